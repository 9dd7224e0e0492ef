"""Django's SQLite backend, whose connections outlive the thread that opened them.

With ``PACS_DB_POOL`` on (``runscp`` turns it on for itself), the SQLite database uses this
backend: the SCP serves every DICOM association in a new thread, and each thread's first
query used to open a connection (the file, its write-ahead log's shared memory, the SQL
functions Django registers: 0.7 ms of a small C-FIND's 8). A connection closed while no
transaction is open is kept instead, and the next thread to connect takes it. Kept open,
it also spares the database the checkpoint SQLite makes when its last connection closes
(a few milliseconds of every association that used to close it). A sqlite3
connection may move between threads when one thread at a time uses it (Django opens them
with ``check_same_thread=False`` and keeps each to one thread); none is kept after a
database error, and none crosses a fork: the kept ones are closed before the process forks.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django.db.backends.sqlite3 import base

# Connections kept for the next thread, per database file; at most this many each.
KEPT_LIMIT = 8
_kept: dict[str, list] = {}
_lock = threading.Lock()


def close_kept() -> None:
    """Close every kept connection (before a fork, and for tests)."""
    with _lock:
        connections = [c for kept in _kept.values() for c in kept]
        _kept.clear()
    for connection in connections:
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - closing what nobody uses any more
            pass


os.register_at_fork(before=close_kept)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        with _lock:
            kept = _kept.get(self.settings_dict["NAME"])
            connection = kept.pop() if kept else None
        if connection is not None:
            return connection
        return super().get_new_connection(conn_params)

    def _close(self) -> None:
        connection = self.connection
        if (
            connection is not None
            and not self.in_atomic_block
            and not self.errors_occurred
            and not connection.in_transaction
            and not self.is_in_memory_db()
        ):
            with _lock:
                kept = _kept.setdefault(self.settings_dict["NAME"], [])
                if len(kept) < KEPT_LIMIT:
                    kept.append(connection)
                    return
        super()._close()
