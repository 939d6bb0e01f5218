"""The doit task generators: the graph, its names and its keys.

For each model m, mode and T of m's shape set:

    checkpoint:m (demo only) -> export_pytorch:m.mode.T -> convert_coreml:m.mode.T -> verify_coreml:m.mode.T
        -> bundle_coreml:m -> verify_coreml:m (each function of the bundle reproduces its leaf package)
    export_onnx:m.mode.T (the ONNX debug path; not in the default set)

Groups ``export_pytorch:T<n>``, ``convert_coreml:T<n>`` and ``verify_coreml:T<n>`` select every
model and mode at one T; verify_coreml runs for models that export an ExportedProgram. A
task's key is (1) its file inputs, by xxh3 content digest
(``ContentChecker``), (2) its config slice, code digest and toolchain versions
(``config_changed``), and (3) its outputs being what it last wrote
(``outputs_intact``). The steps themselves are declared in export/stepdefs.py, their
code keys derived in export/codekey.py. Nothing here imports torch or coremltools.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskFailed
from doit.tools import config_changed

from .. import checkpoint_files
from .. import config as config_mod
from .. import parts as parts_mod
from .. import settings
from . import depfile, lock, written
from ..codekey import CodeKeys
from ..contract import entry_name
from ..digest import StatCache, bytes_digest
from ..errors import ExportError
from ..layout import LAST_BUILD, STATE_DIR, manifest_of
from ..stepdefs import STEPS, contract_shapes
from ..toolchain import versions
from .reporter import BuildReporter


class _State:
    """What the generators share: the config, the stat cache, the code keys. Set by ``setup``; changed
    only by this module's functions."""

    config: config_mod.Config | None = None
    stat: StatCache | None = None
    code: CodeKeys | None = None
    cache = None  # export.cache.Cache, made on first use (a no-op build never imports it)
    parts: dict = {}  # model name -> PartsPlan, for the parted models (export/parts.py)
    ledger = None  # export.planner.memory.Ledger: the build's memory budget


S = _State()


class ContentChecker(FileChangedChecker):
    """doit's ``check_file_uptodate``: a file changed when its xxh3 digest did."""

    def check_modified(self, file_path, file_stat, state):
        return state != _stat().file(file_path, file_stat)

    def get_state(self, dep, current_state):
        digest = _stat().file(dep)
        return None if digest == current_state else digest


def _stat() -> StatCache:
    if S.stat is None:
        S.stat = StatCache(Path(STATE_DIR) / "stat-cache.sqlite")
    return S.stat


def stat_cache() -> StatCache:
    """The build's stat cache (file digests by stat)."""
    return _stat()


def read_only(stat: StatCache) -> None:
    """Plan without writing: digests come from ``stat`` (a read-only stat cache, export/planner/plan.py)."""
    S.stat = stat
    S.code = CodeKeys(stat)


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the export package that this process imported


def check_package(root: Path) -> None:
    """The code that builds, and is keyed, must be the project's own ``export/`` beside dodo.py.

    The ``doit`` console script imports ``export`` (its commands are plugins of the package) from
    wherever the virtual environment installed it before dodo.py loads; in a second checkout sharing
    that environment it would be the other checkout's code. A project without an ``export/`` folder
    builds with the installed package, whatever it is."""
    own = root / PACKAGE_DIR.name
    if own.is_dir() and own.resolve() != PACKAGE_DIR:
        print(f"error: {root / 'dodo.py'}: this project's code is {own}, but doit imported {PACKAGE_DIR} "
              f"(installed from another checkout); run `./dev build` or `python -m doit` here, or "
              f"`pip install -e {root}` to make this checkout the installed one", file=sys.stderr)
        sys.exit(2)


def setup(dodo_file: str, argv: list[str]) -> dict:
    """Load the config (exit 2 with one line naming file and field if it is wrong), take the
    project lock for building commands, and return DOIT_CONFIG."""
    root = Path(dodo_file).resolve().parent
    check_package(root)
    try:
        S.config = config_mod.load(root)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _check_checkpoints_exist()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    if lock.command_of(argv) in lock.READ_ONLY:  # plan, why, graph, list...: the code keys too read it, never write it
        from ..digest import ReadOnlyStatCache

        S.stat = ReadOnlyStatCache(state / "stat-cache.sqlite")
    else:
        S.stat = StatCache(state / "stat-cache.sqlite")
    S.code = CodeKeys(S.stat)
    _plan_parts(state, write=lock.command_of(argv) not in lock.READ_ONLY)
    lock.acquire(state / "lock", argv)
    depfile.check(state / "doit.sqlite", repair=lock.command_of(argv) not in lock.READ_ONLY)
    return {
        "dep_file": str(state / "doit.sqlite"),
        "backend": "sqlite3",
        "check_file_uptodate": ContentChecker,
        "reporter": BuildReporter.writing_to(S.config.artifacts / LAST_BUILD, state, S.config),
        "default_tasks": ["checkpoint", "export_pytorch", "convert_coreml", "verify_coreml", "compress_coreml", "bundle_coreml",
                          "prune_artifacts"],
        "verbosity": 1,
    }


class PartsPlan:
    """A parted model's parts (export/parts.py) and what each part's key covers of the checkpoint."""

    def __init__(self, info, parts, digests: dict[str, str]):
        self.info, self.parts, self.digests = info, parts, digests

    def kwargs(self, part) -> dict:
        """The export step's ``part``: its plan, its digest (config + its tensors) and the bytes it reads."""
        return {**part.to_json(), "digest": self.digests[part.name], "bytes": part.checkpoint_bytes}


