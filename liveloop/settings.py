"""All configuration, from environment variables prefixed ``LIVELOOP_`` (or a ``.env`` file).

Embedded defaults run the whole loop on one machine: SQLite under ``./var``, the packaged model, an embedded
broker. Production sets the database URL, the Kafka bootstrap servers and API keys. Invalid values fail at
start-up with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVELOOP_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Where embedded state lives (SQLite file, model cache, adapters).")
    database_url: str = Field("", description="SQLAlchemy URL; empty means a SQLite file in data_dir.")
    auto_migrate: bool = Field(
        True, description="Run Alembic migrations at start-up; when false, refuse to start on an old schema."
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
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

    # --- API -----------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated end-user keys, each 'key' or 'user:key'. Empty leaves the API open.",
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin; unset disables /admin.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this are refused (413).")
    model_alias: str = Field("liveloop", description="Model name that always means the live adapter version.")

    # --- engine --------------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond the running batch; more get 429.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        return _split_csv(value)

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

    @property
    def users_by_key(self) -> dict[str, str]:
        """API key → user identity stored with completions (the key's own prefix when no user is named)."""
        keys: dict[str, str] = {}
        for entry in self.api_keys:
            user, sep, key = entry.partition(":")
            keys[key if sep else user] = user if sep else f"key-{user[:6]}"
        return keys
