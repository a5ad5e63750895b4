"""The reward model: its losses, its split, learning a separable preference, policy hygiene, versioning."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
import torch

from feedback.events import ComparedCompletion, ComparisonEvent, FeedbackEvent
from liveloop.adapter_artifacts import WEIGHTS, AdapterArtifactError, verify_adapter
from trainer.heldout import REWARD_MODEL_SPLIT, is_heldout
from trainer.policy import POLICY_ADAPTER
from trainer.reward_model import (
    ComparedResponse,
    RankedResponses,
    RatedResponse,
    RewardModel,
    RewardModelConfig,
    auc,
    auc_low,
    balanced_accuracy,
    balanced_accuracy_low,
    pair_accuracy,
    pair_accuracy_low,
    pairwise_loss,
    pointwise_loss,
    preference_pairs,
    prior_log_odds,
    ranking_pairs,
)

PAD = 0
LIKED = 5000  # the synthetic preference: a response containing this token is rated up
FILLER = (1000, 1020)  # everything else is drawn from these tokens


def rated(completion_id: str, prompt: tuple[int, ...], up: bool, response: tuple[int, ...] = (7, 8),
          revision: int = 1) -> RatedResponse:
    return RatedResponse(completion_id, prompt, response, up, revision)


def separable_examples(n_prompts: int, seed: int) -> list[RatedResponse]:
    """Two responses per prompt, one with LIKED somewhere (up) and one without (down)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n_prompts):
        prompt = tuple(torch.randint(*FILLER, (8,), generator=generator).tolist())
        for j, up in enumerate((i % 2 == 0, i % 2 == 1)):
            response = torch.randint(*FILLER, (10,), generator=generator)
            if up:
                response[torch.randint(0, 10, (1,), generator=generator)] = LIKED
            examples.append(RatedResponse(f"{seed}-{i}-{j}", prompt, tuple(response.tolist()), up))
    return examples


def separable_comparisons(n_prompts: int, seed: int) -> list[RankedResponses]:
    """Two responses per prompt, one with LIKED somewhere, ranked first; which of the two it is varies."""
    generator = torch.Generator().manual_seed(seed)
    comparisons = []
    for i in range(n_prompts):
        prompt = tuple(torch.randint(*FILLER, (8,), generator=generator).tolist())
        responses = []
        for j in range(2):
            response = torch.randint(*FILLER, (10,), generator=generator)
            if j == i % 2:
                response[torch.randint(0, 10, (1,), generator=generator)] = LIKED
            responses.append(ComparedResponse(f"{seed}-{i}-{j}", prompt, tuple(response.tolist())))
        liked = responses[i % 2]
        comparisons.append(RankedResponses(f"request-{seed}-{i}", (liked, *(r for r in responses if r is not liked))))
    return comparisons


def test_pairwise_loss_matches_hand_computed_bradley_terry():
    # −log σ(2 − 1) = log(1 + e^−1) = 0.313262; −log σ(0 − 1) = log(1 + e) = 1.313262
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)


