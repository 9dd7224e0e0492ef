#!/usr/bin/env python3
"""C-MOVE benchmark: the 200-slice CT series moved to a DCMTK storescp, by pacsportal and by Orthanc.

Builds the series of bench/ingest.py (200 slices, 512x512, 16 bit, 105 MB), loads it into
pacsportal (``importdicom``; SQLite and/or PostgreSQL) and into Orthanc (``storescu``), then
times a SERIES-level ``movescu`` (process start to exit, ``TCP_NODELAY=1``) from each to a
DCMTK ``storescp`` that writes what it receives. Every run checks that all 200 instances
arrived. Prints instances/s with the ratio to Orthanc measured in the same run, and writes
the table to ``bench/results/move-<timestamp>.md``.

Usage::

    .venv/bin/python bench/move.py [--db sqlite|postgres|both] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - the ingest benchmark's series, processes and receivers

DEST_AE = "BENCHDEST"


def start_destination(processes: ingest.Processes, folder: Path) -> int:
    """DCMTK's storescp writing what it receives into ``folder``; return its port."""
    folder.mkdir(parents=True)
    port = ingest.free_port()
    log = folder.parent / f"{folder.name}.log"  # beside the folder: it must hold only received files
    proc = processes.start(
        ["storescp", "-aet", DEST_AE, "-od", str(folder), "+xa", str(port)], ingest.clean_env(TCP_NODELAY="1"), log
    )
    ingest.wait_for_echo(proc, DEST_AE, port, log)
    return port


def move(ae_title: str, port: int, study_uid: str, series_uid: str) -> float:
    """Time one SERIES-level movescu to the destination; return seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            "movescu", "-S", "-aet", ingest.CALLING_AE, "-aec", ae_title, "-aem", DEST_AE,
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={series_uid}",
            ingest.HOST, str(port),
        ],
        env=ingest.clean_env(TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=ingest.SEND_TIMEOUT,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise ingest.BenchError(f"movescu from {ae_title} failed ({done.returncode}): {done.stderr[-1500:]}")
    return elapsed


def run_orthanc(work: Path, processes: ingest.Processes, series: ingest.Series, dest_port: int) -> ingest.OrthancReceiver:
    receiver = ingest.OrthancReceiver(ingest.Config("orthanc", 1), work, processes)
    receiver.extra_config = {
        "DicomModalities": {"dest": [DEST_AE, ingest.HOST, dest_port]},
        "DicomAlwaysAllowMove": True,  # the calling AE is not a declared modality
    }
    receiver.start()
    sender = processes.start(
        ["storescu", "-aet", ingest.CALLING_AE, "-aec", receiver.ae_title, ingest.HOST, str(receiver.port), *map(str, series.files)],
        ingest.clean_env(TCP_NODELAY="1"),
    )
    if processes.wait(sender, ingest.SEND_TIMEOUT) != 0:
        raise ingest.BenchError("storescu to Orthanc failed")
    return receiver


def run_pacs(work: Path, processes: ingest.Processes, series: ingest.Series, dest_port: int, db: str, pg) -> ingest.PacsReceiver:
    receiver = ingest.PacsReceiver(ingest.Config("pacs", 1, db, 1), work, processes, pg)
    receiver.start()
    receiver.manage("importdicom", "--no-progress", str(series.files[0].parent), timeout=900)
    receiver.manage("remotenode", "add", "dest", DEST_AE, ingest.HOST, str(dest_port))
    return receiver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = ingest.Processes()
    pg = ingest.PostgresAdmin(args.pg_admin_url) if args.db in ("postgres", "both") else None
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-move-"))
    rows: list[tuple[str, str, float]] = []
    try:
        series = ingest.build_series(work / "series")
        first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        receivers: list[tuple[str, str, ingest.Receiver]] = []
        dest = work / "dest"
        dest_port = start_destination(processes, dest)
        (work / "orthanc").mkdir()
        receivers.append(("Orthanc", "SQLite (built-in)", run_orthanc(work / "orthanc", processes, series, dest_port)))
        for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
            (work / db).mkdir()
            database = "PostgreSQL" if db == "postgres" else "SQLite"
            receivers.append(("pacsportal", database, run_pacs(work / db, processes, series, dest_port, db, pg)))
        best: dict[tuple[str, str], float] = {}
        for repeat in range(args.repeats):
            for name, database, receiver in receivers:
                for item in dest.iterdir():
                    item.unlink()
                seconds = move(receiver.ae_title, receiver.port, study_uid, series_uid)
                received = sum(1 for _ in dest.iterdir())
                if received != len(series.files):
                    raise ingest.BenchError(f"{name} ({database}) moved {received} of {len(series.files)} instances")
                key = (name, database)
                best[key] = min(best.get(key, seconds), seconds)
                rate = len(series.files) / seconds
                print(f"[{repeat + 1}/{args.repeats}] {name}, {database}: {seconds:.2f} s, {rate:.1f} instances/s", flush=True)
        count = len(series.files)
        reference = count / best[("Orthanc", "SQLite (built-in)")]
        lines = ["| sender | database | instances/s | MB/s | vs Orthanc |", "|---|---|---:|---:|---:|"]
        for (name, database), seconds in best.items():
            rate = count / seconds
            lines.append(f"| {name} | {database} | {rate:.1f} | {series.total_bytes / seconds / ingest.MB:.1f} | {rate / reference:.2f}x |")
        table = "\n".join(lines)
        print()
        print(table)
        ingest.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = ingest.RESULTS_DIR / f"move-{stamp}.md"
        out.write_text(f"# C-MOVE benchmark, {stamp} UTC\n\nCommand: `.venv/bin/python bench/move.py --db {args.db}`\n\n{table}\n")
        print(f"\nwritten to {out}")
        return 0
    finally:
        ingest.clean_up(processes, pg, work)


if __name__ == "__main__":
    sys.exit(main())