def _plan_parts(state: Path, write: bool = True) -> None:
    """Plan the parts of every parted model from its checkpoint's headers (no torch) before any step runs; a
    plan that cannot be (more chunks than layers, a part over max_part_mb, a model type that cannot be cut) is
    one error line naming pyproject.toml and the field. Each part's digest covers the model config and the
    part's own tensors (read once per file content, export/parts.py ``tensor_digests``)."""
    S.parts = {}
    pyproject = S.config.root / "pyproject.toml"
    for m in S.config.models:
        if m.parts is None:
            continue
        try:
            info = parts_mod.index(S.config.root / m.checkpoint)
            plan = parts_mod.plan(m, info, file=pyproject)
            digests = parts_mod.tensor_digests(info, state if write else None, digest=_stat().file)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        S.parts[m.name] = PartsPlan(info, plan, {p.name: parts_mod.part_digest(info, p, digests) for p in plan})


def _interrupted(signum, frame):
    """Ctrl-C: one line instead of doit's traceback. Outputs appear atomically, so what finished is kept."""
    print("interrupted: the build stopped; finished steps are kept, run doit again to go on", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _check_checkpoints_exist() -> None:
    """A checkpoint file that is not there is a config error (doit would only say "Dependent file ... does not exist")."""
    for i, m in enumerate(S.config.models):
        if m.is_demo:
            continue
        try:
            files = checkpoint_files.input_files(S.config.root / m.checkpoint)
        except ExportError as e:  # a model folder whose shard index is not one
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        for f in files:
            if not f.exists():
                print(f"error: {f}: tool.export.models[{i}].checkpoint: no such checkpoint file (model {m.name!r})",
                      file=sys.stderr)
                sys.exit(2)


# --- actions and up-to-date checks -----------------------------------------


def rel(p: Path) -> str:
    """``p`` relative to the project (how tasks name their files: a copied project keeps its state)."""
    return os.path.relpath(p, S.config.root)


def outputs_intact(task, values):
    """Up to date only if every output still has the digest the task last gave it."""
    recorded = values.get("outputs")
    if not recorded:
        return False
    for path, digest in recorded.items():
        p = S.config.root / path
        if not p.exists():
            return False
        try:
            if _stat().any(p) != digest:
                return False
        except OSError:
            return False
    return True


def build_cache():
    """The build's cache (export/cache/store.py), made on first use: a no-op build never imports it."""
    if S.cache is None:
        from ..cache.store import Cache

        c = S.config.cache
        S.cache = Cache.from_settings(local=c.local, remote=c.remote, read_only=c.read_only,
                                      log=lambda msg: print(msg, file=sys.stderr))
        if S.cache.pending():  # entries published locally only while the shared store was out of reach
            n = S.cache.upload_pending()
            if n:
                print(f"remote cache: uploaded {n} entr{'y' if n == 1 else 'ies'} built while {S.cache.remote_url} "
                      "was out of reach", file=sys.stderr)
    return S.cache


def role(rel: str) -> str:
    """What a file is to the build, whatever this checkout's ``artifacts`` setting: a path under the
    artifacts folder is named from it (``artifacts/<model>/exported/prefill_T16.pt2``, the very path with
    the default setting); any other path (a user's checkpoint) by itself. Cache keys and manifests use
    roles, so that checkouts with different artifacts folders share entries (tests/test_cache_roles.py)."""
    p = S.config.root / rel
    try:
        return "artifacts/" + p.relative_to(S.config.artifacts).as_posix()
    except ValueError:
        return rel


def action_key(key: dict, inputs: list[str]) -> str:
    """The cache key of one action: its key dict plus the content digests of its input files."""
    return action_key_of(key, {rel: _stat().file(S.config.root / rel) for rel in inputs})


def action_key_of(key: dict, digests: dict[str, str]) -> str:
    """The cache key of one action from its input digests by path (``doit plan`` passes the digests it
    predicts); the key holds them by role."""
    by_role = {role(rel): d for rel, d in digests.items()}
    return bytes_digest(json.dumps({"key": key, "inputs": by_role}, sort_keys=True).encode())


def output_roles(rels: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the roles of outputs ``rels``, role -> path): what ``Cache.get``/``put`` take."""
    roles = [role(rel) for rel in rels]
    return roles, dict(zip(roles, rels))


def run_step(step: str, kwargs: dict, outputs: list[Path], task_name: str, key: dict, inputs: list[str],
             arch: str | None = None):
    """The action of every heavy task: restore its outputs from the cache, or run the step in the
    worker and publish them. Returns the outputs' digests (what ``outputs_intact`` checks).

    With ``MODEL_EXPORT_NIGHTLY=1`` nothing is restored: every step runs, and each output digest is
    compared with the cached one (``reproducible`` in the task's values).
    """
    from ..cache.store import StepOutputsMissing, finish_step
    from ..runner import worker

    entered = time.time()  # the timeline (export/planner/timeline.py): this action's span on its lane, and its phases
    lane = os.getpid()     # a doit process: the main one, or one of ``doit -n N``
    rels = [rel(p) for p in outputs]
    roles, where = output_roles(rels)
    akey = action_key(key, inputs)
    cache = build_cache()
    nightly = settings.nightly()
    state = S.config.root / STATE_DIR
    # before anything is written: where this step's outputs and their temporaries may appear
    written.intend(state, rels + ([rel(Path(kwargs["out_dir"]) / ".write-check")] if "out_dir" in kwargs else []))
    in_bytes = input_bytes(kwargs, inputs)
    if not nightly:
        restored = cache.get(akey, S.config.root, roles, where)
        if restored is not None:
            written.wrote(state, restored)
            done = time.time()
            return {"outputs": restored, "restored": True, "action_key": akey,
                    "sizes": {rel: _size(p) for rel, p in zip(rels, outputs)}, "input_bytes": in_bytes,
                    "lane": lane, "span": [entered, done], "phases": [["cache restore", entered, done]],
                    **_verdict(step, outputs, task_name)}
    looked = time.time()
    log = S.config.root / STATE_DIR / "logs" / f"{task_name.replace(':', '__')}.log"
    need = need_mb(step, kwargs, inputs)
    address = dask_address()
    if address:
        return _run_on_cluster(address, step, kwargs, outputs, task_name, key, inputs, akey, need, log, nightly, arch,
                               entered=entered, in_bytes=in_bytes)
    try:
        with _ledger().reserve(task_name, need) as held:
            started, wall = time.monotonic(), time.time()
            measured = worker.run(step, kwargs, log)
            ended = time.time()
    except ExportError as e:
        return TaskFailed(f"error: {e}")
    except worker.StepFailed as e:
        return TaskFailed(f"error: {task_name}: {e}")
    seconds = round(time.monotonic() - started, 3)
    publish = time.time()
    try:
        done = finish_step(cache, akey, S.config.root, rels, {"task": task_name, "seconds": seconds,
                                                              "toolchain": key["tools"]},
                           nightly=nightly, digest=_stat().any, roles=roles)
    except StepOutputsMissing as e:
        return TaskFailed(f"error: {task_name}: the step did not write {e.missing} (log: {log})")
    written.wrote(state, done.digests)
    values = {"outputs": done.digests, "sizes": {rel: _size(p) for rel, p in zip(rels, outputs)}, "action_key": akey,
              "seconds": seconds, "peak_mb": measured["peak_mb"], "reserved_mb": need, "started": wall, "ended": ended,
              "input_bytes": in_bytes, "lane": lane, "held": held["held"], "budget_mb": held["budget_mb"]}
    if nightly:
        values["cached"], values["reproducible"] = done.cached, done.reproducible
    if done.uploaded:
        values["uploaded"] = done.uploaded
    values.update(_verdict(step, outputs, task_name))
    phases = [["cache lookup", entered, looked]]
    if held["waited"]:
        phases.append(["memory wait", *held["waited"]])
    phases.append(["cache publish", publish, time.time()])  # the outputs' digests, and the cache entry
    values["phases"] = phases
    values["span"] = [entered, time.time()]
    return values


def _verdict(step: str, outputs: list[Path], task_name: str | None = None) -> dict:
    """verify_coreml's verdict (errors per output) for last_build.json and the report; a package's figures
    against its devices' limits (``device``, from its manifest), each problem said once on stderr."""
    if step in ("convert_coreml", "compress_coreml", "bundle_coreml"):
        return _device(outputs, task_name)
    if step != "verify_coreml":
        return {}
    try:
        return {"verdict": json.loads(Path(outputs[0]).read_text())}
    except (OSError, ValueError):
        return {}


def _device(outputs: list[Path], task_name: str | None) -> dict:
    for p in outputs:
        if p.name.endswith(".mlpackage"):
            try:
                device = json.loads(manifest_of(p).read_text()).get("device")
            except (OSError, ValueError):
                return {}
            if not device:
                return {}
            for problem in device.get("problems", ()):
                print(f"warning: {task_name}: {rel(p)}: {problem['line']}", file=sys.stderr)
            return {"device": device}
    return {}


def dask_address() -> str | None:
    return settings.dask_scheduler(S.config.dask.scheduler)


def _run_on_cluster(address: str, step: str, kwargs: dict, outputs: list[Path], task_name: str, key: dict,
                    inputs: list[str], akey: str, need: int, log: Path, nightly: bool, arch: str | None,
                    entered: float | None = None, in_bytes: int | None = None):
    """``run_step`` on a Dask cluster (export/runner/cluster.py): publish the inputs to the shared cache,
    run the step on a worker holding ``need`` MB, restore its outputs from the shared cache."""
    from ..runner import cluster

    root, cache, pyproject = S.config.root, build_cache(), S.config.root / "pyproject.toml"
    rels = [rel(p) for p in outputs]
    roles, where = output_roles(rels)
    if not cache.remote_url or cache.read_only:
        return TaskFailed(f"error: {pyproject}: tool.export.cache.remote: steps on the Dask cluster at {address} "
                          "need a shared cache that the workers reach and the build may write (a directory they "
                          "all mount, or s3://...)")
    input_rels = [*inputs, *(rel(Path(p)) for p in _package_inputs(kwargs)),
                  *(rel(p) for p in _weight_inputs(kwargs) if rel(p) not in inputs)]
    if "part" in kwargs:  # a part's export reads its tensors from the checkpoint's files (not in its file_dep)
        input_rels += [rel(f) for f in checkpoint_files.input_files(kwargs["checkpoint"]) if rel(f) not in input_rels]
    digests = {rel: _stat().any(root / rel) for rel in input_rels}
    inputs_key = "in-" + bytes_digest(json.dumps(digests, sort_keys=True).encode())
    if not cache.remote_has(inputs_key):
        cache.put(inputs_key, root, input_rels, {"task": f"inputs of {task_name}"})
        if not cache.remote_has(inputs_key):
            return TaskFailed(f"error: {pyproject}: tool.export.cache.remote: {task_name}: could not publish its "
                              f"inputs to the shared cache {cache.remote_url}")
    try:
        request = {"step": step, "kwargs": cluster.to_request_paths(kwargs, root), "inputs_key": inputs_key,
                   "inputs": input_rels, "outputs": rels, "roles": roles, "action_key": akey, "nightly": nightly,
                   "remote": cache.remote_url, "root": str(root), "task": task_name, "tools": key["tools"],
                   "code": key["code"], "arch": arch}
        result = cluster.submit_and_wait(address, request, need, task_name)
    except ExportError as e:
        if not e.file:  # a cluster error (MEMORY_MB, no worker...): name where the scheduler came from
            where, field = settings.dask_scheduler_origin(pyproject)
            e = ExportError(e.message, file=where, field=field if (e.field or "").startswith("tool.export.dask")
                            or not e.field else e.field)
        return TaskFailed(f"error: {e}")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.get("log", ""))
    for line in result.get("warnings", ()):
        print(f"{result.get('worker')}: {line}", file=sys.stderr)
    if "error" in result:
        return TaskFailed(f"{result['error']} (on {result.get('worker')}; log: {log})")
    restored = cache.get(result["key"], root, roles, where)
    if restored is not None:
        written.wrote(root / STATE_DIR, restored)
    if restored != result["digests"]:
        return TaskFailed(f"error: {task_name}: its outputs could not be restored from the shared cache "
                          f"{cache.remote_url} (entry {result['key']})")
    values = {"outputs": restored, "sizes": {rel: _size(p) for rel, p in zip(rels, outputs)}, "action_key": akey,
              "seconds": result["seconds"], "peak_mb": result["peak_mb"], "reserved_mb": need,
              "started": result["started"], "ended": result["ended"], "worker": result["worker"],
              "input_bytes": in_bytes, "lane": result["worker"], "span": [entered or result["started"], time.time()]}
    if nightly:
        values["cached"], values["reproducible"] = result["cached"], result["reproducible"]
    if result.get("lost_workers"):
        values["lost_workers"] = result["lost_workers"]  # the workers (by name) lost while they held it
    values.update(_verdict(step, outputs, task_name))
    return values


def _package_inputs(kwargs: dict) -> list[str]:
    """The package folders a step reads (a bundle's packages, the float package a recipe compresses): doit
    depends on their manifests, the step on the folders."""
    return [*kwargs.get("packages", ()), *(kwargs[k] for k in ("package", "bundle") if k in kwargs),
            *kwargs.get("leaves", {}).values()]


def _weight_inputs(kwargs: dict) -> list[Path]:
    """The checkpoint files a step reads the program's weights from (shipped to a Dask worker with its inputs):
    of a sharded checkpoint, only the shards holding the tensors the program refers to (a part's own,
    export/weight_refs.py), besides its config and index."""
    from ..weight_refs import read

    if "weights" not in kwargs:
        return []
    refs = read(kwargs["exported"]) if "exported" in kwargs else None
    if not refs:
        return checkpoint_files.input_files(kwargs["weights"])
    return parts_mod.files_for(kwargs["weights"], sorted({r["tensor"] for r in refs.get("tensors", {}).values()}))


def input_sizes(kwargs: dict, inputs: list[str]) -> list[int]:
    """The bytes of each thing a step reads: its input files, the packages a bundle merges, and each weight a
    program reads from its checkpoint (export/weight_refs.py: the tensors it refers to, not the whole checkpoint)."""
    from ..weight_refs import external_sizes

    data = [_size(S.config.root / rel) for rel in inputs if (S.config.root / rel).exists()]
    if "checkpoint" in kwargs and "mode" in kwargs:  # an export: what it holds of the checkpoint, made fp32
        part = kwargs.get("part")
        held = parts_mod.held_bytes(kwargs["checkpoint"], part["tensors"] if part else None)
        if part is not None:  # a part's export reads its own tensors, not the whole checkpoint (export/parts.py)
            data.append(held if held is not None else int(part.get("bytes", 0)))
        elif held is not None:  # a bf16 checkpoint is held at twice its size in the file
            files = {Path(f).resolve() for f in checkpoint_files.input_files(kwargs["checkpoint"])}
            data = [_size(S.config.root / r) for r in inputs
                    if (S.config.root / r).exists() and (S.config.root / r).resolve() not in files] + [held]
    if "weights" in kwargs and "exported" in kwargs:  # each tensor on its own: the largest weighs more
        data.extend(external_sizes(kwargs["exported"]))
    return data + [_size(Path(p)) for p in _package_inputs(kwargs) if Path(p).exists()]


def input_bytes(kwargs: dict, inputs: list[str]) -> int:
    """The bytes a step reads: its input files, the packages a bundle merges, the weights a program refers to."""
    return sum(input_sizes(kwargs, inputs))


def need_mb(step: str, kwargs: dict, inputs: list[str]) -> int:
    """The memory ``step`` reserves: its record's estimate from the bytes it reads and the shapes of the (mode,
    T) contracts it runs (export/stepdefs.py)."""
    sizes = input_sizes(kwargs, inputs)
    return STEPS[step].need_mb(sum(sizes), max(sizes, default=0), contract_shapes(_contracts_of(kwargs)))


def _contracts_of(kwargs: dict) -> list[dict]:
    """The contracts a step runs (a leaf's, or every function's of a bundle), as far as they can be read: a
    contract that cannot be read is the step's own error to report, not the ledger's."""
    more = kwargs.get("contracts") or ()
    paths = ([kwargs["contract"]] if "contract" in kwargs else []) + list(more.values() if isinstance(more, dict) else more)
    out = []
    for p in paths:
        try:
            c = json.loads(Path(p).read_text())
            contract_shapes([c])
        except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError):
            continue
        out.append(c)
    return out


