"""pacsportal settings: every value comes from an environment variable (see README)."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from pacsportal.env import envbool, envchoice, envint, envlist, envstr, persistent_secret

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(envstr("PACS_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = envstr("DJANGO_SECRET_KEY") or persistent_secret(VAR_DIR / "secret_key")
DEBUG = envbool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = envlist("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = envlist("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "axes",
    "corsheaders",
    "archive",
    "viewer",
    "worklist",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Every page requires a signed-in user unless its view says otherwise (login, admin login).
    "pacsportal.middleware.PortalLoginRequired",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "pacsportal.middleware.IdleTimeout",
    # Last, as django-axes asks: it turns a locked-out sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "pacsportal.urls"
WSGI_APPLICATION = "pacsportal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite under var/ by default, tuned so that the SCP, the worker and the web
# server can write at once (WAL, a busy timeout, IMMEDIATE transactions so that a
# writer never has to upgrade a read lock). PostgreSQL through DATABASE_URL.
SQLITE_PATH = VAR_DIR / "pacs.sqlite3"
_database_url = envstr("DATABASE_URL")
if _database_url:
    try:
        _db = dj_database_url.parse(_database_url, conn_max_age=envint("DATABASE_CONN_MAX_AGE", 60))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from exc
    if _db["ENGINE"] == "django.db.backends.postgresql" and envbool("PACS_DB_POOL", False):
        # A connection pool in this process (runscp turns it on for itself): every DICOM
        # association is a new thread, and a new connection costs about 5 ms.
        _db["CONN_MAX_AGE"] = 0
        # At least one connection per association the process may serve, and a few more.
        _pool_size = envint("PACS_MAX_ASSOCIATIONS", 32, minimum=1) + 4
        # Two open from the start (runscp opens the pool before it listens): a modality or a
        # workstation often opens a second association while the first is busy.
        _db.setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": _pool_size, "timeout": 30}
    if _db["ENGINE"] == "django.db.backends.postgresql" and envbool("PACS_DB_PREPARED_STATEMENTS", True):
        # Django turns psycopg's prepared statements off (for poolers such as PgBouncer
        # in transaction mode before 1.21). Its own queries bind on the client and are
        # never prepared either way; this only lets the ingest hot path's one statement
        # (archive.ingest) and the kept query shapes (archive.compiled), both bound by
        # the server, be prepared once per connection instead of parsed and planned on
        # every instance and every query.
        _db.setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5)
else:
    _db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(SQLITE_PATH)}
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db.setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;PRAGMA foreign_keys=ON;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
    )
    if envbool("PACS_DB_POOL", False):
        # runscp: connections kept for the next association's thread (pacsportal.sqlite3).
        _db["ENGINE"] = "pacsportal.sqlite3"
    # Tests run threads (the SCP) beside the test: they need a file, not :memory:.
    _db["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("TZ", "UTC") or "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

SESSION_COOKIE_HTTPONLY = True
# Served over HTTPS (directly or behind a proxy that sets X-Forwarded-Proto): secure cookies,
# HSTS, redirects to HTTPS. DJANGO_SECURE_COOKIES is the older name of the same switch.
PACS_HTTPS = envbool("PACS_HTTPS", envbool("DJANGO_SECURE_COOKIES", False))
SESSION_COOKIE_SECURE = PACS_HTTPS
CSRF_COOKIE_SECURE = PACS_HTTPS
if PACS_HTTPS:
    SECURE_SSL_REDIRECT = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = envint("PACS_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = envbool("PACS_HSTS_PRELOAD", True)  # allows (does not make) a preload-list entry
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Sessions end after this many minutes without a request (pacsportal.middleware.IdleTimeout).
PACS_SESSION_IDLE_MINUTES = envint("PACS_SESSION_IDLE_MINUTES", 30, minimum=1)
SESSION_COOKIE_AGE = PACS_SESSION_IDLE_MINUTES * 60

# Failed sign-ins (django-axes): after PACS_LOGIN_FAILURE_LIMIT failures for one user name
# from one address, that pair is locked out for PACS_LOGIN_LOCKOUT_MINUTES.
AXES_FAILURE_LIMIT = envint("PACS_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = envint("PACS_LOGIN_LOCKOUT_MINUTES", 15, minimum=1) / 60  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "archive.api.pagination.Pagination",
    "PAGE_SIZE": 100,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend", "rest_framework.filters.OrderingFilter"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "pacsportal REST API",
    "DESCRIPTION": "Patients, studies, series and instances of the archive for the RIS and integrators; "
    "study status; access labels; DICOM nodes; sends to nodes. Authenticate with `Authorization: Token <key>` "
    "(`manage.py drf_create_token USER`) or the portal's session. See docs/api.md.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# django-q2: the database is the broker unless REDIS_URL is set.
REDIS_URL = envstr("REDIS_URL")
Q_CLUSTER: dict = {
    "name": "pacsportal",
    "workers": envint("PACS_TASK_WORKERS", 2, minimum=1),
    "timeout": 600,
    "retry": 900,
    "max_attempts": 3,
    "catch_up": False,
    "sync": envbool("PACS_TASKS_SYNC", False),
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# The archive.
PACS_STORAGE_DIR = Path(envstr("PACS_STORAGE_DIR", str(VAR_DIR / "storage"))).resolve()
# CORS for DICOMweb and the API (a viewer such as OHIF served from another origin):
# comma-separated origins, e.g. https://ohif.example.org; empty: same origin only.
CORS_ALLOWED_ORIGINS = envlist("PACS_CORS_ALLOWED_ORIGINS", "")
CORS_URLS_REGEX = r"^/(dicom-web/|api/|wado).*$"
CORS_ALLOW_CREDENTIALS = True
CORS_EXPOSE_HEADERS = ["Content-Type", "Content-Length", "Content-Encoding", "ETag", "Warning"]
# The largest STOW-RS request body accepted (bytes); larger ones get 413.
PACS_STOW_MAX_BYTES = envint("PACS_STOW_MAX_BYTES", 512 * 1024 * 1024, minimum=1024)
# Rendered PNGs (previews, thumbnails, packed frames for the viewer); safe to delete at any time.
PACS_RENDER_CACHE_DIR = Path(envstr("PACS_RENDER_CACHE_DIR", str(VAR_DIR / "cache" / "render"))).resolve()
PACS_AE_TITLE = envstr("PACS_AE_TITLE", "PACSPORTAL")
PACS_BIND_ADDRESS = envstr("PACS_BIND_ADDRESS", "0.0.0.0")
PACS_DICOM_PORT = envint("PACS_DICOM_PORT", 11112, minimum=0)
PACS_HTTP_PORT = envint("PACS_HTTP_PORT", 8000, minimum=0)
# Calling AE titles allowed to associate; empty: any.
PACS_ALLOWED_CALLING_AETS = envlist("PACS_ALLOWED_CALLING_AETS", "")
PACS_MAX_ASSOCIATIONS = envint("PACS_MAX_ASSOCIATIONS", 32, minimum=1)
# SCP processes sharing the DICOM port (SO_REUSEPORT): one per core, so that parallel
# associations are not held to one core by Python's GIL.
PACS_SCP_WORKERS = envint("PACS_SCP_WORKERS", min(os.cpu_count() or 1, 8), minimum=1)
# What a second copy of a stored SOP Instance UID does: keep the first, or replace it.
PACS_DUPLICATE_POLICY = envchoice("PACS_DUPLICATE_POLICY", "keep", {"keep", "overwrite"})
# Flush every stored file (and its directory entry) to disk before the sender is told it is
# stored. Off trades durability after a power cut for speed, like Orthanc's SyncStorageArea.
PACS_SYNC_STORAGE = envbool("PACS_SYNC_STORAGE", True)
# Person-name matching in queries: "insensitive" (case and accents, the default) or "exact".
# Users also see the studies they are the referring physician of (their Last^First name).
PACS_REFERRING_PHYSICIAN_SCOPE = envbool("PACS_REFERRING_PHYSICIAN_SCOPE", False)
PACS_QUERY_NAME_MATCHING = envchoice("PACS_QUERY_NAME_MATCHING", "insensitive", {"insensitive", "exact"})
# Only DICOM nodes (RemoteNode, with the right) may C-FIND, C-MOVE and C-GET.
PACS_QR_KNOWN_NODES_ONLY = envbool("PACS_QR_KNOWN_NODES_ONLY", False)
# The most answers one C-FIND returns (a warning is logged when a query is cut).
PACS_FIND_LIMIT = envint("PACS_FIND_LIMIT", 1000, minimum=1)
# Seconds runscp waits for the C-STOREs being stored when asked to stop.
PACS_SCP_STOP_TIMEOUT = envint("PACS_SCP_STOP_TIMEOUT", 10, minimum=0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "archive": {"level": envstr("PACS_LOG_LEVEL", "INFO").upper(), "propagate": True},
        "pynetdicom": {"level": "WARNING", "propagate": True},
        "django-q": {"level": "INFO", "propagate": True},
    },
}
