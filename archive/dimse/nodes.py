"""The DIMSE side of access and audit: what a calling node did, written to the audit log.

Rights and scope come from ``archive.access.node_access`` (one function for every channel).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from pynetdicom.association import Association

from archive.access import NodeAccess, node_access

log = logging.getLogger("archive.dimse")


def node_access_for(assoc: Association) -> NodeAccess:
    """The calling node's rights, read once per association (its requests share them)."""
    found = getattr(assoc, "_pacs_node_access", None)
    if found is None:
        found = node_access(str(assoc.requestor.ae_title).strip())
        assoc._pacs_node_access = found
    return found


def audit_dimse(
    assoc: Association,
    action: str,
    *,
    keys: Mapping[str, Any] | None = None,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
    study_instance_uid: str = "",
    patient_id: str = "",
) -> None:
    """Record one DIMSE access by the association's calling AE (never raises: logged
    instead); written by the SCP's ``AuditWriter`` when its AE has one."""
    keys = keys or {}
    requestor = assoc.requestor
    matched = {k: str(v)[:128] for k, v in keys.items() if v not in ("", None) and k != "QueryRetrieveLevel"}
    event = dict(
        channel="dimse",
        actor=str(requestor.ae_title).strip() or "(no AE title)",
        source_address=f"{requestor.address}",
        outcome=outcome,
        patient_id=patient_id or str(keys.get("PatientID", "") or "")[:64],
        study_instance_uid=study_instance_uid or _single_uid(keys.get("StudyInstanceUID")),
        details={**(details or {}), **({"keys": matched} if matched else {}), "called_ae": str(assoc.acceptor.ae_title).strip()},
    )
    writer = getattr(assoc.ae, "pacs_audit", None)
    if writer is not None:
        writer.submit(action, event)
    else:
        _write(action, event)


def _write(action: str, event: dict[str, Any]) -> None:
    from audit.services import record

    try:
        record(action, **event)
    except Exception as exc:  # noqa: BLE001 - an audit failure is logged loudly; the association goes on
        log.error("cannot write the audit event of a DIMSE %s from %s: %s", action, event["actor"], exc)


class AuditWriter:
    """Writes an SCP's DIMSE audit events in a thread of its own, in the order they came.

    An association's thread hands its events here and goes on answering: the event of a
    C-FIND is taken when its answers are known, and written while they travel, instead of
    holding them back by the write (a millisecond, a tenth of a small query's time). As
    the audit's record of DICOM events does (PS3.15 A.5), it follows the access; ``stop``
    (the SCP's stop) writes what is still queued before the process ends. The thread keeps
    its own database connection.
    """

    _pause = staticmethod(time.sleep)

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, action: str, event: dict[str, Any]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dimse-audit", daemon=True)
                self._thread.start()
        self._queue.put((action, event))

    def flush(self) -> None:
        """Return once every event submitted so far is written (or its failure logged)."""
        self._queue.join()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread (within ``timeout`` seconds)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.error("DIMSE audit events still unwritten after %.0f s", timeout)

    def _run(self) -> None:
        from django.db import connection

        try:
            while True:
                batch = [self._queue.get()]
                # Let the association that queued the event send its answers first: the
                # write takes the interpreter lock for most of a millisecond, which would
                # otherwise come between the query and its answers. One wait per batch:
                # what was queued meanwhile is written with it.
                self._pause(WRITE_DELAY)
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = False
                for item in batch:
                    try:
                        if item is None:
                            stopping = True
                        else:
                            _write(*item)
                    finally:
                        self._queue.task_done()
                if stopping:
                    return
        finally:
            connection.close()


# How long the audit writer lets an event wait before writing it (seconds).
WRITE_DELAY = 0.05


def _single_uid(value: Any) -> str:
    text = str(value or "")
    return text if text and "\\" not in text and "*" not in text and "?" not in text else ""


def audit_stores(assoc: Association, stats: Any) -> None:
    """At the end of an association: one "store" event per study that received instances,
    and one "denied" event when the node was refused."""
    from archive.models import Series

    if stats.failed and not stats.may_store:
        audit_dimse(assoc, "store", outcome="denied", details={"refused": stats.failed, "reason": "the node may not store"})
    if not stats.stored_per_series:
        return
    studies: dict[tuple[str, str], dict[str, int]] = {}
    rows = Series.objects.filter(pk__in=list(stats.stored_per_series)).values_list(
        "pk", "study__study_instance_uid", "study__patient__patient_id"
    )
    for pk, study_uid, patient_id in rows:
        entry = studies.setdefault((study_uid, patient_id), {"series": 0, "instances": 0})
        entry["series"] += 1
        entry["instances"] += stats.stored_per_series[pk]
    for (study_uid, patient_id), counts in studies.items():
        audit_dimse(assoc, "store", study_instance_uid=study_uid, patient_id=patient_id, details=counts)
