"""Run the django-q2 worker (``manage.py qcluster``) so that it stops cleanly under a
process manager.

honcho (``make run``) and systemd send SIGTERM to the whole process group. django-q2's
pool processes then die mid-way and the cluster waits for them forever. This wrapper starts
qcluster in its own session and passes a stop signal to its main process only, which
stops the pool in order. Usage: ``python -m pacsportal.worker``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

MANAGE = Path(__file__).resolve().parent.parent / "manage.py"


def main() -> int:
    child = subprocess.Popen([sys.executable, str(MANAGE), "qcluster"], start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        return child.wait(timeout=None)
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
