"""Models of the size users ship (issue #21): random-weight models with the dimensions of Qwen2.5-0.5B,
Llama-3.2-1B and Llama-3.1-8B, built by a checkout's ``doit`` in a temporary project.

    python bench/bench_scale.py --model qwen2.5-0.5b --leaves prefill:512 prefill:2048 decode:512 decode:2048
    python bench/bench_scale.py --model llama-3.2-1b --leaves prefill:512
    python bench/bench_scale.py --model llama-3.2-1b --config-line 'chunks = 4' --checkout ../h21a
    python bench/bench_scale.py --model qwen2.5-0.5b --compare main       # this checkout and a worktree of main
    python bench/bench_scale.py write --model llama-3.1-8b                # only write (or check) the model folder

Heavy: run it under the machine-wide lock, ``flock /work/heavy.lock python bench/bench_scale.py ...``.

**The models.** transformers' own config classes (Qwen2Config, LlamaConfig) with the published
dimensions; the weights are seeded random numbers, one generator per tensor (seeded from the tensor's
name), so any tensor can be made again alone (``tensor_for``). The model is built on
``torch.device("meta")`` (no memory), then written shard by shard: only the tensors of the shard being
written are ever materialized, each written with safetensors, with the ``model.safetensors.index.json``
transformers writes (huggingface_hub's ``split_torch_state_dict_into_shards``, as ``save_pretrained``).
0.5B and 1B are fp32 in one ``model.safetensors`` (transformers 5 shards at 50 GB, and one file is what
every checkout reads); 8B is bf16 (16 GB instead of 32 GB of the shared disk) in 2 GB shards. Tied
embeddings are stored once, as transformers stores them. The folders are cached under
``~/.cache/model-export-bench`` (``MODEL_EXPORT_BENCH_MODELS``) and reused; ``--clean`` deletes them.

**The build.** A project in a temporary folder: the checkout's ``dodo.py`` and ``export/`` copied in,
a ``pyproject.toml`` with the checkout's doit commands and one ``hf-causal-lm`` model (fp16 packages,
plus any ``--config-line``), a ``shape_sets.json`` with the chosen leaves (default: the default shape
set, prefill and decode at T 512..4096), its own empty cache. It runs ``python -m doit`` of the
checkout's ``.venv`` (this process's Python if it has none) with the project first on ``PYTHONPATH``,
as ``./dev build`` does. Recorded:

- wall seconds of the whole build, and the peak of the summed resident memory of its process tree
  (psutil, every 0.2 s; pages shared between processes count once per process);
- per task, from the build's own record (``.export/latest_build.json``, else
  ``artifacts/last_build.json``): status, seconds, peak memory of the worker (``peak_mb``), the memory
  the ledger reserved (``reserved_mb``) and the bytes read (``input_bytes``);
- disk bytes of ``artifacts/`` and of the cache, each file counted once however many hardlinks it has
  (and the two together);
- every package's size and each of its ``weight.bin`` files (one per part once models are chunked).

``--compare REF``: the same model and leaves through a ``git worktree`` of REF too (or REF itself when
it is a folder), one after the other in this run; the JSON records both and the ratios. The project of
each build is deleted once measured (``--keep`` keeps them). Results: bench/results/scale-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TreeSampler, write_result  # noqa: E402

MODELS_DIR = Path(os.environ.get("MODEL_EXPORT_BENCH_MODELS", Path.home() / ".cache" / "model-export-bench"))
DEFAULT_LEAVES = [f"{m}:{t}" for m in ("prefill", "decode") for t in (512, 1024, 2048, 4096)]

# The published dimensions (the models' config.json on the Hugging Face hub).
SPECS = {
    "qwen2.5-0.5b": {"config_class": "Qwen2Config", "dtype": "float32", "shard_mb": None, "config": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu")},
    "llama-3.2-1b": {"config_class": "LlamaConfig", "dtype": "float32", "shard_mb": None, "config": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", head_dim=64)},
    "llama-3.1-8b": {"config_class": "LlamaConfig", "dtype": "bfloat16", "shard_mb": 2000, "config": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", head_dim=128)},
    # not a published model: a smoke test of the benchmark itself (seconds, not minutes)
    "toy": {"config_class": "LlamaConfig", "dtype": "float32", "shard_mb": None, "config": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=4096)},
    # not a published model: big enough that its weights, not the per-leaf files, dominate the disk bytes
    # (16M parameters, 62 MiB in fp32), small enough for minutes; sharded, so a part's tensors span shards
    "small": {"config_class": "LlamaConfig", "dtype": "float32", "shard_mb": 20, "config": dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1536, vocab_size=8192, tie_word_embeddings=True, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", head_dim=64)},
}
SEED = 0
DEMO = "demo"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------- the model writer (imports torch)

def make_config(class_name: str, dims: dict, dtype: str):
    import transformers

    cfg = getattr(transformers, class_name)(**dims)
    cfg.dtype = dtype
    return cfg


def tensor_for(name: str, shape, dtype, seed: int = SEED, std: float = 0.02):
    """The tensor ``name`` of a model: its own generator, seeded from the name (any tensor can be made
    again alone, in any order). Norm weights are ones and biases zeros, as transformers initializes them;
    every other tensor is N(0, std), drawn directly in ``dtype`` (no float32 copy of a bf16 tensor)."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, dtype=dtype).mul_(std)


