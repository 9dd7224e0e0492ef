"""DIMSE messages as bytes on the wire: command sets, P-DATA-TF PDUs, file offsets.

Pure functions, no Django and no pynetdicom, for the fast path (``archive.dimse.fastpath``)
that writes the archive's bulk messages (C-STORE sub-operations, C-FIND answers) straight
onto an association's socket instead of through pynetdicom's per-PDU machinery.

- A command set is always Implicit VR Little Endian, led by its group length
  (PS3.7 6.3.1 and E.1).
- A message goes out as P-DATA-TF PDUs (PS3.8 9.3.5), each holding one presentation data
  value: a fragment of the command or of the data set, with its message control header
  (PS3.8 E.2), except that a command set and a data set that fit in one PDU together go
  as its two PDVs. No PDU is longer than the peer's Maximum Length (PS3.8 D.1); the command
  set and the data set never share a PDV, and no PDU holds parts of two messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

# The command elements the fast path writes and reads (PS3.7 E.1): element number in
# group 0000 -> (keyword, VR).
COMMAND_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0600: ("MoveDestination", "AE"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x0903: ("ErrorID", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_ELEMENT_OF = {keyword: (element, vr) for element, (keyword, vr) in COMMAND_ELEMENTS.items()}

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_CANCEL_RQ = 0x0FFF
DATASET_PRESENT = 0x0001  # CommandDataSetType: any value but 0x0101 (PS3.7 E.1); as pynetdicom
NO_DATASET = 0x0101

PDU_HEADER = struct.Struct(">BBL")  # PDU-type, reserved, PDU-length (PS3.8 9.3.1)
PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
P_DATA_TF = 0x04
# A peer that announces no maximum (0) gets PDUs of this size: DCMTK's own cap.
UNLIMITED_PDU = 131072


class WireError(ValueError):
    """Bytes that are not the DIMSE message they should be; ``str(exc)`` says why."""


def _value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return struct.pack("<H", int(value))
    if vr == "UL":
        return struct.pack("<L", int(value))
    if vr == "AT":
        return struct.pack("<HH", int(value) >> 16, int(value) & 0xFFFF)
    data = str(value).encode("ascii", "replace")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "  # PS3.5 6.2: UI pads with NUL, text with space
    return data


def command_set(**values: Any) -> bytes:
    """Encode a command set from keyword=value pairs (``None`` values are left out).

    Elements go in ascending tag order, led by CommandGroupLength. Raises ``KeyError``
    for a keyword that is not a command element known here.
    """
    body = bytearray()
    for keyword in sorted((k for k, v in values.items() if v is not None), key=lambda k: _ELEMENT_OF[k][0]):
        element, vr = _ELEMENT_OF[keyword]
        data = _value(vr, values[keyword])
        body += struct.pack("<HHL", 0x0000, element, len(data)) + data
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + bytes(body)


def c_store_rq(
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
    *,
    priority: int = 0,
    originator_aet: str | None = None,
    originator_message_id: int | None = None,
) -> bytes:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1)."""
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=C_STORE_RQ,
        MessageID=message_id,
        Priority=priority,
        CommandDataSetType=DATASET_PRESENT,
        AffectedSOPInstanceUID=sop_instance_uid,
        MoveOriginatorApplicationEntityTitle=originator_aet,
        MoveOriginatorMessageID=originator_message_id,
    )


def c_store_rsp(
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    responding_to: int,
    status: int,
    *,
    comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2)."""
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=C_STORE_RSP,
        MessageIDBeingRespondedTo=responding_to,
        CommandDataSetType=NO_DATASET,
        Status=status,
        ErrorComment=comment,
        AffectedSOPInstanceUID=sop_instance_uid,
    )


def c_echo_rsp(sop_class_uid: str | None, responding_to: int, status: int, *, comment: str | None = None) -> bytes:
    """The command set of a C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=C_ECHO_RSP,
        MessageIDBeingRespondedTo=responding_to,
        CommandDataSetType=NO_DATASET,
        Status=status,
        ErrorComment=comment,
    )


def c_find_rsp(sop_class_uid: str, responding_to: int, status: int, *, identifier: bool, comment: str | None = None) -> bytes:
    """The command set of a C-FIND-RSP (PS3.7 9.3.2.2)."""
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=C_FIND_RSP,
        MessageIDBeingRespondedTo=responding_to,
        CommandDataSetType=DATASET_PRESENT if identifier else NO_DATASET,
        Status=status,
        ErrorComment=comment,
    )


