"""Pure pydicom helpers for the archive: reading and checking a Part 10 file, turning a
dataset into the plain values the database indexes, and the DICOM JSON model of its header.

No Django imports here: these functions take and return plain data, so that every
channel (C-STORE, STOW-RS, upload, import) can share them and tests can call them directly.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

# PS3.5 9.1: components of digits separated by ".", no leading zero in a component, 64 chars at most.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UNDEFINED_LENGTH = 0xFFFFFFFF
# Elements never copied into the JSON header: the bulk data the viewer reads from the file.
PIXEL_TAGS = frozenset(Tag(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
# Values above this size are deferred when reading a header (kept on disk, not in memory).
DEFER_SIZE = 16 * 1024
JSON_BULK_THRESHOLD = 1024


class DicomFileError(Exception):
    """The bytes are not a DICOM file the archive can keep; ``str(exc)`` says why."""


def is_valid_uid(value: str) -> bool:
    """Return True when ``value`` is a UID as PS3.5 9.1 defines it."""
    return bool(value) and len(value) <= 64 and _UID_RE.match(value) is not None


def read_part10(path: Path | str) -> FileDataset:
    """Read a DICOM Part 10 file's dataset, deferring bulk values, and check it is whole.

    Raises ``DicomFileError`` when the file is not DICOM Part 10 (no "DICM" prefix and no
    file meta information), cannot be parsed, or is truncated (an element's declared
    length runs past the end of the file, or pixel data was cut off).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        raise DicomFileError(f"not a DICOM Part 10 file ({exc})") from exc
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, EOFError) as exc:
        raise DicomFileError(f"unreadable DICOM file: {exc}") from exc
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        raise DicomFileError("no file meta information with a Transfer Syntax UID")
    check_complete(ds, size)
    return ds


def check_complete(ds: Dataset, size: int) -> None:
    """Raise ``DicomFileError`` when a top-level element of ``ds`` runs past ``size`` bytes."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value_tell = getattr(raw, "value_tell", None)
        if length is None or value_tell is None or length == UNDEFINED_LENGTH:
            continue
        if value_tell + length > size:
            raise DicomFileError(
                f"truncated file: element {Tag(tag)} declares {length} bytes "
                f"but the file ends {size - value_tell} bytes after its start"
            )
    image = "Rows" in ds and "Columns" in ds
    has_pixels = any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
    if image and not has_pixels:
        raise DicomFileError("truncated file: image attributes present but no complete Pixel Data")


@dataclass
class Header:
    """The values of one instance that the archive indexes, level by level."""

    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    """Return an element's value as decoded Unicode text ("" when absent), clipped to ``limit``."""
    try:
        value = ds.get(keyword)
    except Exception:  # a value pydicom cannot decode is treated as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", "").strip()
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        number = int(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def _floats(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
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


def normalize_name(value: str) -> str:
    """Fold a person name for case- and accent-insensitive matching (Müller -> muller)."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.casefold()


def extract_header(ds: Dataset) -> Header:
    """Return the indexed values of ``ds``, decoded with its SpecificCharacterSet."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    patient_name = _text(ds, "PatientName", 324)
    header = Header()
    header.patient = {
        "patient_id": _text(ds, "PatientID"),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID"),
        "patient_name": patient_name,
        "patient_birth_date": parse_da(_text(ds, "PatientBirthDate")),
        "patient_sex": _text(ds, "PatientSex", 16).upper(),
    }
    header.study = {
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_date": parse_da(_text(ds, "StudyDate")),
        "study_time": parse_tm(_text(ds, "StudyTime")),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
        "study_id": _text(ds, "StudyID", 16),
        "institution_name": _text(ds, "InstitutionName"),
    }
    header.series = {
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "series_number": _int(ds, "SeriesNumber"),
        "modality": _text(ds, "Modality", 16).upper(),
        "series_description": _text(ds, "SeriesDescription"),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
        "protocol_name": _text(ds, "ProtocolName"),
        "series_date": parse_da(_text(ds, "SeriesDate")),
        "series_time": parse_tm(_text(ds, "SeriesTime")),
        "station_name": _text(ds, "StationName", 16),
    }
    header.instance = {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "instance_number": _int(ds, "InstanceNumber"),
        "transfer_syntax_uid": str(meta.get("TransferSyntaxUID", ""))[:64],
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "number_of_frames": _int(ds, "NumberOfFrames") or (1 if "PixelData" in ds else None),
        "image_position_patient": _floats(ds, "ImagePositionPatient", 3),
        "image_orientation_patient": _floats(ds, "ImageOrientationPatient", 6),
        "slice_location": _float(ds, "SliceLocation"),
        "specific_character_set": _text(ds, "SpecificCharacterSet", 64),
    }
    return header


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


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_nul(v) for k, v in value.items()}
    return value


def json_header(ds: Dataset) -> dict[str, Any]:
    """Return the DICOM JSON model (PS3.18 F.2) of ``ds`` without pixel data.

    Binary values over 1 KiB are not inlined: they get a ``BulkDataURI`` naming their
    tag, relative to the instance, for the DICOMweb layer to complete.
    """
    header = Dataset()
    for tag in ds.keys():
        if tag in PIXEL_TAGS:
            continue
        header.add(ds[tag])  # a deferred value is read here; only pixel data stays on disk

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
    return _strip_nul(data)
