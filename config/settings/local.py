"""Local development and the quickstart: an embedded PostgreSQL and a file broker unless told otherwise."""

from .base import *  # noqa: F403
from .base import database_or_embedded, env

DEBUG = env.bool("DEBUG", default=True)
DATABASES = {"default": database_or_embedded()}