def parse_command(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode an Implicit VR Little Endian command set into {keyword: value}.

    Elements not listed in ``COMMAND_ELEMENTS`` are skipped. Raises ``WireError`` for
    bytes that are not a command set.
    """
    out: dict[str, Any] = {}
    view = memoryview(data)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise WireError("a command set element is cut short")
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise WireError("not a command set (group 0000, Implicit VR Little Endian)")
        known = COMMAND_ELEMENTS.get(element)
        if known is not None:
            keyword, vr = known
            raw = view[offset : offset + length]
            if vr == "US":
                out[keyword] = struct.unpack("<H", raw)[0] if length == 2 else None
            elif vr == "UL":
                out[keyword] = struct.unpack("<L", raw)[0] if length == 4 else None
            elif vr == "AT":
                out[keyword] = int.from_bytes(raw[:2], "little") << 16 | int.from_bytes(raw[2:4], "little")
            else:
                out[keyword] = bytes(raw).decode("ascii", "replace").rstrip("\x00 ")
        offset += length
    return out


def fragment_size(peer_maximum_length: int) -> int:
    """The largest PDV value a PDU may carry to a peer announcing ``peer_maximum_length``.

    The Maximum Length counts the PDU's variable field (PS3.8 D.1); the PDV item's length,
    presentation context ID and control header take 6 bytes of it.
    """
    maximum = peer_maximum_length or UNLIMITED_PDU
    if maximum < 7:
        raise WireError(f"the peer's maximum PDU length ({maximum}) cannot hold a PDV")
    return maximum - 6


def pdus(context_id: int, command: bytes, dataset: Any | None, peer_maximum_length: int) -> list[Any]:
    """The buffers of one DIMSE message as P-DATA-TF PDUs, ready for ``sendmsg``.

    ``dataset`` is any buffer (bytes, memoryview of an mmap); slices of it are not
    copied. Returns alternating PDU headers (bytes) and values (buffers).
    """
    size = fragment_size(peer_maximum_length)
    if dataset is not None and len(command) + 6 + len(dataset) <= size:
        # Both whole in one PDU (two PDVs): a C-FIND answer costs the peer one PDU to read.
        head = PDU_HEADER.pack(P_DATA_TF, 0, 12 + len(command) + len(dataset))
        data_head = PDV_HEADER.pack(2 + len(dataset), context_id, 0x02)
        return [head + PDV_HEADER.pack(2 + len(command), context_id, 0x03), bytes(command) + data_head + bytes(dataset)]
    buffers: list[Any] = []
    _append_fragments(buffers, context_id, memoryview(command), size, command_flag=1)
    if dataset is not None:
        _append_fragments(buffers, context_id, memoryview(dataset), size, command_flag=0)
    return buffers


def _append_fragments(buffers: list[Any], context_id: int, data: memoryview, size: int, command_flag: int) -> None:
    total = len(data)
    offset = 0
    while True:
        chunk = data[offset : offset + size]
        offset += len(chunk)
        last = offset >= total
        header = command_flag | (0x02 if last else 0x00)  # PS3.8 E.2 message control header
        buffers.append(PDU_HEADER.pack(P_DATA_TF, 0, 6 + len(chunk)) + PDV_HEADER.pack(2 + len(chunk), context_id, header))
        buffers.append(chunk)
        if last:
            return


def iter_pdvs(pdu_value: bytes | bytearray | memoryview) -> Iterable[tuple[int, int, memoryview]]:
    """Yield (presentation context ID, control header, value) of a P-DATA-TF's variable field."""
    for context_id, data in iter_pdv_data(pdu_value):
        yield context_id, data[0], data[1:]


def iter_pdv_data(pdu_value: bytes | bytearray | memoryview) -> Iterable[tuple[int, memoryview]]:
    """Yield (presentation context ID, data) of a P-DATA-TF's variable field, where data is
    the message control header followed by the fragment (as pynetdicom keeps a PDV): views
    of ``pdu_value``, not copies."""
    view = memoryview(pdu_value)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 6:
            raise WireError("a presentation data value item is cut short")
        length, context_id, _ = PDV_HEADER.unpack_from(view, offset)
        if length < 2 or offset + 4 + length > end:
            raise WireError("a presentation data value item has a wrong length")
        yield context_id, view[offset + 5 : offset + 4 + length]
        offset += 4 + length


def encode_elements(elements: Iterable[tuple[int, str, bytes]], *, explicit_vr: bool) -> bytes:
    """Encode (tag, VR, value bytes) elements, already in tag order and padded to an even
    length, as a Little Endian data set (PS3.5 7.1.2 explicit, 7.1.3 implicit VR).

    Raises ``WireError`` for a value too long for its VR's length field.
    """
    parts: list[bytes] = []
    for tag, vr, value in elements:
        head = _element_heads.get((tag, vr, explicit_vr))
        if head is None:
            head = _element_heads[(tag, vr, explicit_vr)] = element_head(tag, vr, explicit_vr)
        prefix, long_length = head
        if long_length:
            parts += (prefix, _UL.pack(len(value)), value)
        elif len(value) > 0xFFFF:
            raise WireError(f"a {vr} value of {len(value)} bytes does not fit its length field")
        else:
            parts += (prefix, _US.pack(len(value)), value)
    return b"".join(parts)


def element_head(tag: int, vr: str, explicit_vr: bool) -> tuple[bytes, bool]:
    """An element's header before its length, and whether the length is 4 bytes."""
    if not explicit_vr:
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF), True
    code = vr.encode("ascii")
    if code in _LONG_VRS:
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, code, 0), True
    return struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, code), False