def _ledger():
    from .memory import Ledger, default_budget_mb

    if S.ledger is None:
        budget = settings.memory_budget_mb(S.config.memory_budget_mb) or default_budget_mb()
        S.ledger = Ledger(S.config.root / STATE_DIR / "memory.json", int(budget))
    return S.ledger


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


class SavesValues:
    """An ``uptodate`` entry that decides nothing (None) and adds ``values`` to the task's values on
    success: the code files of the key, so that ``doit plan`` can name the file that changed."""

    def __init__(self, **values):
        self.values = values

    def configure_task(self, task):
        task.value_savers.append(lambda: dict(self.values))

    def __call__(self):
        return None


def step_key(step: str, config_key: dict, arch: str | None = None) -> dict:
    """A task's key: its step, the digest of its code's import closure (export/codekey.py), the versions of
    the tools its record names (export/stepdefs.py), and its slice of the config."""
    return {"step": step, "code": S.code.digest(step, arch), "tools": versions(STEPS[step].tools_for(arch)),
            "config": config_key}


def _task(step: str, name: str, doc: str, kwargs: dict, key: dict, outputs: list[Path], targets: list[Path],
          file_dep: list[Path] = (), arch: str | None = None) -> dict:
    full = f"{step}:{name}"
    key = step_key(step, key, arch)
    deps = [rel(p) for p in file_dep]  # relative: a copied project keeps its state
    return {
        "name": name,
        "doc": doc,
        "actions": [(run_step, [step, kwargs, outputs, full, key, deps], {"arch": arch})],
        "file_dep": deps,
        "targets": [rel(p) for p in targets],
        "uptodate": [config_changed(json.dumps(key, sort_keys=True)), outputs_intact,
                     SavesValues(code_files=S.code.files(step, arch))],
        "clean": True,
        "verbosity": 1,
    }


