"""Token ids to streamed text: incremental detokenisation plus stop strings.

``tokenizers``' ``DecodeStream`` turns ids into text chunks as they arrive and holds back a token that ends in the
middle of a multi-byte character. On top of it, text that could still turn into a stop string is held back too,
so a client never sees the start of a stop string that later completes. Special tokens (EOS, chat markers) add
no text.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalText:
    """The text of one completion, built one token at a time."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._held = ""  # decoded, not yet released: a prefix of some stop string
        self.text = ""  # released so far
        self.stopped = False  # a stop string appeared; nothing more is released

    def push(self, token_id: int) -> str:
        """Add one token; return the text it releases (maybe "")."""
        if self.stopped:
            return ""
        self._held += self._decoder.step(self._tokenizer, token_id) or ""
        cut = min((i for i in (self._held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._held) - self._stop_prefix_length())

    def flush(self) -> str:
        """Release what was held back for a stop string that will not come (the completion ended otherwise)."""
        return "" if self.stopped else self._release(len(self._held))

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that is the start of a stop string."""
        return max((n for s in self._stop for n in range(min(len(s) - 1, len(self._held)), 0, -1)
                    if self._held.endswith(s[:n])), default=0)

    def _release(self, upto: int) -> str:
        out, self._held = self._held[:upto], self._held[upto:]
        if self.stopped:
            self._held = ""
        self.text += out
        return out
