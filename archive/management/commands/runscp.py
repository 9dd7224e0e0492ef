"""``python manage.py runscp``: the archive's DICOM SCP (C-ECHO, C-STORE)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection, connections

from archive import storage
from archive.dimse.server import Scp, listening_socket

log = logging.getLogger("archive.dimse")


def open_database() -> None:
    """Connect to the database before listening, so that the first association does not
    wait for it: on PostgreSQL this opens the process's connection pool (with psycopg_pool
    imported, a connection made and configured, about 10 ms), on SQLite the connection an
    association's thread takes. The connection goes back to the pool (or the cache) for
    the first association. A database that cannot be reached now is only logged: each
    association connects again, and a sender is answered with a failure status while the
    database is away."""
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        log.warning("the database cannot be reached yet: %s", exc)
    finally:
        connection.close()


class Command(BaseCommand):
    help = "Run the DICOM SCP (C-ECHO, C-STORE) that feeds the archive. Stops cleanly on SIGTERM."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=settings.PACS_DICOM_PORT)
        parser.add_argument("--ae-title", default=settings.PACS_AE_TITLE)
        parser.add_argument("--bind", default=settings.PACS_BIND_ADDRESS)
        parser.add_argument(
            "--workers",
            type=int,
            default=settings.PACS_SCP_WORKERS,
            help="SCP processes sharing the port, one per core by default (parallel senders use several cores)",
        )

    def handle(self, *args, **options) -> None:
        ae_title = options["ae_title"].strip()
        if not ae_title or len(ae_title) > 16:
            raise CommandError("the AE title must be 1 to 16 characters")
        storage.incoming_dir()
        removed = storage.clean_incoming()
        if removed:
            log.info("removed %d temporary files left by an earlier run", removed)
        workers = options["workers"]
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        if workers == 1:
            self.serve(ae_title, options)
        else:
            self.supervise(ae_title, options, workers)

    def make_scp(self, ae_title: str, options: dict, listen_socket: socket.socket | None) -> Scp:
        return Scp(
            ae_title=ae_title,
            port=options["port"],
            bind=options["bind"],
            max_associations=settings.PACS_MAX_ASSOCIATIONS,
            allowed_calling_aets=settings.PACS_ALLOWED_CALLING_AETS or None,
            listen_socket=listen_socket,
        )

    def serve(self, ae_title: str, options: dict, listen_socket: socket.socket | None = None) -> None:
        # pynetdicom receives each dataset into a temporary file: keep those on the storage
        # filesystem, in this process's own folder, so that storing one is a rename.
        tempfile.tempdir = str(storage.receive_dir())
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        open_database()
        scp = self.make_scp(ae_title, options, listen_socket)
        try:
            scp.start()
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['bind']}:{options['port']}: {exc}") from exc
        self.stdout.write(f"DICOM SCP {ae_title} listening on {options['bind']}:{scp.port} (pid {os.getpid()})")
        self.stdout.flush()
        stop.wait()
        log.info("stopping: finishing the associations in flight")
        scp.stop(timeout=settings.PACS_SCP_STOP_TIMEOUT)
        storage.discard_receive_dir()
        log.info("SCP stopped")

    def supervise(self, ae_title: str, options: dict, workers: int) -> None:
        """Fork ``workers`` SCP processes accepting on one socket; restart one that dies;
        stop all on SIGTERM."""
        try:
            listen_socket = listening_socket(options["bind"], options["port"])
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['bind']}:{options['port']}: {exc}") from exc
        stopping = threading.Event()
        children: dict[int, int] = {}

        def forward(signum: int, _frame: object) -> None:
            stopping.set()
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)

        def spawn(slot: int) -> None:
            connections.close_all()  # never share a database connection across fork
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = 0
                try:
                    self.serve(ae_title, options, listen_socket)
                except BaseException as exc:  # noqa: BLE001 - the child reports and exits
                    sys.stderr.write(f"SCP worker {slot} failed: {exc}\n")
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = slot

        quick_failures: list[float] = []
        for slot in range(workers):
            spawn(slot)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            slot = children.pop(pid, None)
            if slot is None or stopping.is_set():
                continue
            now = time.monotonic()
            quick_failures = [t for t in quick_failures if now - t < 60] + [now]
            if len(quick_failures) > 5:
                log.error("SCP workers keep failing; stopping them all")
                forward(signal.SIGTERM, None)
                continue
            log.error("SCP worker %d (pid %d) exited with status %d; restarting it", slot, pid, status)
            time.sleep(1)
            spawn(slot)
        log.info("all SCP workers stopped")