def meta_state(cfg) -> dict:
    """The model's tensors to write, on the meta device (no memory): a tied tensor once, under the name
    transformers keeps (the first), as ``save_pretrained`` writes it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else getattr(torch, cfg.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def write_model(folder: Path, cfg, shard_mb: int | None, seed: int = SEED, on_tensor=None) -> dict:
    """Write ``cfg``'s model with seeded random weights as a transformers folder, one shard at a time.

    ``shard_mb`` None writes one ``model.safetensors``; otherwise shards of at most that size (a larger
    single tensor gets a shard of its own) and the index. Only the tensors of the shard being written
    exist at any moment; ``on_tensor(name, tensor)`` is called for each one made (a test watches their
    lifetimes). Written into a temporary folder renamed into place: a folder that exists is complete."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    state = meta_state(cfg)
    kwargs = {"max_shard_size": f"{shard_mb}MB"} if shard_mb else {"max_shard_size": 2**62}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors", **kwargs)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            t = tensor_for(name, tuple(state[name].shape), state[name].dtype, seed)
            if on_tensor:
                on_tensor(name, t)
            shard[name] = t
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        del shard, t
    if split.is_sharded:
        params = sum(t.numel() for t in state.values())
        index = {"metadata": {"total_parameters": params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return describe(folder)


def describe(folder: Path) -> dict:
    """Parameters, bytes and files of a written model folder (headers only, nothing loaded)."""
    from safetensors import safe_open

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    params, tensors = 0, 0
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for k in f.keys():
                params += _numel(f.get_slice(k).get_shape())
                tensors += 1
    return {"folder": str(folder), "files": files, "parameters": params, "tensors": tensors,
            "bytes": sum((folder / n).stat().st_size for n in files), "sharded": (folder / INDEX).exists()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_folder(folder: Path) -> dict:
    """A sharded folder is loadable: its index names every tensor of the model once, every shard it
    names exists and holds exactly the tensors mapped to it, and one tensor of a shard reads back as
    ``tensor_for`` makes it (opened lazily: one tensor read, nothing else)."""
    import torch
    from safetensors import safe_open

    cfg_json = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / INDEX).read_text()) if (folder / INDEX).exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    by_file: dict[str, set] = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            by_file[f] = set(h.keys())
    if index:
        for name, f in index["weight_map"].items():
            if name not in by_file[f]:
                raise SystemExit(f"error: {folder / INDEX}: weight_map[{name!r}] names {f}, which lacks it")
        listed = sum(len(v) for v in by_file.values())
        if listed != len(index["weight_map"]):
            raise SystemExit(f"error: {folder / INDEX}: weight_map lists {len(index['weight_map'])} tensors, the shards hold {listed}")
    first = files[-1]
    with safe_open(str(folder / first), framework="pt") as h:  # a random (2-D) tensor, not a norm's ones
        name = min(by_file[first], key=lambda k: (len(h.get_slice(k).get_shape()) != 2, k))
        got = h.get_tensor(name)
    want = tensor_for(name, tuple(got.shape), got.dtype)
    return {"model_type": cfg_json.get("model_type"), "shards": len(files), "tensors": sum(len(v) for v in by_file.values()),
            "checked_tensor": name, "checked_shard": first, "matches_generator": bool(torch.equal(got, want))}


def ensure_model(name: str, force: bool = False) -> dict:
    """The cached folder of model ``name``, written when absent (in a child process, so this one never
    imports torch); returns its description and, when written now, the writer's wall seconds and peak RSS."""
    folder = MODELS_DIR / name
    info: dict = {}
    if force or not folder.exists():
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        res = measure([sys.executable, __file__, "_write", "--model", name], REPO, dict(os.environ))
        info["written"] = {k: res[k] for k in ("wall_s", "peak_mb")}
    out = subprocess.run([sys.executable, __file__, "_describe", "--model", name], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip() or f"error: {folder}: cannot describe the model folder")
    return {**json.loads(out.stdout), **info}


# ---------------------------------------------------------------- measuring a process tree

def measure(cmd: list[str], cwd: Path, env: dict, log: Path | None = None, check: bool = True) -> dict:
    """Wall seconds and peak tree RSS of a command; its output to ``log`` (or kept, last 4000 chars).
    ``check`` False: a failure is recorded (``returncode``, the output's error lines), not raised."""
    t = time.perf_counter()
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    text, _ = proc.communicate()
    wall = time.perf_counter() - t
    peak = sampler.stop()
    if log:
        out.close()
        text = log.read_text()
    if proc.returncode != 0 and check:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{text[-4000:]}")
    failed = [ln for ln in text.splitlines() if ln.startswith("error:")] if proc.returncode else []
    return {"wall_s": round(wall, 2), "peak_mb": peak, "samples": sampler.samples, "returncode": proc.returncode,
            "errors": failed}


def disk_bytes(*folders: Path) -> int:
    """Bytes of the files under ``folders``, each (device, inode) counted once: a blob hardlinked from
    the cache into artifacts/ is one copy on the disk."""
    seen, total = set(), 0
    for folder in folders:
        if not folder.exists():
            continue
        for root, _dirs, files in os.walk(folder):
            for f in files:
                st = os.lstat(os.path.join(root, f))
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_size
    return total


def packages(artifacts: Path) -> dict:
    """Every .mlpackage under ``artifacts``: its size, the size of each weight file in it and the xxh3 of each
    (the same weights in two builds, or in a bundle and its leaves)."""
    import xxhash

    def digest(path: Path) -> str:
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()

    out = {}
    for pkg in sorted(artifacts.rglob("*.mlpackage")):
        bins = sorted(pkg.rglob("*.bin"))
        out[str(pkg.relative_to(artifacts))] = {"bytes": sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()),
                                                "weights": {str(w.relative_to(pkg)): w.stat().st_size for w in bins},
                                                "weight_digests": {str(w.relative_to(pkg)): digest(w) for w in bins}}
    return out


