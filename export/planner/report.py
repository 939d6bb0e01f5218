"""The build report: ``<artifacts>/report.json`` and a readable, self-contained ``report.html``.

Made from a build's record (what ``last_build.json`` holds: each task's status, seconds, peak
memory, output sizes, its span on its lane), each model's aggregate contract
(``<artifacts>/<model>/contract.json``) and the history of builds (export/history.py): the timeline
of the build (inline SVG, export/timeline.py, with the memory reserved beneath) and the trend of each
step's seconds and peak memory. Written by the reporter at the end of every build that did
something (a no-op leaves it), and by ``doit report`` from the latest such build.
Plain data in, files out; no torch, no config, no JavaScript, nothing fetched.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from .. import atomic
from .recipe_report import recipe_tables, to_html as recipes_html
from . import history, timeline

STATUSES = ("built", "restored", "up-to-date", "failed", "not-run")


def _step(name: str) -> str:
    return name.split(":", 1)[0]


def build_report(artifacts: Path, record: dict, state: Path | None = None) -> dict:
    """The report of one build: ``record`` is ``{"tasks": {name: rec}, "started": ..., "seconds": ...}``;
    ``state``: the state folder whose history gives the trends."""
    tasks = record.get("tasks", {})
    rows = []
    for name, rec in sorted(tasks.items()):
        sizes = rec.get("sizes") or {}
        rows.append({"task": name, "step": _step(name), "status": rec.get("status"), "seconds": rec.get("seconds"),
                     "peak_mb": rec.get("peak_mb"), "bytes": sum(sizes.values()) if sizes else None,
                     "outputs": sorted((rec.get("outputs") or {}).keys()), "error": rec.get("error"),
                     "verdict": rec.get("verdict")})
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    looked = counts["built"] + counts["restored"]
    steps: dict[str, dict] = {}
    for r in rows:
        s = steps.setdefault(r["step"], {"tasks": 0, "seconds": 0.0, **{k: 0 for k in STATUSES}})
        s["tasks"] += 1
        s[r["status"]] = s.get(r["status"], 0) + 1
        s["seconds"] = round(s["seconds"] + (r["seconds"] or 0), 3)
    return {
        "schema": "model-export/report", "schema_version": 1,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started": record.get("started"), "seconds": record.get("seconds"),
        "counts": counts,
        "cache": {"hits": counts["restored"], "misses": counts["built"],
                  "hit_rate": round(counts["restored"] / looked, 3) if looked else None},
        "steps": steps,
        "tasks": rows,
        "models": models(artifacts),
        "recipes": recipe_tables(artifacts),  # export/planner/recipe_report.py
        "device": device_rows(artifacts),
        "timeline": timeline.trace(record),
        "trends": history.trends(history.builds(state)) if state is not None else {},
        "history": _history_counts(state),
    }


def device_rows(artifacts: Path) -> list[dict]:
    """Every package's figures against its devices' limits (export/coreml/checks.py, written in its manifest by
    the step that built it): one row per package and function, leaves and bundles alike."""
    rows = []
    for manifest in sorted(Path(artifacts).glob("*/**/*.mlpackage.manifest.json")):
        try:
            device = json.loads(manifest.read_text()).get("device")
        except (OSError, ValueError):
            continue
        if not device:
            continue
        package = manifest.relative_to(artifacts).as_posix().removesuffix(".manifest.json")
        problems = device.get("problems", [])
        for fn, f in sorted(device.get("functions", {}).items()):
            rows.append({"package": package, "function": fn, "target": device.get("target"),
                         "weight_file_bytes": f.get("weight_file_bytes"), "max_dim": f.get("max_dim"),
                         "max_dim_tensor": f.get("max_dim_tensor"), "ops": f.get("ops"),
                         "problems": [p["line"] for p in problems if fn in p["function"].split(", ")]})
    return rows


def _device_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    parts = ["<h2>Device limits</h2><p class=muted>Per package and function: the weight file a device loads "
             "(about 1 GB per file on iOS, 2 GB on macOS), the largest tensor dimension (16384 on the Neural Engine) "
             "and the op count (export/coreml/checks.py).</p>",
             "<table><tr><th>package</th><th>function</th><th>target</th><th>weight file</th><th>largest dimension</th>"
             "<th>ops</th><th></th></tr>"]
    for r in rows:
        bad = "; ".join(r["problems"])
        parts.append(f"<tr><td><code>{_e(r['package'])}</code></td><td>{_e(r['function'])}</td><td>{_e(r['target'])}</td>"
                     f"<td class=n>{_mb(r['weight_file_bytes'])}</td>"
                     f"<td class=n>{_e(r['max_dim'])} <span class=muted>{_e(r['max_dim_tensor'] or '')}</span></td>"
                     f"<td class=n>{_e(r['ops'])}</td><td class='{'failed' if bad else ''}'>{_e(bad)}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _history_counts(state: Path | None) -> dict:
    if state is None:
        return {"builds": 0, "noops": 0}
    entries = history.read(state)
    return {"builds": sum(1 for e in entries if not e.get("noop")), "noops": sum(1 for e in entries if e.get("noop"))}


def models(artifacts: Path) -> dict:
    """Each model's aggregate contract (``<artifacts>/<model>/contract.json``), by model name."""
    out = {}
    for path in sorted(Path(artifacts).glob("*/contract.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            out[path.parent.name] = {"error": f"{path}: {e}"}
            continue
        if "chain" not in data:
            out[path.parent.name] = data
            continue
        for link in data["chain"]:  # a parted model: each part's bundle contract, as <model>.<part>
            part = path.parent / link.get("contract", "")
            try:
                out[f"{path.parent.name}.{link['part']}"] = json.loads(part.read_text())
            except (OSError, ValueError, KeyError) as e:
                out[f"{path.parent.name}.{link.get('part')}"] = {"error": f"{part}: {e}"}
    return out


def write(artifacts: Path, report: dict) -> tuple[Path, Path]:
    artifacts = Path(artifacts)
    j, h = artifacts / "report.json", artifacts / "report.html"
    atomic.write_text(j, json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic.write_text(h, to_html(report))
    return j, h


# --- HTML ---------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 -apple-system,system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.built{color:#b35c00}.restored{color:#1f5fa8}.up-to-date{color:#2e7d32}.failed,.not-run{color:#c62828}
.bar{display:inline-block;height:.7em;background:#e8a33d;vertical-align:middle}
code{font-size:.92em}.muted{color:#777}
svg.timeline{max-width:100%;height:auto;border:1px solid #eee}
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _shape(io: list) -> str:
    return ", ".join(f"{_e(x.get('name'))} {_e(x.get('dtype'))}{_e(x.get('shape'))}" for x in io or [])


def _verdict_html(verdict) -> str:
    """verify_coreml's errors per output (export/coreml/verify.py), one line under its task."""
    if not verdict:
        return ""
    outs = verdict.get("outputs") or {}
    if not outs and verdict.get("functions"):
        outs = {f"{fn} {o}": e for fn, v in verdict["functions"].items() for o, e in (v.get("outputs") or {}).items()}
    return "<div class=muted>" + "; ".join(
        f"{_e(o)}: max abs {e.get('max_abs', 0):.2g}, rel {e.get('rel', 0):.2g}" for o, e in outs.items()) + "</div>"


def to_html(report: dict) -> str:
    c, cache = report["counts"], report["cache"]
    hit = "n/a" if cache["hit_rate"] is None else f"{cache['hit_rate']:.0%}"
    longest = max((r["seconds"] or 0 for r in report["tasks"]), default=0) or 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>model-export build report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>model-export build report</h1>",
        f"<p>Started {_e(report.get('started'))}, {_e(report.get('seconds'))} s. "
        + ", ".join(f"<span class='{s}'>{n} {s}</span>" for s, n in c.items() if n)
        + f". Cache: {cache['hits']} hits, {cache['misses']} misses (hit rate {hit}).</p>",
        "<h2>Timeline</h2>",
        "<p class=muted>One row per lane (the doit process, each process of <code>doit -n N</code>, each Dask worker); "
        "each task that ran, coloured by status, with its memory waits and cache restores beneath it; the memory the "
        "running steps reserved under the budget. The same data as <code>trace.json</code> (open it in "
        "ui.perfetto.dev or chrome://tracing).</p>",
        timeline.to_svg(report["timeline"]) if report.get("timeline") else "<p class=muted>No timeline.</p>",
        "<h2>Steps</h2><table><tr><th>step</th><th>tasks</th><th>built</th><th>restored</th><th>up to date</th>"
        "<th>failed</th><th>seconds</th></tr>",
    ]
    for step, s in report["steps"].items():
        parts.append(f"<tr><td>{_e(step)}</td><td class=n>{s['tasks']}</td><td class=n>{s['built']}</td>"
                     f"<td class=n>{s['restored']}</td><td class=n>{s['up-to-date']}</td>"
                     f"<td class=n>{s['failed'] + s['not-run']}</td><td class=n>{s['seconds']:.1f}</td></tr>")
    parts.append("</table>")
    parts += _trends_html(report.get("trends") or {}, report.get("history") or {})
    parts.append("<h2>Tasks</h2><table><tr><th>task</th><th>status</th><th>seconds</th><th></th>"
                 "<th>peak memory</th><th>size</th></tr>")
    for r in report["tasks"]:
        secs = r["seconds"]
        bar = f"<span class=bar style='width:{max(1, int(120 * (secs or 0) / longest))}px'></span>" if secs else ""
        peak = f"{r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else ""
        err = f"<div class=muted>{_e(r['error'][-300:])}</div>" if r.get("error") else ""
        err += _verdict_html(r.get("verdict"))
        parts.append(f"<tr id='{_e(r['task'])}'><td><code>{_e(r['task'])}</code>{err}</td>"
                     f"<td class='{_e(r['status'])}'>{_e(r['status'])}</td>"
                     f"<td class=n>{'' if secs is None else f'{secs:.1f}'}</td><td>{bar}</td>"
                     f"<td class=n>{peak}</td><td class=n>{_mb(r['bytes'])}</td></tr>")
    parts.append("</table>" + recipes_html(report.get("recipes") or {}) + _device_html(report.get("device") or [])
                 + "<h2>Models</h2>")
    if not report["models"]:
        parts.append("<p class=muted>No model contract yet (the bundles have not been built).</p>")
    for name, contract in report["models"].items():
        parts.append(f"<h3 id='model-{_e(name)}'>{_e(name)}</h3>")
        if "error" in contract:
            parts.append(f"<p class=failed>{_e(contract['error'])}</p>")
            continue
        ets = contract.get("enumerated_T") or {}
        parts.append(f"<p>architecture <code>{_e(contract.get('architecture'))}</code>; enumerated T: "
                     + "; ".join(f"{_e(m)} {_e(', '.join(map(str, t)))}" for m, t in ets.items()) + "</p>")
        parts.append("<table><tr><th>function</th><th>dtype</th><th>inputs</th><th>outputs</th><th>states</th></tr>")
        for fn, entry in (contract.get("functions") or {}).items():
            parts.append(f"<tr><td><code>{_e(fn)}</code></td><td>{_e(entry.get('dtype'))}</td><td>{_shape(entry.get('inputs'))}</td>"
                         f"<td>{_shape(entry.get('outputs'))}</td><td>{_shape(entry.get('states'))}</td></tr>")
        parts.append("</table>")
    parts.append(f"<p class=muted>Generated {_e(report['generated'])} by model-export.</p></body></html>\n")
    return "\n".join(parts)


def _spark(values: list, colour: str) -> str:
    """A small inline SVG line of ``values`` (None skipped), oldest left."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    if not pts:
        return ""
    w, h, top = 120, 24, max(v for _, v in pts) or 1
    n = max(len(values) - 1, 1)
    xy = [(round(2 + (w - 4) * i / n, 1), round(h - 2 - (h - 4) * v / top, 1)) for i, v in pts]
    line = " ".join(f"{x},{y}" for x, y in xy)
    last = xy[-1]  # the latest build, marked (alone, it is the whole trend)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' class=spark width='{w}' height='{h}' viewBox='0 0 {w} {h}'>"
            f"<polyline points='{line}' fill='none' stroke='{colour}' stroke-width='1.5'/>"
            f"<circle cx='{last[0]}' cy='{last[1]}' r='2.5' fill='{colour}'/></svg>")


def _trends_html(trends: dict, counts: dict) -> list[str]:
    parts = [f"<h2>Trends</h2><p class=muted>Each step's built seconds (summed over its tasks) and largest peak memory in "
             f"the last {counts.get('builds', 0)} builds that did something (oldest left; "
             f"{counts.get('noops', 0)} no-op builds since are not drawn).</p>"]
    if not trends:
        return parts + ["<p class=muted>No history yet.</p>"]
    parts.append("<table><tr><th>step</th><th>builds</th><th>last seconds</th><th>seconds</th>"
                 "<th>last peak</th><th>peak memory</th></tr>")
    for step, t in trends.items():
        peak = t["peak_mb"][-1]
        parts.append(f"<tr><td>{_e(step)}</td><td class=n>{len(t['seconds'])}</td>"
                     f"<td class=n>{t['seconds'][-1]:.1f}</td><td>{_spark(t['seconds'], '#e8a33d')}</td>"
                     f"<td class=n>{'' if peak is None else f'{peak:,.0f} MB'}</td><td>{_spark(t['peak_mb'], '#3182bd')}</td></tr>")
    parts.append("</table>")
    return parts
