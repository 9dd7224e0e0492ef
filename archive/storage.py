"""Where and how instance files are kept under PACS_STORAGE_DIR.

A file's path comes from the SHA-256 of its SOP Instance UID (never from a UID or patient
data directly). Files are written to a temporary name in the storage directory, flushed
and fsynced, and renamed into place by the ingest service inside its database
transaction, so that a failure leaves neither a file without a row nor a row without a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from django.conf import settings

CHUNK = 1024 * 1024
INCOMING = ".incoming"  # temporary files, removed at start-up (see clean_incoming)


def root() -> Path:
    """Return the storage root, PACS_STORAGE_DIR."""
    return Path(settings.PACS_STORAGE_DIR)


def relative_path_for(sop_instance_uid: str) -> str:
    """Return the path, relative to the root, where the instance's file is kept."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"


def absolute(relative: str) -> Path:
    """Return the absolute path of a stored file."""
    return root() / relative


def incoming_dir() -> Path:
    """Return (creating it) the directory for files being received; same filesystem as the root."""
    path = root() / INCOMING
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_temp_path() -> Path:
    """Return a fresh temporary path in the incoming directory."""
    return incoming_dir() / f"{uuid.uuid4().hex}.part"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def same_filesystem(path: Path) -> bool:
    """Return True when ``path`` can be renamed into the storage root."""
    try:
        return os.stat(path).st_dev == os.stat(root()).st_dev
    except OSError:
        return False


def copy_to_temp(source: BinaryIO) -> tuple[Path, int, str]:
    """Copy a stream to a new temporary file; return (path, size, sha256). Removes it on error."""
    temp = new_temp_path()
    digest = hashlib.sha256()
    size = 0
    try:
        with open(temp, "xb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, size, digest.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """Return (size, sha256) of a file, and fsync it so a later rename publishes whole data."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb+") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(handle.fileno())
    return size, digest.hexdigest()


def publish(temp: Path, relative: str) -> None:
    """Rename a temporary file to its final place (replacing what is there)."""
    final = absolute(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fsync_dir(final.parent)


def receive_dir() -> Path:
    """Return (creating it) this process's own directory for datasets being received.

    pynetdicom writes each C-STORE dataset there as it arrives; a dataset whose
    association is aborted leaves a partial file, which ``discard_receive_dir`` (at a
    clean stop) or ``clean_incoming`` (at the next start) removes.
    """
    path = incoming_dir() / f"pid-{os.getpid()}"
    path.mkdir(exist_ok=True)
    return path


def discard_receive_dir() -> None:
    """Remove this process's receive directory and the partial datasets in it."""
    shutil.rmtree(incoming_dir() / f"pid-{os.getpid()}", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_incoming(older_than: float = 3600.0) -> int:
    """Delete temporary files a killed process left behind; return how many.

    Receive directories of processes that no longer run go whole. Loose temporary files
    go once untouched for ``older_than`` seconds: other processes (SCP workers, imports,
    the web server) may be writing fresh ones right now.
    """
    path = root() / INCOMING
    if not path.is_dir():
        return 0
    count = 0
    limit = time.time() - older_than
    for entry in path.iterdir():
        try:
            if entry.is_dir() and entry.name.startswith("pid-"):
                pid = int(entry.name[4:]) if entry.name[4:].isdigit() else 0
                if pid and not _alive(pid):
                    count += sum(1 for _ in entry.iterdir())
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() and entry.stat().st_mtime < limit:
                entry.unlink(missing_ok=True)
                count += 1
        except OSError:
            continue
    return count


def disk_free(path: Path | None = None) -> int:
    """Return the free bytes on the storage filesystem."""
    return shutil.disk_usage(path or root()).free
