"""Downloaded artifacts and frozen tensors, cached by SHA-256 and shared by a simulator's devices.

A task names its artifact as ``{"backend", "manifest", "sha256"}`` and, for a model with a frozen
part, its frozen tensors as ``{"url", "sha256"}`` (docs/protocol.md). Content is fetched once per
hash, checked against that hash (a manifest, then every file against the manifest), and turned into
a ready :class:`~fedscaled.device.backends.Backend`. A phone keeps the same cache on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from fedscaled.core.models import ModelDef
from fedscaled.device.backends import ArtifactBackend, Backend, JaxBackend

NumpyParams = dict[str, np.ndarray]
# (path) -> body: the client's authenticated GET with retries.
Fetch = Callable[[str], Awaitable[bytes]]


class ArtifactMismatch(Exception):
    """Downloaded content does not hash to what the daemon announced."""


def _check(data: bytes, sha256: str, what: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ArtifactMismatch(f"{what} has SHA-256 {digest}, expected {sha256}")


class ArtifactCache:
    """Backends and frozen tensors by content hash; one download per hash however many devices ask."""

    def __init__(self) -> None:
        self._backends: dict[tuple[str, str], Backend] = {}
        self._frozen: dict[str, NumpyParams] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.downloads = 0

    def _lock(self, digest: str) -> asyncio.Lock:
        return self._locks.setdefault(digest, asyncio.Lock())

    async def backend(self, model: ModelDef, ref: Mapping[str, Any], fetch: Fetch) -> Backend:
        """The backend a task's ``artifact`` reference names (JAX needs no download)."""
        name = str(ref.get("backend", "jax"))
        if name == "jax":
            key = ("jax", f"{model.name}{model.input_shape}{model.num_classes}{model.width_multiplier}")
            if key not in self._backends:
                self._backends[key] = JaxBackend(model)
            return self._backends[key]
        digest, manifest_url = str(ref["sha256"]), str(ref["manifest"])
        key = (name, digest)
        async with self._lock(digest):
            if key not in self._backends:
                body = await fetch(manifest_url)
                self.downloads += 1
                _check(body, digest, f"{name} manifest")
                manifest = json.loads(body)
                files: dict[str, bytes] = {}
                for entry in manifest["files"]:
                    data = await fetch(f"{manifest_url}/{entry['name']}")
                    self.downloads += 1
                    _check(data, str(entry["sha256"]), f"{name} file {entry['name']}")
                    files[str(entry["name"])] = data
                self._backends[key] = await asyncio.to_thread(ArtifactBackend, model, manifest, files)
        return self._backends[key]

    async def frozen(self, ref: Mapping[str, Any] | None, fetch: Fetch) -> NumpyParams:
        """A task's frozen tensors (empty for models without any)."""
        if not ref:
            return {}
        digest = str(ref["sha256"])
        async with self._lock(digest):
            if digest not in self._frozen:
                data = await fetch(str(ref["url"]))
                self.downloads += 1
                _check(data, digest, "frozen tensors")
                self._frozen[digest] = dict(st_load(data))
        return self._frozen[digest]
