"""What a person sees during and after a real build: progress lines, the summary table, the
report (report.json, report.html) and the graph (graph.dot, graph.svg, read back as XML)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from export.planner import graph, history
from scenario import Project

SVG = "{http://www.w3.org/2000/svg}"
LEAVES = 23  # checkpoint:judge, 6 exports, 6 conversions, 6 verifications, 2 bundles, 2 bundle verifications


pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def built(scenario_built, tmp_path_factory):
    """A project after one cold build, and that build's console output (the run's shared build)."""
    return scenario_built.copy(tmp_path_factory.mktemp("reported") / "project"), scenario_built.output


@pytest.fixture
def project(built, tmp_path) -> Project:
    return built[0].copy(tmp_path / "project")


def test_progress_says_start_and_end_of_every_task_and_sums_up(built):
    p, r = built
    out = r.stdout
    assert "\r" not in out and "\033" not in out  # not a terminal: whole lines only
    records = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    built_tasks = [n for n, rec in records.items() if rec["status"] == "built"]
    assert len(built_tasks) == LEAVES
    lines = out.splitlines()
    for name in built_tasks:
        start = [i for i, line in enumerate(lines) if line.endswith(f"] start       {name}")]
        end = [i for i, line in enumerate(lines) if f"] built       {name}  " in line]
        assert len(start) == 1 and len(end) == 1 and start[0] < end[0], name
        seconds = records[name]["seconds"]
        assert f"{name}  {seconds:.1f}s  {records[name]['peak_mb']:,.0f} MB" in lines[end[0]]
    total = int(lines[-1].split(" tasks:")[0])
    assert lines[-1].startswith(f"{total} tasks: {LEAVES} built, {total - LEAVES} up to date in ")
    header = next(i for i, line in enumerate(lines) if line.startswith("task ") and "peak" in line)
    table = {line.split()[0]: line.split()[1] for line in lines[header + 1:-1] if line.strip()}
    assert table == {n: "built" for n in built_tasks}


def test_no_op_build_prints_one_line_and_keeps_the_report_and_the_history(built, tmp_path):
    p = built[0].copy(tmp_path / "again")
    art, state = p.root / "artifacts", p.root / ".export"
    kept = {f: (art / f).read_bytes() for f in ("report.json", "report.html", "trace.json")}
    before = history.read(state)
    assert len(before) == 1 and not before[0].get("noop") and before[0]["counts"]["built"] == LEAVES
    r = p.doit()
    n = len(p.last_build())  # last_build.json still records every task's status
    assert set(p.last_build().values()) == {"up-to-date"}
    assert re.fullmatch(rf"{n} tasks up to date \(\d+\.\d s\)\n", r.stdout), r.stdout
    assert {f: (art / f).read_bytes() for f in kept} == kept  # the report still shows the real build
    after = history.read(state)
    assert after[:1] == before and len(after) == 2
    assert after[1]["noop"] is True and after[1]["counts"] == {"up-to-date": n}
    assert history.latest(state)["tasks"]["checkpoint:judge"]["status"] == "built"
    # -v 2 still lists every task
    r = p.doit("-v", "2")
    listed = [line.split("up to date  ")[1] for line in r.stdout.splitlines() if "] up to date  " in line]
    assert sorted(listed) == sorted(p.last_build()) and r.stdout.splitlines()[-1].startswith(f"{n} tasks up to date (")
    assert len(history.read(state)) == 3


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.ids = set(), [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.ids.update(v for k, v in attrs if k == "id")

    def handle_data(self, data):
        self.text.append(data)


def test_report_has_times_sizes_cache_hits_and_contracts(project):
    """A fresh checkout of a built project with the cache full: every task is restored, and the
    report says so, with each model's contract."""
    shutil.rmtree(project.root / "artifacts")
    shutil.rmtree(project.root / ".export")
    project.doit()
    art = project.root / "artifacts"
    report = json.loads((art / "report.json").read_text())
    statuses = project.last_build()
    assert {t["task"]: t["status"] for t in report["tasks"]} == statuses
    assert report["counts"]["restored"] == LEAVES and report["cache"] == {"hits": LEAVES, "misses": 0, "hit_rate": 1.0}
    rows = {t["task"]: t for t in report["tasks"]}
    bundle = rows["bundle_coreml:student"]
    sizes = json.loads((art / "last_build.json").read_text())["tasks"]["bundle_coreml:student"]["sizes"]
    assert bundle["bytes"] == sum(sizes.values()) > 0
    assert set(report["models"]) == {"student", "judge"}
    student = json.loads((art / "student" / "contract.json").read_text())
    assert report["models"]["student"] == student
    assert set(student["functions"]) == {f"{m}_T{t}" for m in ("prefill", "decode") for t in (16, 32)}

    page = (art / "report.html").read_text()
    parsed = _Text()
    parsed.feed(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags  # self-contained, no JS
    assert set(statuses) <= parsed.ids  # a row per task
    text = " ".join(parsed.text)
    for fn in student["functions"]:
        assert fn in text
    assert f"Cache: {LEAVES} hits, 0 misses (hit rate 100%)" in text
    # the timeline shows each restore as a cache restore inside its task's span
    trace = json.loads((art / "trace.json").read_text())
    restores = {e["args"]["task"] for e in trace["traceEvents"] if e.get("name") == "cache restore"}
    assert restores == {n for n, s in statuses.items() if s == "restored"}

    # doit report makes the same from the record
    (art / "report.json").unlink()
    r = project.doit("report")
    assert "report.html" in r.stdout
    again = json.loads((art / "report.json").read_text())
    assert again["tasks"] == report["tasks"] and again["models"] == report["models"]


def _svg_nodes(path) -> tuple[dict[str, ET.Element], list[tuple[str, str]]]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    nodes = {g.get("data-task"): g for g in root.iter(f"{SVG}g") if "node" in (g.get("class") or "").split()}
    edges = [(e.get("data-from"), e.get("data-to")) for e in root.iter(f"{SVG}path") if e.get("class") == "edge"]
    return nodes, edges


def test_graph_svg_nodes_are_the_plan_coloured_by_verdict(project):
    project.set_pyproject(precision="fp32")
    planned = {t["task"]: t["verdict"] for t in json.loads(project.doit("plan", "--json").stdout)["tasks"]}
    project.doit("graph")
    art = project.root / "artifacts"
    nodes, edges = _svg_nodes(art / "graph.svg")
    assert set(nodes) == set(planned)
    for name, g in nodes.items():
        assert g.get("data-verdict") == planned[name]
        rect = g.find(f"{SVG}rect")
        assert rect.get("fill") == graph.STYLE[planned[name]][0]
        assert g.find(f"{SVG}title").text.startswith(f"{name}: ")
    assert {n for n, v in planned.items() if v == "build"} == {f"convert_coreml:student.{m}.T{t}" for m in ("prefill", "decode") for t in (16, 32)}
    assert ("export_pytorch:student.decode.T32", "convert_coreml:student.decode.T32") in edges
    assert ("checkpoint:judge", "export_pytorch:judge.prefill.T16") in edges
    assert all(a in nodes and b in nodes for a, b in edges)
    # left to right: every edge leaves a node's right side for a node further right
    x = {n: float(g.find(f"{SVG}rect").get("x")) for n, g in nodes.items()}
    assert all(x[a] < x[b] for a, b in edges)
    dot = (art / "graph.dot").read_text()
    assert dot.startswith("digraph build {") and all(f'"{n}"' in dot for n in planned)
    assert '"export_pytorch:student.decode.T32" -> "convert_coreml:student.decode.T32";' in dot


def test_svg_layout_keeps_nodes_apart_and_bands_per_model():
    names = [f"{s}:{m}.{mode}.T{t}" for s in ("export_pytorch", "convert_coreml") for m in ("a", "b")
             for mode in ("prefill", "decode") for t in (16, 32, 64)]
    nodes = {n: "up-to-date" for n in names} | {"bundle_coreml:a": "build", "bundle_coreml:b": "may-run"}
    edges = [(n, n.replace("export_pytorch", "convert_coreml")) for n in names if n.startswith("export")]
    edges += [(n, f"bundle_coreml:{n.split(':')[1].split('.')[0]}") for n in names if n.startswith("convert")]
    svg = graph.to_svg(nodes, edges)
    root = ET.fromstring(svg)
    rects = {}
    for g in root.iter(f"{SVG}g"):
        if "node" in (g.get("class") or "").split():
            r = g.find(f"{SVG}rect")
            rects[g.get("data-task")] = tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
    assert set(rects) == set(nodes)
    boxes = list(rects.items())
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1:]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (a, b)
    # every node of model a sits above every node of model b
    assert max(y + h for n, (x, y, w, h) in rects.items() if ":a" in n) < min(y for n, (x, y, w, h) in rects.items() if ":b" in n)
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(x + w <= width and y + h <= height for x, y, w, h in rects.values())


