"""C-STORE SCP handler (PS3.4 Annex B): hands the received file to the ingest service."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import events

from archive.dimse import status
from archive.ingest import Expected, Outcome, Source, ingest_file

log = logging.getLogger("archive.dimse")

STATUS_FOR = {
    Outcome.STORED: status.SUCCESS,
    # Modalities retry or raise an alarm on warnings; a kept duplicate is not their problem.
    Outcome.DUPLICATE: status.SUCCESS,
    Outcome.REJECTED: status.CANNOT_UNDERSTAND,
    Outcome.MISMATCH: status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Outcome.OUT_OF_RESOURCES: status.OUT_OF_RESOURCES,
    Outcome.FAILED: status.PROCESSING_FAILURE,
}


@dataclass
class AssociationStats:
    """What one association did, for its closing log line."""

    calling_ae: str
    address: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    seconds: float = 0.0  # spent storing (after reception), for the closing log line
    may_store: bool = True  # the calling node's right (archive.access.node_access)
    stored_per_series: dict[int, int] = field(default_factory=dict)  # series pk -> instances stored
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: Outcome, seconds: float = 0.0, series_id: int | None = None) -> None:
        with self.lock:
            self.seconds += seconds
            if series_id is not None:
                self.stored_per_series[series_id] = self.stored_per_series.get(series_id, 0) + 1
            if outcome is Outcome.STORED:
                self.stored += 1
            elif outcome is Outcome.DUPLICATE:
                self.duplicates += 1
            else:
                self.failed += 1


class InFlight:
    """Counts the C-STORE handlers running, so that a stop lets them finish and starts no more."""

    def __init__(self) -> None:
        self._count = 0
        self._closing = False
        self._idle = threading.Condition()

    def begin(self) -> bool:
        """Register a handler; False once closing (the request is then refused)."""
        with self._idle:
            if self._closing:
                return False
            self._count += 1
            return True

    def end(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def close(self, timeout: float) -> bool:
        """Start no more handlers; wait up to ``timeout`` seconds for the running ones."""
        with self._idle:
            self._closing = True
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def source_of(assoc: Any) -> Source:
    requestor = assoc.requestor
    return Source(channel="dimse", ae_title=str(requestor.ae_title).strip(), address=str(requestor.address))


def handle_store(event: events.Event, stats_for, in_flight: InFlight) -> int | Dataset:
    """EVT_C_STORE: store the dataset pynetdicom wrote to ``event.dataset_path``."""
    request = event.request
    return store_file(
        event.assoc,
        Path(event.dataset_path),
        str(request.AffectedSOPClassUID or ""),
        str(request.AffectedSOPInstanceUID or ""),
        stats_for,
        in_flight,
    )


def store_file(
    assoc: Any,
    path: Path,
    sop_class_uid: str,
    sop_instance_uid: str,
    stats_for,
    in_flight: InFlight,
    sha256: str | None = None,
) -> int | Dataset:
    """Store the received Part 10 file at ``path`` (PS3.4 B.2.2, the C-STORE SCP) and return
    the response's status: a code, or a status dataset with an Error Comment. ``sha256``:
    the file's digest, when it was worked out while the file was written."""
    if not in_flight.begin():
        path.unlink(missing_ok=True)
        stats_for(assoc).count(Outcome.OUT_OF_RESOURCES)
        return _failure(status.OUT_OF_RESOURCES, "the archive is shutting down; send again later")
    started = time.perf_counter()
    stats = stats_for(assoc)
    if not stats.may_store:
        in_flight.end()
        path.unlink(missing_ok=True)
        stats.count(Outcome.REJECTED)
        return _failure(status.NOT_AUTHORIZED, f"calling AE title {stats.calling_ae} may not store")
    try:
        expected = Expected(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid)
        result = ingest_file(path, source_of(assoc), take=True, expected=expected, sha256=sha256)
    finally:
        in_flight.end()
    stats.count(result.outcome, time.perf_counter() - started, result.series_id)
    code = STATUS_FOR[result.outcome]
    if result.ok:
        return code
    log.warning(
        "C-STORE from %s failed (0x%04X): %s [SOP Instance %s]",
        assoc.requestor.ae_title,
        code,
        result.reason,
        result.sop_instance_uid or expected.sop_instance_uid,
    )
    return _failure(code, result.reason)


def _failure(code: int, reason: str) -> Dataset:
    reply = Dataset()
    reply.Status = code
    reply.ErrorComment = reason[:64]  # LO: 64 characters
    return reply