# --- paths -------------------------------------------------------------------


def model_dir(m) -> Path:
    return S.config.artifacts / m.name


def checkpoint_path(m) -> Path:
    return model_dir(m) / "checkpoint.pt" if m.is_demo else S.config.root / m.checkpoint


def program_weights(m, fmt: str) -> dict:
    """The ``weights`` argument of a step that loads the model's ``fmt`` export: an ExportedProgram written by
    the build keeps its weights in the checkpoint (export/program_weights.py). Not a key: the ``.pt2``'s
    bytes hold the digest of every tensor it reads there (export/weight_refs.py), and the loader checks them."""
    return {"weights": str(checkpoint_path(m))} if fmt == "exported_program" else {}


def device_limits(m) -> dict:
    """What the steps check a model's packages against (export/coreml/checks.py): its deployment target's
    devices, and whether a package over a limit warns or fails."""
    return {"target": m.coreml.minimum_deployment_target, "policy": m.device_limits}


def _fail_key(m) -> dict:
    """``device_limits = "fail"`` keys the steps that check (the step then fails where it passed); the default,
    "warn", changes nothing they write and keys nothing."""
    return {"device_limits": "fail"} if m.device_limits == "fail" else {}


def checkpoint_inputs(m) -> list[Path]:
    """The files a model's checkpoint consists of (a model folder: its config.json and model.safetensors)."""
    return checkpoint_files.input_files(checkpoint_path(m))


