"""A database without Fleet's tables (or behind) is a configuration problem (78), never "down" (75):
retrying cannot create the tables, `fleet db upgrade` does."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fleet import db
from fleet.errors import ConfigError, ExitCode, UnavailableError
from fleet.services import as_fleet_error


def _error_of(database_url: str, *statements: str) -> SQLAlchemyError:
    """The SQLAlchemy error the last statement raises on this database (the others prepare it)."""
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            for statement in statements[:-1]:
                conn.execute(text(statement))
        with engine.connect() as conn, pytest.raises(SQLAlchemyError) as caught:
            conn.execute(text(statements[-1]))
        return caught.value
    finally:
        engine.dispose()


def test_a_missing_table_says_run_db_upgrade_and_exits_78(database_url: str) -> None:
    error = as_fleet_error(_error_of(database_url, "SELECT id FROM runs"))
    assert isinstance(error, ConfigError) and error.exit_code == ExitCode.CONFIG
    assert "no Fleet tables" in str(error) and "fleet db upgrade" in str(error)
    assert "safe to retry" not in str(error)


def test_a_missing_column_is_a_schema_behind_and_exits_78(database_url: str) -> None:
    error = as_fleet_error(_error_of(database_url, "CREATE TABLE runs (id INTEGER)", "SELECT fence FROM runs"))
    assert error.exit_code == ExitCode.CONFIG
    assert "fleet db upgrade" in str(error)


def test_an_insert_into_a_missing_column_is_a_schema_behind(database_url: str) -> None:
    error = as_fleet_error(_error_of(database_url, "CREATE TABLE runs (id INTEGER)",
                                     "INSERT INTO runs (id, fence) VALUES (1, 2)"))
    assert error.exit_code == ExitCode.CONFIG


def test_other_database_errors_stay_transient(database_url: str) -> None:
    error = as_fleet_error(_error_of(database_url, "SELEC 1"))  # not a schema problem: still 75, as before
    assert isinstance(error, UnavailableError)
