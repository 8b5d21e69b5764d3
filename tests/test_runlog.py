"""Run logs shipped to the database in chunks (fleet/runlog.py), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from fleet import db, runlog
from fleet.services import utcnow


def _shipped(engine: Engine, run_id: str) -> bytes:
    with db.session(engine) as session:
        return b"".join(data for _, data in runlog.chunks(session, run_id, limit=10_000))


def test_a_log_is_shipped_in_chunks_as_it_grows_and_a_retry_appends(engine: Engine, tmp_path: Path) -> None:
    path, run = tmp_path / "run.log", "a" * 32
    path.write_bytes(b"first " * 30_000)  # 180 kB: three chunks
    first = runlog.Shipper.for_attempt(engine, run, 1, path)
    assert first.ship(utcnow())
    assert _shipped(engine, run) == path.read_bytes()
    assert first.ship(utcnow())  # nothing new: nothing stored twice
    with path.open("ab") as handle:
        handle.write("é and more\n".encode())
    first.ship(utcnow(), everything=True)  # the attempt's end
    retry = runlog.Shipper.for_attempt(engine, run, 2, path)  # this host's file already holds attempt 1
    with path.open("ab") as handle:
        handle.write(b"second attempt\n")
    retry.ship(utcnow(), everything=True)
    assert _shipped(engine, run).endswith("é and more\nsecond attempt\n".encode())
    assert _shipped(engine, run).count(b"second attempt") == 1
    with db.session(engine) as session:
        assert runlog.tail(session, run, 15) == "second attempt\n"


def test_a_chunk_sent_again_after_a_lost_answer_is_stored_once(engine: Engine, tmp_path: Path) -> None:
    path, run = tmp_path / "run.log", "b" * 32
    path.write_bytes(b"x" * 100_000)
    shipper = runlog.Shipper.for_attempt(engine, run, 1, path)
    assert shipper.ship(utcnow())
    shipper.offset = 0  # as if the commit's answer had been lost: the same chunks go again
    assert shipper.ship(utcnow())
    assert _shipped(engine, run) == path.read_bytes()


def test_retention_keeps_the_newest_runs_logs(engine: Engine, tmp_path: Path) -> None:
    for i in range(5):
        path = tmp_path / f"{i}.log"
        path.write_bytes(f"run {i}\n".encode())
        runlog.Shipper.for_attempt(engine, f"{i}" * 32, 1, path).ship(utcnow())
    with db.session(engine) as session:
        assert runlog.keep_newest(session, 2) == 3
        session.commit()
        assert [runlog.has_log(session, f"{i}" * 32) for i in range(5)] == [False, False, False, True, True]