def units(m) -> list:
    """What a model is built as: its parts in chain order (export/parts.py), or [None] (one whole model)."""
    return S.parts[m.name].parts if m.parts is not None else [None]


def unit_dir(m, part=None) -> Path:
    """A part's folder under the model's (``artifacts/<model>/<part>/``), or the model's own."""
    return model_dir(m) / part.name if part is not None else model_dir(m)


def bundle_stem(m, part=None) -> str:
    return m.name if part is None else f"{m.name}.{part.name}"


def bundle_path(m, part=None) -> Path:
    return unit_dir(m, part) / f"{bundle_stem(m, part)}.mlpackage"


def export_paths(m, mode, T, part=None) -> tuple[dict[str, Path], Path]:
    from ..contract import FORMATS

    d, stem = unit_dir(m, part) / "exported", entry_name(mode, T)
    return {f: d / (stem + FORMATS[f]) for f in m.formats}, d / f"{stem}.contract.json"


def package_path(m, mode, T, part=None) -> Path:
    return unit_dir(m, part) / "coreml" / f"{entry_name(mode, T)}.mlpackage"


def compressed_path(m, mode, T, recipe: str, part=None) -> Path:
    return unit_dir(m, part) / "coreml" / f"{entry_name(mode, T)}.{recipe}.mlpackage"


def quality_path(m, mode, T, recipe: str, part=None) -> Path:
    return unit_dir(m, part) / "coreml" / f"{entry_name(mode, T)}.{recipe}.quality.json"


def recipe_bundle_path(m, recipe: str, part=None) -> Path:
    return unit_dir(m, part) / f"{bundle_stem(m, part)}.{recipe}.mlpackage"


def recipe_contract_path(m, recipe: str, part=None) -> Path:
    return unit_dir(m, part) / f"{bundle_stem(m, part)}.{recipe}.contract.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def tokenizer_files(m) -> list[Path]:
    """The tokenizer and generation config in an hf-causal-lm model's folder, as present (shipped beside the bundle)."""
    if m.architecture != "hf-causal-lm" or m.is_demo:
        return []
    folder = S.config.root / m.checkpoint
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def verdict_path(m, mode, T, part=None) -> Path:
    return unit_dir(m, part) / "coreml" / f"{entry_name(mode, T)}.verify.json"


def bundle_verdict_path(m, part=None) -> Path:
    return unit_dir(m, part) / f"{bundle_stem(m, part)}.verify.json"


def verified(m) -> bool:
    """The numerical verification runs the package against the ExportedProgram: models that export one."""
    return "exported_program" in m.formats


def leaf(m, mode, T, part=None) -> str:
    return f"{m.name}.{mode}.T{T}" + (f".{part.name}" if part is not None else "")


def _kv(m, mode) -> str:
    return m.coreml.kv_cache if mode == "decode" else "explicit"


# --- the generators ----------------------------------------------------------


