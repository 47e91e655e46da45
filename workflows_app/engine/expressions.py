"""CEL expressions in definitions (an edge's `when`, a node's `map_over`): compiled and type-checked on
save, evaluated by the engine, through the CEL project's own Python runtime (`cel-expr-python`), never
`eval`."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping
from typing import Any

from cel_expr_python import cel

# The names each place may read (SPEC, Expressions), with their types for the checker: the run's payload
# and the predecessors' results are JSON objects whose fields' types are known only at run time.
_JSON_OBJECT = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
_NAMES = {"payload": _JSON_OBJECT, "upstream": _JSON_OBJECT, "result": cel.Type.DYN, "event": _JSON_OBJECT}
WHEN_NAMES = frozenset({"payload", "upstream", "result"})
MAP_OVER_NAMES = frozenset({"payload", "upstream"})  # also a wait_event's `event_key`
EVENT_NAMES = frozenset({"event"})  # a wait_event's `match`
FAIRNESS_NAMES = frozenset({"payload"})  # an event type's `fairness_key`, on the run
# What each place's expression must give; DYN (a field of a JSON value) is checked when evaluated.
_GIVES = {bool: (cel.Type.BOOL, "a bool"), list: (cel.Type.LIST, "a list")}
# Longest accepted source: an expression is a condition or a path, not a program.
MAX_SOURCE = 2000

# `upstream.key` and `upstream["key"]`, outside string literals. The library names the variables an
# expression reads but not the fields it selects on them, so which predecessors an expression reads
# is found in its source: string literals are matched first, so that text inside them is skipped.
_STRING = (
    r"""(?P<string>(?:[rR][bB]?|[bB][rR]?)?"""
    r"""(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'))"""
)
_UPSTREAM_REF = re.compile(
    _STRING
    + r"""|(?<![\w.])upstream\s*(?:\.\s*(?P<field>[A-Za-z_]\w*)|\[\s*(?P<quote>["'])(?P<key>[^"'\\]*)(?P=quote)\s*\])"""
)
# The field paths an expression reads (`payload.a.b`, `upstream.key.c`, `upstream["key"].c`), found the
# same way; a last segment called as a method (`.filter(`) is not a field.
_SEGMENT = r"""\s*(?:\.\s*[A-Za-z_]\w*(?!\w|\s*\()|\[\s*"[^"\\]*"\s*\]|\[\s*'[^'\\]*'\s*\])"""
_PATH = re.compile(_STRING + r"""|(?<![\w.])(?P<path>(?:payload|upstream)(?:""" + _SEGMENT + r""")+)""")
_SEGMENT_NAME = re.compile(r"""\.\s*([A-Za-z_]\w*)|\[\s*["']([^"'\\]*)["']\s*\]""")


class ExpressionError(ValueError):
    """An expression that does not compile, or that failed or gave the wrong type at run time; the
    message quotes the expression."""


class Expression:
    """A compiled, type-checked expression over the names of one place, and the predecessors it reads."""

    def __init__(self, source: str, names: frozenset[str] = WHEN_NAMES):
        self.source = source
        env = _env(names)
        try:
            self.program = env.compile(source)
        except RuntimeError as exc:  # the checker's and the parser's errors
            raise ExpressionError(f"`{source}` does not compile: {_cel_message(exc)}") from None
        self.gives = self.program.return_type()
        self.upstream_keys = frozenset(
            m["field"] or m["key"] for m in _UPSTREAM_REF.finditer(source) if m["field"] or m["key"] is not None
        )
        self.paths = tuple(
            (m["path"][0] == "p" and "payload" or "upstream", *(a or b for a, b in _SEGMENT_NAME.findall(m["path"])))
            for m in _PATH.finditer(source)
            if m["path"]
        )

    def evaluate(self, names: Mapping[str, Any]) -> Any:
        """The expression's value (JSON-like Python values in and out), or an ExpressionError naming it."""
        try:
            value = self.program.eval(data=dict(names))
        except Exception as exc:  # a value the runtime cannot take in (e.g. an int beyond 64 bits)
            raise ExpressionError(f"`{self.source}` failed: {_first_line(exc)}") from None
        if value.type() == cel.Type.ERROR:
            raise ExpressionError(f"`{self.source}` failed: {_cel_message(value.value())}")
        return value.plain_value()


@functools.lru_cache(maxsize=8)
def _env(names: frozenset[str]) -> Any:
    return cel.NewEnv(variables={name: _NAMES[name] for name in names})


def _cel_message(error: Any) -> str:
    """The runtime's message without its status code and its caret drawing."""
    text = _first_line(error) if isinstance(error, BaseException) else str(error).strip().splitlines()[0]
    return re.sub(r"^[A-Z_]+: (ERROR: <input>:\d+:\d+: )?| \(in container ''\)", "", text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=4096)
def compiled(source: str, names: frozenset[str] = WHEN_NAMES) -> Expression:
    """Definitions never change once versioned, so each process compiles an expression once."""
    return Expression(source, names)


def check(source: Any, *, names: frozenset[str], upstream: Collection[str], expect: type | None) -> list[str]:
    """What is wrong with an expression for a place that offers `names`, under a node whose
    predecessors are `upstream`, where it must give an `expect` (bool or list; None: any value)."""
    if not isinstance(source, str) or not source.strip():
        return ["must be a non-empty CEL expression"]
    if len(source) > MAX_SOURCE:
        return [f"is longer than {MAX_SOURCE} characters"]
    try:
        expression = compiled(source, names)
    except ExpressionError as exc:
        return [f"{exc} (it may read {', '.join(sorted(names))})" if "undeclared reference" in str(exc) else str(exc)]
    errors = []
    wanted, called = _GIVES.get(expect, (None, ""))
    if wanted is not None and expression.gives != cel.Type.DYN and not _assignable(wanted, expression.gives):
        errors.append(f"`{source}` gives {expression.gives.name().lower()}, not {called}")
    not_upstream = sorted(expression.upstream_keys - set(upstream))
    if not_upstream:
        preds = ", ".join(sorted(upstream)) or "none"
        errors.append(
            f"`{source}` reads upstream.{', upstream.'.join(not_upstream)}, which is not a predecessor "
            f"(its predecessors: {preds})"
        )
    return errors


def _assignable(wanted: Any, gives: Any) -> bool:
    """A list of any element type is a list."""
    return wanted.is_assignable_from(gives) or (wanted == cel.Type.LIST and gives.name().startswith("LIST"))


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a double", str: "a string", list: "a list", dict: "a map"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def when(source: str, *, payload: Mapping[str, Any], upstream: Mapping[str, Any], result: Any) -> bool:
    """An edge's condition: true or false, or an ExpressionError (never silently either)."""
    value = compiled(source, WHEN_NAMES).evaluate({"payload": payload, "upstream": upstream, "result": result})
    if not isinstance(value, bool):
        raise ExpressionError(f"`{source}` gave {_type_name(value)}, not a bool")
    return value


def without(names: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """`names` (e.g. {"payload": ..., "upstream": ...}) without the fields at `paths`, copying only what
    is on a path: a mapped node's instances get their element, not the whole list again each."""
    result = dict(names)
    for path in paths:
        result = _drop(result, path)
    return result


def _drop(value: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(value, Mapping) or path[0] not in value:
        return value
    if len(path) == 1:
        return {k: v for k, v in value.items() if k != path[0]}
    return {**value, path[0]: _drop(value[path[0]], path[1:])}


def map_items(source: str, *, payload: Mapping[str, Any], upstream: Mapping[str, Any]) -> list:
    """A `map_over`'s elements, each as stored JSON gives it back, or an ExpressionError."""
    value = compiled(source, MAP_OVER_NAMES).evaluate({"payload": payload, "upstream": upstream})
    if not isinstance(value, list):
        raise ExpressionError(f"`{source}` gave {_type_name(value)}, not a list")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ExpressionError(f"`{source}` gave elements that are not JSON: {exc}") from None


def fairness_value(source: str, *, payload: Mapping[str, Any]) -> Any:
    """An event type's `fairness_key` on a run's payload; None when it fails (a field the payload lacks):
    such a run shares the key of runs without one rather than failing."""
    try:
        return compiled(source, FAIRNESS_NAMES).evaluate({"payload": payload})
    except ExpressionError:
        return None
