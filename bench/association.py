#!/usr/bin/env python3
"""Association latency: where a short association's time goes, pacsportal against Orthanc.

Stores the small archive of bench/query.py (20 studies, 120 small files) into Orthanc and
into pacsportal (``runscp``, one worker, SQLite or PostgreSQL), then runs ``echoscu`` and a
STUDY-level ``findscu`` (``TCP_NODELAY=1``) against each, interleaved, and prints for each:

* the client's wall time from process start to exit, and its CPU time (the client's own
  work, the same whatever the server: a difference in wall time is the server's);
* the server's CPU time an association: its processes' CPU (``/proc``; for pacsportal the
  ``runscp`` process and its workers, not the PostgreSQL server) over all the runs, warm-up
  included, divided by their number. On a machine with few cores this is what a client
  competes with: the server's work after an answer delays the client's next step;
* with ``tcpdump`` on the loopback interface (run as root), the median time of each step
  as it shows on the wire, from the last packet of one side to the first of the other:
  the server's A-ASSOCIATE-AC, the client's time before its request, the server's
  answer, the client's time before its A-RELEASE-RQ, the server's A-RELEASE-RP, and the
  whole connection from SYN to the last packet.

Usage::

    .venv/bin/python bench/association.py [--db sqlite|postgres] [--repeats N] [--name "SMITH*"]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - processes, receivers, PostgreSQL helpers
import query  # noqa: E402 - the small archive and its receivers

STEPS = ["A-ASSOCIATE-AC", "client, to its request", "answer", "client, to its release", "A-RELEASE-RP"]
PACKET = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): Flags \[([^\]]+)\].*length (\d+)")


# findscu's matching keys (--name): none by default, all studies
MATCHING: dict[str, str] = {}


def client_args(tool: str, ae_title: str, port: int) -> list[str]:
    args = [tool, "-aet", ingest.CALLING_AE, "-aec", ae_title]
    if tool == "findscu":
        args += ["-S", *query.Query("", "STUDY", query.study_keys(**MATCHING), 0).findscu_keys()]
    return args + [ingest.HOST, str(port)]


def run_client(tool: str, ae_title: str, port: int) -> tuple[float, float]:
    """One client run: (wall ms, the client's CPU ms)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        client_args(tool, ae_title, port), env=ingest.clean_env(TCP_NODELAY="1"), capture_output=True, timeout=60
    )
    wall = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise ingest.BenchError(f"{tool} against {ae_title} failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


def process_cpu_ms(pid: int) -> float:
    """CPU ms (user and system) that process ``pid`` and its children have used so far."""
    return ingest.cpu_ms([pid, *ingest.children_of(pid)])


def wire_steps(capture: Path, port: int) -> dict[str, float]:
    """Median ms of each step of the connections to ``port`` in a tcpdump text capture."""
    connections: dict[str, list[tuple[float, str, int, str]]] = {}
    for line in capture.read_text().splitlines():
        m = PACKET.match(line)
        if not m:
            continue
        t, source, target, flags, length = float(m[1]), int(m[2]), int(m[3]), m[4], int(m[5])
        if target == port:
            connections.setdefault(str(source), []).append((t, "client", length, flags))
        elif source == port:
            connections.setdefault(str(target), []).append((t, "server", length, flags))
    steps: dict[str, list[float]] = {name: [] for name in [*STEPS, "connection"]}
    for packets in connections.values():
        turns: list[list] = []  # [side, first time, last time] of each run of data packets
        for t, side, length, _ in packets:
            if not length:
                continue
            if turns and turns[-1][0] == side:
                turns[-1][2] = t
            else:
                turns.append([side, t, t])
        if len(turns) != 6:
            continue  # not request, AC, request, answer, release, RP
        for index, name in enumerate(STEPS, start=1):
            steps[name].append((turns[index][1] - turns[index - 1][2]) * 1000)
        steps["connection"].append((packets[-1][0] - packets[0][0]) * 1000)
    return {name: statistics.median(values) for name, values in steps.items() if values}


def measure(targets: list[tuple[str, ingest.Receiver]], tool: str, repeats: int, work: Path) -> dict:
    """Interleaved runs of ``tool``; with tcpdump when it can capture."""
    capture = None
    dump = shutil.which("tcpdump")
    raw = work / f"{tool}.pcap"
    if dump and os.geteuid() == 0:
        ports = " or ".join(f"port {r.port}" for _, r in targets)
        capture = subprocess.Popen(
            [dump, "-i", "lo", "-nn", "-s", "96", "-w", str(raw), f"tcp and ({ports})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in targets}
    cpu_before = {label: process_cpu_ms(receiver.proc.pid) for label, receiver in targets if receiver.proc}
    try:
        for repeat in range(repeats + 1):  # the first round warms up, untimed
            for label, receiver in targets:
                result = run_client(tool, receiver.ae_title, receiver.port)
                if repeat:
                    runs[label].append(result)
    finally:
        if capture is not None:
            time.sleep(0.5)
            capture.send_signal(signal.SIGINT)
            capture.wait(10)
    results = {}
    for label, receiver in targets:
        walls = [w for w, _ in runs[label]]
        results[label] = {
            "wall": statistics.median(walls),
            "p90": sorted(walls)[int(len(walls) * 0.9) - 1],
            "cpu": statistics.median(c for _, c in runs[label]),
            "server_cpu": (process_cpu_ms(receiver.proc.pid) - cpu_before[label]) / (repeats + 1) if receiver.proc else None,
        }
    if capture is not None:
        text = work / f"{tool}.txt"
        with text.open("w") as out:
            subprocess.run([dump, "-tt", "-nn", "-r", str(raw)], stdout=out, stderr=subprocess.DEVNULL)
        for label, receiver in targets:
            results[label]["wire"] = wire_steps(text, receiver.port)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--name", default="", help=f"findscu's PatientName to match (e.g. {query.SMALL_PREFIX}; default: all studies)")
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args(argv)
    query.check_tools()
    if args.name:
        MATCHING["PatientName"] = args.name
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = ingest.Processes()
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-association-"))
    pg = query.PostgresAdmin(args.pg_admin_url) if args.db == "postgres" else None
    receivers: list[tuple[str, ingest.Receiver]] = []
    try:
        files, _ = query.build_corpus(work / "corpus")
        orthanc = query.OrthancFind(ingest.Config("orthanc", 1), Path(tempfile.mkdtemp(dir=work)), processes)
        receivers.append(("Orthanc", orthanc))
        orthanc.start()
        query.store(files, orthanc, processes)
        pacs = query.new_pacs(args.db, work, processes, pg)
        receivers.append((f"pacsportal ({'PostgreSQL' if pg else 'SQLite'})", pacs))
        pacs.start()
        query.store(files, pacs, processes)
        print(f"Command: .venv/bin/python bench/association.py --db {args.db} --repeats {args.repeats}"
              + (f" --name '{args.name}'" if args.name else ""))
        print(f"{len(files)} files stored in each; {args.repeats} interleaved runs per row after one warm-up round\n")
        header = "| client | server | wall ms (median / p90) | vs Orthanc | client CPU ms | server CPU ms | " + " | ".join(STEPS) + " | connection |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for tool in ("echoscu", "findscu"):
            results = measure(receivers, tool, args.repeats, work)
            reference = results["Orthanc"]["wall"]
            for label, _ in receivers:
                r = results[label]
                wire = r.get("wire", {})
                cells = [f"{wire[name]:.2f}" if name in wire else "n/a" for name in [*STEPS, "connection"]]
                print(
                    f"| {tool} | {label} | {r['wall']:.1f} / {r['p90']:.1f} | {r['wall'] / reference:.2f}x | {r['cpu']:.1f} | "
                    + (f"{r['server_cpu']:.2f} | " if r["server_cpu"] is not None else "n/a | ")
                    + " | ".join(cells) + " |",
                    flush=True,
                )
        print("\nwire steps: median ms from the last packet of one side to the first of the other (tcpdump on lo)")
        return 0
    except (KeyboardInterrupt, ingest.Terminated):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for _, receiver in receivers:
            query.drop(receiver)
        ingest.clean_up(processes, pg, work)


if __name__ == "__main__":
    sys.exit(main())
