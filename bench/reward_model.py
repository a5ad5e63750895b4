"""How fast the reward model learns a simulated taste on the packaged model, rating by rating.

    python bench/reward_model.py [--tastes numbers,list] [--ratings 1024] [--config JSON]

The base model answers the simulation's training prompts as users are served (temperature 0.7, 48 tokens; the
answers are cached in var/bench/reward-model-answers.json). Each taste rates every answer with a thumb drawn from
its probability of a thumbs-up, and the reward model sees the ratings in batches of 64, one ``train_increment``
each, as the trainer does. After every increment it prints:

- the held-out balanced accuracy and its lower bound, which decide ``usable``;
- AUC on 256 answers it never trains on, against their thumbs, and the Pearson correlation of its score with the
  taste's true probability (what PPO needs is a score that orders answers as the taste does);
- the increment's wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveloop.engine.offline import generate  # noqa: E402
from liveloop.model import load_base_model  # noqa: E402
from liveloop.sampling import SamplingParams  # noqa: E402
from liveloop.settings import Settings  # noqa: E402
from liveloop.simulate.preferences import PREFERENCES  # noqa: E402
from liveloop.simulate.prompts import train_prompts  # noqa: E402
from trainer.config import PPOConfig  # noqa: E402
from trainer.policy import Policy  # noqa: E402
from trainer.reward_model import RatedResponse, RewardModel, RewardModelConfig  # noqa: E402

CACHE = Path("var/bench/reward-model-answers.json")
BATCH, EVAL = 64, 256


def answers(base, count: int) -> list[dict]:
    """``count`` answers of the base model to random training prompts (cached)."""
    if CACHE.exists():
        cached = json.loads(CACHE.read_text())
        if len(cached) >= count:
            return cached[:count]
    rng = random.Random(0)
    prompts = train_prompts()
    chosen = [rng.choice(prompts) for _ in range(count)]
    encoded = [base.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True) for p in chosen]
    prompt_ids = [list(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
    params = SamplingParams(temperature=0.7, max_tokens=48)
    start = time.perf_counter()
    out = generate(base.model, prompt_ids, [params] * count, eos_token_ids=base.eos_token_ids,
                   generator=torch.Generator().manual_seed(0), adapter=None, max_batch_size=32)
    print(f"generated {count} answers in {time.perf_counter() - start:.0f} s", flush=True)
    rows = [{"prompt_ids": list(g.prompt_ids), "response_ids": list(g.response_ids),
             "text": base.tokenizer.decode(g.response_ids, skip_special_tokens=True)} for g in out]
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(rows))
    return rows


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random thumb-up > score of a random thumb-down), ties half."""
    up, down = scores[labels], scores[~labels]
    wins = (up[:, None] > down[None, :]).float() + 0.5 * (up[:, None] == down[None, :]).float()
    return float(wins.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tastes", default="numbers,list,concise,enthusiastic")
    parser.add_argument("--ratings", type=int, default=1024)
    parser.add_argument("--config", default="{}", help="RewardModelConfig overrides as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = load_base_model(Settings())
    rows = answers(base, args.ratings + EVAL)
    train_rows, eval_rows = rows[:args.ratings], rows[args.ratings:]
    config, model = RewardModelConfig(**json.loads(args.config)), base.model
    print(f"{config}", flush=True)
    for name in args.tastes.split(","):
        taste = PREFERENCES[name]
        rng = random.Random(args.seed)
        policy = Policy.create(model, PPOConfig(), base_model_id=base.model_id)
        rm = RewardModel.create(policy.model, base_model_id=base.model_id, pad_token_id=base.tokenizer.pad_token_id,
                                config=config)
        p_true = torch.tensor([taste.p_up(r["text"]) for r in eval_rows])
        eval_features = rm.features([r["prompt_ids"] for r in eval_rows], [r["response_ids"] for r in eval_rows])
        thumbs_eval = torch.tensor([rng.random() < p for p in p_true.tolist()])
        print(f"\n{name}: base rate {sum(taste.p_up(r['text']) for r in rows) / len(rows):.3f}", flush=True)
        for start in range(0, len(train_rows), BATCH):
            rm.add(RatedResponse(str(uuid.UUID(int=rng.getrandbits(128))), tuple(r["prompt_ids"]),
                                 tuple(r["response_ids"]), rng.random() < taste.p_up(r["text"]))
                   for r in train_rows[start:start + BATCH])
            began = time.perf_counter()
            m = rm.train_increment()
            seconds = time.perf_counter() - began
            scores = rm.probe(eval_features)
            corr = float(torch.corrcoef(torch.stack([scores, p_true]))[0, 1])
            ba = "-" if m.heldout_balanced_accuracy is None else f"{m.heldout_balanced_accuracy:.2f}"
            low = "-" if m.heldout_balanced_accuracy_low is None else f"{m.heldout_balanced_accuracy_low:.2f}"
            print(f"  ratings {start + BATCH:5d}  loss {m.loss:.3f}  heldout bal.acc {ba} (low {low}, "
                  f"n {m.n_heldout}) usable {m.usable!s:5}  eval AUC {auc(scores, thumbs_eval):.3f}  "
                  f"corr(score, p) {corr:+.3f}  {seconds:.1f} s", flush=True)
        model = policy.model.unload()  # the next taste starts from the bare base


if __name__ == "__main__":
    main()
