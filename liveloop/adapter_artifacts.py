"""LoRA adapter artifacts: one directory per version, written atomically, verified before use.

A directory holds peft's ``adapter_model.safetensors`` and ``adapter_config.json`` plus ``liveloop.json``: the
sha256 of the weights file, the base-model id it was trained on, and free metadata (training config, metrics,
lineage). A version that is not a peft adapter (a reward model: a head on the base model's features) is the same
directory without ``adapter_config.json``, its tensors in the weights file (``save_weights``). ``verify_adapter``
refuses a directory whose weights are missing, corrupt, or made for another base; ``read_adapter`` does the same
checks and returns the weights parsed from the very bytes it hashed, so a file replaced between the check and the
load cannot slip through.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors import SafetensorError
from safetensors.torch import load, save_file

MANIFEST = "liveloop.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# The seven projections of a Llama-style block: attention and MLP, as in the LoRA paper's best setting.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterArtifactError(Exception):
    """The directory is not a usable adapter for this base model."""


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0,
                        layers_to_transform: list[int] | None = None) -> LoraConfig:
    """LoRA on the seven projections of every decoder layer, or of ``layers_to_transform`` only."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none",
                      layers_to_transform=layers_to_transform, task_type="CAUSAL_LM")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(model: PeftModel, adapter_name: str, dest: Path, *, base_model_id: str,
                 metadata: dict | None = None) -> str:
    """Write one adapter of ``model`` to ``dest`` atomically; return the weights' sha256.

    ``dest`` must not exist: version names are immutable, so an existing directory is never overwritten.
    """
    with _version_directory(dest) as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name])
        # peft writes a non-default adapter into a sub-directory named after it
        written = tmp / adapter_name if (tmp / adapter_name / WEIGHTS).is_file() else tmp
        if written != tmp:
            for item in written.iterdir():
                item.rename(tmp / item.name)
            written.rmdir()
        return _write_manifest(tmp, base_model_id=base_model_id, metadata=metadata)


def save_weights(tensors: dict[str, torch.Tensor], dest: Path, *, base_model_id: str,
                 metadata: dict | None = None) -> str:
    """Write a version that is not a peft adapter (named tensors) to ``dest`` atomically; return its sha256."""
    with _version_directory(dest) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS)
        return _write_manifest(tmp, base_model_id=base_model_id, metadata=metadata)


def load_weights(path: Path, *, base_model_id: str | None = None, sha256: str | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``verify_adapter``, then the manifest and the tensors parsed from the bytes that were hashed."""
    manifest = _read_manifest(path)
    data = (path / WEIGHTS).read_bytes()
    _check(path, manifest, hashlib.sha256(data).hexdigest(), base_model_id=base_model_id, sha256=sha256)
    try:
        return manifest, load(data)
    except SafetensorError as exc:
        raise AdapterArtifactError(f"{path}: unreadable {WEIGHTS}: {exc}") from exc


@contextmanager
def _version_directory(dest: Path) -> Iterator[Path]:
    if dest.exists():
        raise AdapterArtifactError(f"{dest} exists; adapter versions are never overwritten")
    with atomic_directory(dest) as tmp:
        yield tmp


def _write_manifest(tmp: Path, *, base_model_id: str, metadata: dict | None) -> str:
    sha = sha256_file(tmp / WEIGHTS)
    manifest = {"sha256": sha, "base_model_id": base_model_id, "metadata": metadata or {}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return sha


@dataclass(frozen=True)
class AdapterWeights:
    """A verified adapter read into memory: its manifest, peft config and weights (keys as peft saves them)."""

    manifest: dict
    config: PeftConfig
    tensors: dict[str, torch.Tensor]


def verify_adapter(path: Path, *, base_model_id: str | None = None, sha256: str | None = None) -> dict:
    """Return the manifest of a complete, uncorrupted adapter directory, or raise AdapterArtifactError."""
    manifest = _read_manifest(path)
    _check(path, manifest, sha256_file(path / WEIGHTS), base_model_id=base_model_id, sha256=sha256)
    return manifest


def read_adapter(path: Path, *, base_model_id: str | None = None, sha256: str | None = None) -> AdapterWeights:
    """``verify_adapter``, then the peft config and the weights parsed from the bytes that were hashed."""
    manifest = _read_manifest(path)
    data = (path / WEIGHTS).read_bytes()
    _check(path, manifest, hashlib.sha256(data).hexdigest(), base_model_id=base_model_id, sha256=sha256)
    if not (path / CONFIG).is_file():
        raise AdapterArtifactError(f"{path}: {CONFIG} is missing")
    try:
        config = PeftConfig.from_pretrained(str(path))
        tensors = load(data)
    except (ValueError, TypeError, SafetensorError) as exc:
        raise AdapterArtifactError(f"{path}: unreadable {CONFIG} or {WEIGHTS}: {exc}") from exc
    config.inference_mode = True
    return AdapterWeights(manifest=manifest, config=config, tensors=tensors)


def _read_manifest(path: Path) -> dict:
    for required in (path / MANIFEST, path / WEIGHTS):
        if not required.is_file():
            raise AdapterArtifactError(f"{path}: {required.name} is missing")
    try:
        return json.loads((path / MANIFEST).read_text())
    except ValueError as exc:
        raise AdapterArtifactError(f"{path}: unreadable {MANIFEST}: {exc}") from exc


def _check(path: Path, manifest: dict, actual: str, *, base_model_id: str | None, sha256: str | None) -> None:
    """Refuse weights whose sha256 ``actual`` is not the manifest's or ``sha256``, or a manifest naming another
    base model."""
    for expected in {manifest.get("sha256"), sha256} - {None}:
        if actual != expected:
            raise AdapterArtifactError(f"{path}: weights sha256 {actual[:12]}… does not match {expected[:12]}…")
    if base_model_id is not None and manifest.get("base_model_id") != base_model_id:
        raise AdapterArtifactError(
            f"{path}: trained on base {manifest.get('base_model_id')!r}, this process serves {base_model_id!r}"
        )


@contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest`` that becomes ``dest`` when the block succeeds (files flushed, then
    one rename) and disappears when it fails: readers see a complete directory or none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        tmp.rename(dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Flush a directory's files and the directory entry itself, so a rename after it is durable."""
    for item in path.iterdir():
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
