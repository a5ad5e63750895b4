import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from feedback.events import ComparisonEvent, parse_event
from feedback.service import (
    ComparisonRequest,
    FeedbackConfig,
    FeedbackIdConflict,
    FeedbackRequest,
    FeedbackWriter,
    InvalidFeedback,
    NotCompletionOwner,
    RecordedComparison,
    RecordedFeedback,
    UnknownCompletion,
    UnusableCompletion,
    record_batch,
    record_feedback,
)
from liveloop.tables import Comparison, Feedback, OutboxMessage


def stored(sessions):
    with sessions() as session:
        feedback = session.scalars(select(Feedback).order_by(Feedback.created_at)).all()
        outbox = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    return feedback, outbox


def test_rating_writes_the_feedback_row_and_a_self_contained_event(sessions, add_completion):
    completion_id = add_completion(user_id="alice")
    result = record_feedback(sessions, completion_id=completion_id, rating="down", comment="wrong", user_id="alice",
                             config=FeedbackConfig(topic="fb-topic", reward_down=-0.5))
    [row], [message] = stored(sessions)
    assert (row.id, row.rating, row.reward, row.revision, row.supersedes_id) == (result.id, "down", -0.5, 1, None)
    assert (message.topic, message.key, message.sent_at, message.attempts) == ("fb-topic", completion_id, None, 0)
    event = parse_event(str.encode(__import__("json").dumps(message.payload)))
    assert (event.event_id, event.feedback_id, event.completion_id) == (message.event_id, result.id, completion_id)
    assert (event.rating, event.reward, event.comment, event.user_id) == ("down", -0.5, "wrong", "alice")
    assert (event.prompt_token_ids, event.response_token_ids, event.behaviour_logprobs) == ([1, 2, 3], [7, 8],
                                                                                           [-0.5, -1.25])
    assert (event.adapter_version, event.sampling_params["temperature"], event.dtype) == ("policy-0001", 0.7,
                                                                                          "float32")
    assert result.created


def test_same_feedback_id_gets_the_same_answer_and_no_second_event(sessions, add_completion):
    completion_id = add_completion()
    first = record_feedback(sessions, completion_id=completion_id, rating="up", feedback_id="client-1")
    again = record_feedback(sessions, completion_id=completion_id, rating="up", feedback_id="client-1")
    assert (again.id, again.created_at, again.revision) == (first.id, first.created_at, first.revision)
    assert (first.created, again.created) == (True, False)
    feedback, outbox = stored(sessions)
    assert (len(feedback), len(outbox)) == (1, 1)


def test_feedback_id_reused_for_another_rating_is_a_conflict_and_stores_nothing(sessions, add_completion):
    completion_id = add_completion()
    record_feedback(sessions, completion_id=completion_id, rating="up", feedback_id="client-1")
    with pytest.raises(FeedbackIdConflict, match="client-1"):
        record_feedback(sessions, completion_id=completion_id, rating="down", feedback_id="client-1")
    with pytest.raises(FeedbackIdConflict):
        record_feedback(sessions, completion_id=add_completion(), rating="up", feedback_id="client-1")
    assert [len(rows) for rows in stored(sessions)] == [1, 1]


def test_change_of_mind_supersedes_the_previous_rating(sessions, add_completion):
    completion_id = add_completion()
    first = record_feedback(sessions, completion_id=completion_id, rating="up")
    second = record_feedback(sessions, completion_id=completion_id, rating="down")
    third = record_feedback(sessions, completion_id=completion_id, rating="up")
    assert [(r.revision, r.supersedes) for r in (first, second, third)] == [(1, None), (2, first.id), (3, second.id)]
    _, outbox = stored(sessions)
    assert [(m.payload["revision"], m.payload["supersedes"], m.payload["reward"]) for m in outbox] == [
        (1, None, 1.0), (2, first.id, -1.0), (3, second.id, 1.0)]


