"""The comparison of docs/experiments.md: each method against its top-K SMoE baseline, several
seeds each, on the built-in corpus, through `moectl train` exactly as a user runs it.

    python bench/experiments.py --seeds 0 1 2 --out runs/experiments      # about 40 min on 2 CPU cores
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


def train(recipe: str, seed: int, out: Path) -> None:
    target = run_dir(out, recipe, seed)
    if (target / "logs" / "summary.json").is_file():
        return
    cmd = [sys.executable, "-m", "moectl", "train", recipe, f"seed={seed}", "--run-dir", str(target), "-q"]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def summary(recipe: str, seed: int, out: Path) -> dict:
    return json.loads((run_dir(out, recipe, seed) / "logs" / "summary.json").read_text())


def active_params(recipe: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "moectl", "build", recipe, "--json"], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)["params"]["active"]


def report(seeds: list[int], out: Path) -> str:
    lines = ["| method | recipe | active params | val loss (mean ± sd) | per seed |",
             "|---|---|---|---|---|"]
    for method, recipe, base in COMPARISONS:
        for label, r in ((method, recipe), ("top-K SMoE", base)):
            runs = [summary(r, s, out) for s in seeds]
            vals = [x["final_val_loss"] for x in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            lines.append(f"| {label} | `{r}` | {active_params(r) / 1e6:.3f}M | {statistics.mean(vals):.4f} ± {sd:.4f} "
                         f"| {', '.join(f'{v:.4f}' for v in vals)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/experiments"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            for _, recipe, base in COMPARISONS:
                train(base, seed, args.out)
                train(recipe, seed, args.out)
    print(report(args.seeds, args.out))


if __name__ == "__main__":
    main()
