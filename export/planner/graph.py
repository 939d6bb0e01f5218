"""``doit graph``: the task graph as Graphviz DOT and as SVG, each task coloured by its plan verdict.

The SVG is laid out here, in pure Python (no Graphviz needed): one band per model, one column per
step (the longest path from the sources), so a model's (mode, T) leaves line up row by row and an
edge always runs left to right. The DOT file is for Graphviz users (``dot -Tpng``): the same nodes
and colours, one cluster per model.

Every node of the SVG is ``<g class="node ..." data-task="<task>" data-verdict="<verdict>">`` with a
``<title>`` (the task and why), a ``<rect>`` and ``<text>``; every edge is a
``<path class="edge" data-from=... data-to=...>``: easy for scripts and tests to read back.
"""
from __future__ import annotations

import re
from html import escape

# verdict -> (fill, stroke, label)
STYLE = {
    "up-to-date": ("#d9ead3", "#6aa84f", "up to date"),
    "restore": ("#cfe2f3", "#3d85c6", "will restore"),
    "build": ("#f9cb9c", "#e69138", "will build"),
    "run": ("#fce5cd", "#e69138", "will run"),
    "may-run": ("#fff2cc", "#bf9000", "may run"),
    "error": ("#f4cccc", "#cc0000", "error"),
}
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN, BAND_PAD, HEAD = 150, 34, 56, 10, 16, 12, 40


def _model(task: str) -> str:
    """The band of a task: its model (``step:model.mode.T``), or "project" for a task of no model."""
    return task.split(":", 1)[1].split(".")[0] if ":" in task else "project"


def _leaf_label(task: str) -> str:
    """``convert_coreml:student.prefill.T16`` -> ``prefill T16``; ``bundle_coreml:student`` -> ``student``."""
    rest = task.split(":", 1)[-1]
    parts = rest.split(".")
    return " ".join(parts[1:]) if len(parts) > 1 else rest


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _depths(names: list[str], edges: set[tuple[str, str]]) -> dict[str, int] | None:
    """Longest path from a source to each name; None if there is a cycle."""
    preds = {n: [a for a, b in edges if b == n and a != n] for n in names}
    if any(a == b for a, b in edges):
        return None
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(n):
        if n in depth:
            return depth[n]
        if n in visiting:
            raise ValueError("cycle")
        visiting.add(n)
        depth[n] = 1 + max((visit(p) for p in preds[n]), default=-1)
        visiting.discard(n)
        return depth[n]

    try:
        for n in names:
            visit(n)
    except ValueError:
        return None
    return depth


