import pytest
import sqlalchemy as sa

from liveloop.db import SchemaOutOfDate, make_engine, migrate, require_current_schema


def test_migrations_reach_head_and_old_schema_is_refused(database_url):
    engine = make_engine(database_url)
    with pytest.raises(SchemaOutOfDate, match="liveloop db upgrade"):
        require_current_schema(engine)
    migrate(database_url)
    require_current_schema(engine)
    assert "completions" in sa.inspect(engine).get_table_names()
    engine.dispose()
