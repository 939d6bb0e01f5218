"""A build's timeline: ``artifacts/trace.json`` in the Chrome trace event format, and the same
timeline as an SVG drawing (inline in report.html, or alone: ``doit report --svg FILE``).

The trace is what Bazel's ``--profile`` writes and what Perfetto (ui.perfetto.dev) and
chrome://tracing open: one process (the build), one track (thread) per lane that ran steps (the doit
process, each process of ``doit -n N``, or each Dask worker), and on it

- a complete event (``"ph": "X"``, ``ts``/``dur`` in microseconds from the build's start) per task
  that ran, coloured by status (``cname``), its figures in ``args``;
- nested in it, its phases: ``memory wait`` (the step waited for the memory budget,
  export/memory.py), ``cache restore`` (its outputs came back from the cache), ``cache publish``;
- a counter (``"ph": "C"``) ``memory reserved``: the MB the running steps hold of the budget.

Made from a build record (what the reporter writes: each task's ``span``, ``phases``, ``lane``,
``held``). Plain data in, text out; no torch.
"""
from __future__ import annotations

import html
import json

# Chrome's trace viewer colours (its reserved color names) and the SVG's, by status or phase.
CNAME = {"built": "thread_state_runnable", "restored": "good", "failed": "terrible", "not-run": "grey",
         "memory wait": "bad", "cache restore": "rail_load", "cache publish": "rail_idle", "cache lookup": "rail_idle"}
FILL = {"built": "#e8a33d", "restored": "#4a90d9", "failed": "#d9534f", "not-run": "#bbbbbb",
        "memory wait": "#8e44ad", "cache restore": "#1f5fa8", "cache publish": "#7fb069", "cache lookup": "#c7c7c7"}
STATUSES = ("built", "restored", "failed")
SHOWN_PHASES = ("memory wait", "cache restore", "cache publish")
PID = 1


def _lane_label(lane, main_pid) -> str:
    if isinstance(lane, str):
        return f"worker {lane}"
    if lane == main_pid:
        return f"doit (pid {lane})"
    return f"lane pid {lane}"


def trace(record: dict) -> dict:
    """The Chrome trace of one build record (``{"tasks": {...}, "t0": wall start, "pid": ...}``)."""
    origin = record.get("t0")
    tasks = record.get("tasks", {})
    spans = []
    for name, r in tasks.items():
        if r.get("status") not in STATUSES:
            continue
        span = r.get("span") or r.get("at")
        if not span or span[0] is None or span[1] is None:
            continue
        spans.append((span[0], span[1], name, r))
    if origin is None:
        origin = min((s[0] for s in spans), default=0.0)
    spans.sort(key=lambda s: (s[0], s[1]))

    def us(t: float) -> int:
        return max(0, int(round((t - origin) * 1e6)))

    # lanes: a known lane (a process id, a Dask worker) is its own track; a task without one (a
    # failure, the prune) goes on the first track free at its time, else a new one.
    lanes: list[dict] = []
    by_key: dict = {}
    placed = []
    for start, end, name, r in spans:
        key = r.get("lane")
        if key is not None:
            if key not in by_key:
                by_key[key] = len(lanes)
                lanes.append({"label": _lane_label(key, record.get("pid")), "end": 0.0})
            i = by_key[key]
        else:
            i = next((j for j, ln in enumerate(lanes) if ln["end"] <= start), None)
            if i is None:
                i = len(lanes)
                lanes.append({"label": "doit", "end": 0.0})
        lanes[i]["end"] = max(lanes[i]["end"], end)
        placed.append((i + 1, start, end, name, r))

    events = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0,
               "args": {"name": f"doit build {record.get('started', '')}".strip()}}]
    for i, ln in enumerate(lanes):
        events.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": i + 1, "args": {"name": ln["label"]}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": i + 1, "args": {"sort_index": i + 1}})
    for tid, start, end, name, r in placed:
        ts, te = us(start), us(end)
        args = {k: r[k] for k in ("status", "seconds", "peak_mb", "reserved_mb", "input_bytes", "worker") if r.get(k) is not None}
        if r.get("sizes"):
            args["bytes"] = sum(r["sizes"].values())
        events.append({"ph": "X", "name": name, "cat": r["status"], "ts": ts, "dur": max(1, te - ts),
                       "pid": PID, "tid": tid, "cname": CNAME[r["status"]], "args": args})
        for phase, p0, p1 in r.get("phases") or ():
            if phase not in SHOWN_PHASES or p0 is None or p1 is None:
                continue
            a, b = max(ts, us(p0)), min(te, us(p1))  # nested inside its task
            if b <= a:
                continue
            events.append({"ph": "X", "name": phase, "cat": "phase", "ts": a, "dur": b - a, "pid": PID, "tid": tid,
                           "cname": CNAME[phase], "args": {"task": name}})
    # memory reserved over time: +MB when a step gets its reservation, -MB when it gives it back
    steps = []
    for name, r in tasks.items():
        held, mb = r.get("held"), r.get("reserved_mb")
        if held and mb and held[0] is not None and held[1] is not None:
            steps += [(us(held[0]), mb), (us(held[1]), -mb)]
    level = 0
    counter = [{"ph": "C", "name": "memory reserved", "pid": PID, "tid": 0, "ts": 0, "args": {"MB": 0}}] if steps else []
    for t, delta in sorted(steps, key=lambda s: (s[0], s[1])):
        level += delta
        counter.append({"ph": "C", "name": "memory reserved", "pid": PID, "tid": 0, "ts": t, "args": {"MB": level}})
    events += counter
    budget = next((r.get("budget_mb") for r in tasks.values() if r.get("budget_mb")), None)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "model-export", "started": record.get("started"), "seconds": record.get("seconds"),
                          "budget_mb": budget}}


