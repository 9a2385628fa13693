"""The comparison of docs/experiments.md: each method against its top-K SMoE baseline, several
seeds each, on the built-in corpus, through `moectl train` exactly as a user runs it.

    python bench/experiments.py --seeds 0 1 2 --out runs/experiments      # about 35 min on 2 CPU cores
    python bench/experiments.py --report-only --out runs/experiments      # table from finished runs

Every run uses the same validation set (data.split_seed: 0 in the tiny recipes) and the same number
of training tokens; only the model seed and data order change with the seed. Prints a Markdown
table of final validation loss (mean, sample standard deviation, per-seed values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

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


def summary(recipe: str, seed: int, out: Path) -> dict:
    return json.loads((run_dir(out, recipe, seed) / "logs" / "summary.json").read_text())


def active_params(recipe: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "moectl", "build", recipe, "--json"], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)["params"]["active"]


def last_routing(recipe: str, seed: int, out: Path) -> tuple[float, float]:
    """(mean routing entropy over layers, worst layer's load imbalance) of the last logged window."""
    path = run_dir(out, recipe, seed) / "logs" / "metrics.jsonl"
    last = [json.loads(x) for x in path.read_text().splitlines() if '"type": "train"' in x][-1]
    layers = last["layers"].values()
    return statistics.mean(v["entropy"] for v in layers), last["imbalance_max"]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def report(seeds: list[int], out: Path) -> str:
    """Final validation loss per recipe (mean ± sample sd over seeds, and each seed), the paired
    difference to the baseline (same seed: same data order), and the routing at the end."""
    lines = ["| method | recipe | active params | val loss (mean ± sd) | per seed | Δ vs SMoE (paired) "
             "| routing entropy | max imbalance |",
             "|---|---|---|---|---|---|---|---|"]
    for method, recipe, base in COMPARISONS:
        base_vals = [summary(base, s, out)["final_val_loss"] for s in seeds]
        for label, r in ((method, recipe), ("top-K SMoE", base)):
            vals = [summary(r, s, out)["final_val_loss"] for s in seeds]
            delta = mean_sd([v - b for v, b in zip(vals, base_vals, strict=True)]) if r != base else "–"
            routing = [last_routing(r, s, out) for s in seeds]
            lines.append(f"| {label} | `{r}` | {active_params(r) / 1e6:.3f}M | {mean_sd(vals)} "
                         f"| {', '.join(f'{v:.4f}' for v in vals)} | {delta} "
                         f"| {statistics.mean(e for e, _ in routing):.3f} "
                         f"| {statistics.mean(i for _, i in routing):.2f} |")
    return "\n".join(lines)


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
    print(report(args.seeds, args.out))


if __name__ == "__main__":
    main()
