"""Test settings: PostgreSQL and Redis on this machine unless the environment says otherwise."""

from .base import *  # noqa: F403
from .base import broker_transport, broker_transport_options, database, env

DATABASES = {"default": database("postgres://postgres@127.0.0.1:5432/eventflow")}
DATABASES["default"]["TEST"] = {"NAME": env("TEST_DATABASE_NAME", default="test_eventflow")}
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/15")
CELERY_BROKER_TRANSPORT_OPTIONS = broker_transport_options(CELERY_BROKER_URL)
CELERY_BROKER_TRANSPORT = broker_transport(CELERY_BROKER_URL)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