def disk_by_kind(artifacts: Path, cache: Path) -> dict:
    """The bytes of ``disk_bytes(artifacts, cache)`` by kind of file, each (device, inode) once and named by its
    first path under artifacts/ (a cache blob linked there is that file): the packages' weight files, the
    exported programs, everything else; and how many weight files there are and how many distinct inodes."""
    seen, out = set(), {"weight_bin": 0, "pt2": 0, "other": 0, "weight_files": 0, "weight_inodes": 0}
    for folder in (artifacts, cache):
        if not folder.exists():
            continue
        for root, _dirs, files in os.walk(folder):
            for f in files:
                st = os.lstat(os.path.join(root, f))
                kind = "weight_bin" if f.endswith(".bin") and folder == artifacts else "pt2" if f.endswith(".pt2") else "other"
                if kind == "weight_bin":
                    out["weight_files"] += 1
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                out[kind] += st.st_size
                out["weight_inodes"] += kind == "weight_bin"
    return out


def exported(artifacts: Path) -> dict:
    return {str(p.relative_to(artifacts)): p.stat().st_size for p in sorted(artifacts.rglob("*.pt2"))}


# ---------------------------------------------------------------- a project around a model

def parse_leaves(leaves: list[str]) -> dict[str, list[int]]:
    modes: dict[str, list[int]] = {}
    for item in leaves:
        m = re.fullmatch(r"(prefill|decode):(\d+(?:,\d+)*)", item)
        if not m:
            raise SystemExit(f"error: --leaves {item!r}: expected MODE:T[,T...] with MODE prefill or decode")
        modes.setdefault(m[1], [])
        modes[m[1]] += [int(t) for t in m[2].split(",") if int(t) not in modes[m[1]]]
    return {k: sorted(v) for k, v in modes.items()}


