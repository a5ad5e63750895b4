"""The trainer's consumption records: which events are fresh, which a newer revision supersedes."""

from __future__ import annotations

import uuid

from feedback.ledger import Ledger, Outcome
from liveloop.tables import Comparison


def test_a_comparison_is_settled_against_the_rankings_of_its_request(sessions, make_comparison, make_event):
    ledger = Ledger(sessions, "trainer")
    with sessions.begin() as session:  # the user ranked request r1 twice: its second ranking is on its way
        for revision in (1, 2):
            session.add(Comparison(id=uuid.uuid4().hex, request_id="r1", revision=revision, ranking=["a", "b"]))
            session.flush()
    old, fresh = make_comparison(request_id="r1"), make_comparison(request_id="r2")
    rating = make_event(completion_id="r1", revision=1)  # a rating is settled against ratings, not rankings
    assert ledger.settle([old, fresh, rating]) == ([fresh, rating], [old])

    ledger.save(offsets={}, consumed=[(fresh, Outcome.TRAINED)])
    again = make_comparison(request_id="r2", event_id=uuid.uuid4().hex)  # the same revision, consumed before
    assert ledger.settle([fresh, again]) == ([], [again])
    newer = make_comparison(request_id="r2", revision=2)
    assert ledger.settle([newer]) == ([newer], [])
