"""``python manage.py importdicom PATH...``: import files and folders through the ingest service."""

from __future__ import annotations

import getpass
from collections import Counter
from pathlib import Path
from typing import Iterator

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

import audit
from archive.ingest import Outcome, Source, announce_series, ingest_file


def walk(paths: list[str]) -> Iterator[Path]:
    """Yield every file under the given files and folders (recursively, sorted, no symlink loops)."""
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            yield path
        elif path.is_dir():
            for sub in sorted(path.rglob("*")):
                if sub.is_file() and not sub.name.startswith("."):
                    yield sub


class Command(BaseCommand):
    help = "Import DICOM files and folders (recursive) into the archive, with progress and a summary."

    def add_arguments(self, parser) -> None:
        parser.add_argument("paths", nargs="+", help="files or folders")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args, **options) -> None:
        missing = [p for p in options["paths"] if not Path(p).exists()]
        if missing:
            raise CommandError(f"no such file or folder: {', '.join(missing)}")
        files = list(walk(options["paths"]))
        counts: Counter[str] = Counter()
        problems: list[tuple[Path, str, str]] = []
        bar = tqdm(files, unit="file", disable=options["no_progress"] or not files, file=self.stderr._out)
        series_ids: set[int] = set()
        for path in bar:
            result = ingest_file(path, Source(channel="import", path=str(path)))
            counts[result.outcome.value] += 1
            if result.series_id is not None:
                series_ids.add(result.series_id)
            if result.outcome is Outcome.REJECTED and result.reason.startswith("not a DICOM"):
                counts["skipped"] += 1
                counts[result.outcome.value] -= 1
                problems.append((path, "skipped", result.reason))
            elif not result.ok:
                problems.append((path, result.outcome.value, result.reason))
        bar.close()
        announce_series(self, series_ids)
        audit.record(
            "store",
            channel="system",
            actor=f"importdicom ({getpass.getuser()})",
            details={"files": len(files), **{k: v for k, v in counts.items() if v}},
        )
        for path, what, reason in problems:
            self.stdout.write(f"{what}: {path}: {reason}")
        stored, duplicates = counts[Outcome.STORED.value], counts[Outcome.DUPLICATE.value]
        failed = len(files) - stored - duplicates - counts["skipped"]
        self.stdout.write(
            f"{len(files)} files: {stored} stored, {duplicates} duplicates, "
            f"{failed} rejected or failed, {counts['skipped']} skipped (not DICOM)"
        )
        if failed:
            raise CommandError(f"{failed} files could not be stored (see above)", returncode=1)
