#!/usr/bin/env python
"""Django's command-line utility for pacsportal."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacsportal.settings")
    if sys.argv[1:2] == ["runscp"]:
        # The SCP serves each association in a new thread: on PostgreSQL it keeps a pool of
        # connections rather than opening one per association (see settings).
        os.environ.setdefault("PACS_DB_POOL", "1")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
