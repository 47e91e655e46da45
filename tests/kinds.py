"""A kind of node used only by the tests: `noop` succeeds as soon as it may run, without a worker.

It shows what adding a kind takes: this module, registered in every process that saves definitions or
moves runs (the suite imports it, and the workers through `tests.e2e_tasks`).
"""

from __future__ import annotations

from typing import Any

from workflows_app.engine import kinds
from workflows_app.engine.graph import NodeSpec
from workflows_app.engine.rules import RunContext, S, Step


class NoopKind(kinds.NodeKind):
    name = "noop"

    def ready(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> Step:
        return Step(node.key, S.SUCCESS, result={"upstream": sorted(upstream)})


kinds.register(NoopKind())
