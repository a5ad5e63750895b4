"""The canary and rollback rules on simulated binomial ratings, at the settings' defaults (or overrides).

    python bench/canary.py [--canaries 10000] [--seed 0] [--base 0.3] [--fraction 0.5]

Canaries: each rating goes to the canary with probability ``canary_fraction`` and is up with its side's rate;
the rule looks after every rating (``liveloop.promotion.simulate_canaries``). Three cases: equal rates (random
raters), the canary 10 points better, 10 points worse. Reported: the share promoted, rejected by the test and
rejected at the cap, and the ratings (both sides) a decision took, mean and 90th percentile. Then the same with 8
users who each stay on one side and differ in how often they press thumbs up (``simulate_user_canaries``).

Head to head: the same rule (one SPRT, the same α and β) when some or all ratings are comparisons of two answers;
a comparison by a user of the canary's side is a paired vote (live against canary), one by another user compares
two live answers and does not count. Thumbs only against comparisons at the canary share, and with every user
comparing live with canary; votes under Thurstone's model (``latent_preference``) and under the least a vote can
carry (``coin_preference``); then with 8 users of unlike habits. Reported: outcomes, and the ratings of all users
(thumbs and comparisons) a decision took: mean, median, 90th percentile.

Rollbacks: a reference of 100, 400 or 1,000 ratings of the predecessor, then up to 2,000 of the new version, the
rule looked at after each (``simulate_rollbacks``). Reported: the share rolled back, and after how many ratings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveloop.promotion import (  # noqa: E402
    CanaryRule,
    Outcome,
    RollbackRule,
    coin_preference,
    latent_preference,
    simulate_canaries,
    simulate_rollbacks,
    simulate_user_canaries,
)
from liveloop.settings import Settings  # noqa: E402


def chunked(simulate, count: int, seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``simulate`` for ``count`` canaries, 1,000 at a time so that memory stays near 100 MB."""
    runs = [simulate(canaries=min(1000, count - start), seed=seed + start, **kwargs) for start in range(0, count, 1000)]
    return np.concatenate([o for o, _ in runs]), np.concatenate([n for _, n in runs])


def canaries(settings: Settings, base: float, count: int, seed: int) -> None:
    rule = CanaryRule.from_settings(settings)
    print(f"canary: fraction {settings.canary_fraction}, effect {rule.effect}, alpha {rule.alpha}, beta {rule.beta}, "
          f"min {rule.min_ratings} per side, cap {rule.max_ratings} in all; {count} canaries, live rate {base}")
    print(f"{'case':<22}{'promoted':>10}{'rejected':>10}{'at cap':>9}{'ratings mean':>14}{'p90':>7}")
    for case, delta in [("equal (random raters)", 0.0), ("10 points better", 0.1), ("10 points worse", -0.1)]:
        outcomes, ratings = chunked(simulate_canaries, count, seed, p_canary=base + delta, p_live=base, rule=rule,
                                    fraction=settings.canary_fraction)
        shares = [np.mean(outcomes == o) for o in (Outcome.PROMOTE, Outcome.REJECT, Outcome.CAP)]
        print(f"{case:<22}" + "".join(f"{s:>10.1%}" for s in shares[:2]) + f"{shares[2]:>9.1%}"
              f"{ratings.mean():>14.0f}{np.percentile(ratings, 90):>7.0f}")


def few_users(settings: Settings, base: float, count: int, seed: int) -> None:
    rule = CanaryRule.from_settings(settings)
    print(f"\ncanary with 8 users, each on one side, their own thumbs-up rates around {base} (sd); {count} canaries")
    print(f"{'case':<22}{'rate sd':>8}{'promoted':>10}{'rejected':>10}{'at cap':>9}{'ratings mean':>14}{'p90':>7}")
    for case, delta in [("equal (random raters)", 0.0), ("10 points better", 0.1)]:
        for rate_sd in (0.0, 0.05, 0.1):
            outcomes, ratings = chunked(simulate_user_canaries, count, seed, p_canary=base + delta, p_live=base,
                                        rule=rule, fraction=settings.canary_fraction, users=8, rate_sd=rate_sd)
            shares = [np.mean(outcomes == o) for o in (Outcome.PROMOTE, Outcome.REJECT, Outcome.CAP)]
            print(f"{case:<22}{rate_sd:>8}" + "".join(f"{s:>10.1%}" for s in shares[:2]) + f"{shares[2]:>9.1%}"
                  f"{ratings.mean():>14.0f}{np.percentile(ratings, 90):>7.0f}")


