"""Bench settings: the test settings, plus switches that try a proposed configuration against the default."""

from config.settings.test import *  # noqa: F403
from config.settings.test import CELERY_RESULT_BACKEND, DATABASES, env

# The canvas reference worker stores results in Redis instead of PostgreSQL.
CELERY_RESULT_BACKEND = env("BENCH_RESULT_BACKEND", default=CELERY_RESULT_BACKEND)

# Proposed: keep a pool process's database connection across tasks. Celery's Django fixup otherwise
# closes it before and after every task, so each task opens a new PostgreSQL connection.
if env("BENCH_DB_REUSE_MAX", default=""):
    CELERY_DB_REUSE_MAX = env.int("BENCH_DB_REUSE_MAX")

# Proposed: commits return before their WAL record is flushed to disk (PostgreSQL's synchronous_commit).
if env("BENCH_SYNCHRONOUS_COMMIT", default=""):
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
        f"-c synchronous_commit={env('BENCH_SYNCHRONOUS_COMMIT')}"
    )
