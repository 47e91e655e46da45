"""manage.py import_workflows: create or replace workflow definitions from YAML or JSON files, all or nothing."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from workflows_app.definitions import DefinitionError, registered_task_names, workflow_definition_save

from ._helpers import definitions_load


class _Rollback(Exception):
    """Raised inside the transaction to undo every save once all problems have been collected."""


class Command(BaseCommand):
    help = (
        "Create or replace workflow definitions from .yaml/.yml/.json files. A file holds one definition, "
        "a list of them, or (YAML) several documents. All files are imported in one transaction: if any "
        "definition is invalid, nothing is written and every problem is reported. A definition that did "
        "not change keeps its version."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE", help="Definition files (.yaml, .yml or .json).")

    def handle(self, *args: Any, files: list[str], **options: Any) -> None:
        # Every file is read and parsed before anything is written, so a syntax error anywhere
        # stops the import before it touches the database.
        loaded = [(path, definitions_load(path)) for path in files]
        known_tasks = registered_task_names()
        problems: list[str] = []
        seen: dict[str, str] = {}
        imported: list[tuple[str, int]] = []
        try:
            with transaction.atomic():
                for path, definitions in loaded:
                    for index, data in enumerate(definitions):
                        name = data.get("name") if isinstance(data, dict) else None
                        where = _where(path, index, len(definitions), name)
                        if isinstance(name, str) and name in seen:
                            problems.append(f"{where}: workflow '{name}' is also defined in {seen[name]}")
                            continue
                        if isinstance(name, str):
                            seen[name] = where
                        try:
                            # Its own savepoint: a refused definition leaves the others' work intact
                            # so that every problem in every file is found in one pass.
                            workflow = workflow_definition_save(data=data, known_tasks=known_tasks)
                        except DefinitionError as exc:
                            problems.extend(f"{where}: {error}" for error in exc.errors)
                            continue
                        imported.append((workflow.name, workflow.version))
                if problems:
                    raise _Rollback
        except _Rollback:
            raise CommandError(
                "nothing was imported; fix these problems:\n" + "\n".join(f"  {p}" for p in problems)
            ) from None
        for name, version in imported:
            self.stdout.write(f"imported {name} (version {version})")


def _where(path: str, index: int, count: int, name: Any) -> str:
    """Where a definition came from, e.g. `defs.yaml (definition 2, 'etl')`."""
    parts = [f"definition {index + 1}"] if count > 1 else []
    if isinstance(name, str) and name:
        parts.append(f"workflow '{name}'")
    return f"{path} ({', '.join(parts)})" if parts else path
