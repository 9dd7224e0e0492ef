"""The ingest service: the one path by which an instance enters the archive.

C-STORE, STOW-RS, web upload and ``importdicom`` all call ``ingest_file``,
``ingest_bytes`` or ``ingest_dataset``. Each checks the dataset, writes the file as
received (DICOM Part 10) under a path derived from a hash of its SOP Instance UID, and
indexes it in one transaction; the answer is stored, duplicate or rejected with a reason
a person can act on. A failure at any step leaves neither a file without a row nor a
row without a file.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, OperationalError, connections, transaction
from django.db.models import F
from django.dispatch import Signal
from django.utils import timezone
from psycopg.pq import TransactionStatus
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from archive import compiled, rawheader, storage
from archive.dicom import DicomFileError, Header, normalize_name, required_uid_errors
from archive.models import Instance, Patient, Series, Study

log = logging.getLogger("archive.ingest")

# Sent after an instance's transaction commits: sender=Instance, instance_id, study_id,
# series_id, created_series (bool). Follow-up work (render cache, routing, labels) hooks here.
instance_stored = Signal()
# Sent when a batch of stores has ended (an association released or aborted, an import
# finished, an upload answered): sender, series_ids (the series that received instances).
# Work that wants whole series (the render cache) hooks here rather than per instance.
series_received = Signal()


def announce_series(sender: object, series_ids: set[int]) -> None:
    """Send ``series_received`` for ``series_ids``; a failing receiver is logged, never raised."""
    if not series_ids:
        return
    for receiver, result in series_received.send_robust(sender=sender, series_ids=sorted(series_ids)):
        if isinstance(result, Exception):
            log.error("series_received receiver %s failed: %s", getattr(receiver, "__name__", receiver), result)

# Refuse a write that would leave less than this on the storage filesystem.
MIN_FREE_BYTES = 64 * 1024 * 1024


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # the data cannot be stored: the sender must fix it
    MISMATCH = "mismatch"  # the dataset is not what the request announced
    OUT_OF_RESOURCES = "out_of_resources"  # disk full: try again later
    FAILED = "failed"  # our side failed (database down, I/O error): try again later


@dataclass(frozen=True)
class Source:
    """Who or what delivered an instance."""

    channel: str  # "dimse", "import", "stow", "upload"
    ae_title: str = ""
    address: str = ""
    user_id: int | None = None
    path: str = ""


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str = ""
    instance_id: int | None = None
    series_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE)


@dataclass(frozen=True)
class Expected:
    """What the request announced (C-STORE's Affected SOP Class/Instance UID)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""


class _Reject(Exception):
    def __init__(self, outcome: Outcome, reason: str):
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def ingest_dataset(ds: Dataset, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store a pydicom dataset (with file_meta), encoded as DICOM Part 10."""
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for unencodable data
        return IngestResult(Outcome.REJECTED, f"dataset cannot be encoded: {exc}")
    buffer.seek(0)
    return ingest_stream(buffer, source, expected)


def ingest_bytes(data: bytes, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store DICOM Part 10 bytes."""
    return ingest_stream(io.BytesIO(data), source, expected)


def ingest_stream(stream: BinaryIO, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store a DICOM Part 10 stream: it is copied to a temporary file first."""
    try:
        temp = storage.copy_to_temp(stream)
    except OSError as exc:
        return _io_failure(exc)
    return ingest_file(temp, source, take=True, expected=expected)


def ingest_file(
    path: Path | str,
    source: Source,
    *,
    take: bool = False,
    expected: Expected | None = None,
    sha256: str | None = None,
) -> IngestResult:
    """Store the DICOM Part 10 file at ``path``.

    With ``take`` the file is ours to move into the archive (or delete): the SCP passes
    the file it received into, and ``sha256``, the file's digest when it was worked out
    while the file was written (else it is worked out here). Otherwise the file is copied
    and left where it is.
    Never raises for bad input or a failing disk or database: the result says what happened.
    """
    path = Path(path)
    temp: Path | None = path if take else None
    try:
        if take and not storage.same_filesystem(path):
            temp = storage.new_temp_path()
            shutil.move(path, temp)
        elif not take:
            with open(path, "rb") as handle:
                temp = storage.copy_to_temp(handle)
        return _ingest_temp(temp, source, expected, sha256 if take else None)
    except _Reject as exc:
        return IngestResult(exc.outcome, exc.reason)
    except OSError as exc:
        return _io_failure(exc)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _io_failure(exc: OSError) -> IngestResult:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full: %s", exc)
        return IngestResult(Outcome.OUT_OF_RESOURCES, "storage is full")
    log.error("storage I/O error: %s", exc)
    return IngestResult(Outcome.FAILED, f"storage I/O error: {exc.strerror or exc}")


def _ingest_temp(temp: Path, source: Source, expected: Expected | None, known_sha256: str | None = None) -> IngestResult:
    with storage.mapped(temp, known_sha256) as (data, size, sha256):
        try:
            header, metadata = rawheader.indexed(data, size)
        except DicomFileError as exc:
            return IngestResult(Outcome.REJECTED, str(exc))
    uid = header.instance["sop_instance_uid"]
    problems = required_uid_errors(header)
    if problems:
        return IngestResult(Outcome.REJECTED, "; ".join(problems), uid)
    if expected:
        mismatch = _mismatch(header, expected)
        if mismatch:
            return IngestResult(Outcome.MISMATCH, mismatch, uid)
    if storage.disk_free() < size + MIN_FREE_BYTES:
        return IngestResult(Outcome.OUT_OF_RESOURCES, "storage is full", uid)
    row = _InstanceRow(header, metadata, storage.relative_path_for(uid), size, sha256, source)
    try:
        if settings.PACS_DUPLICATE_POLICY == "overwrite":
            keys = _store_replacing(row, temp)
        else:
            keys = _store_keeping(row, temp)
    except _Duplicate:
        return IngestResult(Outcome.DUPLICATE, "SOP Instance UID already stored; kept the first copy", uid)
    except _Reject as exc:
        return IngestResult(exc.outcome, exc.reason, uid)
    except DatabaseError as exc:
        log.error("database error while indexing %s: %s", uid, exc)
        return IngestResult(Outcome.FAILED, "database error; nothing was stored", uid)
    instance_stored.send(
        sender=Instance,
        instance_id=keys.instance_id,
        study_id=keys.study_id,
        series_id=keys.series_id,
        created_series=keys.created_series,
    )
    return IngestResult(Outcome.STORED, "", uid, keys.instance_id, keys.series_id)


def _mismatch(header: Header, expected: Expected) -> str:
    if expected.sop_instance_uid and expected.sop_instance_uid != header.instance["sop_instance_uid"]:
        return "the dataset's SOPInstanceUID differs from the request's Affected SOP Instance UID"
    if expected.sop_class_uid and expected.sop_class_uid != header.instance["sop_class_uid"]:
        return "the dataset's SOPClassUID differs from the request's Affected SOP Class UID"
    return ""


class _Duplicate(Exception):
    """The SOP instance is already stored (and kept)."""


@dataclass(frozen=True)
class _InstanceRow:
    header: Header
    metadata: dict
    relative: str
    size: int
    sha256: str
    source: Source

    @property
    def uid(self) -> str:
        return self.header.instance["sop_instance_uid"]


@dataclass(frozen=True)
class _Keys:
    instance_id: int
    study_id: int
    series_id: int
    created_series: bool


class _SeriesCache:
    """SeriesInstanceUID -> (study pk, series pk) of series this process has indexed.

    A series' instances arrive one after the other: with its keys cached, indexing one is
    an insert and two counter updates. Filled only after a commit; a stale entry (a
    series deleted since) makes the insert fail, and the store is retried without it.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._entries: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, study_uid: str, series_uid: str) -> tuple[int, int] | None:
        with self._lock:
            entry = self._entries.get(series_uid)
            if entry is None or entry[0] != study_uid:
                return None
            self._entries.move_to_end(series_uid)
            return entry[1], entry[2]

    def put(self, study_uid: str, series_uid: str, study_id: int, series_id: int) -> None:
        with self._lock:
            self._entries[series_uid] = (study_uid, study_id, series_id)
            self._entries.move_to_end(series_uid)
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


series_cache = _SeriesCache()
# Another association may be storing the same SOP instance right now: wait this long for
# its commit before calling it a duplicate (or, if its file is older, an orphan to replace).
_CONCURRENT_WAIT = 10.0
_ORPHAN_AGE = 60.0


class _SQLiteWriter:
    """SQLite has one writer at a time. Writers wait for each other here, in order, instead
    of polling SQLite's busy handler, which sleeps up to 100 ms between attempts: threads
    on a lock, processes (SCP workers, the web server, the task worker) on a file lock."""

    def __init__(self) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._fd_pid = 0

    def _file(self, conn) -> int:
        if self._fd is None or self._fd_pid != os.getpid():  # a forked child opens its own
            path = f"{conn.settings_dict['NAME']}.writer-lock"
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self._fd_pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def held(self, conn) -> Iterator[None]:
        with self._thread_lock:
            fd = self._file(conn)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


_sqlite_writer = _SQLiteWriter()


def _writer_lock(conn) -> contextlib.AbstractContextManager:
    return _sqlite_writer.held(conn) if conn.vendor == "sqlite" else contextlib.nullcontext()


def _store_keeping(row: _InstanceRow, temp: Path) -> _Keys:
    """Keep policy: put the file in place (never over another), then index it.

    The file is linked into place before the transaction, which keeps the transaction (and
    SQLite's write lock, or PostgreSQL's row locks) short; if indexing fails the file is
    removed again. A file already in place means a duplicate, or one being stored by
    another association right now, or the orphan of a process killed between the two
    steps, which is replaced.
    """
    if not storage.link_into_place(temp, row.relative):
        _wait_for_other_copy(row, temp)
    try:
        return _index_row(row)
    except BaseException:
        storage.absolute(row.relative).unlink(missing_ok=True)
        raise


def _wait_for_other_copy(row: _InstanceRow, temp: Path) -> None:
    """The file is already in place: return once ours replaced an orphan, or raise _Duplicate."""
    deadline = time.monotonic() + _CONCURRENT_WAIT
    while True:
        if Instance.objects.filter(sop_instance_uid=row.uid).exists():
            raise _Duplicate()
        age = storage.age(row.relative)
        if age is None:  # the other store failed and took its file back: try again
            if storage.link_into_place(temp, row.relative):
                return
        elif age > _ORPHAN_AGE:
            log.warning("replacing a file without a row (left by a killed process): %s", row.relative)
            storage.publish(temp, row.relative)
            return
        if time.monotonic() > deadline:
            raise _Reject(Outcome.FAILED, "the same SOP instance is being stored by another sender; send again later")
        time.sleep(0.05)


def _index_row(row: _InstanceRow) -> _Keys:
    """Index a file already in place; retried once without the series cache if it was stale."""
    study_uid = row.header.study["study_instance_uid"]
    series_uid = row.header.series["series_instance_uid"]
    cached = series_cache.get(study_uid, series_uid)
    try:
        keys = _retrying(_transaction, row, cached)
    except IntegrityError:
        if Instance.objects.filter(sop_instance_uid=row.uid).exists():
            raise _Duplicate() from None
        if cached is None:
            raise
        series_cache.clear()  # a cached series or study was deleted
        keys = _retrying(_transaction, row, None)
    series_cache.put(study_uid, series_uid, keys.study_id, keys.series_id)
    return keys


# PostgreSQL SQLSTATEs after which a transaction may simply run again.
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def _retrying(function, *args, attempts: int = 3):
    """Run a transaction, again after a deadlock or serialization failure (PostgreSQL)."""
    for attempt in range(attempts):
        try:
            return function(*args)
        except OperationalError as exc:
            state = getattr(exc.__cause__, "sqlstate", None)
            if state not in _TRANSIENT_SQLSTATES or attempt == attempts - 1:
                raise
            log.info("transaction retried after %s", state)
    raise AssertionError("unreachable")


def _transaction(row: _InstanceRow, cached: tuple[int, int] | None) -> _Keys:
    conn = connections[DEFAULT_DB_ALIAS]  # looked up once: the proxy costs on every use
    if cached is not None and conn.vendor == "postgresql":
        return _add_to_known_series(conn, row, *cached)
    if cached is not None and conn.vendor == "sqlite" and not conn.in_atomic_block:
        return _add_to_known_series_sqlite(conn, row, *cached)
    with _writer_lock(conn), transaction.atomic():
        if cached is not None:
            study_id, series_id = cached
            created_series = False
        else:
            study = _lock_study(row.header)
            series, created_series = _series(study, row.header, row.source)
            study_id, series_id = study.pk, series.pk
        instance_id = _insert_instance(conn, row, series_id)
        _count(conn, study_id, series_id, row.size, created_series)
    return _Keys(instance_id, study_id, series_id, created_series)


def _add_to_known_series(conn, row: _InstanceRow, study_id: int, series_id: int) -> _Keys:
    """PostgreSQL: insert the row and count it in one statement, one transaction of its own
    (``archive_add_instance``, migration 0006); inside a caller's transaction, under a
    savepoint, so that a failure (a duplicate, a stale series) leaves that transaction usable."""
    statements = _sql(conn)
    params = [study_id, row.size, *_instance_params(conn, row, series_id)]
    savepoint = transaction.atomic() if conn.in_atomic_block else contextlib.nullcontext()
    with savepoint:
        conn.ensure_connection()
        if not conn.in_atomic_block and conn.connection.info.transaction_status != TransactionStatus.IDLE:
            # Left open by a failure elsewhere: the insert would join it, uncommitted.
            log.warning("a transaction was left open on this thread's connection; rolled back")
            conn.connection.rollback()
        # A prepared statement with the parameters bound by the server (Django's cursor
        # would quote the header's JSON into the statement text).
        instance_id = compiled.execute(conn, statements.add_instance, params)[0][0]
    return _Keys(instance_id, study_id, series_id, created_series=False)


def _add_to_known_series_sqlite(conn, row: _InstanceRow, study_id: int, series_id: int) -> _Keys:
    """SQLite, outside any transaction of the caller: the insert and the two counts in one
    IMMEDIATE transaction on the sqlite3 connection itself (Django's transaction and cursor
    machinery cost more than the three statements), under Django's error translation."""
    statements = _sql(conn)
    params = _instance_params(conn, row, series_id)
    with _writer_lock(conn):
        conn.ensure_connection()
        raw = conn.connection
        with conn.wrap_database_errors:
            if raw.in_transaction:  # left open by a failure elsewhere: it would refuse BEGIN forever
                log.warning("a transaction was left open on this thread's connection; rolled back")
                raw.execute("ROLLBACK")
            raw.execute("BEGIN IMMEDIATE")
            try:
                instance_id = raw.execute(statements.insert_qmark, params).fetchone()[0]
                raw.execute(statements.count_study_qmark, (1, row.size, study_id))
                raw.execute(statements.count_series_qmark, (1, row.size, series_id))
                raw.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    raw.execute("ROLLBACK")
                raise
    return _Keys(instance_id, study_id, series_id, created_series=False)


@dataclass(frozen=True)
class _Statements:
    """The hot path's SQL for one database vendor, built once."""

    insert: str
    fields: tuple
    prepare: tuple  # per field: its value -> the database's (None: the value as it is)
    count_study: str
    count_series: str
    add_instance: str  # PostgreSQL only: archive_add_instance(study, size, *instance columns)
    # SQLite only: the statements above with sqlite3's own placeholders
    insert_qmark: str = ""
    count_study_qmark: str = ""
    count_series_qmark: str = ""


_statements: dict[str, _Statements] = {}
# Instance columns written at ingest, in statement order (the values of Header.instance
# are inserted under their own names).
_INSTANCE_COLUMNS = (
    "series",
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "bits_allocated",
    "number_of_frames",
    "image_position_patient",
    "image_orientation_patient",
    "slice_location",
    "specific_character_set",
    "file_path",
    "file_size",
    "file_sha256",
    "metadata",
    "source_ae_title",
    "source_address",
    "created",
)


# archive_add_instance's parameter types, by model field type (varchar without a length:
# a cast to varchar(n) would clip where the insert must refuse).
_PG_TYPES = {
    "ForeignKey": "bigint",
    "CharField": "varchar",
    "IntegerField": "integer",
    "PositiveSmallIntegerField": "integer",
    "SmallIntegerField": "integer",
    "PositiveIntegerField": "integer",
    "BigIntegerField": "bigint",
    "PositiveBigIntegerField": "bigint",
    "FloatField": "double precision",
    "JSONField": "jsonb",
    "DateTimeField": "timestamptz",
}


def _sql(conn) -> _Statements:
    statements = _statements.get(conn.vendor)
    if statements is None:
        quote = conn.ops.quote_name
        meta = Instance._meta
        fields = tuple(meta.get_field(name) for name in _INSTANCE_COLUMNS)
        placeholders = [
            "%s::jsonb" if conn.vendor == "postgresql" and f.get_internal_type() == "JSONField" else "%s" for f in fields
        ]
        insert = "INSERT INTO {} ({}) VALUES ({}) RETURNING {}".format(
            quote(meta.db_table), ", ".join(quote(f.column) for f in fields), ", ".join(placeholders), quote(meta.pk.column)
        )
        count = "UPDATE {t} SET {n} = {n} + %s, {b} = {b} + %s WHERE {pk} = %s"
        casts = ["%s::bigint", "%s::bigint"] + [f"%s::{_PG_TYPES[f.get_internal_type()]}" for f in fields]
        count_study = count.format(
            t=quote(Study._meta.db_table),
            n=quote("number_of_study_related_instances"),
            b=quote("study_size"),
            pk=quote(Study._meta.pk.column),
        )
        count_series = count.format(
            t=quote(Series._meta.db_table),
            n=quote("number_of_series_related_instances"),
            b=quote("series_size"),
            pk=quote(Series._meta.pk.column),
        )
        statements = _Statements(
            add_instance=f"SELECT archive_add_instance({', '.join(casts)})",
            insert=insert,
            fields=fields,
            prepare=tuple(_preparer(field) for field in fields),
            count_study=count_study,
            count_series=count_series,
            insert_qmark=insert.replace("%s", "?"),
            count_study_qmark=count_study.replace("%s", "?"),
            count_series_qmark=count_series.replace("%s", "?"),
        )
        _statements[conn.vendor] = statements
    return statements


def _insert_instance(conn, row: _InstanceRow, series_id: int) -> int:
    """Insert the instance's row; return its primary key.

    Plain SQL on the hot path (one call per stored instance): the ORM's save costs ten
    times the statement itself.
    """
    with conn.cursor() as cursor:
        cursor.execute(_sql(conn).insert, _instance_params(conn, row, series_id))
        return cursor.fetchone()[0]


def _instance_params(conn, row: _InstanceRow, series_id: int) -> list:
    """The values of ``_INSTANCE_COLUMNS`` for the row, ready for the database: dates and
    JSON through their fields' own conversion, but for the header, whose JSON text is made
    once (``_preparer``)."""
    values = {
        **row.header.instance,
        "series": series_id,
        "file_path": row.relative,
        "file_size": row.size,
        "file_sha256": row.sha256,
        "metadata": None,
        "source_ae_title": row.source.ae_title[:16],
        "source_address": row.source.address[:64],
        "created": timezone.now(),
    }
    statements = _sql(conn)
    params = []
    for field, prepare in zip(statements.fields, statements.prepare):
        value = values[field.name]
        if field.name == "metadata":
            value = _json_text(row.metadata)
        elif prepare is not None and value is not None:
            value = prepare(value, conn)
        params.append(value)
    return params


# Field types whose values (str, int, float, as the header gives them) go to the database
# as they are: their get_db_prep_save returns them unchanged (or, on PostgreSQL, wrapped
# for a type that the hot path's statements state with casts).
_PLAIN_TYPES = {
    "CharField",
    "IntegerField",
    "PositiveSmallIntegerField",
    "SmallIntegerField",
    "PositiveIntegerField",
    "BigIntegerField",
    "PositiveBigIntegerField",
    "FloatField",
    "ForeignKey",
}


def _preparer(field: Any) -> Any:
    """How one of ``_INSTANCE_COLUMNS`` gets its database value: None when the value goes as
    it is, JSON text for a JSON column (what its field would send, in a fifth of the
    time: the statements state jsonb, or SQLite keeps the text), else the field's own
    ``get_db_prep_save`` (dates)."""
    kind = field.get_internal_type()
    if kind in _PLAIN_TYPES:
        return None
    if kind == "JSONField":
        return _json_value
    return field.get_db_prep_save


def _json_value(value: Any, conn: Any) -> str:
    return _json_text(value)


def _json_text(data: dict) -> str:
    """The header as JSON text, without NUL characters (PostgreSQL's jsonb refuses them).

    orjson gives the same compact UTF-8 text as ``json.dumps(ensure_ascii=False)`` in an
    eighth of the time (8 against 71 us for a CT slice's header); a value it does not take
    (a subclass of float, say) goes to the standard library's encoder."""
    try:
        text = orjson.dumps(data).decode()
    except TypeError:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    if "\\u0000" in text:
        text = json.dumps(_strip_nul(data), ensure_ascii=False, separators=(",", ":"))
    return text


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_nul(v) for k, v in value.items()}
    return value


def _count(conn, study_id: int, series_id: int, size: int, created_series: bool, sign: int = 1) -> None:
    """Add (or with ``sign=-1`` take away) one instance of ``size`` bytes to the counts.

    The updates are relative (``n = n + 1``), so concurrent transactions never lose one;
    plain SQL, as this runs for every stored instance. A new series also recomputes
    NumberOfStudyRelatedSeries and ModalitiesInStudy, under the study's lock.
    """
    statements = _sql(conn)
    with conn.cursor() as cursor:
        # The study first, then the series: every transaction takes the two row locks in
        # this order (the slow path locks the study before it looks at series), so
        # concurrent stores into one study queue instead of deadlocking.
        cursor.execute(statements.count_study, [sign, sign * size, study_id])
        cursor.execute(statements.count_series, [sign, sign * size, series_id])
    if created_series:
        modalities = set(Series.objects.filter(study_id=study_id).values_list("modality", flat=True))
        Study.objects.filter(pk=study_id).update(
            number_of_study_related_series=F("number_of_study_related_series") + 1,
            modalities_in_study="\\".join(sorted(m for m in modalities if m))[:256],
        )


def _store_replacing(row: _InstanceRow, temp: Path) -> _Keys:
    """Overwrite policy: replace a stored copy (row and file) in one transaction."""
    final = storage.absolute(row.relative)
    backup: Path | None = None
    published = False
    try:
        with _writer_lock(connections[DEFAULT_DB_ALIAS]), transaction.atomic():
            study = _lock_study(row.header)
            backup = _remove_previous(row.uid, final)
            series, created_series = _series(study, row.header, row.source)
            conn = connections[DEFAULT_DB_ALIAS]
            instance_id = _insert_instance(conn, row, series.pk)
            _count(conn, study.pk, series.pk, row.size, created_series)
            published = True  # from here on, a failure must take the file back out
            storage.publish(temp, row.relative)  # the last step: the commit follows at once
    except BaseException:
        if published:
            final.unlink(missing_ok=True)
        if backup is not None:
            os.replace(backup, final)
        raise
    if backup is not None:
        backup.unlink(missing_ok=True)
    series_cache.clear()
    return _Keys(instance_id, study.pk, series.pk, created_series)


def _lock_study(header: Header) -> Study:
    """Return the instance's study, created if new, locked for the rest of the transaction.

    The lock serializes the creation of series in one study, so that its number of series
    and ModalitiesInStudy stay exact (on SQLite the transaction already holds the database).
    """
    patient = _patient(header)
    study_values = {k: v for k, v in header.study.items() if k != "study_instance_uid"}
    study, created = Study.objects.get_or_create(
        study_instance_uid=header.study["study_instance_uid"], defaults={**study_values, "patient": patient}
    )
    study = Study.objects.select_for_update().get(pk=study.pk)
    if not created and study.patient_id != patient.pk:
        log.warning(
            "study %s arrived with another patient identity; kept under the first patient", study.study_instance_uid
        )
    if not created:
        blanks = {k: v for k, v in study_values.items() if v not in ("", None) and getattr(study, k) in ("", None)}
        if blanks:
            Study.objects.filter(pk=study.pk).update(**blanks)
    return study


def _patient(header: Header) -> Patient:
    values = dict(header.patient)
    key = {"patient_id": values.pop("patient_id"), "issuer_of_patient_id": values.pop("issuer_of_patient_id")}
    values["patient_name_norm"] = normalize_name(values["patient_name"])
    patient, created = Patient.objects.get_or_create(**key, defaults=values)
    if not created:
        blanks = {k: v for k, v in values.items() if v not in ("", None) and getattr(patient, k) in ("", None)}
        if blanks:
            Patient.objects.filter(pk=patient.pk).update(**blanks)
    return patient


def _series(study: Study, header: Header, source: Source) -> tuple[Series, bool]:
    values = {k: v for k, v in header.series.items() if k != "series_instance_uid"}
    series, created = Series.objects.get_or_create(
        series_instance_uid=header.series["series_instance_uid"],
        defaults={**values, "study": study, "source_ae_title": source.ae_title[:16]},
    )
    if series.study_id != study.pk:
        raise _Reject(
            Outcome.REJECTED,
            "SeriesInstanceUID already belongs to another study (StudyInstanceUID differs)",
        )
    return series, created


def _remove_previous(sop_instance_uid: str, final: Path) -> Path | None:
    """Overwrite policy: delete the stored copy's row (fixing counts) and set its file aside."""
    old = Instance.objects.select_related("series").filter(sop_instance_uid=sop_instance_uid).first()
    if old is None:
        return None
    delete_instance_rows(old)
    if not final.exists():
        return None
    backup = storage.new_temp_path()
    os.replace(final, backup)
    return backup


def delete_instance_rows(instance: Instance) -> None:
    """Delete an instance's row and take it out of its series' and study's counts.

    Must run inside the caller's transaction.
    """
    conn = connections[DEFAULT_DB_ALIAS]
    _count(conn, instance.series.study_id, instance.series_id, instance.file_size, created_series=False, sign=-1)
    instance.delete()