def doit_commands(checkout: Path) -> str:
    text = (checkout / "pyproject.toml").read_text()
    m = re.search(r"^\[tool\.doit\.plugins\.command\]\n(?:[^\[\n].*\n|\n)*", text, re.M)
    return m.group(0) if m else ""


def make_project(root: Path, checkout: Path, model: str, folder: Path, shapes: dict, extra: list[str],
                 reuse: bool = False) -> None:
    """A new project at ``root``; ``reuse``: a kept one (``--keep``) whose code is replaced by the checkout's, its
    artifacts, cache and doit records kept (only the steps whose key the new code changes run again)."""
    root.mkdir(parents=True, exist_ok=reuse)
    if reuse:
        shutil.rmtree(root / "export", ignore_errors=True)
    shutil.copy(checkout / "dodo.py", root / "dodo.py")
    shutil.copytree(checkout / "export", root / "export", ignore=shutil.ignore_patterns("__pycache__"))
    if model == DEMO:  # the checkout's own demo config: its pyproject.toml and shape sets as they are
        shutil.copy(checkout / "pyproject.toml", root / "pyproject.toml")
        shutil.copy(checkout / "shape_sets.json", root / "shape_sets.json")
        return
    lines = ['[tool.export]', 'artifacts = "artifacts"', 'shape_sets = "shape_sets.json"', '',
             '[[tool.export.models]]', f'name = "{re.sub(r"[^A-Za-z0-9_-]", "_", model)}"',
             'architecture = "hf-causal-lm"', f'checkpoint = "{folder}"', 'shape_set = "scale"',
             "modes = [" + ", ".join(f'"{m}"' for m in shapes) + "]",
             'coreml = { compute_precision = "fp16" }', *extra]
    (root / "pyproject.toml").write_text('[project]\nname = "scale"\nversion = "0"\n\n'
                                         + doit_commands(checkout) + "\n" + "\n".join(lines) + "\n")
    (root / "shape_sets.json").write_text(json.dumps({"scale": shapes}, indent=2) + "\n")


