"""The management commands: importdicom, checkarchive, and runscp as a real process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from pydicom.data import get_testdata_file

from archive import storage
from archive.models import Instance, Study
from tests.archive.test_ingest import assert_consistent
from tests.conftest import dcmtk, free_port, make_dataset, part10, write_part10

BASE_DIR = Path(settings.BASE_DIR)


@pytest.mark.django_db
def test_importdicom_imports_a_folder_and_summarizes(tmp_path: Path, storage_dir: Path, capsys) -> None:
    folder = tmp_path / "incoming"
    (folder / "sub" / "deeper").mkdir(parents=True)
    study_uid = "1.2.826.0.1.3680043.10.9"
    for i, where in enumerate(["", "sub", "sub/deeper"]):
        write_part10(make_dataset(study_uid=study_uid), folder / where / f"img{i}.dcm")
    (folder / "sub" / "DICOMDIR.txt").write_text("a note, not an image")
    (folder / "copy.dcm").write_bytes((folder / "img0.dcm").read_bytes())  # a duplicate
    cut = part10(make_dataset(rows=64, columns=64))
    (folder / "cut.dcm").write_bytes(cut[:-300])
    with pytest.raises(CommandError, match="1 files could not be stored"):
        call_command("importdicom", str(folder), "--no-progress")
    out = capsys.readouterr().out
    assert "6 files: 3 stored, 1 duplicates, 1 rejected or failed, 1 skipped (not DICOM)" in out
    assert "skipped: " in out and "DICOMDIR.txt" in out
    assert "rejected: " in out and "cut.dcm: truncated file" in out
    assert Study.objects.get(study_instance_uid=study_uid).number_of_study_related_instances == 3
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_importdicom_takes_single_files_and_says_what_is_missing(storage_dir: Path, capsys) -> None:
    call_command("importdicom", get_testdata_file("CT_small.dcm"), get_testdata_file("JPEG2000.dcm"), "--no-progress")
    assert "2 files: 2 stored" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no such file or folder"):
        call_command("importdicom", "/nonexistent/path")


@pytest.mark.django_db
def test_checkarchive_finds_rows_without_files_and_files_without_rows(storage_dir: Path, capsys) -> None:
    call_command("importdicom", get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm"), "--no-progress")
    call_command("checkarchive", "--verify")
    assert "2 instances: 0 rows without file, 0 files without row, 0 checksum mismatches" in capsys.readouterr().out
    first, second = Instance.objects.order_by("pk")
    storage.absolute(first.file_path).unlink()
    with open(storage.absolute(second.file_path), "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    orphan = storage_dir / "ab" / "cd" / ("f" * 64 + ".dcm")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    with pytest.raises(CommandError):
        call_command("checkarchive", "--verify")
    out = capsys.readouterr().out
    assert f"row without file: {first.file_path}" in out
    assert f"checksum mismatch: {second.file_path}" in out
    assert "file without row: ab/cd/" in out


def database_url() -> str:
    """A URL for the test database, for a subprocess to share it."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{host}:{port}/{db['NAME']}"


def start_runscp(storage_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        DATABASE_URL=database_url(),
        PACS_STORAGE_DIR=str(storage_dir),
        PACS_SCP_STOP_TIMEOUT="20",
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runscp", "--port", str(port), "--bind", "127.0.0.1", *extra],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [dcmtk("echoscu"), "-aec", "PACSPORTAL", "127.0.0.1", str(port)], capture_output=True, timeout=10
        )
        if probe.returncode == 0:
            return process
        if process.poll() is not None:
            pytest.fail(f"runscp exited: {process.stdout.read()}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("runscp did not start listening")


def wait_for_workers(process: subprocess.Popen, count: int, timeout: float = 30.0) -> str:
    """Read runscp's output until ``count`` worker processes say they listen (the first to
    listen answers C-ECHO while the others may still be starting); return what was read."""
    read: list[str] = []
    done = threading.Event()

    def reader() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            read.append(line)
            if sum("listening on" in seen and "(pid" in seen for seen in read) >= count:
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout):
        process.kill()
        pytest.fail(f"fewer than {count} runscp workers listening after {timeout:.0f} s: {''.join(read)}")
    return "".join(read)


def storescu(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescu"), "-aec", "PACSPORTAL", "127.0.0.1", str(port), *map(str, files)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_runscp_stops_on_sigterm_without_half_stored_instances(transactional_db, tmp_path: Path, storage_dir: Path) -> None:
    files = [write_part10(make_dataset(rows=256, columns=256, study_uid="1.2.826.0.1.5"), tmp_path / f"{i}.dcm") for i in range(150)]
    port = free_port()
    scp = start_runscp(storage_dir, port)
    sender = storescu(port, files)
    deadline = time.monotonic() + 60
    while Instance.objects.count() < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    scp.send_signal(signal.SIGTERM)
    try:
        scp.wait(timeout=40)
    finally:
        sender.kill()
        sender.wait()
    output = scp.stdout.read()
    assert scp.returncode == 0, output
    assert "SCP stopped" in output
    stored = Instance.objects.count()
    assert 10 <= stored < 150  # stopped mid-transfer
    assert Study.objects.get().number_of_study_related_instances == stored
    assert_consistent(storage_dir)


def test_runscp_with_several_workers_shares_the_port(transactional_db, tmp_path: Path, storage_dir: Path) -> None:
    files = [write_part10(make_dataset(study_uid="1.2.826.0.1.6"), tmp_path / f"{i}.dcm") for i in range(40)]
    port = free_port()
    scp = start_runscp(storage_dir, port, "--workers", "2")
    try:
        started = wait_for_workers(scp, 2)  # both take associations from the start
        senders = [storescu(port, files[i::4]) for i in range(4)]
        for sender in senders:
            assert sender.wait(timeout=120) == 0, sender.stdout.read()
    finally:
        scp.send_signal(signal.SIGTERM)
        scp.wait(timeout=40)
    output = started + scp.stdout.read()
    assert scp.returncode == 0, output
    pids = {line.split("(pid ")[1].rstrip(")") for line in output.splitlines() if "listening on" in line and "(pid" in line}
    assert len(pids) == 2, output
    # Both processes served associations (the least busy one takes each new association).
    served = {line.split("archive.dimse[")[1].split("]")[0] for line in output.splitlines() if "calling AE STORESCU" in line}
    assert served == pids, output
    assert Study.objects.get().number_of_study_related_instances == 40
    assert_consistent(storage_dir)


def test_runscp_opens_the_database_before_it_listens_and_survives_one_that_is_away(transactional_db, monkeypatch, caplog) -> None:
    from django.db import OperationalError, connection

    from archive.management.commands import runscp

    def away() -> None:
        raise OperationalError("connection refused")

    closed = []
    with monkeypatch.context() as patch:
        patch.setattr(connection, "close", lambda: closed.append(True))
        runscp.open_database()
        assert connection.connection is not None and closed == [True]
        patch.setattr(connection, "ensure_connection", away)
        with caplog.at_level(logging.WARNING, logger="archive.dimse"):
            runscp.open_database()  # logged, not raised: each association connects again
    assert "cannot be reached" in caplog.text and closed == [True, True]