def to_json(tr: dict) -> str:
    return json.dumps(tr, indent=1, sort_keys=True) + "\n"


# --- SVG ---------------------------------------------------------------------------------

LABEL_W, PLOT_W, ROW_H, AXIS_H, MEM_H, PAD = 190, 820, 26, 22, 90, 10


def _nice_step(total: float, ticks: int = 8) -> float:
    raw = max(total, 1e-3) / ticks
    for m in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if m >= raw:
            return float(m)
    return raw


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min" if not sec else f"{m}:{sec:02d}"


def to_svg(tr: dict, title: str | None = None) -> str:
    """The timeline as a standalone SVG: one row per lane with the task spans (coloured by status)
    and their phases, a time axis, and the memory reserved over time beneath."""
    events = tr.get("traceEvents", [])
    lanes = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    counter = [e for e in events if e.get("ph") == "C"]
    end_us = max([e["ts"] + e["dur"] for e in spans] + [e["ts"] for e in counter] + [1])
    total = end_us / 1e6
    tids = sorted(lanes)
    row = {tid: i for i, tid in enumerate(tids)}
    top = PAD + (18 if title else 0)
    lanes_h = max(1, len(tids)) * ROW_H
    mem_top = top + lanes_h + AXIS_H + 14
    width = LABEL_W + PLOT_W + 2 * PAD
    height = mem_top + MEM_H + 40

    def x(us_: float) -> float:
        return round(LABEL_W + PAD + PLOT_W * us_ / end_us, 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" class="timeline" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="-apple-system,system-ui,sans-serif" font-size="11">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>']
    if title:
        out.append(f'<text x="{PAD}" y="{PAD + 11}" font-size="13" font-weight="bold">{html.escape(title)}</text>')
    for tid in tids:
        y = top + row[tid] * ROW_H
        shade = "#f7f7f7" if row[tid] % 2 == 0 else "#ffffff"
        out.append(f'<rect x="{LABEL_W + PAD}" y="{y}" width="{PLOT_W}" height="{ROW_H}" fill="{shade}"/>')
        out.append(f'<text x="{PAD}" y="{y + ROW_H / 2 + 4}" class="lane">{html.escape(lanes[tid])}</text>')
    # time axis
    step = _nice_step(total)
    axis_y = top + lanes_h
    out.append(f'<line x1="{LABEL_W + PAD}" y1="{axis_y}" x2="{LABEL_W + PAD + PLOT_W}" y2="{axis_y}" stroke="#999"/>')
    t = 0.0
    while t <= total + 1e-9:
        xt = x(t * 1e6)
        out.append(f'<line x1="{xt}" y1="{top}" x2="{xt}" y2="{axis_y + 4}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{xt}" y="{axis_y + 16}" text-anchor="middle" fill="#555">{_fmt_s(t)}</text>')
        t += step
    # spans: tasks fill their row, phases are bars along its foot
    for e in spans:
        if e["tid"] not in row:
            continue
        y = top + row[e["tid"]] * ROW_H
        x0, x1 = x(e["ts"]), x(e["ts"] + e["dur"])
        w = max(1.0, round(x1 - x0, 2))
        tip = html.escape(f"{e['name']}: {e.get('cat')} {e['dur'] / 1e6:.2f} s"
                          + "".join(f", {k} {v}" for k, v in (e.get("args") or {}).items() if k not in ("status", "task")))
        if e.get("cat") == "phase":
            colour = FILL.get(e["name"], "#888")
            out.append(f'<rect class="phase" data-phase="{html.escape(e["name"])}" data-task="{html.escape(e["args"].get("task", ""))}" '
                       f'x="{x0}" y="{y + ROW_H - 8}" width="{w}" height="5" fill="{colour}"><title>{tip}</title></rect>')
            continue
        colour = FILL.get(e.get("cat"), "#888")
        # the longest that fits: the task, its leaf (model.mode.T), its T
        leaf = e["name"].split(":", 1)[-1]
        label = next((t for t in (e["name"], leaf, leaf.rsplit(".", 1)[-1]) if w > 6.5 * len(t) + 6), "")
        out.append(f'<g class="span" data-task="{html.escape(e["name"])}" data-status="{html.escape(e.get("cat", ""))}">'
                   f'<rect x="{x0}" y="{y + 3}" width="{w}" height="{ROW_H - 6}" rx="2" fill="{colour}" stroke="#ffffff" '
                   f'stroke-width="0.5"><title>{tip}</title></rect>'
                   + (f'<text x="{x0 + 3}" y="{y + ROW_H / 2 + 2}" fill="#222" font-size="10">{html.escape(label)}</text>' if label else "")
                   + "</g>")
    # memory reserved beneath
    budget = (tr.get("otherData") or {}).get("budget_mb")
    peak = max([e["args"]["MB"] for e in counter] + [1])
    scale_top = max(peak, 1)
    out.append(f'<text x="{PAD}" y="{mem_top + 12}" class="lane">memory reserved</text>')
    out.append(f'<text x="{PAD}" y="{mem_top + 26}" fill="#555">peak {peak:,.0f} MB'
               + (f" of {budget:,.0f}" if budget else "") + "</text>")
    base = mem_top + MEM_H
    out.append(f'<rect x="{LABEL_W + PAD}" y="{mem_top}" width="{PLOT_W}" height="{MEM_H}" fill="#fafafa" stroke="#e3e3e3"/>')
    if counter:
        pts, level = [f"{x(0)},{base}"], 0
        for e in counter:
            xe = x(e["ts"])
            pts.append(f"{xe},{round(base - MEM_H * level / scale_top, 2)}")
            level = e["args"]["MB"]
            pts.append(f"{xe},{round(base - MEM_H * level / scale_top, 2)}")
        pts.append(f"{x(end_us)},{round(base - MEM_H * level / scale_top, 2)}")
        pts.append(f"{x(end_us)},{base}")
        out.append(f'<polygon id="memory" points="{" ".join(pts)}" fill="#9ecae1" stroke="#3182bd" stroke-width="1">'
                   f'<title>memory reserved, peak {peak:,.0f} MB</title></polygon>')
    # legend
    ly = base + 24
    lx = LABEL_W + PAD
    for name in ("built", "restored", "failed", "memory wait", "cache restore", "cache publish"):
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{FILL[name]}"/>'
                   f'<text x="{lx + 14}" y="{ly}">{name}</text>')
        lx += 24 + 7 * len(name)
    out.append(f'<text x="{LABEL_W + PAD + PLOT_W}" y="{ly}" text-anchor="end" fill="#555">{total:.1f} s</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
