"""Which model versions a job keeps: the latest few, every Nth as a checkpoint, and whatever is in use.

Every closed round stores a new model version (4 bytes per parameter). Kept forever, a 5e6-parameter
model over 1,000 rounds is 20 GB; so a job keeps the latest ``model_retention`` versions (the ones tasks
and stale asynchronous updates are trained from, and the ones ``fedscalectl model`` is usually asked
for), every ``checkpoint_interval``-th version (a sparse history to export or roll back to), version 0
(the initial model), and, with ``save_checkpoint: true`` (FedScale's switch), all of them. When version v
is written, exactly one older version can fall out of the window, ``v - keep``: the caller deletes it in
the same transaction, so the store never holds more than the policy says and never less. LMDB reuses
the freed pages for the next versions: the file stops growing once the window is full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Retention:
    """A job's model retention policy."""

    keep: int  # the latest versions kept (0: keep every version)
    every: int  # also keep each version divisible by this (0: none)

    @classmethod
    def of(cls, values: Mapping[str, Any], *, needed_back: int = 0) -> Retention:
        """The policy of a job's config values. ``needed_back``: how many versions behind the latest a task
        may still be based on (asynchronous jobs: ``max_staleness``); those are kept whatever the setting."""
        if values.get("save_checkpoint"):
            return cls(keep=0, every=0)
        keep = int(values["model_retention"])
        if keep > 0:
            keep = max(keep, needed_back + 1)
        return cls(keep=keep, every=int(values.get("checkpoint_interval", 0)))

    def keeps(self, version: int, latest: int) -> bool:
        """Whether ``version`` stays stored once ``latest`` is the newest version."""
        if self.keep == 0 or version == 0 or version > latest - self.keep:
            return True
        return self.every > 0 and version % self.every == 0

    def falls_out(self, new_version: int) -> int | None:
        """The version to delete when ``new_version`` is written (None: nothing falls out)."""
        if self.keep == 0:
            return None
        old = new_version - self.keep
        if old <= 0 or self.keeps(old, new_version):
            return None
        return old
