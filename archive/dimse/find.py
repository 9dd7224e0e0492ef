"""C-FIND SCP (PS3.4 Annex C): decode the identifier, ask the query service, encode answers.

``serve`` answers on the fast path (``archive.dimse.fastpath``): identifiers encoded
straight from the query service's answers, responses written in batches. ``handle_find``
is the same service through pynetdicom's own C-FIND loop, for associations without it.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import events
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import query
from archive.dimse import fastpath, status, wire
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


# The character sets whose text ``fast_identifier_keys`` decodes itself (PS3.3 C.12.1.1.2),
# with the codec pydicom uses for them; others go to pydicom.
_FAST_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
# How pydicom reads each text VR (pydicom.values): the VRs decoded with the data set's
# character set, those split into values and stripped, and those taken whole.
_SPLIT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "UC", "PN"})
_WHOLE_VRS = frozenset({"ST", "LT", "UT"})
_keyword_of: dict[int, tuple[str, str] | None] = {}


def _dictionary_entry(tag: int) -> tuple[str, str] | None:
    known = _keyword_of.get(tag, ...)
    if known is ...:
        keyword = keyword_for_tag(tag)
        known = (keyword, dictionary_VR(tag)) if keyword else None
        _keyword_of[tag] = known
    return known  # type: ignore[return-value]


def fast_identifier_keys(data: bytes, *, explicit_vr: bool) -> tuple[str, dict[str, Any]] | None:
    """``identifier_keys`` of a Little Endian identifier read straight from its bytes, for
    the identifiers every C-FIND sends: flat, text values, a single-byte or UTF-8 character
    set. None for anything else (a sequence, a binary or numeric value, another character
    set, a value pydicom would read differently), which goes to pydicom."""
    try:
        elements = wire.read_elements(data, explicit_vr=explicit_vr)
    except wire.WireError:
        return None
    elements.sort(key=lambda element: element[0])  # pydicom's data set is in tag order
    charset = ""
    for tag, _, value in elements:
        if tag == 0x00080005:
            charset = value.decode("latin_1").rstrip(" \x00").strip()
    codec = _FAST_CHARSETS.get(charset)
    if codec is None:
        return None
    level = ""
    keys: dict[str, Any] = {}
    try:
        for tag, vr, value in elements:
            if tag >> 16 == 0x0002:
                continue
            entry = _dictionary_entry(tag)
            if entry is None:
                continue  # private or unknown: pydicom gives it no keyword
            keyword, known_vr = entry
            vr = vr or known_vr
            if not value and vr != "SQ":
                text = ""  # universal matching (pydicom's empty value, '' or None)
            elif vr in _WHOLE_VRS:
                text = value.decode(codec).rstrip("\x00 ")
            elif vr in _SPLIT_VRS:
                if vr == "PN":
                    text = value.rstrip(b"\x00 ").decode(codec)
                    if "=" in text:
                        return None  # component groups: PersonName drops empty trailing ones
                    values = text.split("\\")
                elif vr in ("SH", "LO", "UC"):
                    values = [v.rstrip("\x00 ") for v in value.decode(codec).split("\\")]
                elif vr == "AE":
                    values = [v.strip() for v in value.decode("latin_1").split("\\")]
                else:
                    values = value.decode("latin_1").rstrip(" \x00").split("\\")
                text = "\\".join(values)
            else:
                return None  # numbers (pydicom formats them), binary values, sequences
            if keyword == "QueryRetrieveLevel":
                level = text.strip().upper()
            else:
                keys[keyword] = text
    except UnicodeDecodeError:
        return None
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


def answers(
    assoc,
    sop_class_uid: str,
    identifier: Dataset | tuple[str, dict[str, Any]],
    is_cancelled: Callable[[], bool] | None,
) -> Iterator[tuple[int | Dataset, dict | None]]:
    """Yield (status, answer) for a C-FIND request: (PENDING, answer dict) per match, then
    (CANCEL, None) if ``is_cancelled`` says so before an answer (None: the caller checks);
    a refusal is one (failure Dataset, None) with its comment. ``identifier`` is the
    request's, or its (level, keys) already read."""
    calling = str(assoc.requestor.ae_title).strip()
    node = node_access_for(assoc)
    if not node.may_query:
        audit_dimse(assoc, "query", outcome="denied", details={"reason": "the node may not query"})
        yield _failure(status.NOT_AUTHORIZED, f"calling AE title {calling} may not query")
        return
    try:
        level, keys = identifier if isinstance(identifier, tuple) else identifier_keys(identifier)
        if level not in MODEL_LEVELS.get(sop_class_uid, ()):
            raise query.QueryError(f"query level {level or '(none)'} is not one of {'/'.join(MODEL_LEVELS[sop_class_uid])} of this model")
        limit = settings.PACS_FIND_LIMIT
        matched, found = query.find_counted(level, keys, limit=limit + 1, queryset=node.scope(query.MODELS[level]))
    except query.QueryError as exc:
        log.warning("C-FIND from %s refused: %s", calling, exc)
        yield _failure(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        return
    if matched > limit:
        log.warning("C-FIND from %s at %s level cut at %d answers (PACS_FIND_LIMIT)", calling, level, limit)
    audit_dimse(assoc, "query", keys=keys, details={"level": level, "answers": min(matched, limit)})
    # Each answer is built as it goes out: the first leaves before the others are built,
    # and the peer reads it while they are.
    for answer in itertools.islice(found, limit):
        if is_cancelled is not None and is_cancelled():
            yield status.CANCEL, None
            return
        answer["RetrieveAETitle"] = settings.PACS_AE_TITLE
        yield status.PENDING, answer


def handle_find(event: events.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND (pynetdicom's own C-FIND service, used where the fast path is not):
    yield (pending status, answer) for each match, stopping on C-CANCEL."""
    for code, answer in answers(
        event.assoc, str(event.request.AffectedSOPClassUID), event.identifier, lambda: event.is_cancelled
    ):
        yield code, (query.answer_dataset(answer) if answer is not None else None)


# ----------------------------------------------------------------- the fast path

# Send the answers gathered so far once they reach this size or wait this long, or once
# there are as many as the batch before (the first answer goes alone): the peer starts
# reading the first answers while the next are encoded, and a long answer still goes out
# in a few large writes.
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.02
# VRs whose text takes the SpecificCharacterSet (PS3.5 6.1.2.3); the others are ASCII.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}) | _CHARSET_VRS
_BINARY = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l"}
_element_of: dict[str, tuple[int, str] | None] = {}


def _element(keyword: str) -> tuple[int, str] | None:
    known = _element_of.get(keyword, ...)
    if known is ...:
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(tag) if tag is not None else None
        known = (int(tag), vr) if tag is not None and vr in (_TEXT_VRS | set(_BINARY)) else None
        _element_of[keyword] = known
    return known  # type: ignore[return-value]


def encode_answer(answer: dict[str, Any], *, explicit_vr: bool) -> bytes | None:
    """Encode an answer of ``answers`` as a Little Endian identifier, the bytes pydicom
    would write for ``query.answer_dataset(answer)``; None when it holds a value this
    encoder leaves to pydicom (floats, sequences, VRs it does not know).

    The answers of one query have the same keys in the same order, so the elements' order
    and headers are worked out once per set of keys (``_layout``), not once per answer."""
    charset = answer.get("SpecificCharacterSet")
    if charset not in (None, "", "ISO_IR 192"):
        return None
    layout = _layout(tuple(answer), explicit_vr)
    if layout is None:
        return None
    encoding = "utf-8" if charset else "ascii"
    parts: list[bytes] = []
    try:
        for keyword, vr, prefix, long_length, text_encoding in layout:
            value = answer[keyword]
            kind = type(value)
            if text_encoding is not None and (kind is str or kind is int and vr == "IS"):
                # Most values: one string, or a number of instances, series or studies.
                data = (value if kind is str else str(value)).encode(text_encoding or encoding)
                if len(data) & 1:
                    data += b"\x00" if vr == "UI" else b" "
            else:
                data = _value_bytes(vr, value, encoding)
                if data is None:
                    return None
            if long_length:
                parts += (prefix, _UL.pack(len(data)), data)
            elif len(data) > 0xFFFF:
                return None
            else:
                parts += (prefix, _US.pack(len(data)), data)
    except (UnicodeEncodeError, struct.error, TypeError, ValueError):
        return None
    return b"".join(parts)


_US = struct.Struct("<H")
_UL = struct.Struct("<L")
# (keys, explicit VR) -> [(keyword, VR, header before the length, 4-byte length, the text's
# encoding: "" for the answer's character set, None for a binary VR)] in tag order, or None.
_layouts: dict[tuple[tuple[str, ...], bool], list[tuple[str, str, bytes, bool, str | None]] | None] = {}


def _layout(keys: tuple[str, ...], explicit_vr: bool) -> list[tuple[str, str, bytes, bool, str | None]] | None:
    layout = _layouts.get((keys, explicit_vr), ...)
    if layout is ...:
        elements = [(_element(keyword), keyword) for keyword in keys]
        if any(known is None for known, _ in elements):
            layout = None
        else:
            layout = []
            for (tag, vr), keyword in sorted(elements):  # type: ignore[misc]
                prefix, long_length = wire.element_head(tag, vr, explicit_vr)
                encoding = None if vr in _BINARY else ("" if vr in _CHARSET_VRS else "ascii")
                layout.append((keyword, vr, prefix, long_length, encoding))
        if len(_layouts) > 1024:
            _layouts.clear()
        _layouts[(keys, explicit_vr)] = layout
    return layout


def _value_bytes(vr: str, value: Any, encoding: str) -> bytes | None:
    """A value that is not one string (a list, a number, a binary VR's value), padded; None
    when this encoder leaves it to pydicom."""
    values = value if isinstance(value, list) else [value]
    if vr in _BINARY:
        if any(type(v) is not int for v in values if v != ""):
            return None
        return b"".join(struct.pack(_BINARY[vr], v) for v in values if v != "")
    if not all(isinstance(v, str) or (type(v) is int and vr == "IS") for v in values):
        return None
    data = "\\".join(str(v) for v in values).encode(encoding if vr in _CHARSET_VRS else "ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def _identifier_bytes(answer: dict[str, Any], syntax) -> bytes:
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        fast = encode_answer(answer, explicit_vr=syntax == ExplicitVRLittleEndian)
        if fast is not None:
            return fast
    encoded = encode(query.answer_dataset(answer), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise ValueError("an answer cannot be encoded")
    return encoded


def serve(service, req, context) -> None:
    """The C-FIND SCP (PS3.4 C.4.1.2, PS3.7 9.1.2) on the fast path: the answers of
    ``answers`` encoded straight to bytes, the pending responses' command set built once,
    and the responses written in batches (``fastpath.write``), checking for C-CANCEL
    before each batch: the answers of a batch that has not gone out when a C-CANCEL comes
    are not sent."""
    assoc = service.assoc
    context_id = int(context.context_id)
    syntax = context.transfer_syntax[0]
    sop_class = str(req.AffectedSOPClassUID)
    message_id = int(req.MessageID)
    peer_max = fastpath.peer_maximum_length(assoc)
    identifier: Dataset | tuple[str, dict[str, Any]] | None = None
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        identifier = fast_identifier_keys(req.Identifier.getvalue(), explicit_vr=syntax == ExplicitVRLittleEndian)
    if identifier is None:
        try:
            identifier = decode(req.Identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        except Exception as exc:  # noqa: BLE001 - an identifier pydicom cannot decode
            identifier = None
            reason = f"the identifier cannot be decoded: {exc}"
    pending_command = wire.c_find_rsp(sop_class, message_id, status.PENDING, identifier=True)
    buffered: list[Any] = []
    size = count = 0
    batch = 1  # answers in the next write
    started = time.monotonic()
    final: tuple[int, str | None] = (status.SUCCESS, None)
    try:
        results = (
            answers(assoc, sop_class, identifier, None)
            if identifier is not None
            else iter([_failure(status.UNABLE_TO_PROCESS, reason)])
        )
        for code, answer in results:
            if answer is None:
                if isinstance(code, Dataset):
                    final = (int(code.Status), str(code.get("ErrorComment", "")) or None)
                else:
                    final = (int(code), None)
                break
            data = _identifier_bytes(answer, syntax)
            buffered += wire.pdus(context_id, pending_command, data, peer_max)
            size += len(data) + len(pending_command)
            count += 1
            if count >= batch or size >= FLUSH_BYTES or time.monotonic() - started >= FLUSH_SECONDS:
                if service.is_cancelled(message_id):
                    buffered, final = [], (status.CANCEL, None)
                    break
                fastpath.write(assoc, buffered)
                buffered, size, started = [], 0, time.monotonic()
                batch, count = 2 * count, 0
    except fastpath.Interrupted as exc:
        log.warning("C-FIND answers to %s not sent: %s", str(assoc.requestor.ae_title).strip(), exc)
        return
    except Exception as exc:  # noqa: BLE001 - as pynetdicom: a failing handler is 0xC311
        log.exception("C-FIND failed: %s", exc)
        buffered = []
        final = (0xC311, "the archive failed to answer")
    code, comment = final
    buffered += wire.pdus(
        context_id, wire.c_find_rsp(sop_class, message_id, code, identifier=False, comment=comment), None, peer_max
    )
    try:
        fastpath.write(assoc, buffered)
    except fastpath.Interrupted as exc:
        log.warning("C-FIND response to %s not sent: %s", str(assoc.requestor.ae_title).strip(), exc)


def _failure(code: int, reason: str) -> tuple[Dataset, None]:
    """A failure status with its error comment (pynetdicom copies both into the response)."""
    reply = Dataset()
    reply.Status = code
    reply.ErrorComment = reason[:64]
    return reply, None
