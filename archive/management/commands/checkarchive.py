"""``python manage.py checkarchive``: check that files and rows agree (no file without a row,
no row without a file) and, with ``--verify``, that every file still has its SHA-256."""

from __future__ import annotations

import hashlib

from django.core.management.base import BaseCommand, CommandError

from archive import storage
from archive.models import Instance


class Command(BaseCommand):
    help = "Check the archive's consistency between database rows and files."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--verify", action="store_true", help="also re-hash every file")
        parser.add_argument(
            "--remove-orphans", action="store_true", help="delete files that no row refers to"
        )

    def handle(self, *args, **options) -> None:
        root = storage.root()
        known = set()
        missing, corrupt = [], []
        for relative, sha256 in Instance.objects.values_list("file_path", "file_sha256").iterator(chunk_size=2000):
            known.add(relative)
            path = root / relative
            if not path.is_file():
                missing.append(relative)
            elif options["verify"]:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    while chunk := handle.read(storage.CHUNK):
                        digest.update(chunk)
                if digest.hexdigest() != sha256:
                    corrupt.append(relative)
        orphans = []
        if root.is_dir():
            for path in root.rglob("*.dcm"):
                relative = path.relative_to(root).as_posix()
                if relative.startswith(storage.INCOMING):
                    continue
                if relative not in known:
                    orphans.append(path)
        for relative in missing:
            self.stdout.write(f"row without file: {relative}")
        for relative in corrupt:
            self.stdout.write(f"checksum mismatch: {relative}")
        for path in orphans:
            self.stdout.write(f"file without row: {path.relative_to(root)}")
            if options["remove_orphans"]:
                path.unlink(missing_ok=True)
        self.stdout.write(
            f"{len(known)} instances: {len(missing)} rows without file, {len(orphans)} files without row"
            + (f", {len(corrupt)} checksum mismatches" if options["verify"] else "")
        )
        if missing or corrupt or (orphans and not options["remove_orphans"]):
            raise CommandError("the archive is not consistent", returncode=1)
