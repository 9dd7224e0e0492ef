"""pacsportal.sqlite3: SQLite connections kept for the next thread (runscp, PACS_DB_POOL)."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from pacsportal.sqlite3 import base

# Each test opens its own database file; the mark lets pytest-django allow connections.
pytestmark = pytest.mark.django_db


@pytest.fixture
def make_wrapper(tmp_path: Path) -> Iterator[Callable[[], base.DatabaseWrapper]]:
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict.update(ENGINE="pacsportal.sqlite3", NAME=str(tmp_path / "kept.sqlite3"))
    settings_dict["OPTIONS"] = {"timeout": 5}
    base.close_kept()
    yield lambda: base.DatabaseWrapper(settings_dict)
    base.close_kept()


def in_thread(function: Callable[[], Any]) -> Any:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join(10)
    return result[0]


def test_a_connection_closed_by_one_thread_serves_the_next(make_wrapper) -> None:
    def first() -> Any:
        db = make_wrapper()
        with db.cursor() as cursor:
            cursor.execute("CREATE TABLE t (n integer)")
            cursor.execute("INSERT INTO t VALUES (7)")
        raw = db.connection
        db.close()
        return raw

    def second() -> Any:
        db = make_wrapper()
        with db.cursor() as cursor:
            cursor.execute("SELECT n FROM t")
            value = cursor.fetchone()[0]
        raw = db.connection
        db.close()
        return raw, value

    raw = in_thread(first)
    again, value = in_thread(second)
    assert again is raw and value == 7


def test_a_connection_in_a_transaction_or_after_an_error_is_closed(make_wrapper) -> None:
    def open_transaction() -> Any:
        db = make_wrapper()
        db.ensure_connection()
        db.connection.execute("BEGIN IMMEDIATE")
        raw = db.connection
        db.close()
        return raw

    def failed() -> Any:
        db = make_wrapper()
        with pytest.raises(Exception), db.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")
        raw = db.connection
        db.close()
        return raw

    for function in (open_transaction, failed):
        raw = in_thread(function)
        assert base._kept.get(make_wrapper().settings_dict["NAME"], []) == []
        with pytest.raises(Exception):
            raw.execute("SELECT 1")  # closed, not kept


def test_no_kept_connection_crosses_a_fork(make_wrapper) -> None:
    def kept() -> None:
        db = make_wrapper()
        db.ensure_connection()
        db.close()

    in_thread(kept)
    name = make_wrapper().settings_dict["NAME"]
    assert len(base._kept[name]) == 1
    pid = os.fork()
    if pid == 0:  # the child: nothing kept
        os._exit(0 if not base._kept.get(name) else 1)
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0
    assert not base._kept.get(name)  # closed before the fork, in the parent too
