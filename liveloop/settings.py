"""All configuration, from environment variables prefixed ``LIVELOOP_`` (or a ``.env`` file).

Embedded defaults run the whole loop on one machine: SQLite under ``./var``, the packaged model, an embedded
broker. Production sets the database URL, the Kafka bootstrap servers and API keys. Invalid values fail at
start-up with a message naming the variable.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ADMIN_TOKEN_MIN_CHARS = 32


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class UnknownVariables(PydanticBaseSettingsSource):
    """Refuses a ``LIVELOOP_*`` variable, in the environment or the ``.env`` file, that names no setting: the
    default is to ignore it, and a misspelt ``LIVELOOP_API_KEY`` would then leave the API open."""

    def __init__(self, settings_cls: type[BaseSettings], *sources: EnvSettingsSource):
        super().__init__(settings_cls)
        self._sources = sources

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # contributes no values; __call__ only checks

    def __call__(self) -> dict[str, Any]:
        prefix = self.config["env_prefix"].upper()
        known = [prefix + name.upper() for name in self.settings_cls.model_fields]
        unknown = sorted({name.upper() for source in self._sources for name in source.env_vars
                          if name.upper().startswith(prefix) and name.upper() not in known})
        if unknown:
            guesses = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, 1))
                       else name for name in unknown]
            raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''}: {', '.join(guesses)}; "
                             "liveloop/settings.py lists every LIVELOOP_ variable")
        return {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Where embedded state lives (SQLite file, model cache, adapters).")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file in data_dir.")
    auto_migrate: bool = Field(
        True, description="Run Alembic migrations at start-up; when false, refuse to start on an old schema."
    )

    # --- logging -------------------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object a line, with the request id, completion id, version and user "
        "where known, for log pipelines.",
    )

    # --- model ---------------------------------------------------------------------------------------
    base_model: Path | None = Field(
        None, description="A local Hugging Face model directory; empty means the packaged SmolLM2-135M-Instruct."
    )
    model_cache_dir: Path | None = Field(
        None, description="Where the packaged model is converted; default data_dir/models."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights and compute dtype for serving; recorded with every completion."
    )
    device: str = Field("auto", description="'auto' picks cuda when present, else cpu.")
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads of `liveloop serve` or `liveloop train` run alone; 0 keeps "
        "torch's default (every core). `liveloop up` sets it for each of its processes from the two below.",
    )
    # `liveloop up` runs the API and the trainer on one machine: torch's default gives each every core, and two
    # busy processes then oversubscribe them; bench/colocated.py measures a split against each process alone
    serve_threads: int = Field(
        0, ge=0, description="torch threads of the API process under `liveloop up`; 0: the cores train_threads "
        "leaves (at least 1).",
    )
    train_threads: int = Field(
        0, ge=0, description="torch threads of the trainer under `liveloop up`; 0: half the cores (at least 1).",
    )

    # --- API -----------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated end-user keys, each 'user:key' or 'key' (its user is then named by a hash of "
        "the key). Empty leaves the API open, which `serve` and `up` refuse on a non-loopback host.",
    )
    allow_open: bool = Field(
        False, description="Serve without API keys on a non-loopback host (anyone who reaches it may chat and rate)."
    )
    admin_token: SecretStr | None = Field(
        None, description=f"Bearer token for /admin, at least {ADMIN_TOKEN_MIN_CHARS} characters (e.g. `openssl "
        "rand -hex 32`); unset disables /admin.",
    )
    access_log: bool = Field(False, description="Log every HTTP request at INFO (uvicorn's access log).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this are refused (413).")
    model_alias: str = Field("liveloop", description="Model name that always means the live adapter version.")

    # --- engine --------------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond the running batch; more get 429.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_stop_chars: int = Field(
        256, ge=1, description="Longest stop string a request may give (text that may start one is held back)."
    )
    tokenize_threads: int = Field(
        2, ge=1, description="Threads that apply the chat template and tokenise prompts, off the event loop."
    )
    merge_live_adapter: bool = Field(
        True, description="Merge the live version's LoRA into the base weights, so most rows decode with no adapter "
        "cost (other versions' rows run their difference to it). Costs a copy of the adapted weights in memory.",
    )

    # --- feedback ------------------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "", description="Kafka bootstrap servers 'host:port,...'; empty means the embedded broker (dev and tests)."
    )
    feedback_topic: str = Field("feedback", description="Rating events, keyed by completion id.")
    feedback_dlq_topic: str = Field("feedback-dlq", description="Events the consumer could not read, with why.")
    adapter_events_topic: str = Field("adapter-events", description="Adapter registry transitions.")
    feedback_partitions: int = Field(
        3, ge=1, description="Partitions of the feedback topic when liveloop creates it (bounds consumer parallelism)."
    )
    feedback_dlq_partitions: int = Field(1, ge=1, description="Partitions of the dead-letter topic when created.")
    adapter_events_partitions: int = Field(1, ge=1, description="Partitions of the adapter-events topic when created.")
    kafka_replication_factor: int = Field(1, ge=1, description="Replication of topics liveloop creates (prod: 3).")
    kafka_idempotence: bool = Field(
        True, description="Idempotent producer (no duplicates from producer retries); off for brokers without it."
    )
    kafka_request_timeout_ms: int = Field(5_000, ge=1_000, description="One Kafka request before the client retries.")
    kafka_delivery_timeout_ms: int = Field(
        15_000, ge=100, description="How long a publish may wait for the broker's ack before the relay retries it."
    )
    kafka_session_timeout_ms: int = Field(
        6_000, ge=100, description="Consumer liveness; Kafka's 45 s default makes a group join take > 20 s."
    )
    kafka_heartbeat_interval_ms: int = Field(1_000, ge=10, description="Consumer heartbeat; below the session timeout.")
    kafka_max_poll_interval_ms: int = Field(
        900_000, ge=1_000, description="Longest gap between polls before the group evicts a consumer (> a PPO update)."
    )
    feedback_consumer_group: str = Field("liveloop-trainer", description="Consumer group of the trainer.")
    feedback_reward_up: float = Field(1.0, description="Reward a thumbs-up is worth to the trainer.")
    feedback_reward_down: float = Field(-1.0, description="Reward a thumbs-down is worth to the trainer.")
    feedback_comment_max_chars: int = Field(2_000, ge=0, description="Longest comment accepted with a rating.")
    feedback_write_timeout_s: float = Field(
        10.0, gt=0, description="Longest a rating waits for the database; then it is answered 503 and not written."
    )
    feedback_max_waiting: int = Field(
        4096, ge=1, description="Ratings waiting for the database (per API process) beyond which new ones get 503."
    )
    relay_in_api: bool = Field(True, description="Run the outbox relay inside the API process.")
    relay_batch_size: int = Field(500, ge=1, description="Outbox rows published per round trip.")
    relay_poll_interval_s: float = Field(
        0.05, gt=0, description="How often an idle relay looks for new outbox rows: up to this much is added to every "
        "adapter event and rating written by another process (an idle relay at 0.05 s costs ~2% of a core).",
    )
    relay_max_backoff_s: float = Field(30.0, gt=0, description="Longest wait between retries while Kafka is down.")
    relay_max_attempts: int = Field(
        10, ge=1, description="Failed sends of its own (Kafka refused it, or took others of its round) after which an "
        "outbox row is parked: kept with its error, no longer sent, counted in liveloop_outbox_parked_rows.",
    )

    # --- registry ------------------------------------------------------------------------------------
    artifact_dir: Path | None = Field(
        None, description="Where the artifact store keeps adapter versions; default data_dir/adapters."
    )

    # --- trainer -------------------------------------------------------------------------------------
    reward_source: Literal["direct", "reward_model"] = Field(
        "direct", description="direct: the thumb is the reward of the logged sample; reward_model: a model learned "
        "from the thumbs scores fresh responses of the current policy (on-policy PPO).",
    )
    train_batch_min: int = Field(16, ge=1, description="Ratings a PPO update waits for (held-out ones not counted).")
    train_batch_max: int = Field(64, ge=1, description="Most ratings one PPO update trains on.")
    train_poll_s: float = Field(5.0, gt=0, description="Longest wait for more ratings in one poll of the topic.")
    trainer_metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus port of `liveloop train`; 0: none.")
    ppo: dict = Field(
        default_factory=dict, description="PPOConfig overrides as JSON, e.g. '{\"learning_rate\": 1e-5}'."
    )
    reward_model: dict = Field(default_factory=dict, description="RewardModelConfig overrides as JSON.")
    rollout: dict = Field(default_factory=dict, description="RolloutConfig overrides as JSON (reward_model mode).")

    # --- gates ---------------------------------------------------------------------------------------
    gate_holdout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of live completions (stable hash of the id) never trained on, for gates."
    )
    gate_prompts: int = Field(
        16, ge=1, description="Held-out prompts in the fixed sample a gate run generates for, in one batch (the "
        "KL and generation-sanity gates); topped up from the shipped prompts while live traffic is thin.",
    )
    gate_max_new_tokens: int = Field(48, ge=1, description="Greedy tokens generated per gate prompt.")
    gate_reward_samples: int = Field(
        128, ge=1, description="Most rated held-out completions in the fixed sample the reward gate reweights.",
    )
    gate_reward_tokens: int = Field(
        8192, ge=1, description="Most prompt + response tokens in that sample (it stops before the completion "
        "that would pass this): with gate_reward_samples, bounds the reward gate's cost whatever the held-out set.",
    )
    gate_reward_min_ess: float = Field(
        30.0, gt=0, description="Effective sample size (Kish, of the truncated importance weights; the smaller of "
        "candidate's and live's) the reward gate needs; below it the gate passes as 'skipped: insufficient "
        "evidence' with a null CI, and the canary's thumbs decide.",
    )
    gate_reward_confidence: float = Field(
        0.9, gt=0, lt=1, description="Level of the two-sided confidence interval [ci_low, ci_high] of the "
        "thumbs-up rate difference candidate − live; the gate fails when ci_high < −gate_reward_epsilon.",
    )
    gate_reward_epsilon: float = Field(
        0.05, ge=0, description="The reward gate fails only when the candidate's thumbs-up rate is shown below the "
        "live version's by more than this (ci_high < −this).",
    )
    gate_kl_target_multiple: float = Field(
        2.0, gt=0, description="The KL gate's bound is this multiple of the training target PPOConfig.target_kl "
        "(nats per token; LIVELOOP_PPO overrides included): mean per-token KL(candidate ‖ base) at T = 1.",
    )
    gate_max_kl: float = Field(
        0.1, gt=0, description="The KL gate's bound, in nats per token, when training has no KL target "
        "(target_kl null: a fixed β).",
    )
    gate_perplexity_delta: float = Field(
        0.1, ge=0, description="Reference-text perplexity may be at most (1 + this) × the base model's."
    )
    gate_repetition_margin: float = Field(
        0.15, ge=0, description="Repeated-trigram rate may exceed the base model's by at most this much."
    )
    gate_length_hit_margin: float = Field(
        0.25, ge=0, description="Share of outputs cut at the token limit may exceed the base model's by this much."
    )
    gate_max_delta_norm: float = Field(
        0.5, gt=0, description="Largest ‖ΔW‖ / ‖W‖ (Frobenius) over the adapted projections."
    )

    # --- promotion -----------------------------------------------------------------------------------
    promotion_policy: Literal["auto", "manual"] = Field(
        "auto", description="auto: passing the gates starts a canary (or promotes); manual: an engineer promotes."
    )
    canary_fraction: float = Field(
        0.5, ge=0, lt=1,
        description="Share of users (stable hash of the user id) served the canary; 0 disables. 0.5 is an A/B test: "
                    "an even split needs the fewest ratings for a decision, so a small user base still gets one.",
    )
    canary_effect: float = Field(
        0.1, gt=0, lt=1,
        description="H1 of the canary's SPRT: the canary's thumbs-up rate exceeds live's by this much (H0: equal).",
    )
    canary_vote_effect: float = Field(
        0.075, gt=0, lt=0.5,
        description="H1 of the canary's SPRT for paired votes (a live and a canary answer compared): the canary is "
        "preferred with probability 0.5 + this (H0: 0.5). 0.075 is what canary_effect means at thumbs-up rates of "
        "0.2-0.5 when a rater prefers the answer they like more (Thurstone; promotion.latent_preference).",
    )
    canary_alpha: float = Field(
        0.005, gt=0, lt=0.5,
        description="Nominal probability of promoting a canary no better than live (README: measured rates).",
    )
    canary_beta: float = Field(
        0.1, gt=0, lt=0.5,
        description="Nominal probability of rejecting a canary better by canary_effect (the cap adds to it).",
    )
    canary_min_ratings: int = Field(
        20, ge=1, description="Ratings each side needs before the first look (the test estimates the variance)."
    )
    canary_min_trained_ratings: int = Field(
        128, ge=0, description="Ratings a version's lineage must have trained on before it may start a canary: a "
        "canary holds its slot for hundreds of ratings, and one trained on a first handful is rarely worth them.",
    )
    canary_max_ratings: int = Field(
        1600, ge=2,
        description="Ratings (thumbs of both sides and comparisons of the two) after which a canary still undecided "
        "is rejected (no evidence).",
    )
    canary_supersede_ratings: int = Field(
        400, ge=0,
        description="Ratings (both sides) after which a canary still undecided gives way to a newer approved version "
        "trained further from it (0: never). The canary slot is the loop's bottleneck; abandoning an undecided "
        "test promotes nothing.",
    )
    max_ratings_per_user: int = Field(
        200, ge=1,
        description="Most ratings one user counts for per side of a canary or rollback decision (the first ones).",
    )
    rollback_window_s: float = Field(
        86_400, gt=0,
        description="How long after a promotion a drop is watched for; the predecessor's ratings in the same length "
                    "of time before the promotion are the reference.",
    )
    rollback_effect: float = Field(
        0.1, gt=0, lt=1, description="H1 of the rollback SPRT: the new version's thumbs-up rate is this much lower."
    )
    rollback_min_ratings: int = Field(30, ge=1, description="Ratings each side needs before the first rollback look.")
    rollback_alpha: float = Field(
        0.01, gt=0, lt=1, description="Probability of rolling back a version no worse than its predecessor."
    )
    promotion_interval_s: float = Field(
        30.0, gt=0, description="How often the promotion monitor decides canaries and checks for rollbacks."
    )

    # --- hot-swap ------------------------------------------------------------------------------------
    adapter_poll_s: float = Field(
        1.0, gt=0, description="How often a serving replica re-reads the registry's routing (events come faster)."
    )
    adapter_load_timeout_s: float = Field(60.0, gt=0, description="Longest wait for an adapter to load.")
    adapter_unload_grace_s: float = Field(
        30.0, ge=0, description="Versions out of the routing (live, canary, previous) this long are unloaded."
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [source for source in (env_settings, dotenv_settings) if isinstance(source, EnvSettingsSource)]
        return (UnknownVariables(settings_cls, *sources), init_settings, env_settings, dotenv_settings,
                file_secret_settings)

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "adapters"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        if any(sep and not (user and key) for user, sep, key in (entry.partition(":") for entry in value)):
            raise ValueError("each LIVELOOP_API_KEYS entry is 'user:key' (both non-empty) or 'key'")
        return value

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(f"LIVELOOP_ADMIN_TOKEN must have at least {ADMIN_TOKEN_MIN_CHARS} characters "
                             "(e.g. `openssl rand -hex 32`)")
        return value

    @model_validator(mode="after")
    def _check_kafka_timeouts(self) -> Settings:
        if self.kafka_heartbeat_interval_ms >= self.kafka_session_timeout_ms:
            raise ValueError("LIVELOOP_KAFKA_HEARTBEAT_INTERVAL_MS must be below LIVELOOP_KAFKA_SESSION_TIMEOUT_MS")
        if self.kafka_delivery_timeout_ms < self.kafka_request_timeout_ms + 100:  # a delivery = batching + request
            raise ValueError("LIVELOOP_KAFKA_DELIVERY_TIMEOUT_MS must exceed LIVELOOP_KAFKA_REQUEST_TIMEOUT_MS by 100+")
        return self

    @model_validator(mode="after")
    def _check_canary(self) -> Settings:
        if self.canary_max_ratings < 2 * self.canary_min_ratings:
            raise ValueError("LIVELOOP_CANARY_MAX_RATINGS must be at least twice LIVELOOP_CANARY_MIN_RATINGS")
        return self

    @model_validator(mode="after")
    def _check_paths(self) -> Settings:
        if self.base_model is not None and not (self.base_model / "config.json").is_file():
            raise ValueError(f"LIVELOOP_BASE_MODEL={self.base_model} is not a Hugging Face model directory")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'liveloop.db').resolve()}"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"
