"""Kernel: aggregating N updates of P float32 parameters, in update-bytes per second.

Ours is the daemon's path: received safetensors bytes, placed by the server's ``read_body`` so that the
data section is 64-byte aligned → ``decode_update`` (validates the header; uses the tensors in place,
no copy) → ``fedavg_fold_many_checked`` in groups of 8 (jitted; the same pass says whether every value
was finite, so the values are read once; the daemon folds the uploads that arrive while a commit
syncs), for all N, then ``block_until_ready``. The floor is a jitted sum over the same bytes, already
on the device (and via ``device_put`` from aligned numpy): reading every byte once is the least any aggregation must
do. The machine's read bandwidth over the same bytes (one jitted sum over all N at once) is reported too.
Ours and every baseline run in turn, round after round; each ratio is the median over the rounds, with its
spread.
Baselines: Flower's ``aggregate`` (on ndarrays, as FedAvg(inplace=False) calls it after deserializing)
and ``aggregate_inplace`` (on FitRes with serialized Parameters, as FedAvg's default calls it, including
the deserialization), and a plain numpy ``acc += w * u`` loop.
The robust kernels (median, trimmed mean, Krum distances) run over k updates in coordinate chunks, as
the daemon streams them, against a jitted sum over the same chunks.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Profile, Result, best_of, interleaved
from fedscaled.core import aggregate, codec
from fedscaled.core.aligned import aligned_at, aligned_empty, as_aligned
from fedscaled.core.models import TensorSpec, build

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
CHUNK = 1 << 16  # coordinates per robust-kernel block (the kernels' docstring measured 64Ki)


def specs_for(num_params: int) -> tuple[TensorSpec, ...]:
    """The layout of a linear model of about ``num_params`` parameters, in the daemon's wire order."""
    return codec.wire_order(build("linear", (max(1, num_params // 10), 1, 1), 10).specs)


def received(body: bytes) -> memoryview:
    """``body`` where the daemon's read_body puts received bytes: data section 64-byte aligned."""
    start = codec.data_offset(body)
    placed = aligned_at(len(body), start if start is not None else 0)
    placed[:] = np.frombuffer(body, dtype=np.uint8)
    return placed.data


def make_updates(specs: Sequence[TensorSpec], n: int, seed: int = 0
                 ) -> tuple[list[memoryview], list[FloatArray]]:
    """``n`` distinct safetensors bodies as the daemon has received them, and their flat vectors."""
    total = codec.num_params(specs)
    base = np.random.default_rng(seed).standard_normal(total, dtype=np.float32)
    bodies = [received(codec.encode_model(base + np.float32(i * 1e-3), specs,
                                          {"samples": str(10 + i), "loss": "0.5"}))
              for i in range(n)]
    flats = [codec.decode_update(b, specs).flat for b in bodies]
    return bodies, flats


def weights(n: int) -> list[float]:
    """The FedAvg weights (sample counts) of the ``n`` updates."""
    return [float(10 + i) for i in range(n)]


# Updates folded per kernel call: under concurrent uploads the daemon's group commit releases several
# accepted uploads at once and the runner folds them together (JobRunner._flush_folds).
DAEMON_FOLD_GROUP = 8


def time_ours(bodies: Sequence[memoryview], specs: Sequence[TensorSpec], group: int = DAEMON_FOLD_GROUP) -> float:
    """Seconds for the daemon's decode (validation, in place) + grouped fold of every body."""
    total = codec.num_params(specs)
    ws = weights(len(bodies))
    state = aggregate.fedavg_init(total)
    state.acc.block_until_ready()
    began = time.perf_counter()
    pending: list[FloatArray] = []
    pending_w: list[float] = []
    for body, w in zip(bodies, ws, strict=True):
        # Values are checked by the fold itself (one pass), as JobRunner/DurableSum do for FedAvg.
        pending.append(codec.decode_update(body, specs, check_finite=False).flat)
        pending_w.append(w)
        if len(pending) == group:
            state, finite = aggregate.fedavg_fold_many_checked(state, pending, pending_w, donate=True)
            assert finite
            pending, pending_w = [], []
    if pending:
        state, finite = aggregate.fedavg_fold_many_checked(state, pending, pending_w, donate=True)
        assert finite
    state.acc.block_until_ready()
    return time.perf_counter() - began


_sum = jax.jit(jnp.sum)


def time_floor_device(arrays: Sequence[jax.Array]) -> float:
    """Seconds for a jitted sum over every array, already on the device."""
    began = time.perf_counter()
    outs = [_sum(a) for a in arrays]
    for o in outs:
        o.block_until_ready()
    return time.perf_counter() - began


def time_floor_put(flats: Sequence[FloatArray]) -> float:
    """Seconds for device_put (zero-copy when aligned) + jitted sum over every aligned numpy vector."""
    began = time.perf_counter()
    outs = [_sum(jax.device_put(f)) for f in flats]
    for o in outs:
        o.block_until_ready()
    return time.perf_counter() - began


def time_numpy(flats: Sequence[FloatArray]) -> float:
    """Seconds for a plain numpy weighted-sum loop."""
    ws = weights(len(flats))
    began = time.perf_counter()
    acc = np.zeros(flats[0].shape, np.float32)
    for u, w in zip(flats, ws, strict=True):
        acc += np.float32(w) * u
    acc /= np.float32(sum(ws))
    return time.perf_counter() - began


def flower() -> Any | None:
    """Flower's aggregate module and common types, or None when flwr is not installed."""
    try:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.server.strategy import aggregate as flower_aggregate
    except ImportError:
        return None
    return (flower_aggregate, Code, FitRes, Status, ndarrays_to_parameters)


def flower_timers(flats: Sequence[FloatArray], specs: Sequence[TensorSpec]
                  ) -> tuple[Callable[[], float], Callable[[], float]] | None:
    """Timers (each returns seconds) of Flower's ``aggregate`` and ``aggregate_inplace`` over the same updates,
    or None when flwr is not installed."""
    fl = flower()
    if fl is None:
        return None
    flower_aggregate, code, fit_res, status, to_parameters = fl
    ws = weights(len(flats))
    as_lists = [list(codec.unflatten(f, specs).values()) for f in flats]
    results = [(arrays, int(w)) for arrays, w in zip(as_lists, ws, strict=True)]

    def plain() -> float:
        began = time.perf_counter()
        flower_aggregate.aggregate(results)
        return time.perf_counter() - began

    # FedAvg's default (inplace=True): FitRes carries serialized Parameters; aggregate_inplace
    # deserializes each one (parameters_to_ndarrays) and scales and adds in place. The ClientProxy is
    # unused by the function; None stands in for it.
    fit_results = [(None, fit_res(status=status(code.OK, ""), parameters=to_parameters(arrays), num_examples=int(w),
                                  metrics={}))
                   for arrays, w in zip(as_lists, ws, strict=True)]

    def inplace() -> float:
        began = time.perf_counter()
        flower_aggregate.aggregate_inplace(fit_results)
        return time.perf_counter() - began

    return plain, inplace


def _chunks(flats: Sequence[FloatArray], k: int) -> list[jax.Array]:
    """The first ``k`` updates as (k, CHUNK) device blocks over the coordinates (last one zero-padded)."""
    total = flats[0].shape[0]
    blocks = []
    for lo in range(0, total, CHUNK):
        hi = min(lo + CHUNK, total)
        block = aligned_empty(k * CHUNK, np.float32).reshape(k, CHUNK)
        block[:, hi - lo:] = 0
        for i in range(k):
            block[i, : hi - lo] = flats[i % len(flats)][lo:hi]
        blocks.append(jax.device_put(block))
    return blocks


def _time_chunks(fn: Callable[[list[jax.Array]], jax.Array], blocks: list[jax.Array]) -> float:
    fn(blocks[:1]).block_until_ready()  # compile
    began = time.perf_counter()
    fn(blocks).block_until_ready()
    return time.perf_counter() - began


def robust(flats: Sequence[FloatArray], k: int, profile: Profile) -> list[Result]:
    """Median, trimmed mean and Krum distances over ``k`` updates, against a chunked jitted sum."""
    blocks = _chunks(flats, k)
    total = flats[0].shape[0]
    nbytes = len(blocks) * k * CHUNK * 4
    trim = max(1, k // 10)

    def floor(bs: list[jax.Array]) -> jax.Array:
        outs = [_sum(b) for b in bs]
        stacked: jax.Array = jnp.stack(outs)
        return stacked

    def median(bs: list[jax.Array]) -> jax.Array:
        outs = [aggregate.median_chunk(b) for b in bs]
        for o in outs[:-1]:
            o.block_until_ready()
        last: jax.Array = outs[-1]
        return last

    def trimmed(bs: list[jax.Array]) -> jax.Array:
        outs = [aggregate.trimmed_mean_chunk(b, trim=trim) for b in bs]
        for o in outs[:-1]:
            o.block_until_ready()
        last: jax.Array = outs[-1]
        return last

    def krum(bs: list[jax.Array]) -> jax.Array:
        acc = aggregate.pairwise_sq_dists_init(k)
        for b in bs:
            acc = aggregate.pairwise_sq_dists_accumulate(acc, b)
        scores: jax.Array = aggregate.krum_scores(acc, max(0, (k - 3) // 2))
        return scores

    t_floor = best_of(lambda: _time_chunks(floor, blocks), profile.repeats)
    out = []
    for name, fn in (("median", median), ("trimmed mean", trimmed), ("krum distances", krum)):
        t = best_of(partial(_time_chunks, fn, blocks), profile.repeats)
        out.append(Result(f"kernel {name} k={k} P={total:.0e}", nbytes / t, "B/s", "chunked jitted sum (floor)",
                          nbytes / t_floor, params={"k": k, "P": total, "chunk": CHUNK, "seconds": t,
                                                    "floor_seconds": t_floor, "trim": trim}))
    return out


# Rounds of the interleaved fedavg comparison: a median needs a few more runs than a best-of.
MIN_ROUNDS = 5
# Kernel targets of "Performance, round two" (ratios to the baselines measured in the same run).
FLOOR_TARGET = 0.7
FLOWER_PLAIN_TARGET = 3.0
FLOWER_INPLACE_TARGET = 5.0


def fedavg(p: int, n: int, profile: Profile) -> tuple[list[Result], list[FloatArray]]:
    """The fedavg figures at about ``p`` params and ``n`` updates, and the decoded updates (for the robust
    kernels). Ours and every baseline run in turn in each round; the ratio is the median of the rounds'."""
    specs = specs_for(p)
    total = codec.num_params(specs)
    bodies, flats = make_updates(specs, n)
    nbytes = n * total * 4
    # Warm up every jitted function at this shape (compilation is not part of the figure).
    time_ours(bodies, specs)
    device = [jax.device_put(as_aligned(f)) for f in flats]
    time_floor_device(device[:1])
    whole = jax.device_put(as_aligned(np.concatenate(flats)))
    time_floor_device([whole])
    baselines: dict[str, Callable[[], float]] = {
        "memory floor: jitted sum per update": partial(time_floor_device, device),
        "read bandwidth: one jitted sum over all N": partial(time_floor_device, [whole]),
        "floor via device_put": partial(time_floor_put, flats),
        "numpy acc += w*u loop": partial(time_numpy, flats),
    }
    targets = {"memory floor: jitted sum per update": FLOOR_TARGET}
    notes = {"read bandwidth: one jitted sum over all N": "the machine's read bandwidth over the same bytes "
                                                          "(one dispatch, no per-update boundaries)"}
    timers = flower_timers(flats, specs)
    if timers is not None:
        baselines["Flower aggregate (ndarrays)"], baselines["Flower aggregate_inplace (Parameters)"] = timers
        targets["Flower aggregate (ndarrays)"] = FLOWER_PLAIN_TARGET
        targets["Flower aggregate_inplace (Parameters)"] = FLOWER_INPLACE_TARGET
        notes["Flower aggregate (ndarrays)"] = "Flower's input is already deserialized; ours starts from received bytes"
        notes["Flower aggregate_inplace (Parameters)"] = "includes parameters_to_ndarrays, as FedAvg's default does"
    rounds = max(MIN_ROUNDS, profile.repeats) if profile.name != "smoke" else 1
    paired = interleaved(partial(time_ours, bodies, specs), baselines, rounds)
    label = f"P={total:.0e} N={n}"
    ours_rate = nbytes / paired.median()
    results = []
    for name in baselines:
        ratio, spread = paired.ratio(name)
        target = targets.get(name) if p >= 1_000_000 else None
        result = Result(f"kernel fedavg {label}", ours_rate, "B/s", name, nbytes / paired.median(name),
                        ratio=ratio, ratio_spread=spread, target=f">= {target}" if target else "",
                        params={"N": n, "P": total, "bytes": nbytes, "rounds": rounds,
                                "seconds": paired.ours, "baseline_seconds": paired.baselines[name]},
                        notes=notes.get(name, ""))
        result.target_met = None if target is None else ratio >= target
        results.append(result)
    if timers is None:
        results.append(Result(f"kernel fedavg {label}", ours_rate, "B/s", "Flower aggregate", float("nan"),
                              params={"N": n, "P": total}, notes="skipped: flwr is not installed "
                              "(bash scripts/setup-bench.sh)"))
    device.clear()
    bodies.clear()
    return results, flats


def run(profile: Profile) -> list[Result]:
    """Every kernel figure of the profile."""
    results: list[Result] = []
    for p in profile.kernel_sizes:
        figures, flats = fedavg(p, profile.kernel_n, profile)
        results += figures
        if p in profile.robust_sizes:
            for k in profile.robust_k:
                results += robust(flats, k, profile)
        flats.clear()
        gc.collect()
    return results
