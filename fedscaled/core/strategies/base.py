"""The server strategy seam: how a round's updates combine and how the result moves the global model.

A strategy is pure logic (no I/O): the round engine folds each accepted upload ``w_k`` into a running
sum with the weight :meth:`ServerStrategy.fold_weight` gives it, keeps the scalar sums
:meth:`ServerStrategy.fold_extras` asks for, and at close turns the weighted mean into the round's
*combined* model (:meth:`ServerStrategy.combine`). Then the server step: FedAvg takes the combined model
as the new global model; the adaptive optimizers of Reddi et al. (ICLR 2021) treat
``global - combined`` as a pseudo-gradient and apply an optax optimizer to it, with state that is stored
durably with the model version it produced.

Adding a strategy is one module in this package, one line in :mod:`fedscaled.core.strategies` (the
registry) and one row in docs/config.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

OptState = Any  # an optax state: a pytree of arrays


class ServerStrategy:
    """FedAvg's behaviour; subclasses override what differs. One instance per job, built from its config."""

    #: the ``gradient_policy`` name (FedScale's where FedScale has one)
    name: ClassVar[str] = "fed-avg"
    #: where the algorithm comes from, for docs and logs
    paper: ClassVar[str] = "McMahan et al., AISTATS 2017"
    #: job keys the strategy reads (documented in its docs row)
    keys: ClassVar[tuple[str, ...]] = ()
    #: whether fold_extras needs each update's squared distance to the global model
    needs_delta_norm: ClassVar[bool] = False
    #: whether the combined model is a weighted mean of the uploads (differential privacy's sensitivity
    #: analysis, and clipping, assume it)
    mean_based: ClassVar[bool] = True

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values
        self._optimizer = self.optimizer()
        self._step = None if self._optimizer is None else jax.jit(partial(_server_step, self._optimizer))

    # ----- combining a round's uploads
    def fold_weight(self, weight: float, loss: float) -> float:
        """The weight of an upload in the running sum, from its FedAvg weight and its reported loss."""
        return weight

    def fold_extras(self, fold_weight: float, loss: float, delta_sq_norm: float, learning_rate: float
                    ) -> dict[str, float]:
        """Scalars to add up over the round's uploads (kept durably with the running sum)."""
        return {}

    def combine(self, mean: jax.Array, global_model: jax.Array, sums: Mapping[str, float], total_weight: float
                ) -> jax.Array:
        """The round's combined model from the weighted mean of its uploads."""
        return mean

    # ----- the server step
    def optimizer(self) -> optax.GradientTransformation | None:
        """The optax optimizer applied to the pseudo-gradient ``global - combined`` (None: take combined)."""
        return None

    @property
    def stateful(self) -> bool:
        """Whether the strategy carries optimizer state from round to round."""
        return self._optimizer is not None

    def init_state(self, global_model: jax.Array) -> OptState | None:
        """The optimizer's state before the first round (None without an optimizer)."""
        return None if self._optimizer is None else self._optimizer.init(global_model)

    def server_step(self, state: OptState | None, global_model: jax.Array, combined: jax.Array
                    ) -> tuple[jax.Array, OptState | None]:
        """The new global model and optimizer state. Jitted once per job: the state and both models are
        traced, so rounds never recompile."""
        if self._step is None:
            return combined, None
        if state is None:
            state = self.init_state(global_model)
        new_model, new_state = self._step(state, global_model, combined)
        return new_model, new_state

    def step_cache_size(self) -> int:
        """How many compilations the server step holds (for no-recompile tests)."""
        return 0 if self._step is None else int(self._step._cache_size())  # type: ignore[attr-defined]

    # ----- what devices are told
    def task_config(self) -> dict[str, Any]:
        """Extra entries of a training task's config (FedProx's ``proxy_mu``)."""
        return {}

    def describe(self) -> str:
        """One line for the job log."""
        settings = ", ".join(f"{k} {self.values[k]:g}" if isinstance(self.values[k], float) else f"{k} {self.values[k]}"
                             for k in self.keys)
        return f"{self.name} ({self.paper}){': ' + settings if settings else ''}"


def _server_step(optimizer: optax.GradientTransformation, state: OptState, global_model: jax.Array,
                 combined: jax.Array) -> tuple[jax.Array, OptState]:
    pseudo_gradient = global_model - combined
    updates, new_state = optimizer.update(pseudo_gradient, state, global_model)
    new_model: jax.Array = optax.apply_updates(global_model, updates)
    return new_model.astype(jnp.float32), new_state


def server_lr(values: Mapping[str, Any], default: float) -> float:
    """``server_lr`` from the job, or the strategy's default when it is 0 (unset)."""
    configured = float(values.get("server_lr", 0.0))
    return configured if configured > 0 else default
