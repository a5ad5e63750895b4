"""Wall time of one gate run on the packaged SmolLM2-135M (fp32), by the size of the held-out set.

    python bench/gates.py                 # held-out sets of 50 and 500 rated completions
    python bench/gates.py --heldout 2000 --runs 1   # the cold run only

For each size: a fresh SQLite database holding ``size / gate_holdout_fraction`` rated completions (so ``size`` of
them fall in the gates' held-out split), prompts of ~30-40 tokens and responses of 30-256 tokens (the default
max_tokens), a live version and two candidates (LoRA on the trainer's layers, small random B: the drift of a
trained candidate). A gate run is what ``judge_candidate`` does: load the held-out data, then every gate.
The first run is cold (nothing cached); the second gates another candidate against the same live version and
held-out set, as the trainer's next candidate is. Token ids are real text; thumbs and behaviour log-probs are
random: a run's cost does not depend on them. CPU seconds are printed too, as the wall clock of a shared
machine depends on its neighbours (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveloop.adapter_artifacts import save_adapter  # noqa: E402
from liveloop.db import make_engine, make_sessionmaker, migrate  # noqa: E402
from liveloop.model import load_base_model  # noqa: E402
from liveloop.sampling import SamplingParams  # noqa: E402
from liveloop.settings import Settings  # noqa: E402
from liveloop.tables import Completion, Feedback  # noqa: E402
from trainer.config import PPOConfig  # noqa: E402
from trainer.gates import DATA, Gates, load_heldout  # noqa: E402
from trainer.heldout import GATES_SPLIT, is_heldout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def fill(sessions, tokenizer, heldout: int, fraction: float, rng: random.Random) -> None:
    """Rated completions until ``heldout`` of them are in the gates' split."""
    lines = [line for line in (DATA / "prompts.txt").read_text().splitlines() if line.strip()]
    text = tokenizer((DATA / "reference.txt").read_text())["input_ids"]
    held = 0
    with sessions.begin() as session:
        while held < heldout:
            cid = uuid.uuid4().hex
            held += is_heldout(cid, fraction, split=GATES_SPLIT)
            question = f"{rng.choice(lines)} (#{rng.randrange(10**6)})"
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, return_dict=True)["input_ids"]
            length = rng.randint(30, 256)
            start = rng.randrange(len(text) - length)
            response = text[start:start + length]
            session.add(Completion(
                id=cid, requested_model="liveloop", adapter_version=None, messages=[], prompt_token_ids=prompt,
                response_token_ids=response, response_text="", behaviour_logprobs=[-2.0] * length,
                sampling_params=SamplingParams(temperature=1.0).to_dict(), dtype="float32", finish_reason="stop",
                prompt_tokens=len(prompt), completion_tokens=length, latency_ms=1.0))
            rating = rng.choice(["up", "down"])
            session.add(Feedback(id=uuid.uuid4().hex, completion_id=cid, revision=1, rating=rating,
                                 reward=1.0 if rating == "up" else -1.0))


def adapter(model, root: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 1e-3)
    save_adapter(model, "policy", root / name, base_model_id="SmolLM2")
    return root / name


def one_size(heldout: int, base, root: Path, runs: int) -> None:
    settings = Settings(_env_file=None, data_dir=root / "var", model_cache_dir=REPO / "var" / "test-models")
    url = f"sqlite:///{root / 'gates.db'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    fill(sessions, base.tokenizer, heldout, settings.gate_holdout_fraction, random.Random(heldout))
    config = PPOConfig()
    model = get_peft_model(base.model, config.lora_config(base.model.config.num_hidden_layers), adapter_name="policy")
    live, *candidates = (adapter(model, root, name, seed) for seed, name in enumerate(["live", "c1", "c2"][:runs + 1]))
    gates = Gates(model, base.tokenizer, eos_token_ids=base.eos_token_ids, settings=settings)
    results = []
    for candidate in candidates:
        wall, cpu = time.perf_counter(), time.process_time()
        data = load_heldout(sessions, fraction=settings.gate_holdout_fraction, prompts=settings.gate_prompts,
                            rated=settings.gate_reward_samples, rated_tokens=settings.gate_reward_tokens)
        report = gates.evaluate(candidate, live=live, heldout=data)
        results.append({"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                     "prompts": len(data.prompts), "rated": len(data.rated),
                     "failed": report.failed, "reward": _details(report, "reward")})
        print(json.dumps({"heldout": heldout, "run": "warm" if results[:-1] else "cold", **results[-1]}), flush=True)
    model.unload()


def _details(report, name: str) -> dict:
    result = next(r for r in report.results if r.name == name)
    return {"value": result.value, **{k: v for k, v in result.details.items() if k in ("ess", "ci_low", "ci_high",
                                                                                      "skipped")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--runs", type=int, choices=[1, 2], default=2, help="1: the cold run only")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base_model(Settings(_env_file=None, model_cache_dir=REPO / "var" / "test-models"))
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for size in args.heldout:
        with tempfile.TemporaryDirectory() as tmp:
            one_size(size, base, Path(tmp), args.runs)
    print(f"load average after: {os.getloadavg()[0]:.2f}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