def test_unknown_completion_and_bad_input_store_nothing(sessions, add_completion):
    with pytest.raises(UnknownCompletion, match="nope"):
        record_feedback(sessions, completion_id="nope", rating="up")
    completion_id = add_completion()
    with pytest.raises(InvalidFeedback, match="rating must be one of up, down"):
        record_feedback(sessions, completion_id=completion_id, rating="sideways")
    with pytest.raises(InvalidFeedback, match="at most 10"):
        record_feedback(sessions, completion_id=completion_id, rating="up", comment="x" * 11,
                        config=FeedbackConfig(comment_max_chars=10))
    assert stored(sessions) == ([], [])


def test_only_the_key_that_received_a_completion_may_rate_it(sessions, add_completion):
    completion_id = add_completion(user_id="alice")
    with pytest.raises(NotCompletionOwner):
        record_feedback(sessions, completion_id=completion_id, rating="down", user_id="mallory")
    assert stored(sessions) == ([], [])
    record_feedback(sessions, completion_id=completion_id, rating="up", user_id="alice")
    # without API keys (the open embedded default) the caller has no identity and anyone may rate
    record_feedback(sessions, completion_id=completion_id, rating="down", user_id=None)
    assert [row.user_id for row in stored(sessions)[0]] == ["alice", None]


def test_concurrent_requests_with_one_feedback_id_store_one_rating(sessions, add_completion):
    completion_id = add_completion()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: record_feedback(sessions, completion_id=completion_id, rating="up",
                                                          feedback_id="retried"), range(16)))
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert [len(rows) for rows in stored(sessions)] == [1, 1]


def test_concurrent_changes_of_mind_form_one_chain(sessions, add_completion):
    completion_id = add_completion()
    ratings = ["up", "down"] * 6
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda rating: record_feedback(sessions, completion_id=completion_id, rating=rating,
                                                               max_attempts=50), ratings))
    by_revision = {r.revision: r for r in results}
    assert sorted(by_revision) == list(range(1, len(ratings) + 1))
    assert all(by_revision[n].supersedes == by_revision[n - 1].id for n in range(2, len(ratings) + 1))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == len(ratings)


def test_one_batch_answers_every_request_on_its_own(sessions, add_completion):
    first, other = add_completion(), add_completion(user_id="bob")
    requests = [
        FeedbackRequest(first, "up", feedback_id="a"),
        FeedbackRequest("missing", "up"),
        FeedbackRequest(first, "down"),  # a change of mind inside the batch chains after "a"
        FeedbackRequest(first, "up", feedback_id="a"),  # a retry inside the batch
        FeedbackRequest(first, "sideways"),
        FeedbackRequest(first, "down", feedback_id="a"),  # "a" reused for another rating
        FeedbackRequest(other, "up", user_id="alice"),
    ]
    results = record_batch(sessions, requests)
    a, missing, changed, retry, sideways, reused, not_owner = results
    assert (a.revision, changed.revision, changed.supersedes) == (1, 2, a.id)
    assert (retry.id, retry.created) == (a.id, False)
    assert [type(r) for r in (missing, sideways, reused, not_owner)] == [
        UnknownCompletion, InvalidFeedback, FeedbackIdConflict, NotCompletionOwner]
    feedback, outbox = stored(sessions)
    assert [row.id for row in feedback] == [a.id, changed.id]
    assert [m.payload["feedback_id"] for m in outbox] == [a.id, changed.id]


def test_a_rating_the_database_cannot_store_fails_alone(sessions, add_completion):
    """A lone surrogate cannot be encoded for either database (PostgreSQL also refuses NUL): the batch is written
    again one rating at a time, and only that rating fails."""
    first, second = add_completion(), add_completion()
    requests = [FeedbackRequest(first, "up", feedback_id="a"), FeedbackRequest(second, "up", comment="\ud800"),
                FeedbackRequest(first, "down"), FeedbackRequest(second, "down", comment="fine")]
    a, unstorable, changed, other = record_batch(sessions, requests)
    assert isinstance(unstorable, InvalidFeedback) and "cannot store" in str(unstorable)
    assert (a.revision, changed.revision, changed.supersedes, other.revision) == (1, 2, a.id, 1)
    feedback, outbox = stored(sessions)
    assert sorted(row.id for row in feedback) == sorted([a.id, changed.id, other.id])
    assert sorted(m.payload["feedback_id"] for m in outbox) == sorted([a.id, changed.id, other.id])


