"""C-FIND SCP (PS3.4 Annex C): decode the identifier, ask the query service, encode answers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import events
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import query
from archive.dimse import status
from archive.dimse.nodes import audit_dimse, node_access_for

log = logging.getLogger("archive.dimse")

# The levels each information model allows (PS3.4 C.6.1 and C.6.2).
MODEL_LEVELS = {
    str(PatientRootQueryRetrieveInformationModelFind): ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    str(StudyRootQueryRetrieveInformationModelFind): ("STUDY", "SERIES", "IMAGE"),
}


def identifier_keys(identifier: Dataset) -> tuple[str, dict[str, Any]]:
    """Return (level, keys) of a C-FIND or C-MOVE identifier, values decoded to text.

    Raises ``query.QueryError`` for an identifier that cannot be read.
    """
    try:
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        keys: dict[str, Any] = {}
        for element in identifier:
            keyword = element.keyword
            if not keyword or keyword == "QueryRetrieveLevel" or element.tag.group == 0x0002:
                continue
            if element.VR == "SQ":
                continue  # sequence matching is not supported: never matched, not returned
            keys[keyword] = _text(element.value)
    except query.QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom cannot decode is a bad identifier
        raise query.QueryError(f"the identifier cannot be decoded: {exc}") from exc
    return level, keys


def _text(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, (str, int, float)):
        return str(value)
    return value  # bytes and the like: the query service refuses them with a reason


def answer_dataset(answer: dict[str, Any]) -> Dataset:
    """Encode one answer as a C-FIND response identifier."""
    ds = query.answer_dataset(answer)
    ds.RetrieveAETitle = settings.PACS_AE_TITLE
    return ds


def handle_find(event: events.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: yield (pending status, answer) for each match, stopping on C-CANCEL."""
    calling = str(event.assoc.requestor.ae_title).strip()
    node = node_access_for(event.assoc)
    if not node.may_query:
        audit_dimse(event.assoc, "query", outcome="denied", details={"reason": "the node may not query"})
        yield _failure(status.NOT_AUTHORIZED, f"calling AE title {calling} may not query")
        return
    model = str(event.request.AffectedSOPClassUID)
    try:
        level, keys = identifier_keys(event.identifier)
        if level not in MODEL_LEVELS.get(model, ()):
            raise query.QueryError(f"query level {level or '(none)'} is not one of {'/'.join(MODEL_LEVELS[model])} of this model")
        limit = settings.PACS_FIND_LIMIT
        answers = list(query.find(level, keys, limit=limit + 1, queryset=node.scope(query.MODELS[level])))
    except query.QueryError as exc:
        log.warning("C-FIND from %s refused: %s", calling, exc)
        yield _failure(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        return
    if len(answers) > limit:
        log.warning("C-FIND from %s at %s level cut at %d answers (PACS_FIND_LIMIT)", calling, level, limit)
        answers = answers[:limit]
    audit_dimse(event.assoc, "query", keys=keys, details={"level": level, "answers": len(answers)})
    for answer in answers:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        yield status.PENDING, answer_dataset(answer)


def _failure(code: int, reason: str) -> tuple[Dataset, None]:
    """A failure status with its error comment (pynetdicom copies both into the response)."""
    reply = Dataset()
    reply.Status = code
    reply.ErrorComment = reason[:64]
    return reply, None
