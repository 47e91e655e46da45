"""Bench settings: the test settings, plus switches that try another configuration against the default."""

from config.settings.test import *  # noqa: F403
from config.settings.test import CELERY_RESULT_BACKEND, DATABASES, env

# The canvas reference worker stores results in Redis instead of PostgreSQL.
CELERY_RESULT_BACKEND = env("BENCH_RESULT_BACKEND", default=CELERY_RESULT_BACKEND)

# A variant: commits return before their WAL record is flushed to disk (PostgreSQL's synchronous_commit).
if env("BENCH_SYNCHRONOUS_COMMIT", default=""):
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
        f"-c synchronous_commit={env('BENCH_SYNCHRONOUS_COMMIT')}"
    )
