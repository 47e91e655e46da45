"""CEL expressions in definitions (an edge's `when`, a node's `map_over`): checked on save, evaluated by
the engine, through `common-expression-language` (a maintained CEL interpreter), never `eval`."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import cel

# The names each place may read (SPEC, Expressions).
WHEN_NAMES = frozenset({"payload", "upstream", "result"})
MAP_OVER_NAMES = frozenset({"payload", "upstream"})
# Longest accepted source: an expression is a condition or a path, not a program.
MAX_SOURCE = 2000

# `upstream.key` and `upstream["key"]`, outside string literals. The library names the variables an
# expression reads but not the fields it selects on them, so which predecessors an expression reads
# is found in its source: string literals are matched first, so that text inside them is skipped.
_UPSTREAM_REF = re.compile(
    r"""(?P<string>(?:[rR][bB]?|[bB][rR]?)?(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'))"""
    r"""|(?<![\w.])upstream\s*(?:\.\s*(?P<field>[A-Za-z_]\w*)|\[\s*(?P<quote>["'])(?P<key>[^"'\\]*)(?P=quote)\s*\])"""
)


class ExpressionError(ValueError):
    """An expression that does not compile, or that failed or gave the wrong type at run time; the
    message quotes the expression."""


class Expression:
    """A compiled expression and what it reads."""

    def __init__(self, source: str):
        self.source = source
        try:
            self.program = cel.compile(source)
        except ValueError as exc:  # the library's parse errors
            raise ExpressionError(f"`{source}` does not compile: {_first_line(exc)}") from None
        self.names = frozenset(self.program.variables())
        self.upstream_keys = frozenset(
            m["field"] or m["key"] for m in _UPSTREAM_REF.finditer(source) if m["field"] or m["key"] is not None
        )

    def evaluate(self, names: Mapping[str, Any]) -> Any:
        """The expression's value (JSON-like Python values in and out), or an ExpressionError naming it."""
        try:
            return self.program.execute(dict(names))
        except KeyError as exc:
            raise ExpressionError(f"`{self.source}` failed: no key {exc}") from None
        except Exception as exc:  # the library raises TypeError, RuntimeError, IndexError, ZeroDivisionError...
            raise ExpressionError(f"`{self.source}` failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=4096)
def compiled(source: str) -> Expression:
    """Definitions never change once versioned, so each process compiles an expression once."""
    return Expression(source)


def check(source: Any, *, names: Collection[str], upstream: Collection[str], expect: type) -> list[str]:
    """What is wrong with an expression for a place that offers `names`, under a node whose
    predecessors are `upstream`; an expression reading none of them is evaluated now and must give
    an `expect` (bool or list)."""
    if not isinstance(source, str) or not source.strip():
        return ["must be a non-empty CEL expression"]
    if len(source) > MAX_SOURCE:
        return [f"is longer than {MAX_SOURCE} characters"]
    try:
        expression = compiled(source)
    except ExpressionError as exc:
        return [str(exc)]
    errors = []
    unknown = sorted(expression.names - set(names))
    if unknown:
        errors.append(f"`{source}` reads unknown name(s) {', '.join(unknown)} (it may read {', '.join(sorted(names))})")
    not_upstream = sorted(expression.upstream_keys - set(upstream))
    if not_upstream:
        preds = ", ".join(sorted(upstream)) or "none"
        errors.append(
            f"`{source}` reads upstream.{', upstream.'.join(not_upstream)}, which is not a predecessor "
            f"(its predecessors: {preds})"
        )
    if not errors and not expression.names:
        try:
            value = expression.evaluate({})
        except ExpressionError as exc:
            return [str(exc)]
        if not _is(value, expect):
            errors.append(f"`{source}` gives {_type_name(value)}, not {_type_name(expect())}")
    return errors


def _is(value: Any, expect: type) -> bool:
    return isinstance(value, expect) and (expect is not int or not isinstance(value, bool))


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a double", str: "a string", list: "a list", dict: "a map"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def when(source: str, *, payload: Mapping[str, Any], upstream: Mapping[str, Any], result: Any) -> bool:
    """An edge's condition: true or false, or an ExpressionError (never silently either)."""
    expression = compiled(source)
    value = expression.evaluate({"payload": payload, "upstream": upstream, "result": result})
    if not isinstance(value, bool):
        raise ExpressionError(f"`{source}` gave {_type_name(value)}, not a bool")
    return value


def map_items(source: str, *, payload: Mapping[str, Any], upstream: Mapping[str, Any]) -> list:
    """A `map_over`'s elements, each as stored JSON gives it back, or an ExpressionError."""
    expression = compiled(source)
    value = expression.evaluate({"payload": payload, "upstream": upstream})
    if not isinstance(value, list):
        raise ExpressionError(f"`{source}` gave {_type_name(value)}, not a list")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ExpressionError(f"`{source}` gave elements that are not JSON: {exc}") from None
