"""Where and how instance files are kept under PACS_STORAGE_DIR.

A file's path comes from the SHA-256 of its SOP Instance UID (never from a UID or patient
data directly). Files are written to a temporary name in the storage directory, flushed
and fsynced, and renamed into place by the ingest service inside its database
transaction, so that a failure leaves neither a file without a row nor a row without a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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
    if not settings.PACS_SYNC_STORAGE:
        return
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


# (directory, storage root) -> whether a file in the directory can be renamed into the
# root: the SCP asks for every instance it receives, always about its receive directory.
_same_filesystem: dict[tuple[str, str], bool] = {}


def same_filesystem(path: Path) -> bool:
    """Return True when ``path`` can be renamed into the storage root."""
    key = (os.path.dirname(path), str(settings.PACS_STORAGE_DIR))
    known = _same_filesystem.get(key)
    if known is not None:
        return known
    try:
        same = os.stat(key[0] or ".").st_dev == os.stat(key[1]).st_dev
    except OSError:
        return False  # not remembered: the directory or the root may appear later
    if len(_same_filesystem) < 64:
        _same_filesystem[key] = same
    return same


def copy_to_temp(source: BinaryIO) -> Path:
    """Copy a stream to a new temporary file and return its path. Removes it on error."""
    temp = new_temp_path()
    try:
        with open(temp, "xb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


@contextlib.contextmanager
def mapped(path: Path, sha256: str | None = None) -> Iterator[tuple[Any, int, str]]:
    """Map a file read-only: yield (a seekable view, size, SHA-256).

    One mapping serves the digest and the header parse, so a file is read once. (Hashing
    on another thread while parsing was measured slower: the GIL hand-offs cost more.)
    A digest already known (worked out while the file was written) is taken as it is, and
    the header parse then reads only the pages it needs.
    The file is flushed to disk when it is put in place (``link_into_place``, ``publish``).
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            yield io.BytesIO(b""), 0, hashlib.sha256(b"").hexdigest()
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view, size, sha256 or hashlib.sha256(view).hexdigest()


def _libc_sync_file_range() -> Any:
    try:
        import ctypes
        import ctypes.util

        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the flush at the end does all the writing
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages, do not wait (Linux)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a received file (or a part of it) to disk without waiting for it
    (``sync_file_range``, Linux), so that the flush when it is put in place, after its
    header is read and indexed, finds the data written or on its way instead of starting
    all of it then. Only a hint: the flush (``flush_file``) is what makes the data durable."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def flush_file(path: Path) -> None:
    """Flush a file's data to disk (``fdatasync``), when PACS_SYNC_STORAGE is on."""
    if not settings.PACS_SYNC_STORAGE:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def link_into_place(temp: Path, relative: str) -> bool:
    """Give a temporary file its final name unless one is there; False when one is.

    The new name, the file's data and the directory entry are on disk when this returns.
    The data is flushed after the link, not before: on a journalling filesystem (ext4,
    XFS) the one flush then commits the new directory entry with it, and the directory's
    own flush finds nothing left to write (one journal commit per instance instead of two,
    bench/ingest.py). A failure to flush takes the name away again.
    """
    final = absolute(relative)
    try:
        try:
            os.link(temp, final)
        except FileNotFoundError:  # the first file of its directory (the common case has one)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.link(temp, final)
    except FileExistsError:
        return False
    try:
        flush_file(final)
        fsync_dir(final.parent)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return True


def publish(temp: Path, relative: str) -> None:
    """Rename a temporary file to its final place, replacing what is there."""
    final = absolute(relative)
    final.parent.mkdir(parents=True, exist_ok=True)
    flush_file(temp)  # a replaced file must never give way to an unflushed one
    os.replace(temp, final)
    fsync_dir(final.parent)


def age(relative: str) -> float | None:
    """Seconds since a stored file was last modified; None when there is no such file."""
    try:
        return time.time() - absolute(relative).stat().st_mtime
    except FileNotFoundError:
        return None


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
