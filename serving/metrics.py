"""Prometheus metrics of the API process (``/metrics``; these live in the default registry).

Where vLLM has a metric of the same meaning, it has vLLM's name with ``liveloop_`` for ``vllm:`` (colons are
reserved for recording rules), so operators' vLLM dashboards and habits carry over. docs/metrics.md lists them all.
Every engine in a process reports into the same series; a serving process has exactly one engine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)

# --- the engine, by vLLM's names --------------------------------------------------------------------------------
WAITING = Gauge("liveloop_num_requests_waiting", "Requests waiting for a slot in the running batch.")
RUNNING = Gauge("liveloop_num_requests_running", "Requests in the running batch.")
GENERATED_TOKENS = Counter("liveloop_generation_tokens_total", "Tokens sampled by the engine.")
PROMPT_TOKENS = Counter("liveloop_prompt_tokens_total", "Prompt tokens prefilled by the engine.")
PREFIX_CACHE_QUERIES = Counter("liveloop_prefix_cache_queries_total",
                               "Prompt tokens of prefilled prompts looked up in the prefix cache.")
PREFIX_CACHE_HITS = Counter("liveloop_prefix_cache_hits_total",
                            "Prompt tokens found in the prefix cache (their keys and values reused, not prefilled).")
TIME_TO_FIRST_TOKEN = Histogram(
    "liveloop_time_to_first_token_seconds", "From submit to the first sampled token (queueing plus prefill).",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "liveloop_time_per_output_token_seconds", "Between two consecutive sampled tokens of a request.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5),
)
E2E_LATENCY = Histogram(
    "liveloop_e2e_request_latency_seconds", "From submit to the last token of a finished request.",
    buckets=_LATENCY_BUCKETS,
)

# --- the engine, liveloop's own ---------------------------------------------------------------------------------
ADAPTERS_LOADED = Gauge("liveloop_engine_adapters_loaded", "Adapter versions loaded and servable.")
FINISHED = Counter("liveloop_engine_requests_finished_total", "Finished requests by reason.", ["finish_reason"])
STEP_SECONDS = Histogram(
    "liveloop_engine_step_seconds",
    "Duration of one engine phase: prefill of newly admitted requests, or one decode step of the batch.",
    ["phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0),
)
# The invariant PPO relies on: the recorded behaviour log-prob equals a full-forward recompute with the same
# sampling parameters. fp32 agrees to ~1e-5 nats; bf16 to a few hundredths; a jump means the two paths diverged.
LOGPROB_MISMATCH = Histogram(
    "liveloop_logprob_mismatch_nats",
    "Per spot-checked completion: max |recorded - recomputed| behaviour log-prob over its tokens.",
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0),
)
LOGPROB_MISMATCH_LAST = Gauge("liveloop_logprob_mismatch_last_nats", "The latest spot check's max mismatch.")

# --- HTTP and feedback ------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "liveloop_http_requests_total", "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "liveloop_http_request_duration_seconds",
    "From a request's arrival to its response's last byte (a streamed answer's whole generation).",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
RATINGS = Counter("liveloop_feedback_ratings_total", "Ratings stored, by thumb (a change of mind counts again).",
                  ["rating"])
for thumb in ("up", "down"):  # both series exist from the start, at 0
    RATINGS.labels(thumb)
COMPARISONS = Counter("liveloop_feedback_comparisons_total",
                      "Comparisons stored (a change of mind counts again).")
