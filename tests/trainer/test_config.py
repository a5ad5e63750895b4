"""PPOConfig: validation, derived sizes, the checkpoint check."""

from __future__ import annotations

import logging

import pytest

from trainer.config import PPOConfig


def test_invalid_values_are_refused_by_name():
    with pytest.raises(ValueError, match="0 < clip_eps < 1.*is_weight_cap >= 1"):
        PPOConfig(clip_eps=0.0, is_weight_cap=0.5)


def test_derived_sizes():
    config = PPOConfig(num_minibatches=4, lora_layers_fraction=0.5)
    assert [config.minibatch_size(n) for n in (16, 17, 3)] == [4, 5, 1]
    assert config.lora_layers(30) == list(range(15, 30))
    assert config.lora_layers(2) == [1]
    assert PPOConfig(lora_layers_fraction=1.0).lora_layers(3) == [0, 1, 2]
    lora = config.lora_config(30)
    assert (lora.r, lora.lora_alpha, lora.layers_to_transform) == (16, 32, list(range(15, 30)))


def test_checkpoint_check_refuses_another_adapter_shape_and_logs_retuning(caplog):
    saved = PPOConfig().to_dict()
    assert PPOConfig.from_dict(saved) == PPOConfig()
    with pytest.raises(ValueError, match="lora_r \\(saved 16, configured 8\\)"):
        PPOConfig(lora_r=8).check_resumable(saved)
    with caplog.at_level(logging.INFO, logger="trainer.config"):
        PPOConfig(learning_rate=1e-4).check_resumable(saved)
    assert "learning_rate" in caplog.text
    with caplog.at_level(logging.INFO, logger="trainer.config"):  # an older recipe's knob: logged, not refused
        PPOConfig().check_resumable({**saved, "vf_coef": 0.1})
    assert "no longer in PPOConfig: ['vf_coef']" in caplog.text
    with pytest.raises(ValueError, match="unknown PPOConfig fields"):  # a misspelt override is refused
        PPOConfig.from_dict({"learning_rat": 1e-4})
