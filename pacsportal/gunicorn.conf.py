"""gunicorn settings for `make run` (web process of the Procfile)."""

import os

bind = f"{os.environ.get('PACS_BIND_ADDRESS', '0.0.0.0')}:{os.environ.get('PACS_HTTP_PORT', '8000')}"
workers = int(os.environ.get("PACS_WEB_WORKERS", "2"))
threads = int(os.environ.get("PACS_WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 120
graceful_timeout = 20
accesslog = "-"
# Query strings may carry patient names: log the path only.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
