"""The behaviour log-prob invariant, checked on served completions: the log-probs the engine recorded while
decoding in a batch against one full forward over prompt + response (``liveloop.sampling.sequence_logprobs``)."""

from __future__ import annotations

from torch import nn

from liveloop.sampling import sequence_logprobs
from serving import metrics
from serving.request_stream import GenerationRequest, GenerationResult


def logprob_mismatch(model: nn.Module, request: GenerationRequest, result: GenerationResult,
                     slot: str | None) -> float:
    """The largest absolute difference between recorded and recomputed log-probs, also exported as a metric."""
    recomputed = sequence_logprobs(model, request.prompt_ids, result.token_ids, request.params, adapter=slot)
    mismatch = max((abs(a - b) for a, b in zip(result.logprobs, recomputed, strict=True)), default=0.0)
    metrics.LOGPROB_MISMATCH.observe(mismatch)
    metrics.LOGPROB_MISMATCH_LAST.set(mismatch)
    return mismatch
