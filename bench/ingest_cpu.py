#!/usr/bin/env python3
"""Ingest CPU: what one stored instance costs each process, pacsportal against Orthanc.

Over four associations both receivers are bound by the machine's two cores, so the rate
follows the CPU an instance costs everyone: the receiver, PostgreSQL's server (pacsportal
on PostgreSQL) and the four ``storescu`` processes. This starts one receiver (pacsportal's
``runscp`` with ``--workers``, or Orthanc), then stores ``--sets`` CT series of 200 slices
(each with new UIDs, as ``bench/ingest.py`` builds them) one after the other over four
associations, and prints for each series the rate and the CPU milliseconds an instance
cost each process group (``/proc/<pid>/stat``; PostgreSQL: every ``postgres`` process at
the series' start, so the first series misses the connections it opens).

Usage::

    .venv/bin/python bench/ingest_cpu.py [--receiver pacs|orthanc] [--db postgres|sqlite] [--workers N] [--sets N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - series, receivers, processes, PostgreSQL helpers

def postgres_processes() -> list[int]:
    """Every PostgreSQL server process running now."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "postgres":
                    found.append(int(entry))
            except OSError:
                continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receiver", choices=["pacs", "orthanc"], default="pacs")
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--warm-up", type=int, default=0, help="instances of another series stored over four associations before the timed ones")
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args(argv)
    ingest.check_tools()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = ingest.Processes()
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-ingest-cpu-"))
    pg = ingest.PostgresAdmin(args.pg_admin_url) if args.receiver == "pacs" and args.db == "postgres" else None
    receiver: ingest.Receiver | None = None
    try:
        series = [ingest.build_series(work / f"series-{number}") for number in range(args.sets)]
        warm_up = ingest.build_series(work / "warm-up", slices=args.warm_up) if args.warm_up else None
        run_dir = Path(tempfile.mkdtemp(dir=work))
        if args.receiver == "pacs":
            receiver = ingest.PacsReceiver(ingest.Config("pacs", 4, args.db, args.workers), run_dir, processes, pg)
        else:
            receiver = ingest.OrthancReceiver(ingest.Config("orthanc", 4), run_dir, processes)
        receiver.start()
        root = receiver.proc.pid  # type: ignore[union-attr]
        server = [root, *ingest.children_of(root)]
        label = f"{args.receiver}" + (f" ({args.db}, {args.workers} workers)" if args.receiver == "pacs" else "")
        if warm_up is not None:
            ingest.send(warm_up.files, min(4, len(warm_up.files)), receiver.ae_title, receiver.port, processes, run_dir)
        print(f"{label}: {args.sets} series of {len(series[0].files)} instances over 4 associations, one after the other")
        print("| series | instances/s | receiver CPU ms/instance | PostgreSQL | storescu |")
        print("|---:|---:|---:|---:|---:|")
        for number, one in enumerate(series, 1):
            os.sync()
            postgres = postgres_processes()
            before = (ingest.cpu_ms(server), ingest.cpu_ms(postgres), os.times())
            seconds = ingest.send(one.files, 4, receiver.ae_title, receiver.port, processes, run_dir)
            after = (ingest.cpu_ms(server), ingest.cpu_ms(postgres), os.times())
            count = len(one.files)
            clients = (after[2].children_user + after[2].children_system - before[2].children_user - before[2].children_system) * 1000
            print(
                f"| {number} | {count / seconds:.1f} | {(after[0] - before[0]) / count:.2f} | "
                + (f"{(after[1] - before[1]) / count:.2f}" if pg else "n/a")
                + f" | {clients / count:.2f} |",
                flush=True,
            )
        held = receiver.count()
        expected = sum(len(one.files) for one in series) + (len(warm_up.files) if warm_up else 0)
        if held != expected:
            raise ingest.BenchError(f"the receiver holds {held} instances, expected {expected}")
        return 0
    except (KeyboardInterrupt, ingest.Terminated, ingest.BenchError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        if receiver is not None:
            receiver.stop()
        ingest.clean_up(processes, pg, work)


if __name__ == "__main__":
    sys.exit(main())
