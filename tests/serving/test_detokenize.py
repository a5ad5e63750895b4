"""IncrementalText on the real SmolLM2 tokenizer: multi-byte characters, stop strings, special tokens."""

from __future__ import annotations

import random
import time

import pytest
from transformers import AutoTokenizer

from serving.detokenize import IncrementalText


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _push_all(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[IncrementalText, list[str]]:
    stream = IncrementalText(tokenizer.backend_tokenizer, stop)
    return stream, [stream.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def test_multibyte_characters_split_across_tokens_come_out_whole(tokenizer):
    text = "Ça va? 🙂 日本語 — naïve"
    stream, released = _push_all(tokenizer, text)
    assert len(released) > len(text.split())  # the emoji and CJK characters span several byte tokens
    assert "" in released and not any("\ufffd" in r for r in released)
    assert "".join(released) == stream.text == text


def test_stop_string_across_tokens_is_held_back_and_cut(tokenizer):
    text = "The answer is 42, and that is final."
    stream, released = _push_all(tokenizer, text, stop=("is 42",))
    expected = "The answer "
    cumulative = ""
    for chunk in released:
        cumulative += chunk
        assert expected.startswith(cumulative)  # "is" was never shown before we knew it led to the stop
    assert stream.stopped and stream.text == cumulative == expected
    assert stream.flush() == ""


def test_earliest_of_several_stop_strings_wins(tokenizer):
    stream, _ = _push_all(tokenizer, "one two three four", stop=("four", "two"))
    assert stream.stopped and stream.text == "one "


def test_a_held_prefix_is_released_when_the_completion_ends_otherwise(tokenizer):
    stream, released = _push_all(tokenizer, "Hello EN", stop=("END",))
    assert not stream.stopped and "".join(released) == "Hello "
    assert stream.flush() == "EN" and stream.text == "Hello EN"


def test_special_tokens_add_no_text(tokenizer):
    stream = IncrementalText(tokenizer.backend_tokenizer)
    assert stream.push(tokenizer.encode("Hi", add_special_tokens=False)[0]) == "Hi"
    assert stream.push(tokenizer.eos_token_id) == "" and stream.text == "Hi"


def _reference(chunks: list[str], stop: tuple[str, ...]) -> list[str]:
    """What each chunk releases, searching all the held-back text again on every chunk."""
    text, out, released = "", "", []
    for chunk in chunks:
        text += chunk
        held = text[len(out):]
        starts = [i for s in stop if (i := held.find(s)) >= 0]
        keep = 0 if starts else max((n for s in stop for n in range(1, min(len(s) - 1, len(held)) + 1)
                                     if held.endswith(s[:n])), default=0)
        released.append(held[:min(starts)] if starts else held[:len(held) - keep])
        out += released[-1]
        if starts:
            break
    return released


def test_stop_strings_match_a_search_of_the_whole_held_text(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 40)))
        stop = tuple("".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        chunks = _push_all(tokenizer, text)[1]
        released = _push_all(tokenizer, text, stop)[1]
        assert released[:len(_reference(chunks, stop))] == _reference(chunks, stop), (text, stop)


def test_a_long_stop_string_costs_the_new_text_only(tokenizer):
    # every token extends a partial match: searching the held text again made this quadratic per token
    stop = ("a" * 7999 + "b",)
    started = time.perf_counter()
    stream, released = _push_all(tokenizer, "a" * 8000, stop)
    assert time.perf_counter() - started < 1.0
    assert "".join(released) == "a" and stream.flush() == "a" * 7999
