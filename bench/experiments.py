"""The comparison of docs/experiments.md: each method against its top-K SMoE baseline, several
seeds each, on the built-in corpus, through `moectl train` exactly as a user runs it.

    python bench/experiments.py --seeds 0 1 2 --out runs/experiments      # about 35 min on 2 CPU cores
    python bench/experiments.py --report-only --out runs/experiments      # table from finished runs

Every run uses the same validation set (data.split_seed: 0 in the tiny recipes) and the same number
of training tokens; only the model seed and data order change with the seed. Prints a Markdown
table of final validation loss (mean, sample standard deviation, per-seed values), built by
moectl.eval.compare (what `moectl compare` prints; docs/compare.md) for each method and its baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moectl.errors import MoectlError
from moectl.eval.compare import compare_paths, fmt_stat, fmt_value

COMPARISONS = [  # (method, recipe, baseline recipe)
    ("CartesianMoE", "papers/cartesianmoe/cartesian-base-tiny", "papers/cartesianmoe/smoe-share-base-tiny"),
    ("RMoE (GRU)", "papers/rmoe/rmoe-enwik8-tiny", "papers/rmoe/smoe-enwik8-tiny"),
    ("CompeteSMoE (2025)", "papers/competesmoe/competesmoe-154m-tiny", "papers/competesmoe/smoe-154m-tiny"),
]


def run_dir(out: Path, recipe: str, seed: int) -> Path:
    return out / recipe.replace("/", "_") / f"seed{seed}"


def train(recipe: str, seed: int, out: Path, overrides: list[str]) -> None:
    target = run_dir(out, recipe, seed)
    if (target / "logs" / "summary.json").is_file():
        return
    cmd = [sys.executable, "-m", "moectl", "train", recipe, f"seed={seed}", *overrides, "--run-dir", str(target), "-q"]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def active_params(recipe: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "moectl", "build", recipe, "--json"], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)["params"]["active"]


def report(seeds: list[int], out: Path) -> str:
    """Final validation loss per recipe (mean ± sample sd over seeds, and each seed), the paired
    difference to the baseline (same seed: same data order), and the routing at the end, as
    `moectl compare` computes them (the runs grouped by recipe, the baseline recipe first)."""
    lines = ["| method | recipe | active params | val loss (mean ± sd) | per seed | Δ vs SMoE (paired) "
             "| routing entropy | max imbalance |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for method, recipe, base in COMPARISONS:
        result = compare_paths([run_dir(out, r, s) for r in (base, recipe) for s in seeds], group_by="recipe")
        if len(result.groups) != 2:
            raise MoectlError(f"{recipe} and {base} trained the same recipe", hint="check COMPARISONS")
        base_group, method_group = result.groups
        notes += result.notes
        for label, r, g in ((method, recipe, method_group), ("top-K SMoE", base, base_group)):
            delta = "–" if g.paired is None else fmt_stat(g.paired["val_loss"], 4, signed=True)
            lines.append(f"| {label} | `{r}` | {active_params(r) / 1e6:.3f}M | {fmt_stat(g.stats['val_loss'], 4)} "
                         f"| {', '.join(fmt_value(v, 4) for v in g.column('val_loss'))} | {delta} "
                         f"| {fmt_value(g.stats['routing_entropy']['mean'], 3)} "
                         f"| {fmt_value(g.stats['max_imbalance']['mean'], 2)} |")
    return "\n".join(lines + [""] * bool(notes) + [f"- note: {n}" for n in dict.fromkeys(notes)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train this many steps instead of the recipes' 400 (the schedule stretches with it); "
                         "use another --out")
    args = ap.parse_args()
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    if not args.report_only:
        for seed in args.seeds:
            for _, recipe, base in COMPARISONS:
                train(base, seed, args.out, overrides)
                train(recipe, seed, args.out, overrides)
    try:
        print(report(args.seeds, args.out))
    except MoectlError as e:
        sys.exit(e.render())


if __name__ == "__main__":
    main()