def python_of(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def build_record(root: Path) -> dict:
    for path in (root / ".export" / "latest_build.json", root / "artifacts" / "last_build.json"):
        if path.exists():
            return json.loads(path.read_text())
    return {}


def run_build(checkout: Path, model: str, folder: Path | None, shapes: dict, extra: list[str], jobs: int,
              targets: list[str], work: Path, keep: bool, tag: str | None = None, reuse: Path | None = None,
              budget_mb: int | None = None) -> dict:
    label = tag or checkout.name
    root = reuse or work / f"project-{label}"
    make_project(root, checkout, model, folder, shapes, extra, reuse=reuse is not None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_EXPORT_")}
    env.update(MODEL_EXPORT_CACHE=str(root / ".cache"), PYTHONPATH=str(root) + os.pathsep + env.get("PYTHONPATH", ""))
    if budget_mb:  # the build's own environment has no MODEL_EXPORT_* but this one (--memory-budget)
        env["MODEL_EXPORT_MEMORY_BUDGET_MB"] = str(budget_mb)
    py = python_of(checkout)
    cmd = [py, "-m", "doit", *(["-n", str(jobs)] if jobs > 1 else []), *targets]
    log = work / f"build-{label}.log"
    print(f"[{label}] {' '.join(cmd)} in {root} (log {log})", flush=True)
    res = measure(cmd, root, env, log, check=False)  # a failed build (a step out of memory) is a result too
    record = build_record(root)
    tasks = {}
    for name, r in sorted(record.get("tasks", {}).items()):
        if r.get("status") in (None, "up-to-date", "not-run"):
            continue
        tasks[name] = {k: r.get(k) for k in ("status", "seconds", "peak_mb", "reserved_mb", "input_bytes")}
    art, cache = root / "artifacts", root / ".cache"
    out = {
        "checkout": str(checkout), "commit": _git(checkout, "rev-parse", "HEAD"), "python": py,
        "command": cmd, "config_lines": extra, "wall_s": res["wall_s"], "peak_tree_mb": res["peak_mb"],
        "returncode": res["returncode"], "errors": res["errors"],
        "rss_samples": res["samples"], "tasks": tasks,
        "disk": {"artifacts_bytes": disk_bytes(art), "cache_bytes": disk_bytes(cache),
                 "total_bytes": disk_bytes(art, cache), "by_kind": disk_by_kind(art, cache)},
        "packages": packages(art), "exported_programs": exported(art),
        "summary": (log.read_text().strip().splitlines() or [""])[-1],
    }
    if not keep and reuse is None:
        shutil.rmtree(root, ignore_errors=True)
    for e in res["errors"]:
        print(f"[{label}] {e}", flush=True)
    print(f"[{label}] {'FAILED ' if res['returncode'] else ''}{out['wall_s']} s, peak {out['peak_tree_mb']:.0f} MB, "
          f"disk {out['disk']['total_bytes'] / 2**30:.2f} GiB {out['disk']['by_kind']}", flush=True)
    for name, t in tasks.items():
        print(f"    {name:48} {t['seconds'] or 0:8.1f} s  peak {t['peak_mb'] or 0:8.0f} MB  "
              f"reserved {t['reserved_mb'] or 0:8.0f} MB", flush=True)
    return out


def _git(path: Path, *args: str) -> str | None:
    r = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def worktree_of(ref: str, work: Path) -> tuple[Path, bool]:
    """A checkout of ``ref``: the folder itself when it is one, else a detached git worktree of this repo."""
    if Path(ref).is_dir():
        return Path(ref).resolve(), False
    dest = work / f"ref-{re.sub(r'[^A-Za-z0-9_.-]', '_', ref)}"
    r = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), ref], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: --compare {ref}: not a folder nor a git ref of {REPO}: {r.stderr.strip()}")
    return dest, True


# ---------------------------------------------------------------- command line

