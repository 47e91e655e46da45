"""Argument parsing and formatting shared by the workflow management commands."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import CommandError

from workflows_app import selectors
from workflows_app.models import WorkflowRun


def trace_id_parse(value: str) -> str:
    """The trace id in canonical form, or a CommandError for anything that is not a uuid."""
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        raise CommandError(f"malformed trace id '{value}': expected a uuid") from None


def run_get_or_error(trace_id: str) -> WorkflowRun:
    """The run (tasks prefetched) with that trace id, or a CommandError naming the id."""
    run = selectors.run_get(trace_id=trace_id_parse(trace_id))
    if run is None:
        raise CommandError(f"unknown run '{trace_id}'")
    return run


def time_format(value: dt.datetime | None, *, short: bool = False) -> str:
    """A UTC timestamp: full ISO-8601 for headers, HH:MM:SS.mmm for table cells, '-' when unset."""
    if value is None:
        return "-"
    value = value.astimezone(dt.UTC)
    if short:
        return value.strftime("%H:%M:%S.%f")[:-3]
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_summary(error: str, *, limit: int = 100) -> str:
    """One line of a task's error: the exception line of a traceback, else the first line."""
    lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def table_format(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


class _ExportDumper(yaml.SafeDumper):
    """safe_dump's dumper, made to read like a hand-written definition file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line descriptions stay readable as literal blocks; the emitter falls back to quoting
    # by itself when a block cannot hold the value exactly (e.g. trailing spaces).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.SequenceNode:
    # Edges and trigger lists as `[a, b]`, the way the format is documented.
    flow = bool(value) and all(_is_scalar(v) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, value: dict) -> yaml.MappingNode:
    # Small leaf objects (`{concurrency: 5}`, short params) inline; nodes and larger ones as blocks.
    flow = not value or (len(value) <= 3 and all(_is_scalar(v) for v in value.values()))
    node = dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flow)
    return node


_ExportDumper.add_representer(str, _represent_str)
_ExportDumper.add_representer(list, _represent_list)
_ExportDumper.add_representer(dict, _represent_dict)


def yaml_dump(data: Any) -> str:
    """yaml.safe_dump with the keys in the given order and the definition file's flow style."""
    return yaml.dump(data, Dumper=_ExportDumper, sort_keys=False, allow_unicode=True, width=120)


def json_dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def definitions_load(path: str) -> list[Any]:
    """Every definition a .yaml/.yml/.json file holds: one object, a list, or a YAML multi-document stream.

    Values are passed through JSON so that what is imported is exactly what JSON can store
    (YAML dates, NaN or non-string keys are refused here with the file's name, not deep in a save).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise CommandError(f"{path}: unsupported file type '{suffix or '(none)'}'; use .yaml, .yml or .json")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        if suffix == ".json":
            documents = [json.loads(text)]
        else:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: invalid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise CommandError(f"{path}: invalid YAML: {exc}") from None
    definitions: list[Any] = []
    for document in documents:
        definitions.extend(document if isinstance(document, list) else [document])
    if not definitions:
        raise CommandError(f"{path}: holds no workflow definition")
    try:
        return json.loads(json.dumps(definitions, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{path}: holds a value JSON cannot represent: {exc}") from None


def waiting_for(task: Any, kind: str) -> str:
    """What a DEFERRED node waits for, and until when (UTC), in a few words."""
    what = {
        "wait_event": f"event {task.wait_type} with key {task.wait_key}",
        "approval": "an approval",
        "delay": "its delay",
    }.get(kind, kind)
    return f"{what}" + (f" until {time_format(task.due_at)}" if task.due_at else "")
