"""manage.py export_workflows: write workflow definitions in the format import_workflows reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app import selectors
from workflows_app.definitions import definition_export

from ._helpers import json_dump, yaml_dump


class Command(BaseCommand):
    help = (
        "Export workflow definitions (all of them when no NAME is given) as YAML (default) or JSON. "
        "One definition is written as an object, several as a list; import_workflows reads either back "
        "unchanged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", metavar="NAME", help="Workflows to export (default: all).")
        parser.add_argument(
            "--format",
            dest="fmt",
            choices=["yaml", "json"],
            default=None,
            help="Output format (default: json for an --output ending in .json, else yaml).",
        )
        parser.add_argument("--output", "-o", metavar="FILE", help="Write to FILE instead of standard output.")

    def handle(self, *args: Any, names: list[str], fmt: str | None, output: str | None, **options: Any) -> None:
        if names:
            found = {name: selectors.workflow_get(name=name) for name in dict.fromkeys(names)}
            unknown = [name for name, workflow in found.items() if workflow is None]
            if unknown:
                raise CommandError(f"unknown workflow(s): {', '.join(unknown)}")
            workflows = list(found.values())
        else:
            workflows = list(selectors.workflow_list())
        definitions = [definition_export(w) for w in workflows]
        data: Any = definitions[0] if len(definitions) == 1 else definitions
        if fmt is None:
            fmt = "json" if output and output.lower().endswith(".json") else "yaml"
        text = json_dump(data) if fmt == "json" else yaml_dump(data)
        if output is None:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"{output}: cannot write: {exc.strerror or exc}") from None
        self.stderr.write(f"exported {len(definitions)} workflow(s) to {output}")
