"""Settings shared by every environment, read from the environment with django-environ."""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

SECRET_KEY = env("SECRET_KEY", default="eventflow-insecure-local-key")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "django_celery_beat",
    "events_app",
    "workflows_app",
    "webhooks_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

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


def database(default: str | None = None) -> dict:
    """The database of DATABASE_URL (PostgreSQL), its connections kept across requests."""
    return _tuned(env.db("DATABASE_URL", default=default) if default else env.db("DATABASE_URL"))


def database_or_embedded() -> dict:
    """DATABASE_URL's database, or without it the quickstart's PostgreSQL embedded under var/pgdata
    (`config.embedded_postgres`), started by the first process that needs it."""
    if env("DATABASE_URL", default=""):
        return database()
    from config.embedded_postgres import database as embedded

    return _tuned(embedded(VAR_DIR / "pgdata"))


def _tuned(db: dict) -> dict:
    """A new PostgreSQL connection per request costs more than a whole API request (a backend process
    forked and authenticated): connections are kept, and health checks replace one the server closed.

    Parameters bound on the server let psycopg prepare what a process keeps repeating (a trigger's
    inserts, Celery's result store): PostgreSQL plans those statements once per connection instead
    of every time, and planning costs more than running them. Turn it off behind a pooler that
    cannot keep prepared statements (PgBouncer before 1.21 in transaction mode).
    """
    db["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    db["CONN_HEALTH_CHECKS"] = True
    prepared = env.bool("EVENTFLOW_PREPARED_STATEMENTS", default=True)
    options = db.setdefault("OPTIONS", {})
    options.update({"server_side_binding": True, "prepare_threshold": 5 if prepared else None})
    # A database that vanishes without closing the connection (a partition, a firewall dropping the
    # flow) holds a query for as long as the kernel retransmits, about 15 minutes. With keepalives and
    # a TCP user timeout (libpq's parameters) the connection fails after DATABASE_TCP_TIMEOUT seconds
    # instead, and a worker's retry (`with_database_retry`) opens a new one once the database answers.
    # A long query is not cut: while it runs, nothing the client sent is unacknowledged.
    if tcp := env.int("DATABASE_TCP_TIMEOUT", default=30):
        options.update(
            connect_timeout=max(2, tcp // 3),
            keepalives=1,
            keepalives_idle=max(1, tcp // 3),
            keepalives_interval=max(1, tcp // 6),
            keepalives_count=3,
            tcp_user_timeout=tcp * 1000,
        )
    return db


DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env("STATIC_ROOT", default=str(VAR_DIR / "static"))

LOGIN_URL = "admin:login"

# Request bodies above this size are refused with 413 before they are parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=1024 * 1024)

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes anonymous calls a 401 rather than a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "workflows_app.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["workflows_app.api.parsers.SafeJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "workflows_app.api.errors.exception_handler",
    "DEFAULT_THROTTLE_RATES": {"trigger": env("EVENTFLOW_TRIGGER_RATE", default="6000/minute")},
}

# The trigger rate limit counts requests in this cache (workflows_app/api/throttling.py). Point it at
# a cache every process shares, e.g. CACHE_URL=redis://127.0.0.1:6379/1, for the limit to hold
# across gunicorn workers and hosts; the default counts in each process's memory.
CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}

SPECTACULAR_SETTINGS = {
    "TITLE": "Eventflow API",
    "DESCRIPTION": "Trigger workflows of Celery tasks and watch their runs.",
    "VERSION": "1.0.0",
    # The schema documents the API, not the schema and docs endpoints themselves.
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs page loads Swagger UI and ReDoc from this app's static files, not from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Keeps a token entered in the docs page across reloads.
    "SWAGGER_UI_SETTINGS": {"persistAuthorization": True},
    # Read-only fields (e.g. a definition's version) stay out of the request shapes.
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "workflows_app.api.schema.forbid_unknown_request_fields",
    ],
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "workflows_app.models.WorkflowRun.Status",
        "TaskRunStatusEnum": "workflows_app.models.TaskRun.Status",
        "EventStatusEnum": "events_app.models.Event.Status",
    },
}

# Celery: JSON only, late acks so a task whose worker dies is redelivered rather than lost,
# one message prefetched at a time so a busy worker does not sit on tasks another could run.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://localhost//")


def broker_transport_options(url: str) -> dict:
    """kombu's options for the broker at `url`."""
    if url.startswith("filesystem://"):
        broker_dir = VAR_DIR / "broker"
        return {
            "data_folder_in": str(broker_dir / "queue"),
            "data_folder_out": str(broker_dir / "queue"),
            "control_folder": str(broker_dir / "control"),
            "processed_folder": str(broker_dir / "processed"),
            "store_processed": False,
            # Seconds an idle worker waits before looking at its folder again (kombu's default is 1):
            # every hop of a DAG waits up to this long, and listing a small folder costs little.
            "polling_interval": 0.1,
        }
    if url.startswith("redis"):
        # A Redis that vanishes without closing the connection (a partition, a firewall dropping an idle
        # flow) would hold a publish forever, and with it a trigger's request or a worker's next hop:
        # kombu waits without limit unless told. With a timeout the publish fails, is logged, and the
        # reconciler sends the message again once the broker answers (tests/test_multihost.py).
        timeout = env.float("CELERY_BROKER_SOCKET_TIMEOUT", default=3.0) or None  # 0: wait without limit
        return {
            # Longer than any task's hard time limit, so a running task is not delivered twice.
            "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
        }
    return {}


CELERY_BROKER_TRANSPORT_OPTIONS = broker_transport_options(CELERY_BROKER_URL)


