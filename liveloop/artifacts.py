"""Where adapter versions' files live, behind a deliberately narrow interface.

The registry stores a URI per version and knows nothing else about storage. ``LocalArtifactStore`` keeps one
directory per version under ``data_dir/adapters`` (a shared volume when replicas run on several hosts); an
object store needs the same three methods, with ``path`` downloading into a local cache before it answers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from liveloop.adapter_artifacts import AdapterArtifactError, atomic_directory, verify_adapter
from liveloop.settings import Settings


class ArtifactStore(Protocol):
    def put(self, src: Path, *, name: str) -> str:
        """Store a verified adapter directory under the version name; return its URI. Never overwrites."""

    def path(self, uri: str) -> Path:
        """A local directory holding the artifact (for an object store: a downloaded, cached copy)."""

    def verify(self, uri: str, *, sha256: str, base_model_id: str | None = None) -> dict:
        """The manifest of the artifact if its weights match ``sha256``, else AdapterArtifactError."""


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def put(self, src: Path, *, name: str) -> str:
        sha256 = verify_adapter(src)["sha256"]  # a corrupt source is refused before anything is written
        dest = self.root / name
        if dest.exists():  # a retried registration of the same weights is harmless; other weights are not
            try:
                self.verify(dest.as_uri(), sha256=sha256)
            except AdapterArtifactError as exc:
                raise AdapterArtifactError(f"{name} is already stored with other weights: {exc}") from exc
            return dest.as_uri()
        with atomic_directory(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return dest.as_uri()

    def path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise AdapterArtifactError(f"{uri}: this store reads file:// URIs only")
        return Path(url2pathname(parsed.path))

    def verify(self, uri: str, *, sha256: str, base_model_id: str | None = None) -> dict:
        return verify_adapter(self.path(uri), sha256=sha256, base_model_id=base_model_id)


def open_artifact_store(settings: Settings) -> ArtifactStore:
    return LocalArtifactStore(settings.resolved_artifact_dir)