def test_group_tasks_never_show_as_still_running(monkeypatch):
    """A group (``export_pytorch:T16``: no action, only task_dep) ends at once: no heartbeat names it
    (issue #20: '... export_pytorch:T16 still running (60s)' came long after it was done)."""
    import io
    import time

    from doit.task import Task

    from export.planner import reporter

    monkeypatch.setattr(reporter, "HEARTBEAT", 0.3)
    leaf = Task("export_pytorch:m.prefill.T16", actions=[(lambda: None, [], {})])
    group = Task("export_pytorch:T16", actions=None, task_dep=[leaf.name])
    slow = Task("convert_coreml:m.prefill.T16", actions=[(lambda: None, [], {})])
    out = io.StringIO()
    rep = reporter.BuildReporter(out, {})
    rep.initialize({t.name: t for t in (leaf, group, slow)}, [group.name, slow.name])
    for t in (leaf, group):
        rep.execute_task(t)
        rep.add_success(t)
    rep.execute_task(slow)  # still running
    time.sleep(2.5)
    rep.add_success(slow)
    rep.complete_run()
    text = out.getvalue()
    assert "convert_coreml:m.prefill.T16 still running" in text, text  # the heartbeat does run
    assert "export_pytorch:T16 still running" not in text, text


# --- the history, the timeline, the estimates ---------------------------------------------


