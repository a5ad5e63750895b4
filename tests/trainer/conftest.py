"""Trainer fixtures: the tiny model wrapped as the trainer wraps the real one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from liveloop.adapter_artifacts import default_lora_config
from trainer.policy import POLICY_ADAPTER


@pytest.fixture
def make_tiny_peft_model(tiny_model_dir: Path) -> Callable[[], PeftModel]:
    """Fresh tiny bases with a "policy" LoRA whose B matrices are random, so the policy differs from the base."""

    def make() -> PeftModel:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, default_lora_config(r=8, alpha=16), adapter_name=POLICY_ADAPTER)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f"lora_B.{POLICY_ADAPTER}." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        return model.eval()  # get_peft_model leaves the wrapper in training mode; peft's adapter_names needs eval

    return make


@pytest.fixture
def tiny_peft_model(make_tiny_peft_model: Callable[[], PeftModel]) -> PeftModel:
    return make_tiny_peft_model()


@pytest.fixture
def torch_one_thread():
    """One intra-op thread for tiny models: their ops are too small to split, and on a shared 2-core machine
    two threads waiting for each other made the PPO tests 50× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
