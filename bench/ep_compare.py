"""Tables for bench/ep_check.sh from the run folders it trained.

    python bench/ep_compare.py parity BASELINE_RUN EP_RUN...   # per-step loss / aux / grad_norm differences
    python bench/ep_compare.py speed RUN...                     # tokens/s per process and peak memory

Run folders are named by what they ran (ep2, ep4-uniform, ...); the name is printed as the row label.
`parity` exits 1 when a difference exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train_records(run: Path) -> dict[int, dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r.get("type") == "train"}


def parity(base: Path, runs: list[Path], tol: float) -> int:
    ref = _train_records(base)
    worst_all = 0.0
    print(f"against {base.name} ({len(ref)} steps):")
    print(f"{'run':20s} {'loss':>10s} {'aux_loss':>10s} {'grad_norm':>10s}   (largest |difference| over the steps)")
    for run in runs:
        got = _train_records(run)
        if sorted(got) != sorted(ref):
            print(f"{run.name:20s} logged steps {sorted(got)} differ from {sorted(ref)}")
            worst_all = float("inf")
            continue
        worst = {k: max(abs(got[s][k] - ref[s][k]) for s in ref) for k in ("loss", "aux_loss", "grad_norm")}
        worst_all = max(worst_all, *worst.values())
        print(f"{run.name:20s} {worst['loss']:10.2e} {worst['aux_loss']:10.2e} {worst['grad_norm']:10.2e}")
    print(f"largest difference {worst_all:.2e} (tolerance {tol:g})")
    return 0 if worst_all <= tol else 1


def speed(runs: list[Path]) -> int:
    print(f"{'run':20s} {'processes':>9s} {'tokens/s/process':>17s} {'peak GiB':>9s} {'exchange share':>15s}")
    for run in runs:
        summary = json.loads((run / "logs" / "summary.json").read_text())
        world = summary.get("provenance", {}).get("world_size") or 1
        records = list(_train_records(run).values())[1:] or list(_train_records(run).values())
        shares = [r["exchange_share"] for r in records if "exchange_share" in r]
        share = f"{sum(shares) / len(shares):.1%}" if shares else "-"
        print(f"{run.name:20s} {world:9d} {summary['tokens_per_s'] / world:17,.0f} "
              f"{summary.get('peak_memory_bytes', 0) / 2**30:9.2f} {share:>15s}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["parity", "speed"])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    if args.what == "parity":
        return parity(args.runs[0], args.runs[1:], args.tol)
    return speed(args.runs)


if __name__ == "__main__":
    sys.exit(main())