def test_history_keeps_the_last_50_builds_and_the_no_ops_after_them(tmp_path):
    state = tmp_path / ".export"

    def build(i, noop=False):
        status = "up-to-date" if noop else "built"
        return {"started": f"build {i}", "seconds": float(i), "t0": 1000.0 + i,
                "tasks": {"export_pytorch:m.prefill.T16": {"status": status, "seconds": None if noop else 1.0 + i,
                                                           "peak_mb": 100 + i, "span": [1000.0 + i, 1001.0 + i]},
                          "prune_artifacts": {"status": "up-to-date"}}}

    for i in range(60):
        history.append(state, build(i))
        history.append(state, build(i, noop=True))
    entries = history.read(state)
    real = [e for e in entries if not e.get("noop")]
    assert [e["started"] for e in real] == [f"build {i}" for i in range(10, 60)]  # the last 50
    assert sum(1 for e in entries if e.get("noop")) == 50
    assert history.latest(state)["started"] == "build 59"
    for i in range(70):  # no-ops never replace the latest build, and each adds one line
        history.append(state, build(100 + i, noop=True))
    assert history.latest(state)["started"] == "build 59"
    assert len(history.read(state)) == 100 + 70
    history.append(state, build(200))  # trimmed when a build that did something comes
    entries = history.read(state)
    assert len([e for e in entries if not e.get("noop")]) == 50 and len([e for e in entries if e.get("noop")]) == 50
    trend = history.trends(history.builds(state))["export_pytorch"]
    assert trend["seconds"][-2:] == [60.0, 201.0] and trend["peak_mb"][-1] == 300


def check_trace(trace: dict, record: dict) -> dict[int, list[dict]]:
    """trace.json against the trace event format, and against the build's record; the spans by lane."""
    events = trace["traceEvents"]
    assert all(isinstance(e["ph"], str) and isinstance(e["pid"], int) for e in events)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    for e in spans:
        assert {"ph", "ts", "dur", "pid", "tid", "name", "cat", "args"} <= set(e), e
        assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["ts"] >= 0 and e["dur"] > 0, e
        assert e["tid"] in names, e  # every span is on a named track
    tasks = [e for e in spans if e["cat"] != "phase"]
    ran = {n for n, r in record["tasks"].items() if r["status"] in ("built", "restored", "failed")}
    assert {e["name"] for e in tasks} == ran and len(tasks) == len(ran)
    for e in tasks:
        assert e["cat"] == record["tasks"][e["name"]]["status"] and e["cname"]
    lanes: dict[int, list[dict]] = {}
    for e in sorted(tasks, key=lambda e: e["ts"]):
        lanes.setdefault(e["tid"], []).append(e)
    for tid, row in lanes.items():  # one step at a time on a lane
        for a, b in zip(row, row[1:]):
            assert a["ts"] + a["dur"] <= b["ts"], (names[tid], a["name"], b["name"])
    for ph in (e for e in spans if e["cat"] == "phase"):  # a phase lies within its task's span, on its lane
        parent = next(e for e in tasks if e["name"] == ph["args"]["task"])
        assert parent["tid"] == ph["tid"] and parent["ts"] <= ph["ts"] and ph["ts"] + ph["dur"] <= parent["ts"] + parent["dur"]
    json.dumps(trace)  # plain JSON
    return lanes