def test_pointwise_loss_is_the_logistic_loss_of_the_thumb():
    # score 0 → p = 1/2 either way: log 2; score 2 rated down: log(1 + e^2) = 2.126928
    loss = pointwise_loss(torch.tensor([0.0, 2.0]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx((math.log(2) + 2.126928) / 2, abs=1e-6)


def test_pairs_are_up_down_responses_to_the_same_prompt():
    batch = [rated("a", (1,), True), rated("b", (1,), False), rated("c", (2,), True), rated("d", (1,), False),
             rated("e", (2,), True)]
    up, down = preference_pairs(batch)
    assert sorted(zip(up, down, strict=True)) == [(0, 1), (0, 3)]


def test_a_comparison_pairs_its_preferred_response_with_each_one_ranked_below():
    a, b, c = (ComparedResponse(name, (1,), (2,)) for name in "abc")
    comparisons = [RankedResponses("r1", (b, a, c)), RankedResponses("r2", (c, a))]
    better, worse = ranking_pairs(comparisons, {"a": 0, "b": 1, "c": 2})
    assert list(zip(better, worse, strict=True)) == [(1, 0), (1, 2), (2, 0)]


def test_pair_accuracy_counts_a_tie_half_and_bounds_few_pairs_loosely():
    assert pair_accuracy(torch.tensor([1.0, -1.0, 0.0])) == pytest.approx(0.5)  # right, wrong, tie
    assert pair_accuracy(torch.zeros(0)) is None and pair_accuracy_low(torch.zeros(0), z=2.33) is None
    assert pair_accuracy(torch.ones(6)) == 1.0 and pair_accuracy_low(torch.ones(6), z=2.33) < 0.75
    assert pair_accuracy_low(torch.ones(200), z=2.33) > 0.98


def test_heldout_split_is_stable_and_near_the_fraction():
    ids = [f"chatcmpl-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.25, split="test")]
    assert 0.22 < len(held) / len(ids) < 0.28
    assert held == [i for i in ids if is_heldout(i, 0.25, split="test")]
    assert set(held) <= {i for i in ids if is_heldout(i, 0.5, split="test")}  # growing the fraction never moves one out
    assert not any(is_heldout(i, 0.0, split="test") for i in ids)


def test_balanced_accuracy_is_a_half_for_a_constant_score_and_one_for_a_perfect_one():
    thumbs_up = torch.tensor([True] * 23 + [False] * 77)  # unbalanced as live thumbs are: 77% down
    always_down = torch.full((100,), -1.0)
    assert ((always_down > 0) == thumbs_up).float().mean().item() == pytest.approx(0.77)  # what plain accuracy says
    assert balanced_accuracy(always_down, thumbs_up) == pytest.approx(0.5)
    assert balanced_accuracy(torch.full((100,), 1.0), thumbs_up) == pytest.approx(0.5)
    assert balanced_accuracy(torch.where(thumbs_up, 2.0, -3.0), thumbs_up) == pytest.approx(1.0)
    # right on every up and on 67 of 77 downs: (1 + 67/77) / 2
    scores = torch.where(thumbs_up, 1.0, -1.0)
    scores[-10:] = 1.0
    assert balanced_accuracy(scores, thumbs_up) == pytest.approx((1 + 67 / 77) / 2)


def test_balanced_accuracy_judges_log_odds_against_the_prior():
    """A calibrated model of a taste liked 20 % of the time says "down" almost everywhere: at threshold 0 it is at
    chance however well it ranks; at the prior log-odds it is judged by how it ranks."""
    thumbs_up = torch.tensor([True] * 20 + [False] * 80)
    scores = torch.where(thumbs_up, -0.5, -2.5)  # every up above every down, all below 0
    assert balanced_accuracy(scores, thumbs_up) == pytest.approx(0.5)
    assert prior_log_odds(thumbs_up.tolist()) == pytest.approx(math.log(21 / 81))  # −1.35
    assert balanced_accuracy(scores, thumbs_up, prior_log_odds(thumbs_up.tolist())) == pytest.approx(1.0)
    assert math.isfinite(prior_log_odds([True])) and math.isfinite(prior_log_odds([]))


def test_balanced_accuracy_of_a_single_thumb_is_none():
    assert balanced_accuracy(torch.full((5,), -1.0), torch.zeros(5, dtype=torch.bool)) is None
    assert balanced_accuracy(torch.full((5,), 1.0), torch.ones(5, dtype=torch.bool)) is None
    assert balanced_accuracy(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) is None


def test_heldout_balanced_accuracy_of_a_constant_reward_model_is_a_half(tiny_peft_model):
    config = RewardModelConfig(heldout_fraction=1.0)  # every example held out
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    reward_model.probe.bias = torch.tensor(-1.0)  # a probe that ignores the features: always "down"
    reward_model.add([rated(f"down-{i}", (1, i + 2), False) for i in range(3)])
    assert reward_model._heldout_accuracy() == (None,) * 4  # one thumb only: undefined, not 1.0
    reward_model.add([rated("up-0", (2,), True)])
    accuracy, low, area, area_low = reward_model._heldout_accuracy()
    assert accuracy == pytest.approx(0.5) and low < 0.5  # plain accuracy: 0.75
    assert area == pytest.approx(0.5) and area_low < 0.5


def test_reward_model_learns_a_separable_preference_above_chance(tiny_peft_model):
    config = RewardModelConfig(heldout_fraction=0.25)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    examples = separable_examples(100, seed=0)
    reward_model.add(examples[:100])
    first = reward_model.train_increment()
    reward_model.add(examples[100:])
    metrics = reward_model.train_increment()
    assert (first.n_examples, metrics.n_examples, metrics.increment) == (100, 200, 2)
    assert metrics.n_heldout + metrics.n_train == 200 and metrics.n_heldout >= 30
    assert metrics.n_pairs > 50 and metrics.pairwise_loss is not None and metrics.l2 in config.l2_grid
    # chance is 0.5 (balanced accuracy, whatever the split's balance); 0.7 on ~60 held-out examples is p < 0.001
    assert metrics.heldout_balanced_accuracy >= 0.7, metrics
    assert metrics.usable and metrics.heldout_balanced_accuracy_low > 0.5


def test_reward_model_learns_a_pairwise_preference_from_comparisons_alone(tiny_peft_model):
    config = RewardModelConfig(heldout_fraction=0.25)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    reward_model.add(separable_comparisons(120, seed=0))
    metrics = reward_model.train_increment()
    assert (metrics.n_comparisons, metrics.n_examples) == (120, 0)
    assert metrics.n_heldout_comparisons >= 20 and metrics.n_pairs == 120 - metrics.n_heldout_comparisons
    assert metrics.pointwise_loss is None and metrics.pairwise_loss is not None
    assert metrics.heldout_balanced_accuracy is None  # no thumbs
    # chance is 0.5; 0.75 of ~120 unseen pairs (held out and out of fold) is p < 0.001
    assert metrics.heldout_comparison_accuracy >= 0.75, metrics
    assert metrics.usable and metrics.heldout_comparison_accuracy_low > 0.5
    fresh = separable_comparisons(40, seed=9)
    liked = reward_model.score([c.ranking[0].prompt_ids for c in fresh], [c.ranking[0].response_ids for c in fresh])
    other = reward_model.score([c.ranking[1].prompt_ids for c in fresh], [c.ranking[1].response_ids for c in fresh])
    assert (liked > other).float().mean() >= 0.75


def test_comparisons_and_thumbs_train_one_model(tiny_peft_model):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD,
                                      config=RewardModelConfig(heldout_fraction=0.0))
    thumbs, comparisons = separable_examples(20, seed=1), separable_comparisons(30, seed=2)
    reward_model.add([*thumbs, *comparisons])
    metrics = reward_model.train_increment()
    assert metrics.n_pairs == len(preference_pairs(thumbs)[0]) + 30  # up/down of one prompt, and each comparison
    assert metrics.pointwise_loss is not None and metrics.pairwise_loss is not None
    assert metrics.heldout_balanced_accuracy is not None and metrics.heldout_comparison_accuracy is not None


def test_a_held_out_comparison_holds_out_the_thumbs_of_its_responses(tiny_peft_model):
    config = RewardModelConfig(heldout_fraction=0.5)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    request = next(f"r{i}" for i in range(100) if is_heldout(f"r{i}", 0.5, split=REWARD_MODEL_SPLIT))
    a, b = (next(f"{name}{i}" for i in range(100) if not is_heldout(f"{name}{i}", 0.5, split=REWARD_MODEL_SPLIT))
            for name in "ab")
    reward_model.add([rated(a, (1,), True), RankedResponses(request, (ComparedResponse(a, (1,), (7, 8)),
                                                                      ComparedResponse(b, (1,), (9,))))])
    split = reward_model._split()
    assert [e.completion_id for e in split.heldout] == [a] and not split.train
    assert [c.request_id for c in split.heldout_comparisons] == [request] and not split.train_comparisons
    # and the other way: a held-out thumb holds out the comparison of its response
    other = next(f"s{i}" for i in range(100) if not is_heldout(f"s{i}", 0.5, split=REWARD_MODEL_SPLIT))
    c = next(f"c{i}" for i in range(100) if is_heldout(f"c{i}", 0.5, split=REWARD_MODEL_SPLIT))
    reward_model.add([rated(c, (2,), False), RankedResponses(other, (ComparedResponse(b, (2,), (9,)),
                                                                    ComparedResponse(c, (2,), (7,))))])
    assert {x.request_id for x in reward_model._split().heldout_comparisons} == {request, other}


def test_a_new_ranking_of_a_request_replaces_the_older_one(tiny_peft_model):
    config = RewardModelConfig(max_examples=2)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    a, b = ComparedResponse("a", (1,), (2,)), ComparedResponse("b", (1,), (3,))
    reward_model.add([RankedResponses("r1", (a, b)), RankedResponses("r1", (b, a), revision=2)])
    reward_model.add([RankedResponses("r1", (a, b))])  # the first revision arriving late changes nothing
    assert reward_model.comparisons["r1"].ranking == (b, a)
    reward_model._example_features([a, b])
    c, d = ComparedResponse("c", (4,), (5,)), ComparedResponse("d", (4,), (6,))
    reward_model.add([RankedResponses("r2", (c, d)), RankedResponses("r3", (d, c))])  # evicts r1
    assert list(reward_model.comparisons) == ["r2", "r3"] and not {"a", "b"} & reward_model._features.keys()


def test_a_reward_model_of_random_thumbs_is_not_usable(tiny_peft_model):
    generator = torch.Generator().manual_seed(5)
    examples = [RatedResponse(e.completion_id, e.prompt_ids, e.response_ids, bool(torch.rand(1, generator=generator)
                                                                                  < 0.5))
                for e in separable_examples(100, seed=5)]
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD,
                                      config=RewardModelConfig(heldout_fraction=0.25))
    reward_model.add(examples)
    assert not reward_model.train_increment().usable


def policy_state(model) -> tuple:
    probe = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if f".{POLICY_ADAPTER}." in n}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return model.active_adapter, logits, weights, grads


