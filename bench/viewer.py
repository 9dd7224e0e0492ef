#!/usr/bin/env python3
"""Web portal benchmark: the study list on a big archive, rendering against Orthanc, and the
viewer in a real browser.

For each database (SQLite, PostgreSQL or both) it starts pacsportal as ``make run`` does
(gunicorn with the project's configuration, WhiteNoise, collected static files) on a fresh
var dir, fills the database with 10,000 studies (``bench/query.py``'s generated archive:
patients, studies and series, no instances), imports one 200-slice 512x512 CT series with
``importdicom`` and stores the same files into Orthanc (``/usr/sbin/Orthanc``). Then:

* **Study list**: server time of ``/`` for typical searches (HTTP round trip on localhost
  with a signed-in session, median and 95th percentile of ``--repeats``), target 150 ms.
* **Render**: one uncached 512x512 CT frame as an 8-bit PNG (``preview``), HTTP round trip
  included, each request a slice never rendered before, against Orthanc's
  ``/instances/{id}/preview`` of the same slices in the same run; then the cached PNG
  (target 5 ms) and the lossless ``packed`` rendition.
* **Viewer** (Playwright driving Debian's chromium, after the pre-render task filled the
  cache): the first slice painted after navigation starts (``performance.now()`` in the page,
  a fresh browser context each time, target 500 ms); a WL/WW change repainting a 512x512
  slice (the JavaScript work, 100 changes, target 16 ms); scrolling the prefetched series one
  slice per animation frame (frames per second, and a check that every slice was painted).

Prints tables and writes them as markdown to ``bench/results/viewer-<timestamp>.md``.

Usage::

    .venv/bin/python bench/viewer.py [--db sqlite|postgres|both] [--studies N] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import http.cookiejar
import json
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - processes, Orthanc, PostgreSQL, the CT series
import query  # noqa: E402 - the generated archive

from ingest import HOST, ORTHANC_BINARY, BenchError, Config, Processes  # noqa: E402

ROOT = ingest.ROOT
CHROMIUM = "/usr/bin/chromium"
SLICES = 200
REPEATS = 20
RENDER_SAMPLES = 40
TARGETS = {"list": 150.0, "first_paint": 500.0, "window": 16.0, "cached": 5.0}


@dataclass
class Stats:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class Run:
    db: str
    rows: list[list[str]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- pacsportal over HTTP


class Portal:
    """pacsportal's web server (gunicorn, as ``make run`` starts it) on a fresh var dir."""

    def __init__(self, db: str, work: Path, processes: Processes, pg: query.PostgresAdmin | None) -> None:
        self.processes, self.pg, self.db_name = processes, pg, ""
        self.var_dir = work / f"var-{db}"
        self.var_dir.mkdir()
        self.port = ingest.free_port()
        extra = {"PACS_VAR_DIR": str(self.var_dir), "DJANGO_SECRET_KEY": secrets.token_hex(16), "PACS_HTTP_PORT": str(self.port)}
        if db == "postgres":
            if pg is None:
                raise BenchError("no PostgreSQL administration connection")
            self.db_name = pg.create()
            extra["DATABASE_URL"] = pg.url_for(self.db_name)
        self.env = ingest.clean_env(**extra)
        self.password = secrets.token_urlsafe(16)
        self.log_path = work / f"gunicorn-{db}.log"
        self.proc: subprocess.Popen | None = None

    def manage(self, *args: str, timeout: float = 900.0) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise BenchError(f"manage.py {args[0]} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def prepare(self, studies: int, series_dir: Path) -> None:
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("collectstatic", "--noinput", "-v", "0")
        print(f"  filling {studies:,} studies", file=sys.stderr, flush=True)
        query.run_child(self.env, ["--child", "fill", "--studies", str(studies), "--no-instances"], query.FILL_TIMEOUT)
        self.manage("importdicom", "--no-progress", str(series_dir))
        self.manage(
            "shell", "-c",
            "from django.contrib.auth.models import Group, User; "
            f"User.objects.create_user('bench', password={self.password!r}).groups.add(Group.objects.get(name='Radiologist'))",
        )

    def prerender(self) -> float:
        started = time.perf_counter()
        self.manage(
            "shell", "-c",
            "from archive.models import Series; from archive.tasks import prerender_series; "
            "[prerender_series(s.pk) for s in Series.objects.filter(modality='CT', study__accession_number='BENCH0001')]",
        )
        return time.perf_counter() - started

    def start(self) -> None:
        args = [sys.executable, "-m", "gunicorn", "--config", "pacsportal/gunicorn.conf.py", "pacsportal.wsgi"]
        self.proc = self.processes.start(args, self.env, self.log_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                http.client.HTTPConnection(HOST, self.port, timeout=2).request("GET", "/accounts/login/")
                return
            except OSError:
                time.sleep(0.2)
        raise BenchError(f"gunicorn did not start:\n{ingest.tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            self.processes.stop(self.proc)
        if self.pg is not None and self.db_name:
            self.pg.drop(self.db_name)


class Session:
    """A signed-in HTTP client on one keep-alive connection."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection(HOST, port, timeout=60)
        self.cookies: dict[str, str] = {}
        login = self.get("/accounts/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', login[1]).group(1).decode()
        body = urllib.parse.urlencode({"username": user, "password": password, "csrfmiddlewaretoken": token})
        status, _ = self.request("POST", "/accounts/login/", body, {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 302 or "sessionid" not in self.cookies:
            raise BenchError("cannot sign in to pacsportal")

    def request(self, method: str, path: str, body: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method == "POST":
            headers["Referer"] = f"http://{HOST}:{self.port}/accounts/login/"
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # the server closed an idle keep-alive connection: open a new one and ask again
            self.connection.close()
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=60)
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
        data = response.read()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name.strip()] = rest.split(";")[0]
        return response.status, data

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def timed(self, path: str) -> tuple[float, int, bytes]:
        started = time.perf_counter()
        status, data = self.get(path)
        return (time.perf_counter() - started) * 1000, status, data


# ------------------------------------------------------------------------- Orthanc over HTTP


def orthanc_previews(orthanc: ingest.OrthancReceiver, samples: int) -> tuple[Stats, Stats]:
    """Orthanc's /instances/{id}/preview: first request of each instance, then again."""
    connection = http.client.HTTPConnection(HOST, orthanc.http_port, timeout=60)

    def get(path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise BenchError(f"Orthanc {path}: {response.status}")
        return (time.perf_counter() - started) * 1000, data

    ids = json.loads(get("/instances")[1])[:samples]
    first, again = Stats("Orthanc preview, first request"), Stats("Orthanc preview, again")
    for instance in ids:
        first.samples.append(get(f"/instances/{instance}/preview")[0])
    for instance in ids:
        again.samples.append(get(f"/instances/{instance}/preview")[0])
    return first, again


# ------------------------------------------------------------------------- measurements


def list_queries(studies: int) -> list[tuple[str, str]]:
    plan = query.build_plan(studies)  # the same archive the fill made (a fixed seed)
    accession = plan.studies[len(plan.studies) // 3].accession
    return [
        ("all studies, newest first (page 1)", "/"),
        ("patient name prefix (accent-folded)", "/?name=mul"),
        ("last 30 days", "/?range=30d"),
        ("one month, modality MR, sorted by name", "/?date_from=2024-03-01&date_to=2024-03-31&modality=MR&sort=name"),
        ("description free text", "/?q=chest"),
        ("page 100 of all studies", "/?page=100"),
        ("accession", f"/?accession={urllib.parse.quote(accession)}"),
    ]


def measure_list(session: Session, repeats: int, studies: int) -> list[Stats]:
    results = []
    for label, path in list_queries(studies):
        stats = Stats(label)
        for _ in range(repeats):
            ms, status, data = session.timed(path)
            if status != 200:
                raise BenchError(f"{path}: status {status}")
            stats.samples.append(ms)
        match = re.search(rb"<p class=\"count\">([\d,]+) stud", data)
        stats.name += f" [{match.group(1).decode() if match else '?'} matches]"
        results.append(stats)
    return results


def slice_uids(portal: Portal) -> tuple[str, list[str]]:
    out = portal.manage(
        "shell", "-c",
        "from archive.models import Instance; import json; "
        "rows = Instance.objects.filter(series__study__accession_number='BENCH0001').order_by('instance_number');"
        "print(json.dumps([rows[0].series.study.study_instance_uid] + [r.sop_instance_uid for r in rows]))",
    )
    values = json.loads(out.strip().splitlines()[-1])
    return values[0], values[1:]


def measure_render(session: Session, sops: list[str], samples: int) -> list[Stats]:
    uncached, cached, packed = Stats("pacsportal preview, uncached"), Stats("pacsportal preview, cached"), Stats("pacsportal packed, uncached")
    for sop in sops[:samples]:
        ms, status, _ = session.timed(f"/render/instances/{sop}/frames/1/preview.png")
        if status != 200:
            raise BenchError(f"render: status {status}")
        uncached.samples.append(ms)
    for sop in sops[:samples]:
        cached.samples.append(session.timed(f"/render/instances/{sop}/frames/1/preview.png")[0])
    for sop in sops[samples : 2 * samples]:
        packed.samples.append(session.timed(f"/render/instances/{sop}/frames/1/packed.png")[0])
    return [uncached, cached, packed]


def measure_browser(portal: Portal, study_uid: str, repeats: int) -> tuple[list[Stats], list[str]]:
    from playwright.sync_api import sync_playwright

    base = f"http://{HOST}:{portal.port}"
    first_paint, window, scroll = Stats("first slice painted after navigation start"), Stats("WL/WW change, repaint 512x512"), Stats("scroll")
    checks: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            # sign in once; each measured navigation gets a fresh context with that session only
            context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base)
            page = context.new_page()
            page.goto("/accounts/login/")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", portal.password)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")
            state = context.storage_state()
            context.close()
            for attempt in range(repeats):
                context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base, storage_state=state)
                page = context.new_page()
                page.goto(f"/viewer/{study_uid}/")
                page.wait_for_function("window.pacsViewer && window.pacsViewer.firstPaint !== null", timeout=30000)
                first_paint.samples.append(page.evaluate("window.pacsViewer.firstPaint"))
                if attempt < repeats - 1:
                    context.close()
            page.wait_for_function(f"window.pacsViewer.state.loaded === {SLICES}", timeout=120000)
            window.samples = page.evaluate(
                """() => { const v = window.pacsViewer, out = [];
                    for (let i = 0; i < 100; i++) { const t = performance.now();
                      v.setWindow(40 + i, 400 + 2 * i); out.push(performance.now() - t); }
                    return out; }"""
            )
            result = page.evaluate(
                """() => new Promise((resolve) => { const v = window.pacsViewer, n = v.state.slices.length;
                    const before = v.paints; let i = 0; const seen = new Set(); const t0 = performance.now();
                    const step = () => { v.show(i); seen.add(v.state.index); i++;
                      if (i < n) requestAnimationFrame(step);
                      else requestAnimationFrame(() => resolve({ms: performance.now() - t0, n, paints: v.paints - before, seen: seen.size})); };
                    requestAnimationFrame(step); })"""
            )
            scroll.samples = [result["n"] / (result["ms"] / 1000)]
            checks.append(
                f"scroll: {result['paints']} paints for {result['n']} slices, {result['seen']} distinct slices shown"
            )
            page.screenshot(path=str(portal.var_dir.parent / "viewer.png"))
            context.close()
        finally:
            browser.close()
    return [first_paint, window, scroll], checks


# ------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    return f"{value:.1f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def run_db(db: str, args: argparse.Namespace, work: Path, series: ingest.Series, processes: Processes, pg) -> Run:
    run = Run(db)
    portal = Portal(db, work, processes, pg)
    orthanc = None
    try:
        portal.prepare(args.studies, series.files[0].parent)
        portal.start()
        session = Session(portal.port, "bench", portal.password)
        header = ["measurement", "median ms", "p95 ms", "target / reference"]
        run.rows.append(header)
        for stats in measure_list(session, args.repeats, args.studies):
            run.rows.append([f"study list: {stats.name}", fmt(stats.median), fmt(stats.p95), f"≤ {TARGETS['list']:.0f} ms"])
        study_uid, sops = slice_uids(portal)
        orthanc = ingest.OrthancReceiver(Config("orthanc", 1), work / f"orthanc-{db}", processes)
        orthanc.run_dir.mkdir()
        orthanc.start()
        ingest.send(series.files, 1, orthanc.ae_title, orthanc.port, processes, orthanc.run_dir)
        # alternate so that neither side always runs on a warmer machine
        ours = measure_render(session, sops, RENDER_SAMPLES)
        theirs_first, theirs_again = orthanc_previews(orthanc, RENDER_SAMPLES)
        ratio = ours[0].median / theirs_first.median
        run.rows.append([ours[0].name, fmt(ours[0].median), fmt(ours[0].p95), f"{ratio:.2f}x Orthanc's time (≤ 1.00x)"])
        run.rows.append([theirs_first.name, fmt(theirs_first.median), fmt(theirs_first.p95), "reference"])
        run.rows.append([theirs_again.name, fmt(theirs_again.median), fmt(theirs_again.p95), "reference"])
        run.rows.append([ours[1].name, fmt(ours[1].median), fmt(ours[1].p95), f"≤ {TARGETS['cached']:.0f} ms"])
        run.rows.append([ours[2].name, fmt(ours[2].median), fmt(ours[2].p95), "(pre-rendered in use)"])
        seconds = portal.prerender()
        run.checks.append(f"pre-render task for the {SLICES}-slice series: {seconds:.1f} s")
        browser_stats, checks = measure_browser(portal, study_uid, max(3, args.repeats // 4))
        run.checks.extend(checks)
        first, window, scroll = browser_stats
        run.rows.append([f"viewer: {first.name}", fmt(first.median), fmt(first.p95), f"≤ {TARGETS['first_paint']:.0f} ms"])
        run.rows.append([f"viewer: {window.name}", f"{window.median:.2f}", f"{window.p95:.2f}", f"≤ {TARGETS['window']:.0f} ms"])
        run.rows.append([f"viewer: scroll the prefetched {SLICES} slices, one per frame", f"{scroll.samples[0]:.0f} fps", "", "every slice shown"])
    finally:
        if orthanc is not None:
            orthanc.stop()
        portal.stop()
    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="postgres")
    parser.add_argument("--studies", type=int, default=query.FULL_STUDIES)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for needed in (CHROMIUM, ORTHANC_BINARY, shutil.which("storescu") or "/usr/bin/storescu"):
        if not Path(needed).exists():
            raise SystemExit(f"missing: {needed} (install the chromium, orthanc and dcmtk packages)")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = Processes()
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-viewer-"))
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    pg = query.PostgresAdmin(args.pg_admin_url) if "postgres" in dbs else None
    runs: list[Run] = []
    load_start = ingest.load_average()
    try:
        print(f"building a {SLICES}-slice 512x512 CT series", file=sys.stderr, flush=True)
        series = ingest.build_series(work / "series", SLICES)
        for db in dbs:
            print(f"{db}:", file=sys.stderr, flush=True)
            runs.append(run_db(db, args, work, series, processes, pg))
    finally:
        processes.stop_all()
        if pg is not None:
            pg.drop_all()
        kept = ingest.RESULTS_DIR / "viewer-last.png"
        shots = sorted(work.glob("viewer.png"))
        if shots:
            ingest.RESULTS_DIR.mkdir(exist_ok=True)
            shutil.copy(shots[0], kept)
        shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# Web portal benchmark, {stamp}",
        "",
        f"Command: `.venv/bin/python bench/viewer.py {' '.join(sys.argv[1:])}`; {args.studies:,} studies; "
        f"load average {load_start} at start, {ingest.load_average()} at end.",
    ]
    for run in runs:
        print(f"\n== {run.db} ==")
        print(table(run.rows))
        for check in run.checks:
            print(f"  {check}")
        out += ["", f"## {run.db}", "", markdown(run.rows), ""] + [f"- {c}" for c in run.checks]
    ingest.RESULTS_DIR.mkdir(exist_ok=True)
    path = ingest.RESULTS_DIR / f"viewer-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text("\n".join(out) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, ingest.Terminated) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