def broker_transport(url: str) -> str | None:
    """kombu's transport for the broker at `url`: for Redis, kombu's own with one client per
    connection pool (`workflows_app.transport`), where it builds one per message published; for the
    file system, kombu's own with messages written whole before they appear; None for the transport
    the URL's scheme names."""
    if url.startswith("redis://"):
        return "workflows_app.transport:Transport"
    if url.startswith("filesystem://"):
        return "workflows_app.transport:FilesystemTransport"
    return None


CELERY_BROKER_TRANSPORT = broker_transport(CELERY_BROKER_URL)
# Every attempt's Celery result is kept in django-celery-results' table, under the attempt's event
# id (its task id), with the task name, arguments and worker; beat's built-in
# `celery.backend_cleanup` deletes results older than CELERY_RESULT_EXPIRES every day at 04:00.
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_IGNORE_RESULT = False
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = env.int("CELERY_RESULT_EXPIRES", default=7 * 24 * 3600)
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
# Left False on purpose: a pool process killed mid-task acks its message, and the engine's lease
# reconciler starts a new attempt under the node's max_retries instead. Redelivering the same
# message would loop forever on a task that kills its process every time (no redelivery count).
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fixup closes the database connection before and after every task unless this is
# set: a new PostgreSQL connection per task. A pool process keeps its connection for this many
# tasks instead; one broken meanwhile is replaced by the workers' database retry.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1000)
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=1800)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=1500)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Installed into django-celery-beat's tables by the scheduler at start; editable in the admin.
CELERY_BEAT_SCHEDULE = {
    "eventflow-reconcile": {
        "task": "workflows_app.tasks.reconcile",
        "schedule": env.float("EVENTFLOW_BEAT_RECONCILE_SECONDS", default=30.0),
        "options": {"queue": "celery"},
    },
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A publish that fails on a broken connection is tried twice more on a new one (Celery's default: three
# times), which covers a broker restart; a broker out of reach fails the publish within about three
# socket timeouts, so a trigger is answered in seconds, and the reconciler sends the message later.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE

EVENTFLOW = {
    # Status pages (/runs/, /workflows/, /queues/) open to anonymous visitors; off: they need a login.
    "PUBLIC_PAGES": env.bool("EVENTFLOW_PUBLIC_PAGES", default=False),
    # Largest accepted run payload, in bytes of JSON.
    "MAX_PAYLOAD_BYTES": env.int("EVENTFLOW_MAX_PAYLOAD_BYTES", default=256 * 1024),
    # Most elements a node's `map_over` may give; more fails the node with a message.
    "MAX_MAP_ITEMS": env.int("EVENTFLOW_MAX_MAP_ITEMS", default=10_000),
    # Deepest accepted nesting of a JSON body.
    "MAX_JSON_DEPTH": env.int("EVENTFLOW_MAX_JSON_DEPTH", default=64),
    # A started task's worker renews its lease every third of this; a task whose lease lapses
    # (its worker or pool process died) is retried or failed, and its slot freed.
    "LEASE_SECONDS": env.float("EVENTFLOW_LEASE_SECONDS", default=30.0),
    # A task handed to Celery that has not started this long after it was due is sent again (its
    # message may have been lost, e.g. by a broker restart); duplicates are refused at start.
    "DISPATCH_GRACE_SECONDS": env.float("EVENTFLOW_DISPATCH_GRACE_SECONDS", default=60.0),
    # How long a worker keeps retrying to record a start or an outcome while the database is down.
    "DB_RETRY_SECONDS": env.float("EVENTFLOW_DB_RETRY_SECONDS", default=120.0),
    # How often each worker looks for lapsed leases.
    "RECONCILE_SECONDS": env.float("EVENTFLOW_RECONCILE_SECONDS", default=5.0),
    # GET /metrics needs `Authorization: Bearer <this>` when set; unset, it is open.
    "METRICS_TOKEN": env("EVENTFLOW_METRICS_TOKEN", default=""),
    # The histograms of /metrics describe the task attempts that ended within this many seconds.
    "METRICS_WINDOW_SECONDS": env.float("EVENTFLOW_METRICS_WINDOW_SECONDS", default=300.0),
    # A webhook answered with anything but 2xx is tried again after this long, doubling, for a day.
    "WEBHOOK_RETRY_SECONDS": env.float("EVENTFLOW_WEBHOOK_RETRY_SECONDS", default=5.0),
    # How long a webhook's receiver may take to answer.
    "WEBHOOK_TIMEOUT_SECONDS": env.float("EVENTFLOW_WEBHOOK_TIMEOUT_SECONDS", default=10.0),
    # Off: no webhook requests to private, loopback or link-local addresses (internal networks).
    "WEBHOOK_ALLOW_PRIVATE": env.bool("EVENTFLOW_WEBHOOK_ALLOW_PRIVATE", default=False),
}

# `text`: the message, followed on lines written during a task's attempt by its `trace_id`,
# `event_id` and `node`; `json`: one JSON object per line, with `time`, `level`, `logger`, `message`
# and those three fields (workflows_app/logs.py; in a worker, config/celery.py routes Celery's own
# loggers through it).
LOG_FORMAT = env.str("LOG_FORMAT", default="text").lower()
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"attempt": {"()": "workflows_app.logs.AttemptFilter"}},
    "formatters": {
        "json": {"()": "workflows_app.logs.json_formatter"},
        "text": {"()": "workflows_app.logs.TextFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["attempt"], "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    # The embedded PostgreSQL's wrapper narrates every start and stop at INFO.
    "loggers": {"embedded_postgres": {"level": "WARNING"}},
}
