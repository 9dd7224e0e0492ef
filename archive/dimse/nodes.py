"""The DIMSE side of access and audit: what a calling node did, written to the audit log.

Rights and scope come from ``archive.access.node_access`` (one function for every channel).
"""

from __future__ import annotations

import logging
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
    """Record one DIMSE access by the association's calling AE (never raises: logged instead)."""
    from audit.services import record

    keys = keys or {}
    requestor = assoc.requestor
    matched = {k: str(v)[:128] for k, v in keys.items() if v not in ("", None) and k != "QueryRetrieveLevel"}
    try:
        record(
            action,
            channel="dimse",
            actor=str(requestor.ae_title).strip() or "(no AE title)",
            source_address=f"{requestor.address}",
            outcome=outcome,
            patient_id=patient_id or str(keys.get("PatientID", "") or "")[:64],
            study_instance_uid=study_instance_uid or _single_uid(keys.get("StudyInstanceUID")),
            details={**(details or {}), **({"keys": matched} if matched else {}), "called_ae": str(assoc.acceptor.ae_title).strip()},
        )
    except Exception as exc:  # noqa: BLE001 - an audit failure is logged loudly; the association goes on
        log.error("cannot write the audit event of a DIMSE %s from %s: %s", action, requestor.ae_title, exc)


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
