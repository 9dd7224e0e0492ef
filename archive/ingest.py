"""The ingest service: the one path by which an instance enters the archive.

C-STORE, STOW-RS, web upload and ``importdicom`` all call ``ingest_file``,
``ingest_bytes`` or ``ingest_dataset``. Each checks the dataset, writes the file as
received (DICOM Part 10) under a path derived from a hash of its SOP Instance UID, and
indexes it in one transaction; the answer is stored, duplicate or rejected with a reason
a person can act on. A failure at any step leaves neither a file without a row nor a
row without a file.
"""

from __future__ import annotations

import enum
import errno
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F
from django.dispatch import Signal
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from archive import storage
from archive.dicom import DicomFileError, Header, extract_header, json_header, normalize_name, read_part10
from archive.dicom import required_uid_errors
from archive.models import Instance, Patient, Series, Study

log = logging.getLogger("archive.ingest")

# Sent after an instance's transaction commits: sender=Instance, instance_id, study_id,
# series_id, created_series (bool). Follow-up work (render cache, routing, labels) hooks here.
instance_stored = Signal()

# Refuse a write that would leave less than this on the storage filesystem.
MIN_FREE_BYTES = 64 * 1024 * 1024


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # the data cannot be stored: the sender must fix it
    MISMATCH = "mismatch"  # the dataset is not what the request announced
    OUT_OF_RESOURCES = "out_of_resources"  # disk full: try again later
    FAILED = "failed"  # our side failed (database down, I/O error): try again later


@dataclass(frozen=True)
class Source:
    """Who or what delivered an instance."""

    channel: str  # "dimse", "import", "stow", "upload"
    ae_title: str = ""
    address: str = ""
    user_id: int | None = None
    path: str = ""


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str = ""
    instance_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.STORED, Outcome.DUPLICATE)


@dataclass(frozen=True)
class Expected:
    """What the request announced (C-STORE's Affected SOP Class/Instance UID)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""


class _Reject(Exception):
    def __init__(self, outcome: Outcome, reason: str):
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def ingest_dataset(ds: Dataset, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store a pydicom dataset (with file_meta), encoded as DICOM Part 10."""
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for unencodable data
        return IngestResult(Outcome.REJECTED, f"dataset cannot be encoded: {exc}")
    buffer.seek(0)
    return ingest_stream(buffer, source, expected)