def task_checkpoint():
    """Make the deterministic demo checkpoint of each model configured with checkpoint = "demo"."""
    for m in S.config.models:
        if not m.is_demo:
            continue
        out = checkpoint_path(m)
        yield _task("checkpoint", m.name, f"demo {m.architecture} checkpoint -> {rel(out)}",
                    {"out": str(out), "architecture": m.architecture}, {"architecture": m.architecture},
                    [out], [out], arch=m.architecture)


def _groups(step: str, verb: str, leaf_names: dict[int, list[str]]):
    for T in sorted(leaf_names):
        yield {"name": f"T{T}", "doc": f"{verb} every model and mode at T={T}",
               "task_dep": [f"{step}:{n}" for n in leaf_names[T]], "actions": None}


def task_export_pytorch():
    """Export a checkpoint at one (mode, T): TorchScript / ExportedProgram + contract; a parted model's part at one
    (mode, T) from the part's tensors alone (export/parts.py)."""
    by_T: dict[int, list[str]] = {}
    for m in S.config.models:
        ck = checkpoint_path(m)
        for part in units(m):
            for mode, T in m.leaves():
                files, contract = export_paths(m, mode, T, part)
                kwargs = {"checkpoint": str(ck), "out_dir": str(contract.parent), "model": m.name, "mode": mode, "T": T,
                          "formats": list(m.formats), "dtype": m.dtype, "kv_cache": _kv(m, mode),
                          "architecture": m.architecture}  # checked against the checkpoint's: not a key of the bytes
                if part is not None:
                    kwargs["part"] = S.parts[m.name].kwargs(part)  # its key: the config and the part's tensors
                key = {k: v for k, v in kwargs.items() if k not in ("checkpoint", "out_dir", "architecture")}
                outs = [*files.values(), contract]
                name = leaf(m, mode, T, part)
                by_T.setdefault(T, []).append(name)
                what = f" part {part.name}" if part is not None else ""
                # a part depends on its tensors through its key, not on the checkpoint's files: editing one layer
                # rebuilds the part holding it only
                yield _task("export_pytorch", name, f"{m.name} {mode} T={T}{what}: {', '.join(m.formats)} + contract",
                            kwargs, key, outs, outs, file_dep=checkpoint_inputs(m) if part is None else [],
                            arch=m.architecture)
    yield from _groups("export_pytorch", "export", by_T)


def task_convert_coreml():
    """Convert one exported (mode, T) (of a part) to a Core ML .mlpackage, checked against its contract."""
    by_T: dict[int, list[str]] = {}
    for m in S.config.models:
        for part in units(m):
            for mode, T in m.leaves():
                files, contract = export_paths(m, mode, T, part)
                pkg = package_path(m, mode, T, part)
                kwargs = {"exported": str(files[m.convert_from]), "contract": str(contract), "out": str(pkg),
                          "options": m.coreml.to_json(), **program_weights(m, m.convert_from),
                          "device_limits": device_limits(m)}
                name = leaf(m, mode, T, part)
                by_T.setdefault(T, []).append(name)
                yield _task("convert_coreml", name, f"{m.name} {mode} T={T}{_what(part)}: Core ML package ({m.coreml.compute_precision}, {m.coreml.minimum_deployment_target})",
                            kwargs, {"options": m.coreml.to_json(), "from": m.convert_from, **_fail_key(m)}, [pkg, manifest_of(pkg)],
                            [manifest_of(pkg)], file_dep=[files[m.convert_from], contract])
    yield from _groups("convert_coreml", "convert", by_T)


def _what(part) -> str:
    return f" part {part.name}" if part is not None else ""


def task_compress_coreml():
    """Compress one converted float package by one recipe (export/recipes.py) and measure its quality."""
    for m in S.config.models:
        for recipe in m.recipes:
            for part in units(m):
                for mode, T in m.leaves():
                    _, contract = export_paths(m, mode, T, part)
                    pkg, out, quality = package_path(m, mode, T, part), compressed_path(m, mode, T, recipe.name, part), \
                        quality_path(m, mode, T, recipe.name, part)
                    kwargs = {"package": str(pkg), "contract": str(contract), "recipe": recipe.to_json(), "out": str(out),
                              "quality": str(quality),  # the quality runs both packages: no exported program needed
                              "device_limits": device_limits(m)}
                    task = _task("compress_coreml", f"{leaf(m, mode, T, part)}.{recipe.name}",
                                 f"{m.name} {mode} T={T}{_what(part)}: compressed by recipe {recipe.name}, quality measured",
                                 kwargs, {"recipe": recipe.to_json(), **_fail_key(m)}, [out, manifest_of(out), quality],
                                 [manifest_of(out), quality],
                                 file_dep=[manifest_of(pkg), contract])
                    task["actions"].append((_quality_values, [quality]))  # the figures reach last_build.json
                    yield task


def _quality_values(path: Path) -> dict:
    try:
        return {"quality": json.loads(Path(path).read_text())}
    except (OSError, ValueError):
        return {}


