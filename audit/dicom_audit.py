"""Audit events as DICOM audit messages (PS3.15 Annex A.5, the RFC 3881 based XML schema).

Each event becomes one ``AuditMessage``: EventIdentification (the DICOM event ID, action
code, time and outcome), the ActiveParticipant who acted (user or calling AE, with their
network address), the AuditSourceIdentification of this archive, and ParticipantObjects for
the patient and the study concerned. An export holds them in one ``AuditMessages`` document.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.etree import ElementTree as ET

from django.conf import settings

from audit.models import AuditEvent

# action -> (EventID code, meaning, EventActionCode, EventTypeCode or None), PS3.15 A.5.3
EVENTS = {
    "login": ("110114", "User Authentication", "E", ("110122", "Login")),
    "login-failed": ("110114", "User Authentication", "E", ("110122", "Login")),
    "logout": ("110114", "User Authentication", "E", ("110123", "Logout")),
    "query": ("110112", "Query", "E", None),
    "study-view": ("110103", "DICOM Instances Accessed", "R", None),
    "retrieve": ("110103", "DICOM Instances Accessed", "R", None),
    "export": ("110106", "Export", "R", None),
    "store": ("110104", "DICOM Instances Transferred", "C", None),
    "delete": ("110105", "DICOM Study Deleted", "D", None),
    "modify": ("110103", "DICOM Instances Accessed", "U", None),
    "permission-change": ("110113", "Security Alert", "E", ("110136", "Security Roles Changed")),
    "node-change": ("110113", "Security Alert", "E", ("110128", "Network Configuration")),
    "audit-export": ("110101", "Audit Log Used", "R", None),
}
# outcome -> EventOutcomeIndicator (0 success, 4 minor failure, 8 serious failure)
OUTCOMES = {"success": "0", "denied": "4", "failure": "8"}


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def message(event: AuditEvent) -> ET.Element:
    """One event as an AuditMessage element."""
    event_id, meaning, action_code, event_type = EVENTS[event.action]
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action_code,
            "EventDateTime": event.time.isoformat(),
            "EventOutcomeIndicator": OUTCOMES.get(event.outcome, "8"),
        },
    )
    _code(identification, "EventID", event_id, meaning)
    if event_type:
        _code(identification, "EventTypeCode", *event_type)
    participant = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": event.actor,
            "UserIsRequestor": "true",
            **({"NetworkAccessPointID": event.source_address, "NetworkAccessPointTypeCode": "2"} if event.source_address else {}),
        },
    )
    if event.channel == "dimse":
        _code(participant, "RoleIDCode", "110153", "Source Role ID")
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": settings.PACS_AE_TITLE})
    _code(source, "AuditSourceTypeCode", "4", "Application Server Process", "RFC3881")
    if event.patient_id:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": event.patient_id, "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1"},
        )
        _code(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    if event.study_instance_uid:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": event.study_instance_uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"},
        )
        _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
    if event.action == "query" and event.details:
        query = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": settings.PACS_AE_TITLE, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"},
        )
        _code(query, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
        ET.SubElement(query, "ParticipantObjectDetail", {"type": "query", "value": str(event.details)[:1000]})
    return root


def export(events: Iterable[AuditEvent]) -> bytes:
    """Audit messages of ``events`` in one XML document."""
    root = ET.Element("AuditMessages")
    for event in events:
        root.append(message(event))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