def head_to_head(settings: Settings, base: float, count: int, seed: int) -> None:
    rule = CanaryRule.from_settings(settings)
    fraction = settings.canary_fraction
    print(f"\nhead to head: one SPRT of thumbs and paired votes, alpha {rule.alpha}, beta {rule.beta}, thumbs effect "
          f"{rule.effect}, vote effect {rule.vote_effect}; {count} canaries, live rate {base}")
    print(f"{'case':<18}{'ratings':<34}{'promoted':>9}{'rejected':>9}{'at cap':>8}{'mean':>7}{'median':>7}{'p90':>6}")
    streams = [("thumbs only", fraction, 0.0, latent_preference),
               ("half comparisons", fraction, 0.5, latent_preference),
               ("comparisons", fraction, 1.0, latent_preference),
               ("comparisons, coin votes", fraction, 1.0, coin_preference),
               ("comparisons, all users", 1.0, 1.0, latent_preference),
               ("comparisons, all users, coin", 1.0, 1.0, coin_preference)]
    for case, delta in [("equal", 0.0), ("10 points better", 0.1), ("10 points worse", -0.1)]:
        for stream, share, comparisons, preference in streams:
            outcomes, ratings = chunked(simulate_canaries, count, seed, p_canary=base + delta, p_live=base, rule=rule,
                                        fraction=share, comparisons=comparisons, preference=preference)
            print(f"{case:<18}{stream:<34}" + _outcomes(outcomes, ratings))
    print(f"\n8 users, each on one side, their own thumbs-up rates around {base} (sd 0.1); {count} canaries")
    for case, delta in [("equal", 0.0), ("10 points better", 0.1)]:
        for stream, comparisons in [("thumbs only", 0.0), ("comparisons", 1.0)]:
            outcomes, ratings = chunked(simulate_user_canaries, count, seed, p_canary=base + delta, p_live=base,
                                        rule=rule, fraction=fraction, users=8, rate_sd=0.1, comparisons=comparisons)
            print(f"{case:<18}{stream:<34}" + _outcomes(outcomes, ratings))


def _outcomes(outcomes: np.ndarray, ratings: np.ndarray) -> str:
    shares = [np.mean(outcomes == o) for o in (Outcome.PROMOTE, Outcome.REJECT, Outcome.CAP)]
    return (f"{shares[0]:>9.1%}{shares[1]:>9.1%}{shares[2]:>8.1%}{ratings.mean():>7.0f}{np.median(ratings):>7.0f}"
            f"{np.percentile(ratings, 90):>6.0f}")


def rollbacks(settings: Settings, base: float, count: int, seed: int) -> None:
    rule = RollbackRule.from_settings(settings)
    print(f"\nrollback: effect {rule.effect}, alpha {rule.alpha}, min {rule.min_ratings} per side; {count} runs, "
          f"predecessor's rate {base}, up to 2000 ratings watched")
    print(f"{'case':<22}{'reference':>10}{'rolled back':>13}{'after mean':>12}{'p90':>7}")
    for case, delta in [("equal", 0.0), ("10 points worse", -0.1)]:
        for reference_n in (100, 400, 1000):
            rolled, after = simulate_rollbacks(base + delta, base, rule, reference_n=reference_n, watched=2000,
                                               runs=count, seed=seed)
            when = (f"{after[rolled].mean():>12.0f}{np.percentile(after[rolled], 90):>7.0f}" if rolled.any()
                    else f"{'-':>12}{'-':>7}")
            print(f"{case:<22}{reference_n:>10}{rolled.mean():>13.1%}{when}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=float, default=0.3, help="live version's thumbs-up rate")
    parser.add_argument("--fraction", type=float, help="override LIVELOOP_CANARY_FRACTION")
    args = parser.parse_args()
    settings = Settings(_env_file=None)
    if args.fraction is not None:
        settings = settings.model_copy(update={"canary_fraction": args.fraction})
    canaries(settings, args.base, args.canaries, args.seed)
    few_users(settings, args.base, args.canaries, args.seed)
    head_to_head(settings, args.base, args.canaries, args.seed)
    rollbacks(settings, args.base, args.canaries, args.seed)


if __name__ == "__main__":
    main()
