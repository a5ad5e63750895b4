"""One PPO update, liveloop's against a naive implementation, measured in the same run.

    python bench/ppo.py

16 sequences × (40 prompt + 128 response) tokens on the packaged SmolLM2-135M (fp32), rank-16 LoRA, the default
PPOConfig's epochs and minibatches. Each variant runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own:

- ``ours``: ``trainer.update.ppo_update`` with the default PPOConfig (LoRA on the upper half of the layers, the
  frozen lower half computed once per batch, chunked chosen-token log-probs, reference = adapter off);
- ``ours-upper-quarter``, ``ours-all-layers``: the same with LoRA on the top quarter / on every layer, to show
  what the split trunk contributes;
- ``naive``: the same update loop and math, but the model side written the straightforward way: LoRA on every
  layer, a deep-copied base as the reference, the full forward per pass and full-vocabulary log_softmaxes (and
  the KL to the reference) through autograd.

tokens/s counts (prompt + response) tokens × epochs per second of the whole update, as /work/shared/PERF.md
does; CPU seconds are printed too, as the wall clock of a shared machine depends on its neighbours (the load
average is printed before and after). Token ids are random: an update's cost does not depend on what they say.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveloop.model import load_base_model  # noqa: E402
from liveloop.settings import Settings  # noqa: E402
from trainer.config import PPOConfig  # noqa: E402
from trainer.policy import PaddedBatch, Policy, TokenOutputs  # noqa: E402
from trainer.update import Sample, ppo_update  # noqa: E402

BATCH, PROMPT, RESPONSE = 16, 40, 128
VARIANTS = {
    "ours": PPOConfig(),
    "ours-upper-quarter": PPOConfig(lora_layers_fraction=0.25),
    "ours-all-layers": PPOConfig(lora_layers_fraction=1.0),
    "naive": PPOConfig(lora_layers_fraction=1.0),
}


class NaivePolicy(Policy):
    """The model side as a first implementation writes it; the update loop and the math are ppo_update's."""

    def __init__(self, *args, reference: nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids  # nothing is cached: every pass runs the whole model

    def states(self, input_ids: torch.Tensor, batch: PaddedBatch, *, reference: bool = False) -> torch.Tensor:
        model = self.reference if reference else self.causal_lm
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            hidden = model.get_decoder()(input_ids=batch.input_ids).last_hidden_state  # (b, L, H)
            return hidden[torch.arange(len(hidden))[:, None], batch.positions]  # (b, T, H)

    def token_outputs(self, states: torch.Tensor, batch: PaddedBatch,
                      ref_states: torch.Tensor | None = None) -> TokenOutputs:
        lm_head = self.causal_lm.get_output_embeddings()
        logits = lm_head(states)  # (b, T, V)
        logp_all = torch.log_softmax(logits / batch.temperature[:, None, None], dim=-1)
        logprobs = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.mask
        entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.mask
        kl = None
        if ref_states is not None:
            log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(lm_head(ref_states), -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1) * batch.mask
        return TokenOutputs(logprobs, entropy, kl)


def build_policy(variant: str) -> Policy:
    base = load_base_model(Settings())
    config = VARIANTS[variant]
    if variant != "naive":
        return Policy.create(base.model, config, base_model_id=base.model_id)
    reference = copy.deepcopy(base.model)
    policy = Policy.create(base.model, config, base_model_id=base.model_id)
    return NaivePolicy(policy.model, config, base_model_id=base.model_id, reference=reference)


def make_samples(vocab: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, PROMPT + RESPONSE), generator=generator)
    scores = torch.randn(BATCH, generator=generator)
    return [Sample(prompt_ids=row[:PROMPT].tolist(), response_ids=row[PROMPT:].tolist(),
                   behaviour_logprobs=[-10.0] * RESPONSE, score=float(score), temperature=1.0)
            for row, score in zip(tokens, scores, strict=True)]


def run_variant(variant: str) -> dict:
    """One update in this process; what the parent prints."""
    torch.manual_seed(0)
    policy = build_policy(variant)
    samples = make_samples(policy.causal_lm.config.vocab_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics = ppo_update(policy, samples)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert metrics["applied"] == 1.0, metrics
    return {"variant": variant, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_s": BATCH * (PROMPT + RESPONSE) * policy.config.ppo_epochs / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used internally)")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant)))
        return
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for variant in args.only:
        command = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:16s} {r['seconds']:7.1f} s ({r['cpu_seconds']:6.1f} s CPU)  "
              f"{r['tokens_per_s']:6.1f} tokens/s  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    if "naive" in results:
        naive = results["naive"]
        for variant, r in results.items():
            if variant != "naive":
                print(f"{variant} / naive: {r['tokens_per_s'] / naive['tokens_per_s']:.2f}× tokens/s "
                      f"({naive['cpu_seconds'] / r['cpu_seconds']:.2f}× by CPU time), "
                      f"{r['peak_rss_gib'] / naive['peak_rss_gib']:.2f}× peak RSS")


if __name__ == "__main__":
    main()
