"""Shared fixtures: generated datasets, an isolated storage directory, the SCP on a free port."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import socket
import subprocess
import threading
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
MG_IMAGE = "1.2.840.10008.5.1.4.1.1.1.2"
SOP_FOR_MODALITY = {"CT": CT_IMAGE, "MR": MR_IMAGE, "CR": CR_IMAGE, "US": US_IMAGE, "MG": MG_IMAGE}

_counter = itertools.count(1)


def make_dataset(
    *,
    modality: str = "CT",
    patient_id: str = "PAT001",
    patient_name: str = "Doe^Jane",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    charset: str | None = None,
    rows: int = 16,
    columns: int = 16,
    accession: str = "ACC001",
    study_date: str = "20240115",
    instance_number: int | None = None,
) -> Dataset:
    """Return a small but complete image dataset (with file meta) of the given modality."""
    number = instance_number if instance_number is not None else next(_counter)
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SOP_FOR_MODALITY[modality]
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = accession
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.StudyDescription = f"{modality} study"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{modality} series"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = float(number)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4096).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def part10(ds: Dataset) -> bytes:
    """Encode a dataset as DICOM Part 10 bytes."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_part10(ds: Dataset, path: Path) -> Path:
    path.write_bytes(part10(ds))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def storage_dir(settings, tmp_path: Path) -> Iterator[Path]:
    """Every test gets its own empty storage directory (and an empty series cache)."""
    from archive.ingest import series_cache

    path = tmp_path / "storage"
    path.mkdir()
    settings.PACS_STORAGE_DIR = path
    settings.PACS_RENDER_CACHE_DIR = tmp_path / "render"
    series_cache.clear()
    from archive.access import forget_nodes, forget_permissions

    forget_permissions()  # user ids come back from one test to the next
    forget_nodes()  # so do AE titles, with other rights
    yield path
    series_cache.clear()
    forget_nodes()


@pytest.fixture
def scp(transactional_db, settings) -> Iterator:
    """The archive's SCP on a free port, serving in this process, stopped after the test."""
    from archive import storage
    from archive.dimse.server import Scp

    # As runscp does: datasets are received into the process's folder on the storage
    # filesystem (storing one is a rename), which the stop removes with any partial one.
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(storage.receive_dir())
    server = Scp(ae_title="PACSPORTAL", port=0, bind="127.0.0.1", max_associations=16)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=5)
        storage.discard_receive_dir()
        tempfile.tempdir = saved_tempdir


def dcmtk(tool: str) -> str:
    """Return the path of a DCMTK tool (installed by .ci/run); fail loudly if missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return path


def run_dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, env=env)


def run_together(targets: list, timeout: float = 30) -> None:
    """Start a thread for each of ``targets`` (callables), all before any is joined; wait
    for them (at most ``timeout`` seconds each)."""
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def make_user(username: str, *roles: str, password: str | None = None, **fields):
    """A user in the given role groups (created again if a flushed database lost them)."""
    from django.contrib.auth.models import Group, Permission, User

    from archive.roles import ensure_roles

    if roles and Group.objects.filter(name__in=roles).count() < len(set(roles)):
        ensure_roles(Group, Permission)
    user = User.objects.create_user(username, password=password, **fields)
    user.groups.set(Group.objects.filter(name__in=roles))
    return user
