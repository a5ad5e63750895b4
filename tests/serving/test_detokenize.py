"""IncrementalText on the real SmolLM2 tokenizer: multi-byte characters, stop strings, special tokens."""

from __future__ import annotations

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
