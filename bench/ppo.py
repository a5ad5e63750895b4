"""One PPO update, liveloop's against a naive implementation and against TRL's PPOTrainer, measured in one run.

    python bench/ppo.py

16 sequences × (40 prompt + 128 response) tokens (``--shape``) on the packaged SmolLM2-135M (fp32), rank-16 LoRA,
the default PPOConfig's epochs and minibatches. Each variant runs in its own subprocess, so its peak RSS
(``ru_maxrss``) is its own:

- ``ours``: ``trainer.update.ppo_update`` with the default PPOConfig (LoRA on the upper half of the layers, the
  frozen lower half computed once per batch, chunked chosen-token log-probs, reference = adapter off);
- ``ours-upper-quarter``, ``ours-all-layers``: the same with LoRA on the top quarter / on every layer, to show
  what the split trunk contributes;
- ``naive``: the same update loop and math, but the model side written the straightforward way: LoRA on every
  layer, a deep-copied base as the reference, the full forward per pass and full-vocabulary log_softmaxes (and
  the KL to the reference) through autograd;
- ``trl``: the peer, TRL 1.12's ``PPOTrainer`` (``trl.experimental.ppo``, the last release that ships it; ``pip
  install -e '.[bench]'``) with the same r16 LoRA on the seven projections of every layer (peft, reference =
  adapter off) and its own value and reward models, as TRL trains: one update of 16 prompts of 40 tokens, its own
  generation of 128 tokens each (no stop token, so every response is full length), scoring, GAE, then the same
  epochs × minibatches (one optimiser step per minibatch). Its generation is timed apart: liveloop's update trains
  on samples served already, so "score + epochs" is the like-for-like part and the whole update is printed too.

tokens/s counts (prompt + response) tokens × epochs per second of the update, as /work/shared/PERF.md does, and
the ratios of every liveloop variant's tokens/s and peak RSS against TRL's are printed at the end; CPU seconds are
printed too, as the wall clock of a shared machine depends on its neighbours (the load average is printed before
and after). Token ids are random: an update's cost does not depend on what they say.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveloop.adapter_artifacts import default_lora_config  # noqa: E402
from liveloop.model import load_base_model, prepare_base_model  # noqa: E402
from liveloop.settings import Settings  # noqa: E402
from trainer.config import PPOConfig  # noqa: E402
from trainer.policy import PaddedBatch, Policy, TokenOutputs  # noqa: E402
from trainer.update import Sample, ppo_update  # noqa: E402


@dataclass(frozen=True)
class Shape:
    batch: int = 16
    prompt: int = 40
    response: int = 128

    @property
    def tokens(self) -> int:
        return self.batch * (self.prompt + self.response)


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


def make_samples(vocab: int, shape: Shape) -> list[Sample]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (shape.batch, shape.prompt + shape.response), generator=generator)
    scores = torch.randn(shape.batch, generator=generator)
    return [Sample(prompt_ids=row[:shape.prompt].tolist(), response_ids=row[shape.prompt:].tolist(),
                   behaviour_logprobs=[-10.0] * shape.response, score=float(score), temperature=1.0)
            for row, score in zip(tokens, scores, strict=True)]


def run_variant(variant: str, shape: Shape) -> dict:
    """One update in this process; what the parent prints."""
    torch.manual_seed(0)
    if variant == "trl":
        return run_trl(shape)
    policy = build_policy(variant)
    samples = make_samples(policy.causal_lm.config.vocab_size, shape)
    with measured(variant, shape) as result:
        metrics = ppo_update(policy, samples)
    assert metrics["applied"] == 1.0, metrics
    return result


@contextmanager
def measured(variant: str, shape: Shape) -> Iterator[dict]:
    """Times the block: the result dict is filled in when it ends (``started``/``ended`` are Unix times, for
    bench/colocated.py to line the update up with the load beside it)."""
    result = {"variant": variant, "started": time.time()}
    started, cpu_started = time.perf_counter(), time.process_time()
    yield result
    seconds = time.perf_counter() - started
    result |= {"ended": time.time(), "seconds": seconds, "cpu_seconds": time.process_time() - cpu_started,
               "tokens_per_s": shape.tokens * PPOConfig().ppo_epochs / seconds,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_trl(shape: Shape) -> dict:
    """TRL's PPOTrainer on the same shape, one update; its generation timed apart (module docstring)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer, ppo_trainer

    _, path = prepare_base_model(Settings())
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value, reward = (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
                     for _ in range(2))
    ours = PPOConfig()
    # ordinary tokens only: TRL masks the pad id wherever it appears
    prompts = torch.randint(256, policy.config.vocab_size, (shape.batch, shape.prompt),
                            generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLConfig(
            output_dir=tmp, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
            learning_rate=ours.learning_rate, num_ppo_epochs=ours.ppo_epochs, num_mini_batches=ours.num_minibatches,
            per_device_train_batch_size=shape.batch, gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=shape.batch, total_episodes=shape.batch, response_length=shape.response,
            stop_token=None, num_sample_generations=0)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                             value_model=value, train_dataset=Dataset.from_dict({"input_ids": prompts.tolist()}),
                             peft_config=default_lora_config(r=ours.lora_r, alpha=ours.lora_alpha))
        generation = {"seconds": 0.0}
        batch_generation = ppo_trainer.batch_generation

        def timed_generation(*args, **kwargs):
            started = time.perf_counter()
            try:
                return batch_generation(*args, **kwargs)
            finally:
                generation["seconds"] += time.perf_counter() - started

        ppo_trainer.batch_generation = timed_generation  # looked up by train() at each update
        with measured("trl", shape) as result:
            trainer.train()
    score_and_epochs = result["seconds"] - generation["seconds"]
    return result | {"generation_seconds": generation["seconds"],
                     "score_epochs_tokens_per_s": result["tokens_per_s"] * result["seconds"] / score_and_epochs}


def compare(results: dict[str, dict], peer: str) -> None:
    base = results[peer]
    for variant, r in results.items():
        if variant != peer:
            line = (f"{variant} / {peer}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}× tokens/s "
                    f"({base['cpu_seconds'] / r['cpu_seconds']:.2f}× by CPU time)")
            if "score_epochs_tokens_per_s" in base:
                line += f", {r['tokens_per_s'] / base['score_epochs_tokens_per_s']:.2f}× its score + epochs"
            print(f"{line}, {r['peak_rss_gib'] / base['peak_rss_gib']:.2f}× peak RSS")


def main() -> None:
    variants = [*VARIANTS, "trl"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=variants, help="run one variant in this process (used internally)")
    parser.add_argument("--only", nargs="+", choices=variants, default=variants, help="variants to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 40, 128], metavar=("BATCH", "PROMPT", "RESPONSE"),
                        help="sequences and their prompt and response tokens (smaller only to check the bench runs)")
    args = parser.parse_args()
    shape = Shape(*args.shape)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, shape)))
        return
    if "trl" in args.only and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e '.[bench]'): the TRL row is skipped")
        args.only.remove("trl")
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {shape}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for variant in args.only:
        command = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads),
                   "--shape", *map(str, args.shape)]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        results[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:18s} {r['seconds']:7.1f} s ({r['cpu_seconds']:6.1f} s CPU)  "
              f"{r['tokens_per_s']:6.1f} tokens/s  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
        if "generation_seconds" in r:
            print(f"{'':18s} of which generation {r['generation_seconds']:.1f} s; score + epochs "
                  f"{r['score_epochs_tokens_per_s']:.1f} tokens/s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for peer in ("naive", "trl"):
        if peer in results:
            compare(results, peer)


if __name__ == "__main__":
    main()
