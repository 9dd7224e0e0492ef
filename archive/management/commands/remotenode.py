"""``python manage.py remotenode add NAME AE_TITLE HOST PORT`` / ``list`` / ``remove NAME`` /
``echo NAME``: the remote DICOM nodes, for scripted set-ups (admin edits the same rows)."""

from __future__ import annotations

import argparse

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError, transaction

from archive.dimse import echo
from archive.models import RemoteNode


def _port(value: str) -> int:
    """argparse type for a TCP port: an integer (the model checks its range).

    Raises argparse.ArgumentTypeError (a CommandError through call_command)."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the port must be a number, not {value!r}") from None


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Format rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


class Command(BaseCommand):
    help = "Add, list, remove and verify (C-ECHO) the remote DICOM nodes."

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{add,list,remove,echo}", required=True)

        add = actions.add_parser("add", help="add a node")
        add.add_argument("name", metavar="NAME", help="a human label, unique")
        add.add_argument("ae_title", metavar="AE_TITLE", help="its AE title, unique")
        add.add_argument("host", metavar="HOST", help="host name or IP address")
        add.add_argument("port", metavar="PORT", type=_port, help="TCP port (1-65535)")
        add.add_argument("--no-store", action="store_true", help="it may not send us instances (C-STORE)")
        add.add_argument("--no-query", action="store_true", help="it may not query (C-FIND)")
        add.add_argument(
            "--no-retrieve", action="store_true", help="it may not retrieve (C-MOVE, C-GET) nor be a C-MOVE destination"
        )
        add.add_argument("--description", metavar="TEXT", default="", help="free text")

        actions.add_parser("list", help="list the nodes")

        remove = actions.add_parser("remove", help="remove a node")
        remove.add_argument("name", metavar="NAME")

        check = actions.add_parser("echo", help="send a C-ECHO to a node; exit status 1 if it fails")
        check.add_argument("name", metavar="NAME")
        check.add_argument("--timeout", metavar="SECONDS", type=float, default=10.0, help="seconds (default 10)")

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "add":
            self.add(options)
        elif action == "list":
            self.list()
        elif action == "remove":
            self.remove(options["name"])
        elif action == "echo":
            self.echo(options["name"], options["timeout"])

    def add(self, options: dict) -> None:
        node = RemoteNode(
            name=options["name"].strip(),
            ae_title=options["ae_title"],
            host=options["host"],
            port=options["port"],
            may_store=not options["no_store"],
            may_query=not options["no_query"],
            may_retrieve=not options["no_retrieve"],
            description=options["description"],
        )
        try:
            node.full_clean()
            with transaction.atomic():
                node.save()
        except ValidationError as exc:
            problems = " ".join(
                " ".join(errors) if field == "__all__" else f"{RemoteNode._meta.get_field(field).verbose_name}: {' '.join(errors)}"
                for field, errors in exc.message_dict.items()
            )
            raise CommandError(f"remote node not added. {problems}") from None
        except IntegrityError:  # added by someone else since full_clean()
            raise CommandError("remote node not added: its name or AE title is already taken") from None
        self.stdout.write(f"added {node} may {','.join(node.rights) or 'nothing'}")

    def list(self) -> None:
        nodes = list(RemoteNode.objects.all())
        if not nodes:
            self.stdout.write("no remote nodes")
            return
        rows = [("NAME", "AE TITLE", "ADDRESS", "MAY")]
        rows += [(n.name, n.ae_title, f"{n.host}:{n.port}", ",".join(n.rights) or "-") for n in nodes]
        for line in _table(rows):
            self.stdout.write(line)

    def remove(self, name: str) -> None:
        deleted, _ = RemoteNode.objects.filter(name=name).delete()
        if not deleted:
            raise CommandError(f"no remote node named {name!r}")
        self.stdout.write(f"removed {name}")

    def echo(self, name: str, timeout: float) -> None:
        node = RemoteNode.objects.filter(name=name).first()
        if node is None:
            raise CommandError(f"no remote node named {name!r}")
        ok, text = echo.verify(node.ae_title, node.host, node.port, settings.PACS_AE_TITLE, timeout=timeout)
        if not ok:
            raise CommandError(f"{node}: {text}", returncode=1)
        self.stdout.write(f"{node}: {text}")
