"""WSGI entry point (gunicorn pacsportal.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacsportal.settings")
application = get_wsgi_application()
