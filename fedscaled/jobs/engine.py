"""The round engine host: drives every active job's rounds (filled in by the rounds work)."""

from __future__ import annotations

from fedscaled.jobs.registry import JobRegistry


class Engine:
    """Runs the active jobs of a registry."""

    def __init__(self, registry: JobRegistry, *, max_pending_checkins: int = 20000) -> None:
        self.registry = registry
        self.max_pending_checkins = max_pending_checkins
        self.shutting_down = False

    async def start(self) -> None:
        """Resume active jobs from the store."""

    def begin_shutdown(self) -> None:
        """Stop handing out work; wake held check-ins."""
        self.shutting_down = True

    async def stop(self) -> None:
        """Stop every job's loop (state stays in the store)."""