_element_heads: dict[tuple[int, str, bool], tuple[bytes, bool]] = {}
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def read_elements(data: bytes | bytearray | memoryview, *, explicit_vr: bool) -> list[tuple[int, str | None, bytes]]:
    """Read a flat Little Endian data set (PS3.5 7.1.2 explicit, 7.1.3 implicit VR) into
    (tag, VR, value bytes), in the order written; the VR is None in Implicit VR (the
    caller knows its dictionary). Raises ``WireError`` for an undefined length (a sequence
    or encapsulated data: not flat) and for bytes cut short."""
    view = memoryview(data)
    offset, end = 0, len(view)
    out: list[tuple[int, str | None, bytes]] = []
    while offset < end:
        if end - offset < 8:
            raise WireError("a data element is cut short")
        group, element = _TAG.unpack_from(view, offset)
        vr: str | None = None
        if explicit_vr:
            code = bytes(view[offset + 4 : offset + 6])
            if code in _LONG_VRS:
                if end - offset < 12:
                    raise WireError("a data element is cut short")
                length = _UL.unpack_from(view, offset + 8)[0]
                offset += 12
            else:
                length = _US.unpack_from(view, offset + 6)[0]
                offset += 8
            try:
                vr = code.decode("ascii")
            except UnicodeDecodeError as exc:
                raise WireError("a data element has no valid VR") from exc
        else:
            length = _UL.unpack_from(view, offset + 4)[0]
            offset += 8
        if length == 0xFFFFFFFF:
            raise WireError("a data element of undefined length (not a flat data set)")
        if offset + length > end:
            raise WireError("a data element's value is cut short")
        out.append((group << 16 | element, vr, bytes(view[offset : offset + length])))
        offset += length
    return out


_TAG = struct.Struct("<HH")


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, implementation_uid: str, implementation_version: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1) of a Part 10 file, Explicit VR Little
    Endian, led by its group length: what follows the preamble and "DICM". ASCII values."""

    def padded(value: str, pad: bytes) -> bytes:
        data = value.encode("ascii")
        return data + pad if len(data) % 2 else data

    body = encode_elements(
        [
            (0x00020001, "OB", b"\x00\x01"),  # File Meta Information Version
            (0x00020002, "UI", padded(sop_class_uid, b"\x00")),
            (0x00020003, "UI", padded(sop_instance_uid, b"\x00")),
            (0x00020010, "UI", padded(transfer_syntax, b"\x00")),
            (0x00020012, "UI", padded(implementation_uid, b"\x00")),
            (0x00020013, "SH", padded(implementation_version, b" ")),
        ],
        explicit_vr=True,
    )
    return encode_elements([(0x00020000, "UL", struct.pack("<L", len(body)))], explicit_vr=True) + body


# VRs whose explicit-VR length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def dataset_offset(data: bytes | bytearray | memoryview | Any) -> int:
    """Where the data set starts in a DICOM Part 10 file: after its preamble, prefix and
    File Meta Information group (PS3.10 7.1), which is always Explicit VR Little Endian.

    Raises ``WireError`` when the bytes are not a Part 10 file.
    """
    view = memoryview(data)
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        raise WireError("not a DICOM Part 10 file (no DICM prefix)")
    offset, end = 132, len(view)
    while offset + 8 <= end:
        group = struct.unpack_from("<H", view, offset)[0]
        if group != 0x0002:
            break
        vr = bytes(view[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            if offset + 12 > end:
                raise WireError("the file meta information is cut short")
            length = struct.unpack_from("<L", view, offset + 8)[0]
            offset += 12 + length
        else:
            length = struct.unpack_from("<H", view, offset + 6)[0]
            offset += 8 + length
    if offset > end:
        raise WireError("the file meta information is cut short")
    return offset