def ingest_bytes(data: bytes, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store DICOM Part 10 bytes."""
    return ingest_stream(io.BytesIO(data), source, expected)


def ingest_stream(stream: BinaryIO, source: Source, expected: Expected | None = None) -> IngestResult:
    """Store a DICOM Part 10 stream: it is copied to a temporary file first."""
    try:
        temp, _, _ = storage.copy_to_temp(stream)
    except OSError as exc:
        return _io_failure(exc)
    return ingest_file(temp, source, take=True, expected=expected)


def ingest_file(path: Path | str, source: Source, *, take: bool = False, expected: Expected | None = None) -> IngestResult:
    """Store the DICOM Part 10 file at ``path``.

    With ``take`` the file is ours to move into the archive (or delete): the SCP passes
    the file pynetdicom received into. Otherwise it is copied and left where it is.
    Never raises for bad input or a failing disk or database: the result says what happened.
    """
    path = Path(path)
    temp: Path | None = path if take else None
    try:
        if take:
            if not storage.same_filesystem(path):
                temp = storage.new_temp_path()
                shutil.move(path, temp)
            size, sha256 = storage.hash_file(temp)
        else:
            with open(path, "rb") as handle:
                temp, size, sha256 = storage.copy_to_temp(handle)
        return _ingest_temp(temp, size, sha256, source, expected)
    except _Reject as exc:
        return IngestResult(exc.outcome, exc.reason)
    except OSError as exc:
        return _io_failure(exc)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)


def _io_failure(exc: OSError) -> IngestResult:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full: %s", exc)
        return IngestResult(Outcome.OUT_OF_RESOURCES, "storage is full")
    log.error("storage I/O error: %s", exc)
    return IngestResult(Outcome.FAILED, f"storage I/O error: {exc.strerror or exc}")


def _ingest_temp(temp: Path, size: int, sha256: str, source: Source, expected: Expected | None) -> IngestResult:
    try:
        ds = read_part10(temp)
    except DicomFileError as exc:
        return IngestResult(Outcome.REJECTED, str(exc))
    header = extract_header(ds)
    uid = header.instance["sop_instance_uid"]
    problems = required_uid_errors(header)
    if problems:
        return IngestResult(Outcome.REJECTED, "; ".join(problems), uid)
    if expected:
        mismatch = _mismatch(header, expected)
        if mismatch:
            return IngestResult(Outcome.MISMATCH, mismatch, uid)
    overwrite = settings.PACS_DUPLICATE_POLICY == "overwrite"
    if not overwrite and Instance.objects.filter(sop_instance_uid=uid).exists():
        return IngestResult(Outcome.DUPLICATE, "SOP Instance UID already stored; kept the first copy", uid)
    if storage.disk_free() < size + MIN_FREE_BYTES:
        return IngestResult(Outcome.OUT_OF_RESOURCES, "storage is full", uid)
    metadata = json_header(ds)
    relative = storage.relative_path_for(uid)
    try:
        instance_id, created_series, study_id, series_id = _index(
            header, metadata, temp, relative, size, sha256, source, overwrite
        )
    except _Reject as exc:
        return IngestResult(exc.outcome, exc.reason, uid)
    except IntegrityError:
        # Another association stored the same SOP instance a moment before us.
        return IngestResult(Outcome.DUPLICATE, "SOP Instance UID already stored; kept the first copy", uid)
    except DatabaseError as exc:
        log.error("database error while indexing %s: %s", uid, exc)
        return IngestResult(Outcome.FAILED, "database error; nothing was stored", uid)
    instance_stored.send(
        sender=Instance, instance_id=instance_id, study_id=study_id, series_id=series_id, created_series=created_series
    )
    return IngestResult(Outcome.STORED, "", uid, instance_id)


def _mismatch(header: Header, expected: Expected) -> str:
    if expected.sop_instance_uid and expected.sop_instance_uid != header.instance["sop_instance_uid"]:
        return "the dataset's SOPInstanceUID differs from the request's Affected SOP Instance UID"
    if expected.sop_class_uid and expected.sop_class_uid != header.instance["sop_class_uid"]:
        return "the dataset's SOPClassUID differs from the request's Affected SOP Class UID"
    return ""


def _index(
    header: Header,
    metadata: dict,
    temp: Path,
    relative: str,
    size: int,
    sha256: str,
    source: Source,
    overwrite: bool,
) -> tuple[int, bool, int, int]:
    """Write the rows and publish the file in one transaction; undo the file if it fails."""
    final = storage.absolute(relative)
    backup: Path | None = None
    published = False
    try:
        with transaction.atomic():
            study = _lock_study(header)
            if overwrite:
                backup = _remove_previous(header.instance["sop_instance_uid"], final)
            series, created_series = _series(study, header, source)
            instance = Instance.objects.create(
                series=series,
                **header.instance,
                file_path=relative,
                file_size=size,
                file_sha256=sha256,
                metadata=metadata,
                source_ae_title=source.ae_title[:16],
                source_address=source.address[:64],
            )
            Series.objects.filter(pk=series.pk).update(
                number_of_series_related_instances=F("number_of_series_related_instances") + 1,
                series_size=F("series_size") + size,
            )
            updates = {
                "number_of_study_related_instances": F("number_of_study_related_instances") + 1,
                "study_size": F("study_size") + size,
            }
            if created_series:
                updates["number_of_study_related_series"] = F("number_of_study_related_series") + 1
                modalities = set(Series.objects.filter(study=study).values_list("modality", flat=True))
                updates["modalities_in_study"] = "\\".join(sorted(m for m in modalities if m))[:256]
            Study.objects.filter(pk=study.pk).update(**updates)
            published = True  # from here on, a failure must take the file back out
            storage.publish(temp, relative)  # the last step: the commit follows at once
    except BaseException:
        if published:
            final.unlink(missing_ok=True)
        if backup is not None:
            os.replace(backup, final)
        raise
    if backup is not None:
        backup.unlink(missing_ok=True)
    return instance.pk, created_series, study.pk, series.pk


def _lock_study(header: Header) -> Study:
    """Return the instance's study, created if new, locked for the rest of the transaction.

    The lock serializes stores into one study so that its counts and modalities stay exact
    (on SQLite the IMMEDIATE transaction already serializes writers).
    """
    patient = _patient(header)
    study_values = {k: v for k, v in header.study.items() if k != "study_instance_uid"}
    study, created = Study.objects.get_or_create(
        study_instance_uid=header.study["study_instance_uid"], defaults={**study_values, "patient": patient}
    )
    study = Study.objects.select_for_update().get(pk=study.pk)
    if not created and study.patient_id != patient.pk:
        log.warning(
            "study %s arrived with another patient identity; kept under the first patient", study.study_instance_uid
        )
    if not created:
        blanks = {k: v for k, v in study_values.items() if v not in ("", None) and getattr(study, k) in ("", None)}
        if blanks:
            Study.objects.filter(pk=study.pk).update(**blanks)
    return study


def _patient(header: Header) -> Patient:
    values = dict(header.patient)
    key = {"patient_id": values.pop("patient_id"), "issuer_of_patient_id": values.pop("issuer_of_patient_id")}
    values["patient_name_norm"] = normalize_name(values["patient_name"])
    patient, created = Patient.objects.get_or_create(**key, defaults=values)
    if not created:
        blanks = {k: v for k, v in values.items() if v not in ("", None) and getattr(patient, k) in ("", None)}
        if blanks:
            Patient.objects.filter(pk=patient.pk).update(**blanks)
    return patient


def _series(study: Study, header: Header, source: Source) -> tuple[Series, bool]:
    values = {k: v for k, v in header.series.items() if k != "series_instance_uid"}
    series, created = Series.objects.get_or_create(
        series_instance_uid=header.series["series_instance_uid"],
        defaults={**values, "study": study, "source_ae_title": source.ae_title[:16]},
    )
    if series.study_id != study.pk:
        raise _Reject(
            Outcome.REJECTED,
            "SeriesInstanceUID already belongs to another study (StudyInstanceUID differs)",
        )
    return series, created


def _remove_previous(sop_instance_uid: str, final: Path) -> Path | None:
    """Overwrite policy: delete the stored copy's row (fixing counts) and set its file aside."""
    old = Instance.objects.select_related("series").filter(sop_instance_uid=sop_instance_uid).first()
    if old is None:
        return None
    delete_instance_rows(old)
    if not final.exists():
        return None
    backup = storage.new_temp_path()
    os.replace(final, backup)
    return backup


def delete_instance_rows(instance: Instance) -> None:
    """Delete an instance's row and take it out of its series' and study's counts.

    Must run inside the caller's transaction, with the study locked.
    """
    series = instance.series
    Series.objects.filter(pk=series.pk).update(
        number_of_series_related_instances=F("number_of_series_related_instances") - 1,
        series_size=F("series_size") - instance.file_size,
    )
    Study.objects.filter(pk=series.study_id).update(
        number_of_study_related_instances=F("number_of_study_related_instances") - 1,
        study_size=F("study_size") - instance.file_size,
    )
    instance.delete()