def test_scoring_and_training_leave_the_policy_active_and_unchanged(tiny_peft_model):
    before = policy_state(tiny_peft_model)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD)
    reward_model.add(separable_examples(8, seed=1))
    reward_model.train_increment()
    scores = reward_model.score([(1, 2), (3, 4, 5)], [(6,), (7, 8)])
    after = policy_state(tiny_peft_model)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert after[0] == before[0] == POLICY_ADAPTER
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    assert all(torch.equal(after[2][n], w) for n, w in before[2].items())
    assert after[3] == before[3]  # requires_grad untouched: the policy trains as before


def test_adapter_is_restored_when_scoring_fails(tiny_peft_model):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        reward_model.score([(1,), ()], [(2,), ()])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward_model.score([(1,), (2,)], [(3,)])
    assert tiny_peft_model.active_adapter == POLICY_ADAPTER


def test_scores_do_not_depend_on_padding_neighbours(tiny_peft_model):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD)
    alone = reward_model.score([(11, 12)], [(13,)])
    batched = reward_model.score([(11, 12), tuple(range(100, 130))], [(13,), (14, 15)])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


def test_a_feedback_event_becomes_a_rated_response():
    now = datetime.now(UTC)
    event = FeedbackEvent(
        event_id="e1", feedback_id="f2", completion_id="chatcmpl-1", revision=2, rating="down", reward=-1.0,
        supersedes="f1", rated_at=now, messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2],
        response_token_ids=[3, 4], behaviour_logprobs=[-0.5, -0.1], adapter_version=None,
        sampling_params={"temperature": 1.0}, dtype="float32", completion_created_at=now,
    )
    assert RatedResponse.from_event(event) == RatedResponse("chatcmpl-1", (1, 2), (3, 4), thumbs_up=False, revision=2)


