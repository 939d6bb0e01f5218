"""export_pytorch: one (mode, T) of a checkpoint -> TorchScript / ExportedProgram + contract."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoints, programs


def run(checkpoint: str, out_dir: str, model: str, mode: str, T: int, formats: list[str], dtype: str,
        kv_cache: str = "explicit", architecture: str | None = None, part: dict | None = None) -> None:
    from ...errors import ExportError
    from ...export_pytorch import export_entry, export_part

    if part is not None:  # one part of a parted model: only its tensors are read (export/parts.py)
        loaded = checkpoints.load_part(checkpoint, part)
        if architecture is not None and loaded[0].name != architecture:
            raise ExportError(f"the checkpoint holds a {loaded[0].name!r} model; the config says model {model!r} is a "
                              f"{architecture!r}", file=checkpoint, field="architecture")
        export_part(checkpoint, part, Path(out_dir), model_name=model, mode=mode, T=T, formats=formats, dtype=dtype,
                    kv_cache=kv_cache, loaded=loaded, keep=programs.PROGRAMS.keep,
                    external_weights=True)
        return

    ck, module = checkpoints.load(checkpoint)
    if architecture is not None and ck.arch.name != architecture:
        raise ExportError(f"the checkpoint holds a {ck.arch.name!r} model; the config says model {model!r} is a "
                          f"{architecture!r}", file=checkpoint, field="architecture")
    extra = {"kv_cache": kv_cache} if kv_cache != "explicit" else {}
    export_entry(ck, module, Path(out_dir), model_name=model, mode=mode, T=T, formats=formats, dtype=dtype,
                 keep=programs.PROGRAMS.keep, external_weights=True, **extra)