def _png(path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) pixel bytes) of an 8-bit non-interlaced PNG, decoded with zlib."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = head
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows


def _colours(w: int, rows: list[bytes], bpp: int) -> set[tuple[int, int, int]]:
    return {tuple(r[i:i + 3]) for r in rows for i in range(0, w * bpp, bpp)}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed and REQUIRE_CHROMIUM=1 (.ci/run installs it: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return exe


def screenshot(page, out, size=(1200, 1000)):
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={size[0]},{size[1]}",
                            page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    return out


def test_parallel_build_timeline_lanes_memory_waits_and_the_svg_in_chromium(built, tmp_path):
    """doit -n 2 under a budget that holds one step at a time: two lanes, steps waiting for memory, the
    memory reserved never above the budget; report.html's SVG drawn by a real Chromium."""
    p = built[0].copy(tmp_path / "parallel")
    for d in ("artifacts", ".cache"):
        shutil.rmtree(p.root / d)
    budget = 700  # every step reserves at least 400 MB (export/tasks.py NEED_BASE_MB): one fits at a time
    r = p.doit("-n", "2", "export_pytorch:T16", env={"MODEL_EXPORT_MEMORY_BUDGET_MB": str(budget)})
    art = p.root / "artifacts"
    record = json.loads((art / "last_build.json").read_text())
    trace = json.loads((art / "trace.json").read_text())
    lanes = check_trace(trace, record)
    assert len(lanes) == 2, lanes  # the two processes of -n 2
    waits = [e for e in trace["traceEvents"] if e.get("name") == "memory wait"]
    assert waits and "waiting for memory" in r.stderr
    levels = [e["args"]["MB"] for e in trace["traceEvents"] if e["ph"] == "C"]
    assert max(levels) <= budget and levels[-1] == 0 and trace["otherData"]["budget_mb"] == budget

    page = (art / "report.html").read_text()
    svg = ET.fromstring(page[page.index("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"timeline\""):page.index("</svg>") + 6])
    drawn = {g.get("data-task"): g.get("data-status") for g in svg.iter(f"{SVG}g") if g.get("class") == "span"}
    assert drawn == {e["name"]: e["cat"] for row in lanes.values() for e in row}
    assert len([t for t in svg.iter(f"{SVG}rect") if t.get("data-phase") == "memory wait"]) == len(waits)
    assert svg.find(f"{SVG}polygon[@id='memory']") is not None
    x0 = {g.get("data-task"): float(g.find(f"{SVG}rect").get("x")) for g in svg.iter(f"{SVG}g") if g.get("class") == "span"}
    first = min(trace["traceEvents"], key=lambda e: e["ts"] if e["ph"] == "X" and e["cat"] != "phase" else 1e18)
    assert min(x0.values()) == x0[first["name"]]  # drawn in time order

    shot = screenshot(art / "report.html", tmp_path / "report.png")
    w, h, rows = _png(shot)
    assert (w, h) == (1200, 1000)
    bpp = len(rows[0]) // w
    seen = _colours(w, rows, bpp)
    assert len(seen) > 50  # not an empty page
    assert (0xe8, 0xa3, 0x3d) in seen and (0x9e, 0xca, 0xe1) in seen  # built spans, the memory area
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><html><body></body></html>")
    bw, bh, brows = _png(screenshot(blank, tmp_path / "blank.png"))
    assert (bw, bh) == (w, h) and len(_colours(bw, brows, len(brows[0]) // bw)) < 5


def on_a_terminal(p: Project, *args: str) -> str:
    """Run ``doit args`` with its stdout on a pseudo-terminal; what it wrote there."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=p.root, env=p.env({"TERM": "xterm"}),
                            stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-3000:]
    return out.decode(errors="replace")


def test_plan_estimates_a_second_cold_build_from_its_history(tiny_built, tmp_path):
    from faults import STEPS as TINY_STEPS

    # the tiny project (faults.create_tiny: 8 steps of every cached kind), its history that of its one cold build
    p = tiny_built.copy(tmp_path / "second")
    fresh = p.copy(tmp_path / "fresh")
    shutil.rmtree(fresh.root / ".export")
    said = fresh.doit("plan").stdout.splitlines()[-2]
    assert said.startswith("estimate: no history of earlier builds yet"), said
    for d in ("artifacts", ".cache"):  # a cold build: no artifacts, an empty cache; the history stays
        shutil.rmtree(p.root / d)
    planned = json.loads(p.doit("plan", "--json").stdout)
    estimate = planned["estimate"]
    assert estimate["builds"] == 1 and estimate["without_history"] == [] and estimate["steps"] == len(TINY_STEPS)
    assert {t["basis"] for t in planned["tasks"] if t["verdict"] != "up-to-date"} == {"same task"}
    text = p.doit("plan").stdout.splitlines()[-2]
    assert text.startswith(f"estimate: about ") and f"for {len(TINY_STEPS)} steps (history of 1 build)" in text
    # the estimate is the history's: each step its recorded seconds, the whole their sum and the overhead (how
    # close that comes to the next build's wall time depends on the machine's load: a measurement, not a test)
    recorded = {t: r["seconds"] for t, r in history.read(p.root / ".export")[-1]["tasks"].items() if r["status"] == "built"}
    steps = [t for t in planned["tasks"] if t["verdict"] != "up-to-date"]
    assert {t["task"]: t["seconds"] for t in steps} == {t["task"]: round(recorded[t["task"]], 2) for t in steps}
    assert estimate["seconds"] >= round(sum(t["seconds"] for t in steps), 1)
    shown = on_a_terminal(p)  # the build, its output on a terminal: the live line says the time left
    assert set(p.last_build().values()) == {"built", "up-to-date"}
    live = [part for part in shown.split("\r") if part.startswith("\033[K  running ")]
    assert live and all(re.search(r", (about|at least) [0-9][^,\]]* left", part) for part in live), shown[-3000:]
    # a leaf never built: same step, scaled by its input size (its checkpoint is there)
    sets = json.loads((p.root / "shape_sets.json").read_text())
    sets["tiny"]["prefill"].append(64)
    p.set_shape_sets(sets)
    planned = {t["task"]: t for t in json.loads(p.doit("plan", "--json").stdout)["tasks"]}
    assert planned["export_pytorch:student.prefill.T64"]["basis"] == "same step, scaled by input size"
    assert planned["export_pytorch:student.prefill.T64"]["seconds"] > 0


def test_fast_no_op_stops_before_the_graph_and_trusts_only_unchanged_stats(built, tmp_path):
    p = built[0].copy(tmp_path / "fast")
    time.sleep(2.1)  # files younger than 2 s are not trusted (export/planner/noop.py RACY_SECONDS): no stamp
    p.doit()  # a copy: every stat differs, doit checks every task, and stamps what it found
    assert (p.root / ".export" / "noop-stamp.bin").exists()

    def loaded_graph(r) -> bool:
        return any(line.rstrip().endswith("| export.planner.tasks") for line in r.stderr.splitlines())

    r = p.doit(python_args=("-X", "importtime"))
    assert re.fullmatch(rf"{len(p.last_build())} tasks up to date \(\d+\.\d s\)\n", r.stdout) and not loaded_graph(r)
    assert set(p.last_build().values()) == {"up-to-date"} and history.read(p.root / ".export")[-1]["noop"]
    # another setting in the environment: the ordinary way (nothing to do all the same)
    r = p.doit(python_args=("-X", "importtime"), env={"MODEL_EXPORT_MEMORY_BUDGET_MB": "5000"})
    assert loaded_graph(r) and set(p.last_build().values()) == {"up-to-date"}
    p.doit()  # back to the plain command line: stamped again
    assert not loaded_graph(p.doit(python_args=("-X", "importtime")))
    # a byte changed in place inside a package, its size the same: not up to date, restored from the cache
    pkg = p.root / "artifacts" / "student" / "coreml" / "decode_T16.mlpackage"
    victim = next(f for f in pkg.rglob("model.mlmodel"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = p.doit(python_args=("-X", "importtime"))
    assert loaded_graph(r) and p.restored() == {"convert_coreml:student.decode.T16"}, r.stdout