def task_verify_coreml():
    """Run each package in the reference interpreter against its ExportedProgram (export/coreml/verify.py), and
    each function of a bundle against its leaf package; the verdict (max abs and relative error per output)
    goes to <package stem>.verify.json."""
    by_T: dict[int, list[str]] = {}
    for m in S.config.models:
        if not verified(m):
            continue
        for part in units(m):
            for mode, T in m.leaves():
                files, contract = export_paths(m, mode, T, part)
                pkg, out = package_path(m, mode, T, part), verdict_path(m, mode, T, part)
                kwargs = {"package": str(pkg), "exported": str(files["exported_program"]), "contract": str(contract),
                          "out": str(out), **program_weights(m, "exported_program")}
                name = leaf(m, mode, T, part)
                by_T.setdefault(T, []).append(name)
                yield _task("verify_coreml", name, f"{m.name} {mode} T={T}{_what(part)}: the package's numbers against the program",
                            kwargs, {}, [out], [out],  # the package's bytes (its manifest) cover its options
                            file_dep=[manifest_of(pkg), files["exported_program"], contract])
            bundle = bundle_path(m, part)
            names = [entry_name(mode, T) for mode, T in m.leaves()]
            kwargs = {"bundle": str(bundle), "out": str(bundle_verdict_path(m, part)),
                      "leaves": {n: str(package_path(m, mode, T, part)) for n, (mode, T) in zip(names, m.leaves())},
                      "contracts": {n: str(export_paths(m, mode, T, part)[1]) for n, (mode, T) in zip(names, m.leaves())}}
            yield _task("verify_coreml", bundle_stem(m, part), f"{bundle_stem(m, part)}: each function of the bundle against its leaf package",
                        kwargs, {"functions": names}, [bundle_verdict_path(m, part)], [bundle_verdict_path(m, part)],
                        file_dep=[manifest_of(bundle)] + [manifest_of(package_path(m, mode, T, part)) for mode, T in m.leaves()]
                        + [export_paths(m, mode, T, part)[1] for mode, T in m.leaves()])
    yield from _groups("verify_coreml", "verify", by_T)


def task_bundle_coreml():
    """Merge every (mode, T) package of a model (of each part of a parted model) into one multifunction
    package + its contract; a parted model's contract.json describes the chain of its parts."""
    for m in S.config.models:
        shipped = tokenizer_files(m)
        for part in units(m):
            pkgs = [package_path(m, mode, T, part) for mode, T in m.leaves()]
            contracts = [export_paths(m, mode, T, part)[1] for mode, T in m.leaves()]
            out = bundle_path(m, part)
            contract_out = unit_dir(m, part) / "contract.json"
            ships = shipped if part is None else []  # a parted model ships them beside its chain contract
            kwargs = {"packages": [str(p) for p in pkgs], "contracts": [str(c) for c in contracts], "out": str(out),
                      "contract_out": str(contract_out), "device_limits": device_limits(m)}
            key = {"functions": [entry_name(mode, T) for mode, T in m.leaves()], **_fail_key(m)}
            extra = {}
            if m.metadata:
                extra["metadata"] = dict(m.metadata)
            if ships:
                extra["files"] = [str(f) for f in ships]
                extra["files_out"] = str(model_dir(m))
            kwargs.update(extra)
            key.update({k: v for k, v in (("metadata", extra.get("metadata")),) if v})
            verdicts = [verdict_path(m, mode, T, part) for mode, T in m.leaves()] if verified(m) else []
            yield _task("bundle_coreml", bundle_stem(m, part),
                        f"{bundle_stem(m, part)}: one multifunction package of {len(pkgs)} functions",
                        kwargs, key, [out, manifest_of(out), contract_out, *(model_dir(m) / f.name for f in ships)],
                        [manifest_of(out), contract_out, *(model_dir(m) / f.name for f in ships)],
                        file_dep=[manifest_of(p) for p in pkgs] + contracts + ships + verdicts)  # a leaf that fails its verification stops its bundle
            for recipe in m.recipes:  # one bundle per recipe, of its compressed packages
                cpkgs = [compressed_path(m, mode, T, recipe.name, part) for mode, T in m.leaves()]
                rout = recipe_bundle_path(m, recipe.name, part)
                rcontract = recipe_contract_path(m, recipe.name, part)
                rkwargs = {"packages": [str(p) for p in cpkgs], "contracts": [str(c) for c in contracts], "out": str(rout),
                           "contract_out": str(rcontract), **({"metadata": dict(m.metadata)} if m.metadata else {}),
                           "device_limits": device_limits(m)}
                yield _task("bundle_coreml", f"{bundle_stem(m, part)}.{recipe.name}",
                            f"{bundle_stem(m, part)}: one multifunction package of {len(cpkgs)} functions, recipe {recipe.name}",
                            rkwargs, {**key, "recipe": recipe.name}, [rout, manifest_of(rout), rcontract],
                            [manifest_of(rout), rcontract], file_dep=[manifest_of(p) for p in cpkgs] + contracts)
        if m.parts is not None:
            yield _chain_task(m, shipped)


def chain_contract_path(m) -> Path:
    return model_dir(m) / "contract.json"


def _chain_task(m, shipped: list[Path]) -> dict:
    """``bundle_coreml:<model>`` of a parted model: contract.json, the chain of its parts' bundles (and the
    tokenizer files of a transformers model beside it)."""
    parts = units(m)
    out = chain_contract_path(m)
    kwargs = {"chain": [{"contract": str(unit_dir(m, p) / "contract.json"),
                         "bundle": bundle_path(m, p).relative_to(model_dir(m)).as_posix(),
                         "contract_name": (unit_dir(m, p) / "contract.json").relative_to(model_dir(m)).as_posix()}
                        for p in parts],
              "contract_out": str(out), "model": m.name, "architecture": m.architecture}
    if shipped:
        kwargs["files"], kwargs["files_out"] = [str(f) for f in shipped], str(model_dir(m))
    key = {"chain": [p.name for p in parts]}
    outs = [out, *(model_dir(m) / f.name for f in shipped)]
    return _task("bundle_coreml", m.name, f"{m.name}: contract.json, the chain of its {len(parts)} parts",
                 kwargs, key, outs, outs,
                 file_dep=[unit_dir(m, p) / "contract.json" for p in parts]
                 + [manifest_of(bundle_path(m, p)) for p in parts] + shipped)


