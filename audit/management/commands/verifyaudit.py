"""``manage.py verifyaudit``: walk the audit log's hash chain and report the first break."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from audit.services import verify_chain


class Command(BaseCommand):
    help = "Verify the audit log's hash chain; exit with status 1 and name the first broken event."

    def handle(self, *args, **options) -> None:
        checked, problem = verify_chain()
        if problem:
            raise CommandError(f"audit chain broken after {checked} good events: {problem}", returncode=1)
        self.stdout.write(f"audit chain intact: {checked} events verified")
