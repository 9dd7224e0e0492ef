"""gunicorn settings for `make run` (web process of the Procfile)."""

import os
from pathlib import Path

_var = Path(os.environ.get("PACS_VAR_DIR", Path(__file__).resolve().parent.parent / "var"))
_var.mkdir(parents=True, exist_ok=True)

bind = f"{os.environ.get('PACS_BIND_ADDRESS', '0.0.0.0')}:{os.environ.get('PACS_HTTP_PORT', '8000')}"
workers = int(os.environ.get("PACS_WEB_WORKERS", "2"))
threads = int(os.environ.get("PACS_WEB_THREADS", "4"))
worker_class = "gthread"
# Import the application once, before forking: workers answer their first request without
# first importing Django, DRF, pydicom and the rest (about a second each).
preload_app = True
timeout = 120
graceful_timeout = 20
accesslog = "-"
# Query strings may carry patient names: log the path only.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
# gunicorn's control socket lives with the rest of the instance's state, not in $HOME.
control_socket = str(_var / "gunicorn.ctl")
