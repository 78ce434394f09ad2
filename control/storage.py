"""SQLite as the embedded store of the gateway's registry and the center's state."""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


def open_db(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating it and its directory if need be) the database at `path` and apply
    `schema`. WAL: readers never block the writer, and a crash loses at most the last
    transaction. Autocommit: a statement is its own transaction unless `transaction`
    groups several. Rows come as sqlite3.Row. One connection, shared by threads: its
    owner serialises access with a lock."""
    if path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


def journal_mode(db: sqlite3.Connection) -> str:
    """"wal", or what SQLite fell back to (an in-memory database is "memory")."""
    return str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()


@contextmanager
def transaction(db: sqlite3.Connection, immediate: bool = False) -> Iterator[None]:
    """Statements in the block commit together, or not at all if it raises. `immediate`
    takes the write lock at the start, for a read that decides a write."""
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
