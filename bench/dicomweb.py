#!/usr/bin/env python3
"""DICOMweb benchmark: pacsportal next to Orthanc's DICOMweb plugin, same data, same run.

pacsportal runs as ``make run`` starts it (gunicorn) on a fresh PostgreSQL database (or
SQLite) holding 10,000 generated studies (``bench/query.py``'s archive: patients, studies,
series) and one 200-slice 512x512 CT series imported with ``importdicom``; Orthanc (Debian's
``orthanc`` with ``orthanc-dicomweb``) gets the same 200 files by C-STORE. Timed over HTTP on
localhost with HTTP Basic credentials on both sides:

* series metadata (200 instances): the first call for the series (after a few unrelated
  requests that warm the servers up), then warm (median);
* QIDO-RS ``/studies?PatientID=``, and on pacsportal ``/studies?PatientName=mul*`` over the
  10,000 studies;
* an instance ``/rendered`` as JPEG;
* the whole series retrieved as stored (``transfer-syntax=*``): MB/s.

Prints a table with ratios to Orthanc; targets: metadata 50 ms or less even on the first
call, the name search 50 ms or less, retrieval 200 MB/s or more.

Usage::

    .venv/bin/python bench/dicomweb.py [--db postgres|sqlite] [--studies N] [--repeats N]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402
import query  # noqa: E402
import viewer as portal_bench  # noqa: E402 - the gunicorn-started pacsportal of bench/viewer.py

from ingest import HOST, ORTHANC_BINARY, Config, Processes  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancDicomWeb(ingest.OrthancReceiver):
    extra_config = {
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"bench": "bench-password"},
    }


class Http:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.port = port
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.connection = http.client.HTTPConnection(HOST, port, timeout=120)

    def get(self, path: str, accept: str = "application/dicom+json") -> tuple[float, int, bytes]:
        headers = {"Authorization": self.auth, "Accept": accept}
        started = time.perf_counter()
        try:
            self.connection.request("GET", path, headers=headers)
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.connection.close()
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=120)
            started = time.perf_counter()
            self.connection.request("GET", path, headers=headers)
            response = self.connection.getresponse()
        body = response.read()
        return (time.perf_counter() - started) * 1000, response.status, body


def timed(client: Http, path: str, repeats: int, accept: str = "application/dicom+json") -> list[float]:
    out = []
    for _ in range(repeats):
        ms, status, _ = client.get(path, accept)
        if status != 200:
            raise ingest.BenchError(f"{path}: HTTP {status}")
        out.append(ms)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--studies", type=int, default=query.FULL_STUDIES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    args = parser.parse_args()
    for needed in (ORTHANC_BINARY, PLUGIN):
        if not Path(needed).exists():
            raise SystemExit(f"missing {needed} (apt-get install orthanc orthanc-dicomweb)")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = Processes()
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-dicomweb-"))
    pg = query.PostgresAdmin(args.pg_admin_url) if args.db == "postgres" else None
    rows = [["measurement", "pacsportal ms", "Orthanc ms", "ratio", "target"]]
    try:
        series = ingest.build_series(work / "series", portal_bench.SLICES)
        portal = portal_bench.Portal(args.db, work, processes, pg)
        portal.prepare(args.studies, series.files[0].parent)
        study_uid, sops = portal_bench.slice_uids(portal)
        series_uid = portal.manage(
            "shell", "-c",
            f"from archive.models import Series; print(Series.objects.get(study__study_instance_uid='{study_uid}').series_instance_uid)",
        ).strip().splitlines()[-1]
        orthanc = OrthancDicomWeb(Config("orthanc", 1), work / "orthanc", processes)
        orthanc.run_dir.mkdir()
        orthanc.start()
        ingest.send(series.files, 1, orthanc.ae_title, orthanc.port, processes, orthanc.run_dir)
        portal.start()
        ours = Http(portal.port, "bench", portal.password)
        theirs = Http(orthanc.http_port, "bench", "bench-password")
        metadata = f"/dicom-web/studies/{study_uid}/series/{series_uid}/metadata"
        for _ in range(6):  # the servers' own warm-up (workers, connections), not this series'
            ours.get("/dicom-web/studies?limit=1")
            theirs.get("/dicom-web/studies?limit=1")
        first_ours = ours.get(metadata)[0]
        first_theirs = theirs.get(metadata)[0]
        rows.append(["series metadata (200 instances), first call", f"{first_ours:.1f}", f"{first_theirs:.1f}",
                     f"{first_ours / first_theirs:.2f}x", "≤ 50 ms"])
        warm_ours, warm_theirs = timed(ours, metadata, args.repeats), timed(theirs, metadata, args.repeats)
        rows.append(["series metadata, warm (median)", f"{statistics.median(warm_ours):.1f}", f"{statistics.median(warm_theirs):.1f}",
                     f"{statistics.median(warm_ours) / statistics.median(warm_theirs):.2f}x", "≤ 50 ms"])
        by_id = "/dicom-web/studies?PatientID=BENCH-INGEST"
        a, b = statistics.median(timed(ours, by_id, args.repeats)), statistics.median(timed(theirs, by_id, args.repeats))
        rows.append([f"QIDO /studies?PatientID= (pacsportal: {args.studies:,} studies; Orthanc: 1)", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", ""])
        by_name = "/dicom-web/studies?PatientName=mul*&limit=100"
        a = statistics.median(timed(ours, by_name, args.repeats))
        rows.append([f"QIDO /studies?PatientName=mul* over {args.studies:,} studies", f"{a:.1f}", "", "", "≤ 50 ms"])
        rendered = f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sops[100]}/rendered"
        a = statistics.median(timed(ours, rendered, args.repeats, "image/jpeg"))
        b = statistics.median(timed(theirs, rendered, args.repeats, "image/jpeg"))
        rows.append(["instance rendered as JPEG (512x512 CT)", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x", ""])
        retrieve = f"/dicom-web/studies/{study_uid}/series/{series_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        speeds = {}
        for name, client in (("ours", ours), ("theirs", theirs)):
            best = None
            for _ in range(3):
                ms, status, body = client.get(retrieve, accept)
                if status != 200:
                    raise ingest.BenchError(f"{name} series retrieve: HTTP {status}")
                rate = len(body) / 1e6 / (ms / 1000)
                best = max(best or 0, rate)
            speeds[name] = (best, len(body))
        rows.append([f"series retrieve as stored, {speeds['ours'][1] / 1e6:.0f} MB (MB/s, best of 3)", f"{speeds['ours'][0]:.0f}",
                     f"{speeds['theirs'][0]:.0f}", f"{speeds['ours'][0] / speeds['theirs'][0]:.2f}x", "≥ 200 MB/s"])
        rows[0] = ["measurement", "pacsportal", "Orthanc", "pacsportal / Orthanc", "target"]
    finally:
        processes.stop_all()
        if pg is not None:
            pg.drop_all()
        shutil.rmtree(work, ignore_errors=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"DICOMweb benchmark, {args.db}, times in ms unless stated")
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ingest.BenchError, ingest.Terminated) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
