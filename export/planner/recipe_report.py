"""The recipe table of the report: per model, each recipe's size and measured quality, sorted by size.

Read from the artifacts the compress steps wrote (``<model>/coreml/<mode>_T<n>.<recipe>.quality.json``,
export/coreml/quality.py) and the bundles' sizes. Over a recipe's leaves: the largest max abs error, the
mean of the mean abs errors and of the KL divergences, the lowest top-1 agreement. Imports no torch.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

QUALITY = re.compile(r"^(?P<leaf>[a-z]+_T\d+)\.(?P<recipe>[A-Za-z0-9_-]+)\.quality\.json$")


def _tree_size(p: Path) -> int | None:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else None


def recipe_tables(artifacts: Path) -> dict[str, list[dict]]:
    """{model: [row per recipe, smallest first]}; models without recipes are left out."""
    out: dict[str, list[dict]] = {}
    for model in sorted(Path(artifacts).glob("*/")):
        by_recipe: dict[str, list[dict]] = {}
        for q in sorted((model / "coreml").glob("*.quality.json")):
            m = QUALITY.match(q.name)
            if not m:
                continue
            try:
                by_recipe.setdefault(m["recipe"], []).append({"leaf": m["leaf"], **json.loads(q.read_text())})
            except (OSError, ValueError):
                continue
        rows = []
        float_bundle = _tree_size(model / f"{model.name}.mlpackage")
        for recipe, leaves in by_recipe.items():
            bundle = _tree_size(model / f"{model.name}.{recipe}.mlpackage")
            size = bundle if bundle is not None else sum(x["size_bytes"] for x in leaves)
            float_size = float_bundle if bundle is not None and float_bundle else sum(x["float_size_bytes"] for x in leaves)
            row = {"recipe": recipe, "leaves": len(leaves), "size_bytes": size,
                   "size_ratio": round(size / float_size, 4) if float_size else None,
                   "max_abs_err": max(x["max_abs_err"] for x in leaves),
                   "mean_abs_err": sum(x["mean_abs_err"] for x in leaves) / len(leaves)}
            if all("top1_agreement" in x for x in leaves):
                row["top1_agreement"] = min(x["top1_agreement"] for x in leaves)
                row["mean_kl"] = sum(x["mean_kl"] for x in leaves) / len(leaves)
            rows.append(row)
        if rows:
            out[model.name] = sorted(rows, key=lambda r: (r["size_bytes"], r["recipe"]))
    return out


def to_html(tables: dict[str, list[dict]]) -> str:
    if not tables:
        return ""
    parts = ["<h2>Recipes</h2>"]
    for model, rows in tables.items():
        parts.append(f"<h3>{html.escape(model)}</h3><table><tr><th>recipe</th><th>size</th><th>x float</th>"
                     "<th>max abs err</th><th>mean abs err</th><th>top-1 agreement</th><th>mean KL</th></tr>")
        for r in rows:
            top1 = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else ""
            kl = f"{r['mean_kl']:.6f}" if "mean_kl" in r else ""
            ratio = "" if r["size_ratio"] is None else f"{r['size_ratio']:.3f}"
            parts.append(f"<tr><td><code>{html.escape(r['recipe'])}</code></td><td class=n>{r['size_bytes'] / 1e6:.2f} MB</td>"
                         f"<td class=n>{ratio}</td><td class=n>{r['max_abs_err']:.4g}</td>"
                         f"<td class=n>{r['mean_abs_err']:.4g}</td><td class=n>{top1}</td><td class=n>{kl}</td></tr>")
        parts.append("</table>")
    return "".join(parts)
