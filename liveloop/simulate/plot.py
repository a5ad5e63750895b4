"""The learning curve of a simulation run (its JSON record) as a PNG.

Top: the users' liked share per window of ratings, the mean P(up) of the answers served (in a comparison run,
of both answers of each pair, so that thumbs and comparison runs share one scale; in a thumbs run also the
thumbs-up share), the pinned evaluations of the base model and of the live version (± one standard error) on the
ratings axis, a vertical line at each promotion, and how often each canary's answer was preferred to the other
version's. Bottom: which version served each rating (both of a comparison).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no global state, no display, safe off the main thread


def windows(values: list[float], size: int) -> tuple[list[float], list[float]]:
    """Per consecutive window of ``size`` ratings: its middle rating index and the mean of ``values`` over it."""
    starts = range(0, len(values) - size + 1, size)
    return [start + size / 2 for start in starts], [sum(values[start:start + size]) / size for start in starts]


def plot_run(record: dict, path: Path) -> None:
    ratings, window = record["ratings"], record["config"]["window"]
    fig = Figure(figsize=(11, 6.5))
    ax, served = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    size = max(1, min(window, len(ratings)))
    compare = record["config"].get("feedback") == "compare"
    if compare:
        ax.plot(*windows([r["p_up"] for r in ratings], size), "o-", color="tab:blue",
                label=f"mean P(up) of both answers of each comparison, per {size} comparisons")
    else:
        ax.plot(*windows([r["rating"] == "up" for r in ratings], size), "o-", color="tab:blue",
                label=f"users' thumbs-up share per {size} ratings")
        ax.plot(*windows([r["p_up"] for r in ratings], size), ".--", color="tab:blue", alpha=0.5,
                label="mean P(up) of the same answers")
    _plot_evals(ax, record)
    _note_canary_comparisons(ax, record.get("canary_comparisons", []))
    _plot_promotions(ax, served, record)
    ax.set_ylim(0, 1)
    ax.set_ylabel("liked share")
    params = record["config"]["params"]
    ax.set_title(f"liveloop simulate, taste '{record['preference']['name']}': {len(ratings)} "
                 f"{'comparisons' if compare else 'ratings'}, "
                 f"{record['config']['users']} concurrent users, max_tokens {params['max_tokens']}, "
                 f"temperature {params['temperature']}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    _plot_served(served, ratings)
    served.set_xlabel("ratings")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _plot_promotions(ax, served, record: dict) -> None:
    """A dotted line at each promotion, named; the span each version was live shaded in turn."""
    promotions = [e for e in record["events"] if e["kind"] == "promotion"]
    edges = [0] + [e["at_rating"] for e in promotions] + [max(len(record["ratings"]), 1)]
    for k, (start, end) in enumerate(zip(edges, edges[1:], strict=False)):
        ax.axvspan(start, end, color="tab:green" if k % 2 else "tab:gray", alpha=0.06, linewidth=0)
    for event in promotions:
        for axis in (ax, served):
            axis.axvline(event["at_rating"], color="tab:red", linestyle=":", linewidth=1.5)
        ax.annotate(f"live: {event['to'] or record['base_model']}", (event["at_rating"], 0.98),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7,
                    color="tab:red")


def _plot_evals(ax, record: dict) -> None:
    styles = {"base": ("tab:gray", "s"), "live": ("tab:green", "D"), "canary": ("tab:orange", "^"),
              "newest": ("tab:blue", "o"), "candidate": ("tab:purple", "v")}
    for role, (color, marker) in styles.items():
        points = sorted((e for e in record["evals"] if e["role"] == role), key=lambda e: e["at_rating"])
        if not points:
            continue
        label = f"pinned eval: {role} ({record['eval_prompts']} unseen prompts, mean P(up) ± s.e.)"
        ax.errorbar([e["at_rating"] for e in points], [e["liked_share"] for e in points],
                    yerr=[e["stderr"] for e in points], color=color, marker=marker, capsize=3,
                    linestyle="-" if role == "live" else "none", drawstyle="steps-post", label=label)
    base = [e for e in record["evals"] if e["role"] == "base"]
    if base:
        ax.axhline(base[0]["liked_share"], color="tab:gray", linewidth=0.8, alpha=0.6)


def _note_canary_comparisons(ax, results: list[dict]) -> None:
    if results:
        lines = [f"{r['canary']} (canary) preferred in {r['won']} of {r['comparisons']} comparisons "
                 f"({r['won_share']:.0%}) against {', '.join(r['against'])}" for r in results]
        ax.text(0.99, 0.02, "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "tab:orange"})


def _served_by(rating: dict) -> list[str]:
    return rating["models"] if "models" in rating else [rating["model"]]  # a comparison's or a thumb's


def _plot_served(ax, ratings: list[dict]) -> None:
    """One tick per rating at the row of each version that served it; rows in order of first appearance."""
    versions = list(dict.fromkeys(model for r in ratings for model in _served_by(r)))
    for row, version in enumerate(versions):
        xs = [i for i, r in enumerate(ratings) if version in _served_by(r)]
        ax.scatter(xs, [row] * len(xs), marker="|", s=60, color=f"C{row % 10}")
    ax.set_yticks(range(len(versions)), versions, fontsize=7)
    ax.set_ylim(-0.7, max(len(versions), 1) - 0.3)
    ax.set_ylabel("served by", fontsize=8)
