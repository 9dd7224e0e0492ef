#!/usr/bin/env python3
"""Audit benchmark: what ``audit.record`` costs on the request path (target: 2 ms or less).

For each database (a fresh SQLite file, a fresh PostgreSQL database) it migrates, then times
``audit.record`` (a study-view event with a patient, a study, an address and details) one
call at a time, after 0 and after 20,000 events already in the chain, and, as the reference
measured in the same run, a plain ORM insert of the same row without the chain (no lock, no
read of the previous hash). Prints median and 95th percentile per call in milliseconds.

Usage::

    .venv/bin/python bench/audit.py [--db sqlite|postgres|both] [--calls N]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - PostgreSQL helpers, environment

ROOT = ingest.ROOT
TARGET_MS = 2.0


def child(calls: int) -> dict:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacsportal.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.utils import timezone

    import audit
    from audit.models import AuditEvent

    call_command("migrate", verbosity=0)
    details = {"page": "viewer", "series": "1.2.826.0.1.3680043.8.498.1"}

    def timed(function, n: int) -> list[float]:
        out = []
        for i in range(n):
            started = time.perf_counter()
            function(i)
            out.append((time.perf_counter() - started) * 1000)
        return out

    def chained(i: int) -> None:
        audit.record("study-view", channel="web", actor="alice", source_address="10.0.0.5", patient_id=f"P{i}",
                     study_instance_uid=f"1.2.3.{i}", details=details)

    def plain(i: int) -> None:
        AuditEvent(time=timezone.now(), actor="alice", action="study-view", channel="web", patient_id=f"P{i}",
                   study_instance_uid=f"1.2.3.{i}", source_address="10.0.0.5", details=details,
                   previous_hash="", hash=secrets.token_hex(32)).save(force_insert=True)

    results = {"empty": timed(chained, calls)}
    for _ in range(20_000 // calls):
        timed(chained, calls)
    results["after 20,000 events"] = timed(chained, calls)
    results["plain insert (reference)"] = timed(plain, calls)
    return {name: [statistics.median(v), sorted(v)[int(0.95 * (len(v) - 1))]] for name, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.calls)))
        return 0
    rows = [["database", "measurement", "median ms", "p95 ms", "target"]]
    pg = None
    for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
        with tempfile.TemporaryDirectory(prefix="pacs-bench-audit-") as var:
            env = ingest.clean_env(PACS_VAR_DIR=var, DJANGO_SECRET_KEY="bench")
            name = ""
            if db == "postgres":
                pg = pg or ingest.PostgresAdmin(args.pg_admin_url)
                name = pg.create()
                env["DATABASE_URL"] = pg.url_for(name)
            try:
                done = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)], env=env, cwd=ROOT,
                                      capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                result = json.loads(done.stdout.strip().splitlines()[-1])
            finally:
                if name:
                    pg.drop(name)
        for measurement, (median, p95) in result.items():
            target = "reference" if "reference" in measurement else f"≤ {TARGET_MS:.0f} ms"
            rows.append([db, f"audit.record, {measurement}" if "reference" not in measurement else measurement,
                         f"{median:.2f}", f"{p95:.2f}", target])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