def test_a_comparison_event_becomes_ranked_responses():
    now = datetime.now(UTC)

    def answer(completion_id: str, response: list[int]) -> ComparedCompletion:
        return ComparedCompletion(
            completion_id=completion_id, messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2],
            response_token_ids=response, behaviour_logprobs=[-0.5] * len(response), adapter_version=None,
            sampling_params={"temperature": 1.0}, dtype="float32", completion_created_at=now)

    event = ComparisonEvent(event_id="e1", feedback_id="cmp-2", request_id="chatcmpl-r", revision=2,
                            supersedes="cmp-1", rated_at=now, ranking=[answer("b", [5]), answer("a", [3, 4])])
    assert RankedResponses.from_event(event) == RankedResponses(
        "chatcmpl-r", (ComparedResponse("b", (1, 2), (5,)), ComparedResponse("a", (1, 2), (3, 4))), revision=2)


def test_a_change_of_mind_replaces_the_rating_and_the_buffer_is_bounded(tiny_peft_model):
    config = RewardModelConfig(max_examples=3)
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD, config=config)
    reward_model.add([rated("a", (1,), True), rated("b", (1,), False), rated("c", (2,), True)])
    reward_model.add([rated("a", (1,), False, revision=3)])  # "a" is now the newest, rated down
    reward_model.add([rated("a", (1,), True, revision=2)])  # an older revision arriving late changes nothing
    reward_model.add([rated("d", (3,), True)])  # evicts the oldest: "b"
    assert {k: e.thumbs_up for k, e in reward_model.examples.items()} == {"c": True, "a": False, "d": True}
    assert reward_model.examples["a"].revision == 3


