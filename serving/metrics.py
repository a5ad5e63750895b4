"""Prometheus metrics of the generation engine (the app mounts ``/metrics``; these live in the default registry).

Every engine in a process reports into the same series; a serving process has exactly one engine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge("liveloop_engine_queue_depth", "Requests waiting for a slot in the running batch.")
RUNNING = Gauge("liveloop_engine_running_sequences", "Sequences in the running batch.")
ADAPTERS_LOADED = Gauge("liveloop_engine_adapters_loaded", "Adapter versions loaded and servable.")
GENERATED_TOKENS = Counter("liveloop_engine_generated_tokens_total", "Tokens sampled by the engine.")
PROMPT_TOKENS = Counter("liveloop_engine_prompt_tokens_total", "Prompt tokens prefilled by the engine.")
FINISHED = Counter("liveloop_engine_requests_finished_total", "Finished requests by reason.", ["finish_reason"])
STEP_SECONDS = Histogram(
    "liveloop_engine_step_seconds",
    "Duration of one engine phase: prefill of newly admitted requests, or one decode step of the batch.",
    ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "liveloop_engine_time_to_first_token_seconds",
    "From submit to the first sampled token (queueing plus prefill).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0),
)
# The invariant PPO relies on: the recorded behaviour log-prob equals a full-forward recompute with the same
# sampling parameters. fp32 agrees to ~1e-5 nats; bf16 to a few hundredths; a jump means the two paths diverged.
LOGPROB_MISMATCH = Histogram(
    "liveloop_logprob_mismatch_nats",
    "Per spot-checked completion: max |recorded - recomputed| behaviour log-prob over its tokens.",
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0),
)
LOGPROB_MISMATCH_LAST = Gauge("liveloop_logprob_mismatch_last_nats", "The latest spot check's max mismatch.")
