"""How `liveloop up` splits the cores between the API and the trainer (torch threads per process)."""

from __future__ import annotations

from liveloop.cli import core_split


def test_up_gives_the_trainer_half_the_cores_and_the_api_the_rest_by_default(make_settings):
    settings = make_settings()
    assert core_split(settings, 2) == (1, 1)
    assert core_split(settings, 3) == (2, 1)
    assert core_split(settings, 8) == (4, 4)
    assert core_split(settings, 1) == (1, 1)  # each gets a thread, however few the cores


def test_up_split_follows_the_serve_and_train_thread_settings(make_settings):
    assert core_split(make_settings(serve_threads=3, train_threads=1), 2) == (3, 1)
    assert core_split(make_settings(train_threads=3), 4) == (1, 3)  # the API takes what the trainer leaves
    assert core_split(make_settings(serve_threads=2), 4) == (2, 2)
