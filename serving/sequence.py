"""A served request inside the engine: the core sequence, plus its stream, its text and its stop strings.

The model runner appends each token; this class streams it with the text it adds, ends the sequence when the
text completes a stop string, and hands the finished (or failed) sequence to ``on_done``. Its ``token_ids`` and
``logprobs`` hold every sampled token, including the EOS token and the token that completed a stop string: the
policy chose them and PPO needs their log-probs. Its text excludes the stop string and anything the same token
added after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from liveloop.engine.sequence import Sequence
from serving import metrics
from serving.detokenize import IncrementalText
from serving.request_stream import GenerationRequest, RequestStream, TokenEvent


class ServedSequence(Sequence):
    def __init__(self, request: GenerationRequest, stream: RequestStream, text: IncrementalText, *,
                 slot: str | None, on_done: Callable[[ServedSequence], None]):
        # the request's own generator: the same seed, prompt and adapter give the same tokens whatever the batch
        generator = torch.Generator()
        if request.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.params.seed)
        super().__init__(request.prompt_ids, request.params, generator=generator, adapter=slot)
        self.request, self.stream, self.text = request, stream, text
        self.submitted = self._last_token_at = time.perf_counter()
        self._on_done = on_done

    def append(self, token: int, logprob: float, reason: str | None) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        metrics.GENERATED_TOKENS.inc()
        now = time.perf_counter()
        (metrics.TIME_TO_FIRST_TOKEN if len(self.token_ids) == 1 else metrics.TIME_PER_OUTPUT_TOKEN).observe(
            now - self._last_token_at)
        self._last_token_at = now
        text = "" if reason == "stop" else self.text.push(token)  # the runner's "stop" is an end token
        if self.text.stopped:
            reason = "stop"
        if reason is not None:
            text += self.text.flush()
        self.stream.publish(event=TokenEvent(token, logprob, text))
        if reason is not None:
            self.finish(reason)

    def finish(self, reason: str) -> None:
        super().finish(reason)
        self._on_done(self)

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self._on_done(self)