def test_a_completion_without_finite_log_probs_cannot_be_rated_and_fails_alone(sessions, add_completion):
    """NaN behaviour log-probs are stored as null (orjson); such a completion cannot make a valid event."""
    broken, good = add_completion(behaviour_logprobs=[None, -1.25]), add_completion()
    unusable, recorded = record_batch(sessions, [FeedbackRequest(broken, "up"), FeedbackRequest(good, "up")])
    assert type(unusable) is UnusableCompletion and "behaviour_logprobs.0" in str(unusable)
    feedback, outbox = stored(sessions)
    assert [row.id for row in feedback] == [recorded.id] and len(outbox) == 1


def test_writer_answers_each_submission_from_group_commits(sessions, add_completion):
    completions = [add_completion() for _ in range(40)]

    async def record_all(writer: FeedbackWriter):
        requests = [FeedbackRequest(c, "up") for c in completions * 3] + [FeedbackRequest("missing", "up")]
        return await asyncio.gather(*(writer.record(request) for request in requests), return_exceptions=True)

    writer = FeedbackWriter(sessions, max_batch=16).start()
    try:
        *results, unknown = asyncio.run(asyncio.wait_for(record_all(writer), 60))
    finally:
        writer.stop()
    assert isinstance(unknown, UnknownCompletion)
    assert [r.completion_id for r in results] == completions * 3
    by_completion = {}
    for result in results:
        by_completion.setdefault(result.completion_id, []).append(result.revision)
    assert all(sorted(revisions) == [1, 2, 3] for revisions in by_completion.values())
    assert [len(rows) for rows in stored(sessions)] == [120, 120]


# --- comparisons ---------------------------------------------------------------------------------------------------