def reduce(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Leave out each edge that a longer path implies (export -> bundle, when export -> convert ->
    bundle): the picture shows the pipeline, not every file dependency."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reachable(a, b) -> bool:  # b from a in two steps or more
        todo, seen = [c for c in succ.get(a, ()) if c != b], set()
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(succ.get(n, ()))
        return False

    return [(a, b) for a, b in edges if not reachable(a, b)]


def layout(nodes: dict[str, str], edges: list[tuple[str, str]]) -> dict:
    """Positions: {task: (x, y)}, bands [(model, y, height)], columns [(x, step)], width, height.

    A task's column is its step's depth in the graph of steps (checkpoint -> export -> convert ->
    bundle), so every model's tasks of one step share a column even where a model has no task of
    an earlier step; if the steps do not form a DAG, each task's own depth is used instead."""
    step_of = {n: n.split(":", 1)[0] for n in nodes}
    layer = _depths(list(dict.fromkeys(step_of.values())), {(step_of[a], step_of[b]) for a, b in edges})
    if layer is not None:
        layer = {n: layer[step_of[n]] for n in nodes}
    else:
        layer = _depths(list(nodes), set(edges))
    models = list(dict.fromkeys(_model(n) for n in nodes))
    ncols = 1 + max(layer.values(), default=0)
    pos, bands, y = {}, [], HEAD
    for m in models:
        cols = {c: sorted((n for n in nodes if _model(n) == m and layer[n] == c), key=lambda n: _natural(_leaf_label(n)))
                for c in range(ncols)}
        rows = max(len(v) for v in cols.values())
        height = rows * (NODE_H + GAP_Y) - GAP_Y + 2 * BAND_PAD + 14
        for c, members in cols.items():
            top = y + BAND_PAD + 14 + (rows - len(members)) * (NODE_H + GAP_Y) / 2
            for i, n in enumerate(members):
                pos[n] = (MARGIN + c * (NODE_W + GAP_X), top + i * (NODE_H + GAP_Y))
        bands.append((m, y, height))
        y += height + GAP_Y
    steps = []
    for c in range(ncols):
        names = [n.split(":", 1)[0] for n in nodes if layer[n] == c]
        steps.append((MARGIN + c * (NODE_W + GAP_X), max(set(names), key=names.count) if names else ""))
    width = MARGIN * 2 + ncols * (NODE_W + GAP_X) - GAP_X
    return {"pos": pos, "bands": bands, "columns": steps, "width": width, "height": y + 30}


def to_svg(nodes: dict[str, str], edges: list[tuple[str, str]], titles: dict[str, str] | None = None,
           caption: str = "") -> str:
    """``nodes``: task -> verdict; ``edges``: (prerequisite, dependant); ``titles``: task -> hover text."""
    titles = titles or {}
    L = layout(nodes, edges)
    pos, W, H = L["pos"], L["width"], L["height"] + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="#ffffff"/>']
    for x, step in L["columns"]:
        out.append(f'<text class="column" x="{x + NODE_W / 2:.0f}" y="{HEAD - 14}" text-anchor="middle" '
                   f'font-weight="bold" fill="#444">{escape(step)}</text>')
    for m, y, h in L["bands"]:
        out.append(f'<g class="band" data-model="{escape(m)}"><rect x="4" y="{y:.0f}" width="{W - 8}" height="{h:.0f}" '
                   f'rx="8" fill="#f7f7f7" stroke="#cccccc"/>'
                   f'<text x="12" y="{y + 14:.0f}" fill="#666" font-weight="bold">{escape(m)}</text></g>')
    for a, b in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
        mid = (sx + ex) / 2
        out.append(f'<path class="edge" data-from="{escape(a)}" data-to="{escape(b)}" '
                   f'd="M{sx:.1f},{sy:.1f} C{mid:.1f},{sy:.1f} {mid:.1f},{ey:.1f} {ex:.1f},{ey:.1f}" '
                   f'fill="none" stroke="#999999" stroke-width="1"/>')
    for n, verdict in nodes.items():
        fill, stroke, label = STYLE.get(verdict, ("#ffffff", "#000000", verdict))
        x, y = pos[n]
        dash = ' stroke-dasharray="4,3"' if verdict == "may-run" else ""
        out.append(f'<g class="node {escape(verdict)}" data-task="{escape(n)}" data-verdict="{escape(verdict)}">'
                   f'<title>{escape(titles.get(n, n))}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="5" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="1.5"{dash}/>'
                   f'<text x="{x + NODE_W / 2:.1f}" y="{y + 14:.1f}" text-anchor="middle">{escape(_leaf_label(n))}</text>'
                   f'<text x="{x + NODE_W / 2:.1f}" y="{y + 27:.1f}" text-anchor="middle" font-size="10" '
                   f'fill="#555">{escape(label)}</text></g>')
    lx, ly = MARGIN, L["height"] - 6
    for verdict, (fill, stroke, label) in STYLE.items():
        if verdict == "error" and "error" not in nodes.values():
            continue
        out.append(f'<g class="legend"><rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{lx + 16}" y="{ly}">{escape(label)}</text></g>')
        lx += 30 + 7 * len(label)
    if caption:
        out.append(f'<text class="caption" x="{MARGIN}" y="{ly + 20}" fill="#777" font-size="11">{escape(caption)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(nodes: dict[str, str], edges: list[tuple[str, str]], titles: dict[str, str] | None = None) -> str:
    titles = titles or {}
    lines = ["digraph build {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
             '  edge [color="#999999"];']
    for m in dict.fromkeys(_model(n) for n in nodes):
        lines.append(f"  subgraph {_q('cluster_' + m)} {{")
        lines.append(f'    label={_q(m)}; style="rounded,filled"; fillcolor="#f7f7f7"; color="#cccccc";')
        for n, verdict in nodes.items():
            if _model(n) != m:
                continue
            fill, stroke, label = STYLE.get(verdict, ("#ffffff", "#000000", verdict))
            style = ', style="rounded,filled,dashed"' if verdict == "may-run" else ""
            lines.append(f"    {_q(n)} [label={_q(n.split(':', 1)[0] + chr(10) + _leaf_label(n) + chr(10) + label).replace(chr(10), chr(92) + 'n')}, "
                         f"fillcolor={_q(fill)}, color={_q(stroke)}, tooltip={_q(titles.get(n, n))}{style}];")
        lines.append("  }")
    for a, b in edges:
        lines.append(f"  {_q(a)} -> {_q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