def test_each_answer_runs_through_the_trunk_once(tiny_peft_model):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD,
                                      config=RewardModelConfig(heldout_fraction=0.0))
    computed = []
    features_of = reward_model._features_of
    reward_model._features_of = lambda prompts, responses: computed.append(len(prompts)) or features_of(prompts,
                                                                                                     responses)
    reward_model.add(separable_examples(20, seed=2))
    reward_model.train_increment()
    first = sum(computed)
    reward_model.add(separable_examples(3, seed=3))
    reward_model.train_increment()
    assert first == 40 and sum(computed) - first == 6  # the second increment computes the six new answers only


def test_rewards_are_normalised_over_the_training_split(tiny_peft_model):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD,
                                      config=RewardModelConfig(heldout_fraction=0.0))
    examples = separable_examples(32, seed=4)
    reward_model.add(examples)
    reward_model.train_increment()
    mean, std = reward_model.normalizer
    prompts, responses = [e.prompt_ids for e in examples], [e.response_ids for e in examples]
    raw, normalised = reward_model.score(prompts, responses), reward_model.reward(prompts, responses)
    torch.testing.assert_close(normalised, (raw - mean) / std)
    assert std != 1.0 and abs(normalised.mean().item()) < 1e-4 and normalised.std().item() == pytest.approx(1, abs=1e-4)


def test_a_reward_model_at_chance_is_not_usable_and_one_that_ranks_is():
    """The gate on held-out balanced accuracy, through the bound PPO's use depends on."""
    generator = torch.Generator().manual_seed(0)
    thumbs = torch.rand(200, generator=generator) < 0.3
    noise = torch.randn(200, generator=generator)
    at_chance = balanced_accuracy_low(noise, thumbs, z=2.33)
    ranking = balanced_accuracy_low(torch.where(thumbs, 1.0, -1.0) + 0.8 * noise, thumbs, z=2.33)
    assert at_chance < 0.5 < ranking
    # a perfect score on 3 + 3 ratings is far from certain (and usable_min_per_thumb asks for more)
    few = torch.tensor([True] * 3 + [False] * 3)
    assert balanced_accuracy_low(torch.where(few, 1.0, -1.0), few, z=2.33) < 0.7


