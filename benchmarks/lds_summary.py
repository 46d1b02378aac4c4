"""One table of every method measured on an LDS benchmark, gathered from its `lds eval` tables.

    .venv/bin/python benchmarks/lds_summary.py benchmarks/lds/digits8 \
        results baselines baselines-model baselines-model-K100 ensembles ekfac \
        [--out benchmarks/lds/digits8/all-methods.md]

Reads ``BENCH/NAME.json`` for each NAME (the JSON that ``diffattr lds eval --out BENCH/NAME.md``
writes next to its table), keeps the first row of each (method, K) and prints the rows sorted
by K, then by cross-fitted validation LDS (highest first), with their CIs over targets and the
table each came from. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def cell(d: dict | None) -> str:
    if not d or d.get("lds") is None or math.isnan(d["lds"]):
        return "–"
    if "ci_targets" not in d:
        return f"{d['lds']:.3f}"
    lo, hi = d["ci_targets"]
    edge = " †" if d.get("lambda_at_edge") else ""
    return f"{d['lds']:.3f} [{lo:.3f}, {hi:.3f}]{edge}"


def default_cell(d: dict | None) -> str:
    """LDS with the method's default λ rule (what `diffattr score` gives); – if not recorded."""
    if not d or d.get("default_lds") is None:
        return "–"
    return f"{d['default_lds']:.3f}"


def gather(bench: Path, names: list[str]) -> tuple[list[dict], dict]:
    rows, seen, ceiling = [], set(), {}
    for name in names:
        path = bench / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such table (run `diffattr lds eval ... --out` first)")
        for r in json.loads(path.read_text()):
            if r["method"] == "noise ceiling":  # one row per target kind
                for kind in ("val", "gen"):
                    if r.get(kind):
                        ceiling.setdefault(kind, r[kind])
                continue
            key = (r["method"], r.get("timesteps"))
            if key not in seen:
                seen.add(key)
                rows.append({**r, "source": name})
    return rows, ceiling


def table(rows: list[dict], ceiling: dict) -> str:
    def order(r: dict) -> tuple:
        k = r.get("timesteps")
        val = (r.get("val") or {}).get("lds")
        return (k if isinstance(k, int) else -1, -(val if val is not None else -math.inf))

    lines = [
        "| method | K | val LDS (cross-fit λ) [CI targets] | val default λ "
        "| gen LDS (cross-fit λ) [CI targets] | gen default λ | table |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=order):
        k = r.get("timesteps")
        lines.append(
            f"| {r['method']} | {k if isinstance(k, int) else '–'} | {cell(r.get('val'))} "
            f"| {default_cell(r.get('val'))} | {cell(r.get('gen'))} "
            f"| {default_cell(r.get('gen'))} | {r['source']} |"
        )
    if ceiling:
        val, gen = ceiling.get("val"), ceiling.get("gen")
        lines.append(f"| noise ceiling | – | {cell(val)} | | {cell(gen)} | | |")
    if any((r.get(k) or {}).get("lambda_at_edge") for r in rows for k in ("val", "gen")):
        lines += ["", "† λ chosen at an end of its grid."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", type=Path, help="benchmark directory")
    p.add_argument("tables", nargs="+", help="names of its lds eval tables (without .md)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    text = table(*gather(args.bench, args.tables)) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
