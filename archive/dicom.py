"""Pure pydicom helpers for the archive: reading and checking a Part 10 file, turning a
dataset into the plain values the database indexes, and the DICOM JSON model of its header.

No Django imports here: these functions take and return plain data, so that every
channel (C-STORE, STOW-RS, upload, import) can share them and tests can call them directly.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag
from pydicom.uid import UID

# PS3.5 9.1: components of digits separated by ".", no leading zero in a component, 64 chars at most.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UNDEFINED_LENGTH = 0xFFFFFFFF
# Elements never copied into the JSON header: the bulk data the viewer reads from the file.
PIXEL_TAGS = frozenset(Tag(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
JSON_BULK_THRESHOLD = 1024
# UIDs are validated whole (a clipped UID would be another, valid-looking UID).
UNCLIPPED = 1024


class DicomFileError(Exception):
    """The bytes are not a DICOM file the archive can keep; ``str(exc)`` says why."""


def is_valid_uid(value: str) -> bool:
    """Return True when ``value`` is a UID as PS3.5 9.1 defines it."""
    return bool(value) and len(value) <= 64 and _UID_RE.match(value) is not None


def read_part10(path: Path | str) -> Dataset:
    """Read the DICOM Part 10 file at ``path`` (see ``parse_part10``)."""
    path = Path(path)
    with open(path, "rb") as fp:  # OSError here is an I/O problem, not bad data
        return parse_part10(fp, os.fstat(fp.fileno()).st_size)


def parse_part10(fp: Any, size: int) -> Dataset:
    """Parse a DICOM Part 10 file's header (all but the pixel data) and check it is whole.

    ``fp`` is a seekable binary file or an ``mmap`` of ``size`` bytes. Pixel data is never
    read: its presence and length are checked by walking the element structure.
    Raises ``DicomFileError`` when the bytes are not DICOM Part 10 (no "DICM" prefix and
    no file meta information), cannot be parsed, or are cut short (an element's declared
    length runs past the end, or an image has no pixel data).
    """
    try:
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", ()) else None
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            fp.seek(0)
            ds = pydicom.dcmread(fp)  # a deflate stream: inflated whole, pixels included
    except InvalidDicomError as exc:
        raise DicomFileError(f"not a DICOM Part 10 file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on malformed input
        raise DicomFileError(f"unreadable DICOM file: {exc or type(exc).__name__}") from exc
    if syntax is None:
        raise DicomFileError("no file meta information with a Transfer Syntax UID")
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        has_pixels = any(t in ds for t in PIXEL_TAGS)  # zlib checked the stream's integrity
    else:
        has_pixels = check_complete(fp, size, syntax)
    # Pixel Data is Type 1 in every image IOD: its absence means a cut-off file.
    if is_image_storage(str(ds.get("SOPClassUID", ""))) and not has_pixels:
        raise DicomFileError("truncated file: an image without Pixel Data")
    return ds


def check_complete(fp: Any, size: int, syntax: UID) -> bool:
    """Walk the element structure of a Part 10 file; return whether it has pixel data.

    pydicom reads leniently: a value cut short is kept short and an undefined-length
    element that ends before its delimiter is dropped without an error. So the structure
    is walked here (PS3.5 7.1 and 7.5: tags, lengths, items and delimiters; values are
    skipped, never read) and every length must fit in the file, else ``DicomFileError``.
    """
    fp.seek(128)
    start = 132 if fp.read(4) == b"DICM" else 0
    fp.seek(start)
    walker = _Walker(fp, size, explicit=True, little=True)
    walker.elements(until_group_changes_from=0x0002)
    walker.explicit = not syntax.is_implicit_VR
    walker.little = syntax.is_little_endian
    walker.elements()
    return walker.pixel_data_seen


def is_image_storage(sop_class_uid: str) -> bool:
    """Return True for the image storage SOP classes, whose IODs require Pixel Data."""
    return "Image Storage" in UID(sop_class_uid).name if sop_class_uid else False


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Walker:
    """Walks the element structure of an encoded dataset without reading values."""

    def __init__(self, fp: Any, size: int, explicit: bool, little: bool) -> None:
        self.fp, self.size, self.explicit, self.little = fp, size, explicit, little
        self.pixel_data_seen = False

    def _truncated(self, what: str) -> DicomFileError:
        return DicomFileError(f"truncated file: {what} at byte {self.fp.tell()} of {self.size}")

    def header(self) -> tuple[int, bytes | None, int]:
        raw = self.fp.read(8)
        if len(raw) < 8:
            raise self._truncated("an element header is cut off")
        endian = "<" if self.little else ">"
        group, element = struct.unpack(endian + "HH", raw[:4])
        tag = (group << 16) | element
        if group == 0xFFFE or not self.explicit:
            return tag, None, struct.unpack(endian + "L", raw[4:])[0]
        vr = raw[4:6]
        if not (vr.isalpha() and vr.isupper()):
            # Encoded in implicit VR despite an explicit transfer syntax: read on as pydicom does.
            self.explicit = False
            return tag, None, struct.unpack(endian + "L", raw[4:])[0]
        if vr in _LONG_VRS:
            more = self.fp.read(4)
            if len(more) < 4:
                raise self._truncated("an element header is cut off")
            return tag, vr, struct.unpack(endian + "L", more)[0]
        return tag, vr, struct.unpack(endian + "H", raw[6:])[0]

    def skip(self, length: int, tag: int) -> None:
        if self.fp.tell() + length > self.size:
            raise DicomFileError(
                f"truncated file: element {Tag(tag)} declares {length} bytes "
                f"but only {self.size - self.fp.tell()} remain"
            )
        self.fp.seek(length, 1)

    def elements(self, until_group_changes_from: int | None = None, in_item: bool = False) -> None:
        while True:
            position = self.fp.tell()
            if position >= self.size:
                if in_item:
                    raise self._truncated("an item ends without its delimiter")
                return
            if until_group_changes_from is not None:
                peek = self.fp.read(2)
                self.fp.seek(position)
                if len(peek) < 2 or struct.unpack("<H", peek)[0] != until_group_changes_from:
                    return
            tag, vr, length = self.header()
            if tag == _ITEM_END and in_item:
                return
            if tag in PIXEL_TAGS and not in_item:
                self.pixel_data_seen = True
            if length != UNDEFINED_LENGTH:
                self.skip(length, tag)
            elif tag == 0x7FE00010:
                self.sequence(fragments=True)
            else:
                implicit_inside = vr == b"UN"  # PS3.5 6.2.2: UN of undefined length holds implicit VR
                saved = self.explicit
                self.explicit = self.explicit and not implicit_inside
                self.sequence(fragments=False)
                self.explicit = saved

    def sequence(self, fragments: bool) -> None:
        while True:
            tag, _, length = self.header()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise DicomFileError(f"malformed file: {Tag(tag)} inside a sequence where an item was expected")
            if length != UNDEFINED_LENGTH:
                self.skip(length, tag)
            elif fragments:
                raise DicomFileError("malformed file: a pixel data fragment of undefined length")
            else:
                self.elements(in_item=True)


@dataclass
class Header:
    """The values of one instance that the archive indexes, level by level."""

    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


Getter = Callable[[str], Any]  # keyword -> the element's value as pydicom gives it (None when absent)


def _get(get: Getter, keyword: str) -> Any:
    try:
        return get(keyword)
    except Exception:  # a value pydicom cannot decode is treated as absent
        return None


def _text(get: Getter, keyword: str, limit: int = 64) -> str:
    """Return an element's value as decoded Unicode text ("" when absent), clipped to ``limit``."""
    value = _get(get, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", "").strip()
    return text[:limit]


def _int(get: Getter, keyword: str) -> int | None:
    try:
        value = get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        number = int(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def _floats(get: Getter, keyword: str, count: int) -> list[float] | None:
    try:
        value = get(keyword)
        if value is None:
            return None
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def _float(get: Getter, keyword: str) -> float | None:
    try:
        value = get(keyword)
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def parse_da(value: str) -> dt.date | None:
    """Parse a DA value (PS3.5 6.2: YYYYMMDD; also the ACR-NEMA YYYY.MM.DD) or return None."""
    digits = value.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def parse_tm(value: str) -> dt.time | None:
    """Parse a TM value (PS3.5 6.2: HH[MM[SS[.F{1,6}]]]; also HH:MM:SS) or return None."""
    text = value.strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not match:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        return dt.time(
            int(hour),
            int(minute or 0),
            min(int(second or 0), 59),  # leap second 60 folds into 59
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        return None


def fnmatch_dicom(value: str, pattern: str) -> bool:
    """Whether ``value`` matches ``pattern`` with DICOM wildcards (``*``, ``?``), ignoring case."""
    parts = []
    for char in pattern.strip():
        parts.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
    return re.fullmatch("".join(parts), (value or "").strip(), flags=re.IGNORECASE | re.DOTALL) is not None


def normalize_name(value: str) -> str:
    """Fold a person name for case- and accent-insensitive matching (Müller -> muller)."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.casefold()


def extract_header(ds: Dataset) -> Header:
    """Return the indexed values of ``ds``, decoded with its SpecificCharacterSet."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    return _header(ds.get, "Rows" in ds, str(meta.get("TransferSyntaxUID", "")))


@functools.cache
def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword))


def header_from_values(values: dict[int, Any], transfer_syntax: str) -> Header:
    """``extract_header`` for values already decoded (``archive.rawheader``): top-level
    tag -> the value as pydicom would give it.

    The instances of a series repeat their patient, study and series values: those three
    levels are worked out once for a set of values (``_UPPER_LEVELS``) and copied after."""

    def get(keyword: str) -> Any:
        return values.get(_tag(keyword))

    header = Header()
    key = _upper_key(values)
    upper = _UPPER_LEVELS.get(key) if key is not None else None
    if upper is None:
        upper = (_patient_values(get), _study_values(get), _series_values(get))
        if key is not None:
            if len(_UPPER_LEVELS) >= _UPPER_LEVELS_LIMIT:
                _UPPER_LEVELS.clear()
            _UPPER_LEVELS[key] = upper
    header.patient, header.study, header.series = (dict(level) for level in upper)
    header.instance = _instance_values(get, _tag("Rows") in values, transfer_syntax)
    return header


# The keywords the patient, study and series values are made of (``_patient_values``,
# ``_study_values``, ``_series_values``).
_UPPER_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription",
    "ReferringPhysicianName", "StudyID", "InstitutionName",
    "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
    "ProtocolName", "SeriesDate", "SeriesTime", "StationName",
)  # fmt: skip
_UPPER_TAGS: tuple[int, ...] = ()
_UPPER_LEVELS: dict[tuple, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
_UPPER_LEVELS_LIMIT = 1024


def _upper_key(values: dict[int, Any]) -> tuple | None:
    """The values behind the patient, study and series levels, each with its type (1 and
    1.0 are equal keys, not equal texts); None when one cannot be a key."""
    global _UPPER_TAGS
    if not _UPPER_TAGS:
        _UPPER_TAGS = tuple(_tag(keyword) for keyword in _UPPER_KEYWORDS)
    key = []
    for tag in _UPPER_TAGS:
        value = values.get(tag)
        if isinstance(value, list):
            value = tuple(value)
        key.append((type(value), value))
    key_tuple = tuple(key)
    try:
        hash(key_tuple)
    except TypeError:
        return None
    return key_tuple


def _header(get: Getter, has_rows: bool, transfer_syntax: str) -> Header:
    header = Header()
    header.patient = _patient_values(get)
    header.study = _study_values(get)
    header.series = _series_values(get)
    header.instance = _instance_values(get, has_rows, transfer_syntax)
    return header


def _patient_values(get: Getter) -> dict[str, Any]:
    """The Patient row's values (PS3.3 C.7.1.1), from ``get``."""
    return {
        "patient_id": _text(get, "PatientID"),
        "issuer_of_patient_id": _text(get, "IssuerOfPatientID"),
        "patient_name": _text(get, "PatientName", 324),
        "patient_birth_date": parse_da(_text(get, "PatientBirthDate")),
        "patient_sex": _text(get, "PatientSex", 16).upper(),
    }


def _study_values(get: Getter) -> dict[str, Any]:
    """The Study row's values (PS3.3 C.7.2.1), from ``get``."""
    return {
        "study_instance_uid": _text(get, "StudyInstanceUID", UNCLIPPED),
        "accession_number": _text(get, "AccessionNumber", 16),
        "study_date": parse_da(_text(get, "StudyDate")),
        "study_time": parse_tm(_text(get, "StudyTime")),
        "study_description": _text(get, "StudyDescription"),
        "referring_physician_name": _text(get, "ReferringPhysicianName", 324),
        "study_id": _text(get, "StudyID", 16),
        "institution_name": _text(get, "InstitutionName"),
    }


def _series_values(get: Getter) -> dict[str, Any]:
    """The Series row's values (PS3.3 C.7.3.1), from ``get``."""
    return {
        "series_instance_uid": _text(get, "SeriesInstanceUID", UNCLIPPED),
        "series_number": _int(get, "SeriesNumber"),
        "modality": _text(get, "Modality", 16).upper(),
        "series_description": _text(get, "SeriesDescription"),
        "body_part_examined": _text(get, "BodyPartExamined", 16),
        "protocol_name": _text(get, "ProtocolName"),
        "series_date": parse_da(_text(get, "SeriesDate")),
        "series_time": parse_tm(_text(get, "SeriesTime")),
        "station_name": _text(get, "StationName", 16),
    }


def _instance_values(get: Getter, has_rows: bool, transfer_syntax: str) -> dict[str, Any]:
    """The Instance row's values (SOP Common, Image Pixel and Plane modules), from ``get``."""
    return {
        "sop_instance_uid": _text(get, "SOPInstanceUID", UNCLIPPED),
        "sop_class_uid": _text(get, "SOPClassUID", UNCLIPPED),
        "instance_number": _int(get, "InstanceNumber"),
        "transfer_syntax_uid": transfer_syntax[:64],
        "rows": _int(get, "Rows"),
        "columns": _int(get, "Columns"),
        "bits_allocated": _int(get, "BitsAllocated"),
        "number_of_frames": _int(get, "NumberOfFrames") or (1 if has_rows else None),
        "image_position_patient": _floats(get, "ImagePositionPatient", 3),
        "image_orientation_patient": _floats(get, "ImageOrientationPatient", 6),
        "slice_location": _float(get, "SliceLocation"),
        "specific_character_set": _text(get, "SpecificCharacterSet", 64),
    }


def required_uid_errors(header: Header) -> list[str]:
    """Return what makes ``header`` unfit to store: missing or malformed identifying UIDs."""
    problems = []
    for label, value in (
        ("SOPInstanceUID", header.instance["sop_instance_uid"]),
        ("SOPClassUID", header.instance["sop_class_uid"]),
        ("StudyInstanceUID", header.study["study_instance_uid"]),
        ("SeriesInstanceUID", header.series["series_instance_uid"]),
    ):
        if not value:
            problems.append(f"{label} is missing")
        elif not is_valid_uid(value):
            problems.append(f"{label} {value[:70]!r} is not a valid UID (PS3.5 9.1)")
    return problems


def json_header(ds: Dataset) -> dict[str, Any]:
    """Return the DICOM JSON model (PS3.18 F.2) of ``ds`` without pixel data.

    Binary values over 1 KiB are not inlined: they get a ``BulkDataURI`` naming their
    tag, relative to the instance, for the DICOMweb layer to complete.
    """
    header = ds
    if any(tag in ds for tag in PIXEL_TAGS):
        header = Dataset()
        for tag in ds.keys():
            if tag not in PIXEL_TAGS:
                header.add(ds[tag])

    def bulk_uri(element: Any) -> str:
        return f"bulkdata/{int(element.tag):08X}"

    try:
        data = header.to_json_dict(
            bulk_data_threshold=JSON_BULK_THRESHOLD,
            bulk_data_element_handler=bulk_uri,
            suppress_invalid_tags=True,
        )
    except Exception:  # noqa: BLE001 - a header pydicom cannot express stays indexed without JSON
        return {}
    return data
