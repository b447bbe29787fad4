"""Repair of the embedded MLflow SQLite store after an interrupted schema migration.

MLflow creates and upgrades its SQLite store with Alembic. On SQLite, Alembic alters a table by
"move and copy": ``CREATE TABLE _alembic_tmp_<table>`` with the new schema, copy the rows,
``DROP TABLE <table>``, rename the copy. These steps are not one transaction, so a migration that
dies between them (a full disk, a kill during the first ``sftflow run`` in a new home) leaves
``_alembic_tmp_<table>`` behind while ``alembic_version`` still names the previous revision. Every
later start then runs the same migration again and fails for good with ``table
_alembic_tmp_experiments already exists``, even after space was freed.

``repair_interrupted_migration(uri)`` runs before MLflow opens a SQLite store (from
``sftflow.tracking.runs.init_store``, under the store's initialisation lock, so no other sftflow
process is migrating it at that moment): a leftover ``_alembic_tmp_<table>`` whose ``<table>``
still exists is a partial copy, and dropping it lets MLflow's migration redo that step from the
intact original. One that replaced its original (the crash came after ``DROP TABLE <table>``)
holds the only copy of the rows: it is left alone and the message says so. Other stores (HTTP,
PostgreSQL, MySQL) migrate transactionally or on the server: nothing to do. Standard library only.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TMP_PREFIX = "_alembic_tmp_"
_log = logging.getLogger("sftflow.tracking.store")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///...`` URI (None for other stores and in-memory ones)."""
    if urlparse(uri).scheme.split("+")[0] != "sqlite" or ":///" not in uri:
        return None
    db = uri.split(":///", 1)[1].split("?", 1)[0]
    if not db or db.startswith(":memory:"):
        return None
    return Path(db).expanduser()


def leftover_tables(path: Path) -> list[str]:
    """Names of ``_alembic_tmp_*`` tables in the SQLite file ``path`` ([] when none or unreadable)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return []
    try:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
                           (TMP_PREFIX.replace("_", "\\_") + "%",)).fetchall()
    except sqlite3.Error:  # not a database, locked for long, ...: MLflow reports it when it opens the file
        return []
    finally:
        con.close()
    return sorted(r[0] for r in rows)


def repair_interrupted_migration(uri: str, *, logger: Any = None) -> list[str]:
    """Drop the ``_alembic_tmp_<table>`` tables an interrupted MLflow migration left in a SQLite store.

    Call before MLflow opens the store, while no other process migrates it. Says what it did in one
    warning line.

    Args:
        uri: the tracking URI (only ``sqlite:///`` files are looked at).
        logger: where the line goes (default: the ``sftflow.tracking.store`` logger).

    Returns:
        The tables dropped ([] when the store is fine, not SQLite, or could not be repaired).
    """
    log = logger or _log
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return []
    leftovers = leftover_tables(path)
    if not leftovers:
        return []
    dropped: list[str] = []
    orphans: list[str] = []
    con = sqlite3.connect(path, timeout=60)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for tmp in leftovers:
            if tmp[len(TMP_PREFIX):] in names:
                con.execute(f'DROP TABLE "{tmp}"')
                dropped.append(tmp)
            else:
                orphans.append(tmp)
        con.commit()
    except sqlite3.Error as e:
        con.rollback()
        log.warning("MLflow store %s: an interrupted schema migration left %s, and removing it failed (%s); "
                    "free disk space / make the file writable and run again", path, ", ".join(leftovers), e)
        return []
    finally:
        con.close()
    if dropped:
        log.warning("MLflow store %s: an earlier schema migration was interrupted (e.g. the disk filled up) and "
                    "left %s; dropped %s so the migration runs again", path, ", ".join(dropped),
                    "it" if len(dropped) == 1 else "them")
    if orphans:
        log.warning("MLflow store %s: an interrupted schema migration left %s as the only copy of its table; not "
                    "touched. Restore %s from a backup, or move it aside to start a new store",
                    path, ", ".join(orphans), path.name)
    return dropped
