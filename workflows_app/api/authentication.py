"""DRF's token authentication, with its lookup done in one prepared statement on PostgreSQL.

Every API request authenticates, and building the ORM's query for the token and its user costs
several times what running it does; the rules (unknown token, inactive user) are DRF's own. The same
statement reads the user's permissions, which Django's ModelBackend would read in two more queries
at the first permission check (and keeps on the user for the request, as this does).
"""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from workflows_app import pgsql

MODEL_BACKEND_ONLY = ["django.contrib.auth.backends.ModelBackend"]


@functools.cache
def _token_sql() -> str:
    user = get_user_model()
    return (
        f"SELECT {pgsql.columns(Token, 't')}, {pgsql.columns(user, 'u')}, ARRAY({_permissions_sql(user, 'u')})"
        f" FROM {Token._meta.db_table} t JOIN {user._meta.db_table} u ON u.{user._meta.pk.column} = t.user_id"
        " WHERE t.key = %s"
    )


def _permissions_sql(user_model: type, alias: str) -> str:
    """The names ("app_label.codename") of the permissions the user `alias` has, directly or through
    its groups: what ModelBackend's `get_all_permissions` loads for an active user who is not a
    superuser."""
    direct = user_model._meta.get_field("user_permissions")
    groups = user_model._meta.get_field("groups")
    granted = Group._meta.get_field("permissions")
    content_type = Permission._meta.get_field("content_type").remote_field.model._meta.db_table
    user_id = f"{alias}.{user_model._meta.pk.column}"
    return f"""
        SELECT ct.app_label || '.' || p.codename
        FROM {Permission._meta.db_table} p JOIN {content_type} ct ON ct.id = p.content_type_id
        WHERE p.id IN (
            SELECT d.{direct.m2m_reverse_name()} FROM {direct.m2m_db_table()} d
            WHERE d.{direct.m2m_column_name()} = {user_id}
            UNION
            SELECT gp.{granted.m2m_reverse_name()} FROM {groups.m2m_db_table()} ug
            JOIN {granted.m2m_db_table()} gp ON gp.{granted.m2m_column_name()} = ug.{groups.m2m_reverse_name()}
            WHERE ug.{groups.m2m_column_name()} = {user_id}
        )
    """


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, as DRF's."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        if self.get_model() is not Token:
            return super().authenticate_credentials(key)
        found = pgsql.fetch_rows(_token_sql(), [key], Token, get_user_model())
        if not found:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        token, user, permissions = found[0]
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        if list(settings.AUTHENTICATION_BACKENDS) == MODEL_BACKEND_ONLY and not user.is_superuser:
            # Where ModelBackend keeps them once it has read them (tests/test_library_pins.py).
            user._perm_cache = set(permissions)
        token.user = user
        return user, token
