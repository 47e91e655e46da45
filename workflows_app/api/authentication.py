"""DRF's token authentication, with its lookup done in one prepared statement on PostgreSQL.

Every API request authenticates, and building the ORM's query for the token and its user costs
several times what running it does; the rules (unknown token, inactive user) are DRF's own.
"""

from __future__ import annotations

import functools
from typing import Any

from django.contrib.auth import get_user_model
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from workflows_app import pgsql


@functools.cache
def _token_sql() -> str:
    user = get_user_model()
    return (
        f"SELECT {pgsql.columns(Token, 't')}, {pgsql.columns(user, 'u')}"
        f" FROM {Token._meta.db_table} t JOIN {user._meta.db_table} u ON u.{user._meta.pk.column} = t.user_id"
        " WHERE t.key = %s"
    )


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, as DRF's."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Token]:
        if self.get_model() is not Token or not pgsql.available():
            return super().authenticate_credentials(key)
        found = pgsql.fetch_rows(_token_sql(), [key], Token, get_user_model())
        if not found:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        token, user = found[0]
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        token.user = user
        return user, token
