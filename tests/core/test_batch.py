"""DecodeBatch: rows joining, leaving and growing the cache give the logits each row gets when decoded alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from liveloop.engine.batch import _SPARE_COLUMNS, DecodeBatch
from liveloop.engine.prefix_cache import Prefix, PrefixCache

PROMPTS = [[1, 504, 3185, 28, 1001], [1, 77, 9], [1, 4000, 4001, 4002, 4003, 4004, 4005, 4006], [1, 12, 13, 14]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def _assert_matches_full_forward(model, prompt: list[int], history: list[torch.Tensor]) -> None:
    """Logits (V,) a row got at each step equal those of one cache-free forward over its greedy continuation."""
    generated = [int(logits.argmax()) for logits in history]
    reference = model(input_ids=torch.tensor([prompt + generated[:-1]]), logits_to_keep=len(generated)).logits[0]
    torch.testing.assert_close(torch.stack(history), reference, rtol=1e-4, atol=1e-4)


def test_prefilled_rows_match_rows_alone_despite_left_padding(model):
    steps = 6
    batch, logits = DecodeBatch.prefill(model, PROMPTS)
    history = [logits]
    for _ in range(steps - 1):
        logits = batch.decode(model, logits.argmax(-1))
        history.append(logits)
    for row, prompt in enumerate(PROMPTS):
        _assert_matches_full_forward(model, prompt, [h[row] for h in history])
    assert batch.positions.tolist() == [len(p) + steps - 1 for p in PROMPTS]


def test_rows_join_and_leave_between_steps_and_padding_columns_are_trimmed(model):
    batch, logits = DecodeBatch.prefill(model, PROMPTS[:2])
    rows, history = [0, 1], {0: [logits[0]], 1: [logits[1]]}
    for step in range(8):
        tokens = logits.argmax(-1)
        if step == 2:  # a longer prompt joins: the running rows get more left padding
            joined, first = DecodeBatch.prefill(model, PROMPTS[2:])
            batch, rows, tokens = batch.merge(joined), rows + [2, 3], torch.cat([tokens, first.argmax(-1)])
            history |= {2: [first[0]], 3: [first[1]]}
        if step == 5:  # the longest row leaves: its padding columns go with it, the rows after it move up
            length_before = batch.length
            order = batch.drop([rows.index(2)])
            rows, tokens = [rows[i] for i in order], tokens[order]
            assert rows == [0, 1, 3]
            assert batch.length < length_before and bool(batch.attention_mask[:, 0].any())
        logits = batch.decode(model, tokens)
        for i, r in enumerate(rows):
            history[r].append(logits[i])
    for r, got in history.items():
        _assert_matches_full_forward(model, PROMPTS[r], got)


def test_cache_grows_past_its_spare_columns(model):
    steps = _SPARE_COLUMNS + 10
    batch, logits = DecodeBatch.prefill(model, PROMPTS[:1])
    history = [logits[0]]
    for _ in range(steps - 1):
        logits = batch.decode(model, logits.argmax(-1))
        history.append(logits[0])
    _assert_matches_full_forward(model, PROMPTS[0], history)
    assert batch.length == len(PROMPTS[0]) + steps - 1


def test_rows_joining_and_leaving_for_many_steps_each_get_what_they_get_alone(model):
    """Joins of prompts longer and shorter than the running rows, leaves from the middle and the end, past the
    slabs' spare rows and columns: every row's logits stay those of its own full forward."""
    prompts = [[1, *range(100 + 7 * i, 100 + 7 * i + 2 + (5 * i) % 11)] for i in range(12)]
    batch, logits = DecodeBatch.prefill(model, prompts[:1])
    rows, history, waiting = [0], {0: [logits[0]]}, list(range(1, 12))
    lifetime = {i: 20 + (13 * i) % 50 for i in range(12)}  # decode steps each row stays
    for step in range(2 * _SPARE_COLUMNS):
        tokens = logits.argmax(-1)
        done = [i for i, r in enumerate(rows) if len(history[r]) >= lifetime[r]]
        if done and len(done) < len(rows):
            order = batch.drop(done)
            rows, tokens = [rows[i] for i in order], tokens[order]
        if waiting and step % 7 == 3:
            joining = waiting[:1 + step % 2]
            waiting = waiting[len(joining):]
            joined, first = DecodeBatch.prefill(model, [prompts[r] for r in joining])
            batch, rows = batch.merge(joined), rows + joining
            tokens = torch.cat([tokens, first.argmax(-1)])
            history |= {r: [first[i]] for i, r in enumerate(joining)}
        logits = batch.decode(model, tokens)
        for i, r in enumerate(rows):
            history[r].append(logits[i])
    assert not waiting
    for r, got in history.items():
        _assert_matches_full_forward(model, prompts[r], got)


def test_rows_prefilled_from_a_kept_prefix_get_what_a_whole_prefill_gives(model):
    system = [1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17]  # two blocks of 8 shared by every prompt
    prompts = [system + [300 + i] * (i + 1) for i in range(4)] + [[1, 42, 43]]
    whole, whole_logits = DecodeBatch.prefill(model, prompts)
    kept = [whole.prefix(0, 16), whole.prefix(1, 8)]
    prefixes = [kept[0], kept[1], None, kept[0], None]  # mixed lengths, and rows with none
    batch, logits = DecodeBatch.prefill(model, prompts, prefixes)
    torch.testing.assert_close(logits, whole_logits, rtol=1e-4, atol=1e-4)
    assert batch.positions.tolist() == [len(p) for p in prompts]
    history = {row: [logits[row]] for row in range(len(prompts))}
    for _ in range(5):
        logits = batch.decode(model, logits.argmax(-1))
        for row in history:
            history[row].append(logits[row])
    for row, got in history.items():
        _assert_matches_full_forward(model, prompts[row], got)


def test_a_prefix_is_kept_once_two_prompts_shared_it_and_forgotten_when_the_weights_change():
    epoch = [0]
    cache = PrefixCache(capacity=2, block=4, weights_epoch=lambda: epoch[0])
    shared, fake = [1, 2, 3, 4, 5, 6, 7, 8], Prefix(8, [])
    assert cache.lookup("a", shared + [9]) is None
    assert cache.worth_keeping("a", shared + [9], cached=0) == 0  # seen once: not worth a copy yet
    assert cache.worth_keeping("a", shared + [10, 11], cached=0) == 8  # its longest shared whole-block prefix
    cache.keep("a", shared + [10, 11], fake)
    assert cache.lookup("a", shared + [12]) is fake
    assert cache.lookup("a", shared) is None  # a prompt that is all prefix: its last token is still prefilled
    assert cache.lookup("b", shared + [12]) is None  # another adapter computes other keys and values
    assert cache.worth_keeping("a", shared + [13], cached=8) == 0  # prefilled from it already
    epoch[0] += 1  # say a version was merged into the weights
    assert cache.lookup("a", shared + [12]) is None and len(cache) == 0
