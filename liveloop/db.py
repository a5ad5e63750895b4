"""Database engine, sessions and the Alembic schema check.

Alembic owns the schema: ``migrate`` upgrades to head (embedded default), ``require_current_schema`` refuses to
run on an old one (production, where migrations are a deploy step: ``liveloop db upgrade``).
"""

from __future__ import annotations

from pathlib import Path

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from liveloop.settings import Settings

_MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    pass


def _ensure_sqlite_dir(url: str) -> None:
    path = url.removeprefix("sqlite:///")
    if url.startswith("sqlite") and path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _json_dumps(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# JSON columns go through orjson: decoding the token ids and log-probs of completions, and encoding feedback
# events, were a third of the time of recording a rating with the standard library's json.
_JSON = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}


def make_engine(url: str) -> Engine:
    _ensure_sqlite_dir(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **_JSON)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # WAL lets readers run while the relay writes
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **_JSON)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    _ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), "head")


def require_current_schema(engine: Engine) -> None:
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, this code needs {head}: run 'liveloop db upgrade'"
        )


def open_database(settings: Settings) -> Engine:
    """The engine for the configured database, migrated or checked as settings say."""
    url = settings.resolved_database_url
    if settings.auto_migrate:
        migrate(url)
    engine = make_engine(url)
    require_current_schema(engine)
    return engine