def test_auc_counts_ordered_pairs_and_its_bound_judges_a_weak_ranking_on_a_rare_thumb_before_balanced_accuracy():
    thumbs = torch.tensor([True, True, False, False, False])
    assert auc(torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0]), thumbs) == pytest.approx(5 / 6)
    assert auc(torch.zeros(5), thumbs) == pytest.approx(0.5)  # ties count half: a constant is at chance
    assert auc(torch.zeros(3), torch.zeros(3, dtype=torch.bool)) is None
    generator = torch.Generator().manual_seed(0)
    thumbs = torch.rand(300, generator=generator) < 0.15  # a taste few answers meet
    noise = torch.randn(300, generator=generator)
    assert auc_low(noise, thumbs, z=2.33) < 0.5  # chance is not usable
    weak = torch.where(thumbs, 0.8, 0.0) + noise  # a ranking as weak as a probe's after ~150 ratings
    assert auc_low(weak, thumbs, z=2.33) > 0.5
    assert balanced_accuracy_low(weak, thumbs, z=2.33, threshold=prior_log_odds(thumbs.tolist())) < 0.5


def test_save_and_load_round_trip_verifies_and_reproduces_scores(make_tiny_peft_model, tmp_path):
    config = RewardModelConfig(heldout_fraction=0.25, l2_grid=(0.5, 2.0))
    trained = RewardModel.create(make_tiny_peft_model(), base_model_id="tiny", pad_token_id=PAD, config=config)
    trained.add(separable_examples(12, seed=2))
    trained.train_increment()
    sha = trained.save(tmp_path / "rm-1", metadata={"parent": None})
    manifest = verify_adapter(tmp_path / "rm-1", base_model_id="tiny", sha256=sha)
    assert manifest["metadata"]["config"]["l2_grid"] == [0.5, 2.0] and manifest["metadata"]["n_examples"] == 24
    saved_accuracy = manifest["metadata"]["metrics"]["heldout_balanced_accuracy"]
    assert saved_accuracy == trained.last_metrics.heldout_balanced_accuracy

    fresh = make_tiny_peft_model()
    loaded = RewardModel.load(fresh, tmp_path / "rm-1", base_model_id="tiny", pad_token_id=PAD, sha256=sha)
    prompts, responses = [(1, 2, 3), (4,)], [(5, 6), (LIKED,)]
    torch.testing.assert_close(loaded.score(prompts, responses), trained.score(prompts, responses))
    assert (loaded.config, loaded.increments, fresh.active_adapter) == (config, 1, POLICY_ADAPTER)
    with pytest.raises(AdapterArtifactError, match="never overwritten"):
        trained.save(tmp_path / "rm-1")


def test_loading_may_retune_the_penalties_but_other_features_start_over(tiny_peft_model, make_tiny_peft_model,
                                                                         tmp_path):
    trained = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD)
    trained.add(separable_examples(12, seed=2))
    trained.train_increment()
    trained.save(tmp_path / "rm-1")
    prompts, responses = [(1, 2, 3), (4,)], [(5, 6), (LIKED,)]
    retuned = RewardModel.load(make_tiny_peft_model(), tmp_path / "rm-1", base_model_id="tiny", pad_token_id=PAD,
                               config=RewardModelConfig(l2_grid=(3.0,)))
    assert retuned.config.l2_grid == (3.0,) and retuned.increments == 1
    torch.testing.assert_close(retuned.score(prompts, responses), trained.score(prompts, responses))
    other = RewardModel.load(make_tiny_peft_model(), tmp_path / "rm-1", base_model_id="tiny", pad_token_id=PAD,
                             config=RewardModelConfig(mean_layers=(0.5,)))
    assert other.increments == 0 and not other.score(prompts, responses).any()  # a probe of other features: gone


def test_corrupt_weights_are_refused(tiny_peft_model, make_tiny_peft_model, tmp_path):
    reward_model = RewardModel.create(tiny_peft_model, base_model_id="tiny", pad_token_id=PAD)
    reward_model.save(tmp_path / "rm-1")
    weights = tmp_path / "rm-1" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-4] + b"\1\2\3\4")
    with pytest.raises(AdapterArtifactError, match="sha256"):
        RewardModel.load(make_tiny_peft_model(), tmp_path / "rm-1", base_model_id="tiny", pad_token_id=PAD)