def onnx_path(m, mode, T) -> Path:
    return model_dir(m) / "exported" / f"{entry_name(mode, T)}.onnx"


def task_export_onnx():
    """The ONNX debug path: export one (mode, T) to ONNX, checked with onnxruntime (not in the default build;
    not for parted models)."""
    for m in S.config.models:
        if m.parts is not None:
            continue
        ck = checkpoint_path(m)
        for mode, T in m.leaves():
            out = onnx_path(m, mode, T)
            yield _task("export_onnx", leaf(m, mode, T), f"{m.name} {mode} T={T}: ONNX, checked with onnxruntime",
                        {"checkpoint": str(ck), "out_dir": str(out.parent), "mode": mode, "T": T},
                        {"mode": mode, "T": T}, [out], [out], file_dep=checkpoint_inputs(m), arch=m.architecture)


def _expected_outputs() -> set[Path]:
    """Every output path of every task of the current config."""
    out: set[Path] = set()
    for m in S.config.models:
        if m.is_demo:
            out.add(checkpoint_path(m))
        for part in units(m):
            for mode, T in m.leaves():
                files, contract = export_paths(m, mode, T, part)
                pkg = package_path(m, mode, T, part)
                out.update([*files.values(), contract, pkg, manifest_of(pkg), verdict_path(m, mode, T, part)])
                if part is None:
                    out.add(onnx_path(m, mode, T))
                for recipe in m.recipes:
                    cpkg = compressed_path(m, mode, T, recipe.name, part)
                    out.update([cpkg, manifest_of(cpkg), quality_path(m, mode, T, recipe.name, part)])
            bundle = bundle_path(m, part)
            out.update([bundle, manifest_of(bundle), unit_dir(m, part) / "contract.json", bundle_verdict_path(m, part)])
            for recipe in m.recipes:
                rb = recipe_bundle_path(m, recipe.name, part)
                out.update([rb, manifest_of(rb), recipe_contract_path(m, recipe.name, part)])
        out.update(model_dir(m) / f.name for f in tokenizer_files(m))
        if m.parts is not None:
            out.add(chain_contract_path(m))
    return out


# Temporaries of atomic writes (export/atomic.py: .<name>.*.tmp), of cache restores (export/cache/store.py: .restore,
# .old), of an output replaced by a hardlink to its cache blob (export/cache/store.py: .link) and of the bundle's merge (export/coreml/bundle.py: .merge), beside the output they stand for.
# A full build runs prune_artifacts after every step it runs, under the project lock: none is being written.
LEFTOVER_SUFFIXES = (".tmp", ".restore", ".old", ".merge", ".link")
COMPACT_BYTES = 1 << 20  # the record of written outputs is compacted past this size


def _leftovers(rec: "written.Record") -> list[Path]:
    """Temporaries a killed build left beside an output it meant to write: ``.<output name>.<random><suffix>``."""
    by_dir: dict[Path, set[str]] = {}
    for rel in rec.intents | set(rec.wrote):
        p = S.config.root / rel
        by_dir.setdefault(p.parent, set()).add(p.name)
    out = []
    for d, names in sorted(by_dir.items()):
        try:
            entries = sorted(os.listdir(d))
        except OSError:
            continue
        for e in entries:
            if e.startswith(".") and e.endswith(LEFTOVER_SUFFIXES) and any(e.startswith(f".{n}.") for n in names):
                out.append(d / e)
    return out


def stale_outputs() -> tuple[list[Path], list[Path]]:
    """(outputs the build wrote that the config no longer makes: a T removed, a format dropped, a model
    renamed; temporaries a killed build left). Only paths in the build's record (export/planner/written.py): a file
    the build never wrote is never listed."""
    rec = written.read(S.config.root / STATE_DIR)
    expected = {rel(p) for p in _expected_outputs()}
    stale = [S.config.root / r for r in sorted(rec.wrote) if r not in expected and os.path.lexists(S.config.root / r)]
    return stale, _leftovers(rec)


def _prune() -> dict:
    from ..atomic import remove

    state = S.config.root / STATE_DIR
    rec = written.read(state)
    stale, leftovers = stale_outputs()
    gone, kept = [], []
    for p in stale:
        r = rel(p)
        try:
            same = not p.is_symlink() and _stat().any(p) == rec.wrote[r]
        except OSError:
            same = False
        if same:
            remove(p)
            print(f"prune_artifacts: removed {r} (no longer in the config)", file=sys.stderr, flush=True)
            gone.append(r)
        else:
            print(f"prune_artifacts: left {r} alone: it is no longer in the config, but it changed since the "
                  "build wrote it", file=sys.stderr, flush=True)
            kept.append(r)
    for p in leftovers:
        remove(p)
        print(f"prune_artifacts: removed {rel(p)} (a temporary an interrupted build left)", file=sys.stderr, flush=True)
        gone.append(rel(p))
    # forget what is settled: removed or given up outputs, intents of paths the config no longer makes
    expected = {rel(p) for p in _expected_outputs()}
    done = [r for r in sorted(rec.intents | set(rec.wrote)) if r not in expected
            and (r in gone or r in kept or not os.path.lexists(S.config.root / r))]
    written.removed(state, done)
    if written.size(state) > COMPACT_BYTES:
        written.rewrite(state, written.read(state))
    return {"removed": gone, "left": kept}


def _nothing_to_prune() -> bool:
    stale, leftovers = stale_outputs()
    return not stale and not leftovers


def task_prune_artifacts():
    """Remove outputs the build wrote for leaves no longer in the config (and temporaries of killed builds);
    never a file the build did not write."""
    return {
        "actions": [_prune],
        "task_dep": ["bundle_coreml", "verify_coreml"],
        "uptodate": [_nothing_to_prune],
        "verbosity": 1,
    }
