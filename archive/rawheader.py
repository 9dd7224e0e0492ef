"""The indexed values and the DICOM JSON header of a Part 10 file, from one walk of its bytes.

Ingest needs two things from each file's header: the values the database indexes
(``archive.dicom.extract_header``) and the header in the DICOM JSON model (PS3.18 F.2,
``archive.dicom.json_header``). Through pydicom that costs about a millisecond per CT
slice, most of it building a ``Dataset`` of ``DataElement`` objects that are thrown away.
``read`` walks the encoded elements once instead (PS3.5 7.1, 7.5) and converts each value
as pydicom does: the same splitting at backslashes, the same stripping, the same codecs
and the same validators (``pydicom.valuerep.validate_value``, in strict mode).

It only answers for files it fully understands, and gives the same answer as pydicom
for them: Explicit or Implicit VR Little Endian data sets (the encapsulated syntaxes
included: only their pixel data differs), a character set without code extensions, and
every value valid as pydicom reads strictly. For anything else (a big endian or
deflated file, ISO 2022 escapes, a UN element, a private tag in implicit VR, an invalid
value, a truncated or malformed structure) it returns None and the caller takes the
pydicom way, which also words the error for a damaged file.
"""

from __future__ import annotations

import base64
import io
import mmap
import struct
import threading
from typing import Any

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.tag import _LUT_DESCRIPTOR_TAGS
from pydicom.uid import UID
from pydicom.valuerep import is_valid_ds, validate_value

from archive.dicom import (
    JSON_BULK_THRESHOLD,
    PIXEL_TAGS,
    UNDEFINED_LENGTH,
    DicomFileError,
    Header,
    _Walker,
    extract_header,
    header_from_values,
    is_image_storage,
    json_header,
    parse_part10,
)

