"""Token ids to streamed text: incremental detokenisation plus stop strings.

``tokenizers``' ``DecodeStream`` turns ids into text chunks as they arrive and holds back a token that ends in the
middle of a multi-byte character. On top of it, text that could still turn into a stop string is held back too,
so a client never sees the start of a stop string that later completes. Special tokens (EOS, chat markers) add
no text.

Stop strings are matched one character at a time by a Knuth–Morris–Pratt automaton per string, so each token
costs the length of the text it adds, whatever the length of the held-back text (searching the held text again
on every token cost ~5 ms per token for one stop string of 8,000 characters).
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StopMatcher:
    """Follows, for one stop string, the longest end of the text seen so far that is a start of the string."""

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0  # characters of ``stop`` the text currently ends with
        # fallback[i]: length of the longest proper border (prefix that is also a suffix) of stop[:i + 1]
        self._fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fallback[i] = k

    def feed(self, text: str) -> int:
        """Advance over ``text``; return the index in it just past the first full match, or -1."""
        for i, char in enumerate(text):
            while self.matched and char != self.stop[self.matched]:
                self.matched = self._fallback[self.matched - 1]
            if char == self.stop[self.matched]:
                self.matched += 1
            if self.matched == len(self.stop):
                return i + 1
        return -1


class IncrementalText:
    """The text of one completion, built one token at a time."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._matchers = [StopMatcher(s) for s in stop]
        self._held = ""  # decoded, not yet released: a prefix of some stop string
        self.text = ""  # released so far
        self.stopped = False  # a stop string appeared; nothing more is released

    def push(self, token_id: int) -> str:
        """Add one token; return the text it releases (maybe "")."""
        if self.stopped:
            return ""
        new = self._decoder.step(self._tokenizer, token_id) or ""
        self._held += new
        # where each stop string first ends within the new text, as an index into the held text
        ends = [(len(self._held) - len(new) + end, len(m.stop)) for m in self._matchers if (end := m.feed(new)) >= 0]
        if ends:
            self.stopped = True
            return self._release(min(end - length for end, length in ends))  # the earliest-starting stop wins
        return self._release(len(self._held) - max((m.matched for m in self._matchers), default=0))

    def flush(self) -> str:
        """Release what was held back for a stop string that will not come (the completion ended otherwise)."""
        return "" if self.stopped else self._release(len(self._held))

    def _release(self, upto: int) -> str:
        out, self._held = self._held[:upto], self._held[upto:]
        if self.stopped:
            self._held = ""
        self.text += out
        return out