def choices(add_completion, count: int = 2, **fields) -> list[str]:
    """The completions of one chat request's ``count`` choices, as serving stores them."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return [add_completion(request_id=request_id, choice_index=index, **fields) for index in range(count)]


def compare(sessions, *ranking: str, **fields) -> RecordedComparison:
    [result] = record_batch(sessions, [ComparisonRequest(ranking, **fields)])
    if isinstance(result, Exception):
        raise result
    return result


def stored_comparisons(sessions):
    with sessions() as session:
        comparisons = session.scalars(select(Comparison).order_by(Comparison.revision)).all()
        outbox = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    return comparisons, outbox


def test_comparison_writes_its_row_and_an_event_of_both_samples(sessions, add_completion):
    request_id = "chatcmpl-request"
    live = add_completion(user_id="alice", request_id=request_id, choice_index=0, adapter_version="policy-0001")
    canary = add_completion(user_id="alice", request_id=request_id, choice_index=1, adapter_version="policy-0002",
                            behaviour_logprobs=[-0.25, -2.0])
    result = compare(sessions, canary, live, comment="the second is wrong", user_id="alice")
    [row], [message] = stored_comparisons(sessions)
    assert (row.id, row.request_id, row.ranking, row.revision, row.supersedes_id) == (
        result.id, request_id, [canary, live], 1, None)
    assert (message.key, result.ranking, result.created) == (request_id, (canary, live), True)
    event = parse_event(json.dumps(message.payload).encode())
    assert isinstance(event, ComparisonEvent) and event.event_id == message.event_id
    assert (event.feedback_id, event.request_id, event.revision, event.supersedes) == (result.id, request_id, 1, None)
    assert (event.comment, event.user_id) == ("the second is wrong", "alice")
    assert [(c.completion_id, c.adapter_version, c.behaviour_logprobs) for c in event.ranking] == [
        (canary, "policy-0002", [-0.25, -2.0]), (live, "policy-0001", [-0.5, -1.25])]


@pytest.mark.parametrize(("case", "error", "fragment"), [
    ("unknown", UnknownCompletion, "no completion with id 'chatcmpl-missing'"),
    ("another user's", NotCompletionOwner, "not served to this API key"),
    ("other request", InvalidFeedback, "not choices of one chat request"),
    ("served alone, before comparisons", InvalidFeedback, "not choices of one chat request"),
    ("twice", InvalidFeedback, "twice"),
    ("one", InvalidFeedback, "at least 2"),
])
def test_a_comparison_that_cannot_be_stores_nothing(sessions, add_completion, case, error, fragment):
    first, second = choices(add_completion, user_id="alice")
    ranking = {"unknown": (first, "chatcmpl-missing"), "another user's": (first, add_completion(user_id="bob")),
               "other request": (first, choices(add_completion, user_id="alice")[0]),
               "served alone, before comparisons": (add_completion(user_id="alice"), add_completion(user_id="alice")),
               "twice": (first, second, first), "one": (first,)}[case]
    with pytest.raises(error, match=fragment):
        compare(sessions, *ranking, user_id="alice")
    assert stored_comparisons(sessions) == ([], [])


def test_same_comparison_feedback_id_gets_the_same_answer_and_a_different_body_a_conflict(sessions, add_completion):
    first, second = choices(add_completion)
    rated = add_completion()
    recorded = compare(sessions, first, second, feedback_id="k")
    again = compare(sessions, first, second, feedback_id="k")
    assert (again.id, again.created) == (recorded.id, False)
    with pytest.raises(FeedbackIdConflict):
        compare(sessions, second, first, feedback_id="k")
    record_feedback(sessions, completion_id=rated, rating="up", feedback_id="rating-key")
    with pytest.raises(FeedbackIdConflict):  # one namespace of keys for ratings and comparisons
        compare(sessions, first, second, feedback_id="rating-key")
    with pytest.raises(FeedbackIdConflict):
        record_feedback(sessions, completion_id=first, rating="up", feedback_id="k")
    comparisons, outbox = stored_comparisons(sessions)
    assert len(comparisons) == 1 and len(outbox) == 2  # the comparison's event and the rating's


def test_a_new_ranking_of_the_same_choices_supersedes_the_previous_one(sessions, add_completion):
    first, second = choices(add_completion)
    before = compare(sessions, first, second)
    changed = compare(sessions, second, first)
    assert (changed.revision, changed.supersedes) == (2, before.id)
    _, outbox = stored_comparisons(sessions)
    assert [m.payload["revision"] for m in outbox] == [1, 2]
    assert outbox[1].payload["supersedes"] == before.id


def test_concurrent_comparisons_of_one_request_form_one_chain(sessions, add_completion):
    first, second = choices(add_completion)
    rankings = [(first, second), (second, first)] * 6

    def record(ranking):
        [result] = record_batch(sessions, [ComparisonRequest(ranking)], max_attempts=50)
        return result

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(record, rankings))
    by_revision = {r.revision: r for r in results}
    assert sorted(by_revision) == list(range(1, len(rankings) + 1))
    assert all(by_revision[n].supersedes == by_revision[n - 1].id for n in range(2, len(rankings) + 1))
    assert len(stored_comparisons(sessions)[1]) == len(rankings)


def test_ratings_and_comparisons_share_a_batch_and_its_answers(sessions, add_completion):
    first, second = choices(add_completion)
    requests = [FeedbackRequest(first, "up"), ComparisonRequest((first, second)), ComparisonRequest((first, "nope")),
                ComparisonRequest((second, first))]
    rating, comparison, unknown, changed = record_batch(sessions, requests)
    assert isinstance(rating, RecordedFeedback) and isinstance(unknown, UnknownCompletion)
    assert (comparison.revision, changed.revision, changed.supersedes) == (1, 2, comparison.id)
    assert [m.key for m in stored_comparisons(sessions)[1]] == [first, comparison.request_id, comparison.request_id]