_DEFAULT = "iso8859"  # pydicom's default_encoding: the default repertoire, read as Latin-1
# Character sets decoded here: one codec, no code extensions (PS3.3 C.12.1.1.2).
_CODECS = {
    name: python_encoding[name]
    for name in (
        "",
        "ISO_IR 6",
        "ISO_IR 100",
        "ISO_IR 101",
        "ISO_IR 109",
        "ISO_IR 110",
        "ISO_IR 126",
        "ISO_IR 127",
        "ISO_IR 138",
        "ISO_IR 144",
        "ISO_IR 148",
        "ISO_IR 166",
        "ISO_IR 192",
    )
}
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_SPLIT_TEXT_VRS = frozenset({"SH", "LO", "UC"})  # pydicom's convert_text
_SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT"})  # pydicom's convert_single_string
_TEXT_VRS = _SPLIT_TEXT_VRS | _SINGLE_TEXT_VRS | {"PN"}  # decoded with the character set
_STRING_VRS = frozenset({"AS", "CS", "DA", "DT", "TM"})  # pydicom's convert_string
_KNOWN_VRS = (
    _BYTES_VRS
    | set(_NUMBER_FORMATS)
    | _SPLIT_TEXT_VRS
    | _SINGLE_TEXT_VRS
    | _STRING_VRS
    | {"AE", "AT", "DS", "IS", "PN", "SQ", "UI", "UR"}
)
# Base64 makes binary values a third longer: pydicom's cut-off for inlining them.
_INLINE_LIMIT = (JSON_BULK_THRESHOLD // 4) * 3
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET_TAG = 0x00080005
# An element's header (PS3.5 7.1.2): tag, then in explicit VR the VR and a 16-bit length
# (or, for the VRs of _LONG_VRS, two reserved bytes and a 32-bit length).
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_LENGTH = struct.Struct("<L")
_VR_OF = {vr.encode("ascii"): (vr, vr in _LONG_VRS) for vr in _KNOWN_VRS}
_TRANSFER_SYNTAX_TAG = 0x00020010


class _Unhandled(Exception):
    """Not a file (or value) ``read`` answers for: the caller goes the pydicom way."""


# json_header reads strictly through pydicom's config.strict_reading(), a setting of the
# whole process: one thread at a time, so that another's header is not read strictly too.
_pydicom_lock = threading.Lock()


def indexed(data: Any, size: int) -> tuple[Header, dict[str, Any]]:
    """The indexed values and the JSON header of a Part 10 file: ``read``, or pydicom
    (``parse_part10``, ``extract_header``, ``json_header``) for what ``read`` leaves.

    Raises ``DicomFileError`` when the bytes are not a DICOM file the archive can keep.
    """
    answer = read(data, size)
    if answer is not None:
        return answer
    with _pydicom_lock:
        ds = parse_part10(data if hasattr(data, "seek") else io.BytesIO(data), size)
        return extract_header(ds), json_header(ds)


def read(data: Any, size: int) -> tuple[Header, dict[str, Any]] | None:
    """Return the indexed values and the JSON header of the Part 10 file in ``data``
    (bytes or an ``mmap`` of ``size`` bytes), or None when pydicom must read it.

    Raises ``DicomFileError`` for an image without pixel data (PS3.3: Type 1), as
    ``archive.dicom.parse_part10`` does.
    """
    if config.datetime_conversion or config.use_DS_numpy or config.use_IS_numpy or config.use_DS_decimal:
        return None  # pydicom would build other value types
    try:
        view = memoryview(data)
    except TypeError:  # a file object (an empty file is not mapped): pydicom reads it
        return None
    try:
        return _Reader(view, size, data).read()
    except (_Unhandled, struct.error, UnicodeError, ValueError, OverflowError, IndexError):
        return None
    finally:
        view.release()  # else closing the caller's mmap fails (BufferError)


class _Reader:
    """One walk of one file: its file meta group, its data set to the pixel data (values
    converted), then the structure of the rest (lengths checked, values skipped)."""

    def __init__(self, view: memoryview, size: int, data: Any = None) -> None:
        self.view = view
        # Values are sliced from here: bytes or an mmap give bytes in one step.
        self.source = data if isinstance(data, (bytes, mmap.mmap)) else _BytesOf(view)
        self.size = size
        self.explicit = True
        self.values: dict[int, Any] = {}  # top-level tag -> value as pydicom returns it

    def read(self) -> tuple[Header, dict[str, Any]]:
        if self.size < 132 or bytes(self.view[128:132]) != b"DICM":
            raise _Unhandled("no preamble")
        syntax, position = self._file_meta(132)
        if not syntax.is_transfer_syntax or syntax.is_deflated or not syntax.is_little_endian:
            raise _Unhandled("transfer syntax")
        self.explicit = not syntax.is_implicit_VR
        metadata, position, pixels_at = self._dataset(position, self.size, _DEFAULT, top=True)
        has_pixels = pixels_at is not None
        if has_pixels:
            self._check_rest(pixels_at)
        if is_image_storage(str(self.values.get(0x00080016) or "")) and not has_pixels:
            raise DicomFileError("truncated file: an image without Pixel Data")
        return header_from_values(self.values, str(syntax)), metadata

    def _file_meta(self, position: int) -> tuple[UID, int]:
        """Read group 0002 (always Explicit VR Little Endian, PS3.10 7.1)."""
        syntax: UID | None = None
        while position + 8 <= self.size and struct.unpack_from("<H", self.view, position)[0] == 0x0002:
            tag, vr, length, position = self._element_header(position, explicit=True)
            if length == UNDEFINED_LENGTH or position + length > self.size:
                raise _Unhandled("file meta")
            if tag == _TRANSFER_SYNTAX_TAG:
                syntax = UID(bytes(self.view[position : position + length]).decode(_DEFAULT).rstrip("\0 "))
            position += length
        if syntax is None:
            raise _Unhandled("no transfer syntax")
        return syntax, position

    def _element_header(self, position: int, explicit: bool) -> tuple[int, str | None, int, int]:
        if position + 8 > self.size:
            raise _Unhandled("cut off")
        group, element, vr_bytes, short = _EXPLICIT_HEAD.unpack_from(self.view, position)
        tag = (group << 16) | element
        if group == 0xFFFE or not explicit:
            return tag, None, _LENGTH.unpack_from(self.view, position + 4)[0], position + 8
        known = _VR_OF.get(vr_bytes)
        if known is None:
            raise _Unhandled(f"VR {vr_bytes!r}")  # UN, an unknown VR, or implicit VR in an explicit file
        vr, long = known
        if long:
            if position + 12 > self.size:
                raise _Unhandled("cut off")
            return tag, vr, _LENGTH.unpack_from(self.view, position + 8)[0], position + 12
        return tag, vr, short, position + 8

    def _dataset(
        self, position: int, end: int, encoding: str, *, top: bool = False, delimited: bool = False
    ) -> tuple[dict[str, Any], int, int | None]:
        """Elements from ``position`` to ``end``, or with ``delimited`` (an item of undefined
        length) to the item's delimiter: (JSON, position after them, where the top level's
        pixel data starts or None)."""
        out: dict[str, Any] = {}
        previous = -1
        text_seen = False
        view, size, explicit = self.view, self.size, self.explicit
        while position < end:
            start = position
            # The element's header, as _element_header reads it (inline: once per element).
            if position + 8 > size:
                raise _Unhandled("cut off")
            group, element, vr_bytes, short = _EXPLICIT_HEAD.unpack_from(view, position)
            tag = (group << 16) | element
            if group == 0xFFFE or not explicit:
                vr = None
                length = _LENGTH.unpack_from(view, position + 4)[0]
                position += 8
            else:
                known = _VR_OF.get(vr_bytes)
                if known is None:
                    raise _Unhandled(f"VR {vr_bytes!r}")
                vr, long = known
                if long:
                    if position + 12 > size:
                        raise _Unhandled("cut off")
                    length = _LENGTH.unpack_from(view, position + 8)[0]
                    position += 12
                else:
                    length = short
                    position += 8
            if tag == _ITEM_END and delimited:
                return out, position, None
            if group == 0xFFFE or tag <= previous or group == 0x0002:
                raise _Unhandled("element order")
            previous = tag
            if top and tag in PIXEL_TAGS:
                return out, start, start
            if vr is None:
                vr = self._implicit_vr(tag)
            if length == UNDEFINED_LENGTH:
                if vr != "SQ":
                    raise _Unhandled("undefined length")
                items, position = self._sequence(position, None, encoding)
                out[_key(tag)] = {"vr": "SQ", "Value": items}
                continue
            if position + length > end:
                raise _Unhandled("cut off")
            if vr == "SQ":
                items, position = self._sequence(position, position + length, encoding)
                out[_key(tag)] = {"vr": "SQ", "Value": items}
                continue
            raw = self.source[position : position + length]
            position += length
            if tag == _CHARSET_TAG:
                if text_seen:
                    raise _Unhandled("text before the character set")
                encoding = _codec(raw)
            elif vr in _TEXT_VRS:
                text_seen = True
            value, element = _converted(tag, vr, raw, encoding)
            if top:
                self.values[tag] = value
            out[_key(tag)] = element
        if position != end or delimited:
            raise _Unhandled("cut off, or an item without its delimiter")
        return out, position, None

    def _implicit_vr(self, tag: int) -> str:
        if tag >> 16 & 1:
            raise _Unhandled("private tag in implicit VR")  # its VR depends on its creator
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _Unhandled("unknown tag in implicit VR") from None
        if vr not in _KNOWN_VRS:
            raise _Unhandled(f"VR {vr}")  # ambiguous (US or SS ...): pydicom looks at other elements
        return vr

    def _sequence(self, position: int, end: int | None, encoding: str) -> tuple[list[dict[str, Any]], int]:
        """A sequence's items (PS3.5 7.5): of its ``end`` or, when None, to its delimiter."""
        items: list[dict[str, Any]] = []
        while end is None or position < end:
            tag, _, length, position = self._element_header(position, explicit=False)
            if tag == _SEQUENCE_END and end is None:
                return items, position
            if tag != _ITEM:
                raise _Unhandled("not an item")
            if length == UNDEFINED_LENGTH:
                item, position, _ = self._dataset(position, self.size, encoding, delimited=True)
            else:
                if position + length > (end if end is not None else self.size):
                    raise _Unhandled("cut off")
                item, position, _ = self._dataset(position, position + length, encoding)
            items.append(item)
        if position != end:
            raise _Unhandled("length mismatch")
        return items, position

    def _check_rest(self, position: int) -> None:
        """The pixel data and what follows: structure only, as ``check_complete`` walks it."""
        stream = _MemoryFile(self.view)
        stream.seek(position)
        walker = _Walker(stream, self.size, explicit=self.explicit, little=True)
        try:
            walker.elements()
        except DicomFileError:
            raise _Unhandled("damaged after the header") from None


class _BytesOf:
    """Slices of a memoryview as bytes (what slicing bytes or an mmap gives)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __getitem__(self, part: slice) -> bytes:
        return bytes(self.view[part])


_KEYS: dict[int, str] = {}
_KEYS_LIMIT = 16384  # tags; private ones vary from file to file


def _key(tag: int) -> str:
    """A tag's key in the JSON model ("0010 0010" -> "00100010")."""
    key = _KEYS.get(tag)
    if key is None:
        key = f"{tag:08X}"
        if len(_KEYS) < _KEYS_LIMIT:
            _KEYS[tag] = key
    return key


class _MemoryFile:
    """The little of a binary file that ``_Walker`` uses, over a memoryview."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def read(self, count: int) -> bytes:
        data = bytes(self.view[self.position : self.position + count])
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> None:
        self.position = offset if whence == 0 else self.position + offset

    def tell(self) -> int:
        return self.position


def _codec(raw: bytes) -> str:
    """The Python codec of a SpecificCharacterSet value (pydicom's convert_encodings)."""
    name = raw.decode(_DEFAULT).rstrip(" \x00")
    if "\\" in name or name.strip() != name or name not in _CODECS:
        raise _Unhandled("character set")  # code extensions, or a spelling pydicom corrects
    return _CODECS[name]


def _decode(raw: bytes, encoding: str) -> str:
    """pydicom's decode_bytes for one codec without escape sequences; strict."""
    if b"\x1b" in raw:
        raise _Unhandled("escape sequence")
    return raw.decode(encoding)


def _strings(text: str) -> list[str]:
    """pydicom's multi_string: trailing padding off, split at backslashes."""
    return text.rstrip(" \x00").split("\\")


def _json(vr: str, values: list[Any]) -> dict[str, Any]:
    """An element in the JSON model; an empty single value has no "Value" (pydicom's VM 0)."""
    if len(values) == 1 and values[0] in ("", None):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _single(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


# Conversions of short values seen lately: the instances of a series repeat most of their
# header (patient, study, series, equipment, geometry) byte for byte, and converting and
# validating those values again was most of the walk. The cached values and JSON elements
# are shared between headers, so nothing may change them (nothing does: they are read,
# indexed and serialized).
_SEEN: dict[tuple[int, str, bytes, str], tuple[Any, dict[str, Any]]] = {}
_SEEN_LIMIT = 8192
_SEEN_VALUE_LIMIT = 256  # bytes; longer values are converted each time


def _converted(tag: int, vr: str, raw: bytes, encoding: str) -> tuple[Any, dict[str, Any]]:
    """``_convert``, answered from the conversions seen lately when it can be."""
    key = (tag, vr, raw, encoding)
    answer = _SEEN.get(key)
    if answer is None:
        answer = _convert(tag, vr, raw, encoding)
        if len(raw) <= _SEEN_VALUE_LIMIT:
            if len(_SEEN) >= _SEEN_LIMIT:
                _SEEN.clear()  # simpler than an LRU, and a series refills it in one instance
            _SEEN[key] = answer
    return answer


def _convert(tag: int, vr: str, raw: bytes, encoding: str) -> tuple[Any, dict[str, Any]]:
    """(value as pydicom returns it, JSON element) of one element's value bytes."""
    if not raw:
        return _empty(vr)
    if vr in _BYTES_VRS:
        if len(raw) > _INLINE_LIMIT:
            return raw, {"vr": vr, "BulkDataURI": f"bulkdata/{tag:08X}"}
        return raw, {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}
    if vr in _NUMBER_FORMATS:
        if tag in _LUT_DESCRIPTOR_TAGS:
            raise _Unhandled("LUT descriptor")  # pydicom adjusts its first value
        width = struct.calcsize("<" + _NUMBER_FORMATS[vr])
        if len(raw) % width:
            raise _Unhandled("length")
        numbers = list(struct.unpack(f"<{len(raw) // width}{_NUMBER_FORMATS[vr]}", raw))
        if vr in ("FL", "FD") and any(n != n or n in (float("inf"), float("-inf")) for n in numbers):
            raise _Unhandled("not a finite number")
        return _single(numbers), {"vr": vr, "Value": numbers}
    if vr == "AT":
        if len(raw) % 4:
            raise _Unhandled("length")
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        tags = [(pairs[i] << 16) | pairs[i + 1] for i in range(0, len(pairs), 2)]
        return _single(tags), {"vr": vr, "Value": [f"{t:08X}" for t in tags]}
    if vr == "PN":
        return _person_names(raw, encoding)
    if vr in _SPLIT_TEXT_VRS:
        strings = _decode(raw, encoding).split("\\")
        for value in strings:
            validate_value(vr, value, config.RAISE)
        strings = [value.rstrip("\0 ") for value in strings]
        return _single(strings), _json(vr, strings)
    if vr in _SINGLE_TEXT_VRS:
        text = _decode(raw, encoding)
        validate_value(vr, text, config.RAISE)
        text = text.rstrip("\0 ")
        return text, _json(vr, [text])
    text = raw.decode(_DEFAULT)
    if vr in _STRING_VRS:
        strings = _strings(text)
        return _single(strings), _json(vr, strings)
    if vr == "AE":
        strings = [value.strip() for value in text.split("\\")]
        return _single(strings), _json(vr, strings)
    if vr == "UI":
        strings = _strings(text.rstrip("\0 "))
        for value in strings:
            validate_value("UI", value, config.RAISE)
        return _single(strings), _json(vr, strings)
    if vr == "UR":
        value = text.rstrip()
        return value, _json(vr, [value])
    if vr == "IS":
        strings = _strings(text)
        numbers = [_integer_string(value) for value in strings]
        return _single(numbers), {"vr": vr, "Value": numbers}
    if vr == "DS":
        strings = _strings(text.strip())
        numbers = [_decimal_string(value) for value in strings]
        return _single(numbers), {"vr": vr, "Value": numbers}
    raise _Unhandled(f"VR {vr}")


def _empty(vr: str) -> tuple[Any, dict[str, Any]]:
    """A zero-length value: pydicom's empty value for the VR, and no "Value" in JSON."""
    if vr in ("PN", "AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR") or vr in _SPLIT_TEXT_VRS or vr in _SINGLE_TEXT_VRS:
        return "", {"vr": vr}
    return None, {"vr": vr}


def _integer_string(value: str) -> int:
    """An IS value as pydicom reads it strictly (PS3.5 6.2: at most 12 characters)."""
    if not value.strip():
        raise _Unhandled("empty IS")  # pydicom keeps "" and fails to write it as a number
    validate_value("IS", value, config.RAISE)
    number = int(value)
    if not -(2**31) <= number < 2**31:
        raise _Unhandled("IS out of range")
    return number


def _decimal_string(value: str) -> float:
    """A DS value as pydicom's DSfloat reads it strictly (PS3.5 6.2: at most 16 characters)."""
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or not is_valid_ds(stripped):
        raise _Unhandled("DS")
    number = float(stripped)
    if number != number or number in (float("inf"), float("-inf")):
        raise _Unhandled("DS")
    return number


class _Name(str):
    """A decoded PN value (``str`` gives what pydicom's PersonName gives) with its groups."""

    components: tuple[str, ...]


def _person_names(raw: bytes, encoding: str) -> tuple[Any, dict[str, Any]]:
    """PN values (pydicom's convert_PN and PersonName): groups split at "=", trailing
    empty groups dropped; JSON Alphabetic, Ideographic and Phonetic (PS3.18 F.2.2)."""
    names: list[_Name] = []
    for text in _decode(raw.rstrip(b"\x00 "), encoding).split("\\"):
        validate_value("PN", text, config.RAISE)
        groups = text.split("=")
        while groups and not groups[-1]:
            groups.pop()
        name = _Name("=".join(groups))
        name.components = tuple(groups)
        names.append(name)
    if len(names) == 1 and not names[0].components:
        return names[0], {"vr": "PN"}
    values = []
    for name in names:
        if not name.components:
            raise _Unhandled("empty PN in a list")  # pydicom fails to write it
        parts = {"Alphabetic": name.components[0]}
        if len(name.components) > 1:
            parts["Ideographic"] = name.components[1]
        if len(name.components) > 2:
            parts["Phonetic"] = name.components[2]
        values.append(parts)
    return _single(names), {"vr": "PN", "Value": values}
