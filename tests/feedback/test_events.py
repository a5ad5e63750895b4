import json

import pytest

from feedback.events import (
    SCHEMA_VERSION,
    ComparisonEvent,
    FeedbackEvent,
    MalformedEvent,
    UnknownSchemaVersion,
    parse_event,
)


def sample(**overrides) -> dict:
    fields = dict(
        messages=[{"role": "user", "content": "hi"}],
        prompt_token_ids=[1, 2], response_token_ids=[3, 4], behaviour_logprobs=[-0.1, -0.2],
        adapter_version=None, sampling_params={"temperature": 0.7}, dtype="float32",
        completion_created_at="2026-11-24T02:59:59Z",
    )
    return fields | overrides


def event(**overrides) -> dict:
    fields = dict(
        schema_version=SCHEMA_VERSION, event_id="e1", feedback_id="fb-1", completion_id="chatcmpl-1", revision=1,
        rating="up", reward=1.0, supersedes=None, rated_at="2026-11-24T03:00:00Z", **sample(),
    )
    return fields | overrides


def comparison(*ranking: dict, **overrides) -> dict:
    ranking = ranking or (sample(completion_id="chatcmpl-a"),
                          sample(completion_id="chatcmpl-b", adapter_version="policy-00001-abc"))
    fields = dict(
        schema_version=SCHEMA_VERSION, event_type="comparison", event_id="e2", feedback_id="cmp-1",
        request_id="chatcmpl-r", revision=1, supersedes=None, rated_at="2026-11-24T03:00:00Z", ranking=list(ranking),
    )
    return fields | overrides


def test_event_round_trips_through_bytes():
    parsed = parse_event(json.dumps(event()).encode())
    assert parsed.schema_version == SCHEMA_VERSION
    assert parse_event(parsed.to_bytes()) == parsed


def test_an_event_without_event_type_is_a_rating():
    parsed = parse_event(json.dumps(event()).encode())
    assert isinstance(parsed, FeedbackEvent) and parsed.event_type == "rating"
    assert json.loads(parsed.to_bytes())["event_type"] == "rating"


def test_comparison_round_trips_through_bytes():
    parsed = parse_event(json.dumps(comparison()).encode())
    assert isinstance(parsed, ComparisonEvent)
    assert [choice.completion_id for choice in parsed.ranking] == ["chatcmpl-a", "chatcmpl-b"]
    assert parsed.ranking[1].adapter_version == "policy-00001-abc"
    assert parse_event(parsed.to_bytes()) == parsed


def test_fields_added_later_in_the_same_version_are_ignored():
    assert parse_event(json.dumps(event(added_in_a_later_release=True)).encode()).event_id == "e1"


@pytest.mark.parametrize(("raw", "error", "reason"), [
    (None, MalformedEvent, "no value"),
    (b"\xff\xfe", MalformedEvent, "not JSON"),
    (b"{not json", MalformedEvent, "not JSON"),
    (b"[1, 2]", MalformedEvent, "not a JSON object but a list"),
    (json.dumps(event(schema_version=2)).encode(), UnknownSchemaVersion, "unknown schema_version 2"),
    (json.dumps({"rating": "up"}).encode(), MalformedEvent, "no schema_version"),
    (json.dumps(event(schema_version="1")).encode(), UnknownSchemaVersion, "unknown schema_version '1'"),
    (json.dumps(event(rating="meh")).encode(), MalformedEvent, "rating"),
    (json.dumps(event(revision=0)).encode(), MalformedEvent, "revision"),
    (json.dumps(event(behaviour_logprobs=[-0.1])).encode(), MalformedEvent, "1 behaviour log-probs for 2"),
    # Python's json writes and reads NaN and Infinity; orjson writes null
    (json.dumps(event(behaviour_logprobs=[float("nan"), -0.2])).encode(), MalformedEvent, "behaviour_logprobs.0"),
    (json.dumps(event(behaviour_logprobs=[None, -0.2])).encode(), MalformedEvent, "behaviour_logprobs.0"),
    (json.dumps(event(reward=float("inf"))).encode(), MalformedEvent, "reward"),
    (json.dumps(event(event_type="thumbs")).encode(), MalformedEvent, "unknown event_type 'thumbs'"),
    (json.dumps(event(event_type=["rating"])).encode(), MalformedEvent, "unknown event_type ['rating']"),
    # a comparison's choices are checked as a rating's completion is: one place validates a logged sample
    (json.dumps(comparison(sample(completion_id="a"), sample(completion_id="b", behaviour_logprobs=[-0.1])))
     .encode(), MalformedEvent, "1 behaviour log-probs for 2"),
    (json.dumps(comparison(sample(completion_id="a"), sample(completion_id="b", behaviour_logprobs=[None, 0.0])))
     .encode(), MalformedEvent, "ranking.1.behaviour_logprobs.0"),
    (json.dumps(comparison(sample(completion_id="a"))).encode(), MalformedEvent,
     "ranking: List should have at least 2"),
    (json.dumps(comparison(sample(completion_id="a"), sample(completion_id="a"))).encode(), MalformedEvent,
     "ranked twice"),
    (json.dumps(comparison(revision=0)).encode(), MalformedEvent, "revision"),
    (json.dumps(comparison(schema_version=2)).encode(), UnknownSchemaVersion, "unknown schema_version 2"),
])
def test_unusable_messages_raise_a_typed_error_with_the_reason(raw, error, reason):
    with pytest.raises(error) as caught:
        parse_event(raw)
    assert reason in caught.value.reason


def test_missing_fields_are_named():
    data = event()
    del data["completion_id"]
    with pytest.raises(MalformedEvent, match="completion_id: Field required"):
        parse_event(json.dumps(data).encode())


def test_a_reason_names_the_first_problems_and_counts_the_rest():
    with pytest.raises(MalformedEvent) as caught:
        parse_event(json.dumps(event(response_token_ids=[3] * 10, behaviour_logprobs=[None] * 10)).encode())
    assert caught.value.reason.endswith("behaviour_logprobs.2: Input should be a valid number; and 7 more")


def test_event_is_immutable():
    parsed = FeedbackEvent.model_validate(event())
    with pytest.raises(ValueError):
        parsed.reward = 5.0


def test_comparison_is_immutable():
    parsed = ComparisonEvent.model_validate(comparison())
    with pytest.raises(ValueError):
        parsed.revision = 2
