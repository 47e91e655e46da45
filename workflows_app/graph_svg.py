"""Layered layout of a workflow DAG and its drawing as inline SVG, plus a run's timeline and the status palette."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import networkx as nx
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

# fill, text colour; one palette for SVG nodes, timeline bars and the HTML badges.
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    "WAITING": ("#cfd4da", "#212529"),
    "QUEUED": ("#b9ddf7", "#0b3a5b"),
    # A node that waits for an event, a person or a time: amber, and drawn dashed (WAIT_STROKE).
    "DEFERRED": ("#fff3bf", "#5c3c00"),
    "STARTED": ("#1f6fd1", "#ffffff"),
    "RETRY": ("#f59f00", "#212529"),
    "SUCCESS": ("#2b8a3e", "#ffffff"),
    "FAILURE": ("#d62828", "#ffffff"),
    "SKIPPED": ("#eceff1", "#6c757d"),
    "UPSTREAM_FAILED": ("#b8520a", "#ffffff"),
    "REVOKED": ("#7048b8", "#ffffff"),
    # Run and event statuses share the badge styles.
    "PENDING": ("#e7f1ff", "#0b3a5b"),
    "RUNNING": ("#1f6fd1", "#ffffff"),
    "FAILED": ("#d62828", "#ffffff"),
    "CANCELED": ("#7048b8", "#ffffff"),
}
TASK_STATUSES = (
    "WAITING",
    "QUEUED",
    "DEFERRED",
    "STARTED",
    "RETRY",
    "SUCCESS",
    "FAILURE",
    "SKIPPED",
    "UPSTREAM_FAILED",
    "REVOKED",
)
UNCOLOURED = ("#ffffff", "#212529")

NODE_W = 188
NODE_H = 64
GAP_X = 70
# Columns are this far apart when some edge carries a condition, so its label fits between them.
GAP_X_LABELLED = 150
GAP_Y = 22
PAD = 14
# Approximate advance of one character at the label font sizes, to truncate before overflowing the box.
CHAR_W_TITLE = 7.6
CHAR_W_TEXT = 6.4
# An edge's label is monospace at 10px: 0.6em a character, with a little room for fonts that run wider.
CHAR_W_LABEL = 6.3
# An edge with a condition is dashed: it may not be taken.
DASHED = ' stroke-dasharray="5 3"'
# A mapped node is drawn as a stack of cards: the cards behind it, offset up and to the right.
STACK_OFFSETS = (8, 4)
# The outline of a waiting (DEFERRED) node: amber and dashed, so it reads apart from a running one.
WAIT_STROKE = "#e8590c"


@dataclass(frozen=True)
class Layout:
    """Top-left corner of every node box and the size of the drawing."""

    positions: dict[str, tuple[float, float]]
    width: float
    height: float


@dataclass(frozen=True)
class SvgNode:
    """One node as drawn: its key, up to two lines under the key, colour status and optional link."""

    key: str
    lines: tuple[str, ...] = ()
    status: str | None = None
    href: str | None = None
    tooltip: str = ""
    # A mapped node (one task instance per element of a list): drawn as a stack, with `badge` on it.
    mapped: bool = False
    badge: str = ""


@dataclass(frozen=True)
class TimelineRow:
    key: str
    status: str
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


def status_css() -> SafeString:
    """CSS classes `st-<STATUS>` for badges, generated from the palette so pages and SVG agree."""
    return format_html_join(
        "\n",
        ".st-{0}{{background:{1};color:{2};}}",
        ((status, fill, text) for status, (fill, text) in STATUS_COLOURS.items()),
    )


def legend() -> list[tuple[str, str]]:
    """(status, label) for each task status, in lifecycle order."""
    return [(status, status.replace("_", " ").lower()) for status in TASK_STATUSES]


def _layers(keys: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[list[str]]:
    graph = nx.DiGraph()
    graph.add_nodes_from(keys)
    graph.add_edges_from(edges)
    order = {key: i for i, key in enumerate(keys)}
    try:
        layers = [sorted(gen, key=order.__getitem__) for gen in nx.topological_generations(graph)]
    except nx.NetworkXUnfeasible:
        # Saved definitions are acyclic; a cycle here means a half-edited graph, drawn as one column.
        return [list(keys)]
    preds = {key: list(graph.predecessors(key)) for key in keys}
    succs = {key: list(graph.successors(key)) for key in keys}

    def sweep(ranks: Iterable[int], neighbours: dict[str, list[str]], ref_offset: int) -> None:
        # Barycenter heuristic: order each layer by the mean position of its neighbours in the
        # adjacent layer, which removes most edge crossings in a few passes.
        for r in ranks:
            ref = {key: i for i, key in enumerate(layers[r + ref_offset])}
            current = {key: i for i, key in enumerate(layers[r])}

            def weight(key: str, ref: dict[str, int] = ref, current: dict[str, int] = current) -> tuple[float, int]:
                near = [ref[n] for n in neighbours[key] if n in ref]
                return (sum(near) / len(near) if near else current[key], order[key])

            layers[r].sort(key=weight)

    for _ in range(3):
        sweep(range(1, len(layers)), preds, -1)
        sweep(range(len(layers) - 2, -1, -1), succs, 1)
    return layers


@functools.lru_cache(maxsize=512)
def layout(keys: tuple[str, ...], edges: tuple[tuple[str, str], ...], gap_x: float = GAP_X) -> Layout:
    """Layers left to right (a node sits one column right of its deepest predecessor), centred vertically.

    Cached: a run's graph is fixed by its version and the live page redraws it every second.
    """
    layers = _layers(keys, edges)
    tallest = max((len(layer) for layer in layers), default=0)
    positions: dict[str, tuple[float, float]] = {}
    for column, layer in enumerate(layers):
        offset = (tallest - len(layer)) * (NODE_H + GAP_Y) / 2
        for row, key in enumerate(layer):
            positions[key] = (
                PAD + column * (NODE_W + gap_x),
                PAD + offset + row * (NODE_H + GAP_Y),
            )
    width = 2 * PAD + len(layers) * NODE_W + max(len(layers) - 1, 0) * gap_x
    height = 2 * PAD + tallest * NODE_H + max(tallest - 1, 0) * GAP_Y
    return Layout(positions=positions, width=width, height=height)


def _fit(text: str, room: float, char_w: float) -> str:
    limit = max(int(room // char_w), 1)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _edge_ends(src: tuple[float, float], dst: tuple[float, float]) -> tuple[float, float, float, float, float]:
    """(x1, y1, x2, y2, bend) of the cubic curve from the source's right side to the target's left."""
    x1, y1 = src[0] + NODE_W, src[1] + NODE_H / 2
    x2, y2 = dst[0] - 2, dst[1] + NODE_H / 2
    return x1, y1, x2, y2, max((x2 - x1) / 2, 20)


def _edge_path(src: tuple[float, float], dst: tuple[float, float]) -> str:
    x1, y1, x2, y2, bend = _edge_ends(src, dst)
    return f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} {x2 - bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"


def _label_point(src: tuple[float, float], dst: tuple[float, float], gap_x: float) -> tuple[float, float]:
    """Where an edge's label sits: on its curve, in the middle of the gap before its target. Between
    two columns no box is drawn, so an edge that skips columns keeps its label off the boxes it passes."""
    x1, y1, x2, y2, bend = _edge_ends(src, dst)
    xs, ys = (x1, x1 + bend, x2 - bend, x2), (y1, y1, y2, y2)

    def at(t: float, p: tuple[float, ...]) -> float:
        u = 1 - t
        return u * u * u * p[0] + 3 * u * u * t * p[1] + 3 * u * t * t * p[2] + t * t * t * p[3]

    want, low, high = x2 - gap_x / 2 + 1, 0.0, 1.0
    for _ in range(30):  # x grows along the curve: bisect for the t where it reaches `want`
        mid = (low + high) / 2
        low, high = (mid, high) if at(mid, xs) < want else (low, mid)
    t = (low + high) / 2
    return at(t, xs), at(t, ys)


def _condition_svg(source: str, target: str, when: str, x: float, y: float, room: float) -> str:
    text = _fit(when, room - 24, CHAR_W_LABEL)
    width = len(text) * CHAR_W_LABEL + 10
    return (
        f'<g class="dag-cond" data-edge="{_e(source)} {_e(target)}" transform="translate({x:.1f},{y:.1f})">'
        f"<title>{_e(source)} \u2192 {_e(target)} when {_e(when)}</title>"
        f'<rect x="{-width / 2:.1f}" y="-9" width="{width:.1f}" height="17" rx="8" fill="#fff8db" stroke="#c9a227"/>'
        '<text text-anchor="middle" y="4" font-size="10" fill="#5c4a00" font-family="ui-monospace, monospace">'
        f"{_e(text)}</text></g>"
    )


def _e(value: object) -> str:
    return html.escape(str(value))


# The drawing of a 300-node run is rebuilt every second while someone watches it, so boxes and bars
# are plain f-strings with every outside value escaped, which costs a fraction of format_html.
def _node_svg(node: SvgNode, x: float, y: float) -> str:
    fill, ink = STATUS_COLOURS.get(node.status or "", UNCOLOURED)
    room = NODE_W - 20
    badge = _fit(node.badge, 60, CHAR_W_TEXT) if node.badge else ""
    badge_w = len(badge) * CHAR_W_TEXT + 10 if badge else 0
    texts = [
        '<text x="10" y="21" class="dag-key" font-size="13" font-weight="600">'
        f"{_e(_fit(node.key, room - badge_w, CHAR_W_TITLE))}</text>"
    ]
    for i, line in enumerate(node.lines[:2]):
        texts.append(
            f'<text x="10" y="{39 + i * 16}" class="dag-sub" font-size="11">{_e(_fit(line, room, CHAR_W_TEXT))}</text>'
        )
    stroke = "#495057" if node.status else "#868e96"
    width = "1.2"
    # A skipped node is drawn as a dashed outline too, so it reads as "did not run" beside a waiting one.
    dash = ' stroke-dasharray="6 4"' if node.status == "SKIPPED" else ""
    if node.status == "DEFERRED":
        stroke, width, dash = WAIT_STROKE, "2", ' stroke-dasharray="7 4"'
    card = f'width="{NODE_W}" height="{NODE_H}" rx="7" fill="{fill}" stroke="{stroke}" stroke-width="{width}"{dash}'
    body = ""
    if node.mapped:
        body += "".join(f'<rect x="{d}" y="{-d}" class="dag-stack" {card}/>' for d in STACK_OFFSETS)
    body += f"<rect {card}/>"
    body += "".join(texts)
    if badge:
        body += (
            f'<g class="dag-badge" transform="translate({NODE_W - badge_w - 6:.1f},6)">'
            f'<rect width="{badge_w:.1f}" height="16" rx="8" fill="#ffffff" fill-opacity="0.85" stroke="{stroke}"/>'
            f'<text x="{badge_w / 2:.1f}" y="12" text-anchor="middle" font-size="10.5" font-weight="600" '
            f'fill="#212529">{_e(badge)}</text></g>'
        )
    key = _e(node.key)
    if node.href:
        # data-node-link lets the run page open the node's detail in place instead of following the link.
        body = f'<a href="{_e(node.href)}" class="dag-link" data-node-link="{key}">{body}</a>'
    tooltip = node.tooltip or " \u00b7 ".join((node.key, *node.lines))
    status_attr = f' data-status="{_e(node.status)}"' if node.status else ""
    mapped_attr = ' data-mapped="true"' if node.mapped else ""
    return (
        f'<g class="dag-node" data-node="{key}"{status_attr}{mapped_attr} transform="translate({x:.1f},{y:.1f})" '
        f'fill="{ink}"><title>{_e(tooltip)}</title>{body}</g>'
    )


def dag_svg(
    nodes: Sequence[SvgNode],
    edges: Sequence[tuple[str, str]],
    *,
    label: str = "workflow graph",
    conditions: Mapping[tuple[str, str], str] | None = None,
) -> SafeString:
    """The DAG as an inline <svg>: one `g.dag-node[data-node][data-status]` per node, curved edges with arrows.

    `conditions` maps (source, target) to an edge's `when`: such an edge is dashed and labelled with it
    (`g.dag-cond`, shortened to fit, in full in its <title>).
    """
    keys = tuple(node.key for node in nodes)
    known = set(keys)
    edge_list = tuple((s, t) for s, t in edges if s in known and t in known)
    conditions = {edge: when for edge, when in (conditions or {}).items() if edge in edge_list and when}
    gap_x = GAP_X_LABELLED if conditions else GAP_X
    placed = layout(keys, edge_list, gap_x)
    pos = placed.positions
    paths = mark_safe(  # keys escaped; the path is numbers
        "".join(
            f'<path class="dag-edge" data-edge="{_e(s)} {_e(t)}" d="{_edge_path(pos[s], pos[t])}" '
            f'marker-end="url(#dag-arrow)"{DASHED if (s, t) in conditions else ""}/>'
            for s, t in edge_list
        )
    )
    labels = mark_safe(  # escaped in _condition_svg
        "".join(
            _condition_svg(s, t, when, *_label_point(pos[s], pos[t], gap_x), gap_x)
            for (s, t), when in conditions.items()
        )
    )
    boxes = mark_safe("".join(_node_svg(node, *pos[node.key]) for node in nodes))  # escaped in _node_svg
    return format_html(
        '<svg class="dag" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{}" '
        'width="{}" height="{}" viewBox="0 0 {} {}" font-family="system-ui, sans-serif">'
        '<defs><marker id="dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6c757d"/></marker></defs>'
        '<g fill="none" stroke="#6c757d" stroke-width="1.5">{}</g>{}{}</svg>',
        label,
        f"{placed.width:.0f}",
        f"{placed.height:.0f}",
        f"{placed.width:.0f}",
        f"{placed.height:.0f}",
        paths,
        boxes,
        labels,
    )


def workflow_svg(
    nodes: Sequence[Any],
    edges: Sequence[tuple[str, str]],
    *,
    label: str,
    href: Callable[[str], str] | None = None,
    conditions: Mapping[tuple[str, str], str] | None = None,
) -> SafeString:
    """A definition drawn without statuses: each node labelled with its event type (concurrency) and task,
    a mapped node as a stack marked "map", each edge's condition on it.

    `nodes` are saved `Node` rows with their event type loaded; `href(key)` gives each box a link.
    """
    svg_nodes = []
    for node in nodes:
        map_over = (node.options or {}).get("map_over", "")
        svg_nodes.append(
            SvgNode(
                key=node.key,
                lines=(
                    f"{node.event_type_id} ({node.event_type.concurrency})" if node.event_type_id else node.kind,
                    node.task.rsplit(".", 1)[-1],
                ),
                href=href(node.key) if href else None,
                tooltip=" \u00b7 ".join(
                    filter(
                        None,
                        (node.key, node.task or node.kind, node.event_type_id, map_over and f"map over {map_over}"),
                    )
                ),
                mapped=bool(map_over),
                badge="map" if map_over else "",
            )
        )
    return dag_svg(svg_nodes, edges, label=label, conditions=conditions)


def timeline_svg(rows: Sequence[TimelineRow], *, start: datetime, end: datetime) -> SafeString:
    """A Gantt strip per task: a pale bar while it waited in line, a coloured bar while it ran."""
    label_w, bar_w, row_h, top = 150, 620, 20, 22
    span = max((end - start).total_seconds(), 0.001)

    def x_at(moment: datetime) -> float:
        seconds = min(max((moment - start).total_seconds(), 0.0), span)
        return label_w + seconds / span * bar_w

    parts: list[str] = []
    for tick in range(5):
        x = label_w + tick * bar_w / 4
        parts.append(
            format_html(
                '<line x1="{0}" x2="{0}" y1="14" y2="{1}" stroke="#dee2e6"/>'
                '<text x="{0}" y="10" text-anchor="middle" fill="#6c757d">{2}</text>',
                f"{x:.1f}",
                top + len(rows) * row_h,
                _seconds_label(span * tick / 4),
            )
        )
    for i, row in enumerate(rows):
        y = top + i * row_h
        fill, _ = STATUS_COLOURS.get(row.status, UNCOLOURED)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end" fill="#212529">'
            f"{_e(_fit(row.key, label_w - 12, CHAR_W_TEXT))}</text>"
        )
        ran_from = row.started_at
        if row.queued_at:
            waited_to = ran_from or row.finished_at or end
            pale = STATUS_COLOURS["DEFERRED" if row.status == "DEFERRED" else "QUEUED"][0]
            parts.append(_bar(x_at(row.queued_at), x_at(waited_to), y, pale, row, "waiting"))
        if ran_from:
            parts.append(_bar(x_at(ran_from), x_at(row.finished_at or end), y, fill, row, "running"))
    return format_html(
        '<svg class="timeline" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="task timeline" '
        'width="{0}" height="{1}" viewBox="0 0 {0} {1}" font-family="system-ui, sans-serif" font-size="11">{2}</svg>',
        label_w + bar_w + 20,
        top + len(rows) * row_h + 4,
        mark_safe("".join(parts)),  # parts built with format_html or escaped
    )


def _bar(x1: float, x2: float, y: float, fill: str, row: TimelineRow, phase: str) -> str:
    return (
        f'<rect x="{x1:.1f}" y="{y + 3}" width="{max(x2 - x1, 2):.1f}" height="14" rx="2" fill="{fill}" '
        f'stroke="#adb5bd" stroke-width="0.5"><title>{_e(row.key)} {phase}</title></rect>'
    )


def _seconds_label(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
