"""Finding, checking and holding the on-device artifacts a job serves.

Artifacts are looked up by their key (fedscaled/core/artifact_spec.py) in the daemon's artifact
folder first (``--artifact-dir``, where an operator puts what ``python -m fedscaled_build`` wrote for
a job's own shapes) and then in the package's prebuilt folder. A manifest that does not fit the
key, or a file whose SHA-256 differs from its manifest, is refused with a logged reason: a device
must never train with a program for other shapes. Found artifacts are held in memory (they are
small: kilobytes for the dense models, about 1 MB for MobileNetV3-Small) and served from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedscaled.core import artifact_spec as spec

log = logging.getLogger("fedscaled.artifacts")


@dataclass(frozen=True)
class Artifact:
    """One backend's artifact for one key: the manifest and its files, verified."""

    backend: str
    manifest: bytes
    sha256: str  # of the manifest bytes: the artifact's identity
    files: dict[str, bytes]
    file_sha256: dict[str, str]
    source: Path

    @property
    def total_bytes(self) -> int:
        """Size of the program files."""
        return sum(len(data) for data in self.files.values())


def _load(folder: Path, key: spec.ArtifactKey, backend: str) -> Artifact | None:
    path = folder / key.slug() / backend / spec.MANIFEST
    try:
        manifest_bytes = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("artifact %s unreadable: %s", path, exc)
        return None
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        log.warning("artifact %s is not JSON; ignored", path)
        return None
    problems = spec.check_manifest(manifest, key, backend)
    if problems:
        log.warning("artifact %s does not fit %s: %s; ignored", path, key.slug(), "; ".join(problems))
        return None
    files: dict[str, bytes] = {}
    hashes: dict[str, str] = {}
    for entry in manifest["files"]:
        name = str(entry["name"])
        try:
            data = (path.parent / name).read_bytes()
        except OSError as exc:
            log.warning("artifact %s: file %s unreadable (%s); ignored", path, name, exc)
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            log.warning("artifact %s: file %s has SHA-256 %s, the manifest says %s; ignored", path, name, digest,
                        entry.get("sha256"))
            return None
        files[name] = data
        hashes[name] = digest
    return Artifact(backend, manifest_bytes, hashlib.sha256(manifest_bytes).hexdigest(), files, hashes, path.parent)


class ArtifactCatalog:
    """Artifacts by (key, backend), searched in ``folders`` in order and cached."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = tuple(folders)
        self._cache: dict[tuple[spec.ArtifactKey, str], Artifact | None] = {}

    def find(self, key: spec.ArtifactKey, backend: str) -> Artifact | None:
        """The artifact of ``key`` for ``backend``, or None when no folder has a valid one."""
        cache_key = (key, backend)
        if cache_key not in self._cache:
            found = None
            for folder in self.folders:
                found = _load(folder, key, backend)
                if found is not None:
                    break
            self._cache[cache_key] = found
        return self._cache[cache_key]

    def for_key(self, key: spec.ArtifactKey) -> dict[str, Artifact]:
        """Every backend with a valid artifact for ``key``."""
        found = {backend: self.find(key, backend) for backend in spec.BACKENDS}
        return {backend: artifact for backend, artifact in found.items() if artifact is not None}

    def forget(self, key: spec.ArtifactKey) -> None:
        """Drop cached lookups of ``key`` (a new submit looks again: the operator may have added files)."""
        for backend in spec.BACKENDS:
            self._cache.pop((key, backend), None)
