"""What a person sees during and after a real build: progress lines, the summary table, the
report (report.json, report.html) and the graph (graph.dot, graph.svg, read back as XML)."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from export.planner import graph
from scenario import Project

SVG = "{http://www.w3.org/2000/svg}"
LEAVES = 15  # checkpoint:judge, 6 exports, 6 conversions, 2 bundles


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


def test_no_op_build_says_up_to_date_and_has_no_table(built, tmp_path):
    p = built[0].copy(tmp_path / "again")
    r = p.doit()
    lines = r.stdout.splitlines()
    assert sum(1 for line in lines if "] up to date  " in line) == len(p.last_build())
    assert not any(line.startswith("task ") for line in lines)
    assert lines[-1].startswith(f"{len(p.last_build())} tasks: {len(p.last_build())} up to date in ")


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