def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["_write"], ["_describe"], ["_check"]):
        return _child(argv)
    write_only = argv[:1] == ["write"]
    if write_only:
        argv = argv[1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*sorted(SPECS), DEMO], default="qwen2.5-0.5b",
                    help="a model of published dimensions, or demo: the checkout's own demo config (the tiny end of the ledger)")
    ap.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose doit builds (default: this one)")
    ap.add_argument("--compare", metavar="REF", help="also build with REF (a folder, or a git ref of this repo)")
    ap.add_argument("--leaves", nargs="+", default=DEFAULT_LEAVES, metavar="MODE:T[,T]",
                    help="the shape set (default: prefill and decode at T 512, 1024, 2048, 4096)")
    ap.add_argument("--config-line", action="append", default=[], metavar="LINE",
                    help="a line added to the model's config (e.g. 'chunks = 4'); repeatable")
    ap.add_argument("-n", type=int, default=1, dest="jobs", help="doit -n")
    ap.add_argument("--memory-budget", type=int, metavar="MB", help="the build's memory budget (default: the "
                    "project's, three quarters of the machine); the build sees no other MODEL_EXPORT_* variable")
    ap.add_argument("--targets", nargs="*", default=[], help="doit's targets (default: the whole build)")
    ap.add_argument("--rewrite", action="store_true", help="write the model folder again")
    ap.add_argument("--check", action="store_true", help="(write) check the folder: index, shards, one tensor")
    ap.add_argument("--clean", action="store_true", help="delete the cached model folder when done")
    ap.add_argument("--keep", action="store_true", help="keep the build projects (their path is printed)")
    ap.add_argument("--reuse", type=Path, metavar="PROJECT",
                    help="build in this kept project (--keep) with the checkout's code: its artifacts and cache stay, "
                         "only the steps the new code changes run (e.g. verify_coreml after a change of the interpreter)")
    args = ap.parse_args(argv)

    if args.model == DEMO:
        if write_only or args.config_line or args.leaves != DEFAULT_LEAVES:
            raise SystemExit("error: --model demo builds the checkout's own demo config: no write, --leaves or --config-line")
        model = {"parameters": 0, "bytes": 0, "files": [], "folder": ""}
    else:
        model = ensure_model(args.model, force=args.rewrite)
    print(f"model {args.model}: {model['parameters'] / 1e9:.3f}B parameters, {model['bytes'] / 2**30:.2f} GiB in "
          f"{len(model['files'])} file(s) at {model['folder']}", flush=True)
    folder = Path(model["folder"]) if args.model != DEMO else None  # demo: no folder of ours (never cleaned)
    if write_only:
        if args.check or model.get("sharded"):
            log = Path(tempfile.mkstemp(prefix="scale-check-")[1])
            res = measure([sys.executable, __file__, "_check", "--model", args.model], REPO, dict(os.environ), log=log)
            model["check"] = {**json.loads(log.read_text().strip().splitlines()[-1]),
                              "wall_s": res["wall_s"], "peak_tree_mb": res["peak_mb"]}
            log.unlink()
            print(f"check: {model['check']}", flush=True)
        path = write_result(f"scale-write-{args.model}", {"model": {"name": args.model, **SPECS[args.model], **model}})
        print(path)
        if args.clean:
            shutil.rmtree(folder)
        return

    shapes = parse_leaves(args.leaves) if args.model != DEMO else "the checkout's shape_sets.json"
    work = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=os.environ.get("MODEL_EXPORT_BENCH_WORK")))
    added = []
    try:
        runs = {}
        checkouts = [args.checkout.resolve()]
        if args.compare:
            ref, is_worktree = worktree_of(args.compare, work)
            checkouts.insert(0, ref)
            if is_worktree:
                added.append(ref)
        for i, co in enumerate(checkouts):
            label = "reference" if args.compare and i == 0 else "checkout"
            runs[label] = run_build(co, args.model, folder, shapes, args.config_line, args.jobs, args.targets, work,
                                    args.keep, tag=f"{i}-{co.name}", reuse=args.reuse.resolve() if args.reuse else None,
                                    budget_mb=args.memory_budget)
        data = {"model": {"name": args.model, **SPECS.get(args.model, {}), **model}, "leaves": shapes, "jobs": args.jobs,
                "targets": args.targets, "runs": runs}
        if args.compare:
            a, b = runs["checkout"], runs["reference"]
            data["checkout_over_reference"] = {
                "wall": round(a["wall_s"] / b["wall_s"], 3), "peak_tree": round(a["peak_tree_mb"] / b["peak_tree_mb"], 3),
                "disk": round(a["disk"]["total_bytes"] / max(b["disk"]["total_bytes"], 1), 3)}
            same = {name: pkg["weight_digests"] == b["packages"].get(name, {}).get("weight_digests")
                    for name, pkg in a["packages"].items()}
            data["same_weight_files_as_reference"] = same
            print(f"checkout / reference: {data['checkout_over_reference']}", flush=True)
            print(f"packages whose weight files are the reference's: {sum(same.values())} of {len(same)}; not: "
                  f"{sorted(k for k, v in same.items() if not v)}", flush=True)
        path = write_result(f"scale-{args.model}", data)
        print(path)
    finally:
        for wt in added:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if args.clean and folder is not None and folder.parent == MODELS_DIR:
            shutil.rmtree(folder, ignore_errors=True)


def _child(argv: list[str]) -> None:
    """The child processes that import torch: write, describe or check a model folder."""
    what, name = argv[0], argv[argv.index("--model") + 1]
    spec, folder = SPECS[name], MODELS_DIR / name
    if what == "_write":
        info = write_model(folder, make_config(spec["config_class"], spec["config"], spec["dtype"]), spec["shard_mb"])
        print(json.dumps(info))
    elif what == "_describe":
        print(json.dumps(describe(folder)))
    else:
        print(json.dumps(check_folder(folder)))


if __name__ == "__main__":
    main()
