"""The studies of docs/experiments.md: each paper method against its top-K SMoE baseline and the
ablations that explain the result, several seeds each, on the built-in corpus, through
`moectl train`, `moectl eval` and `moectl compare` exactly as a user runs them.

    python bench/experiments.py                               # every study, seeds 0 1 2, 2 runs at a time
    python bench/experiments.py rmoe rmoe-init --seeds 0      # some studies, one seed
    python bench/experiments.py --report-only                 # the tables again from finished runs
    python bench/experiments.py --list                        # the studies and the commands of their rows
    python bench/experiments.py competesmoe --arm "router loss 0.1"   # one row (and its baseline), every seed

A run is `moectl train RECIPE seed=S [OVERRIDES] --run-dir OUT/<arm>/seedS -q`, then
`moectl eval OUT/<arm>/seedS --no-plots -q`; finished runs and evaluations are kept. Each study's
table is what `moectl compare` prints for its runs (the first arm is the baseline; losses are those
of `moectl eval` on the whole validation split), followed by the study's own measures taken from
the runs' eval/results.json and logs/metrics.jsonl. With --jobs N, N runs train at once, each with
cores / N threads (a run's numbers depend on its thread count: docs/experiments.md gives the one used).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from moectl.compare.comparison import compare_paths, fmt_stat, mean_sd, to_markdown
from moectl.errors import MoectlError
from moectl.rundir import RunDir


@dataclass(frozen=True)
class Arm:
    label: str
    recipe: str
    overrides: tuple[str, ...] = ()

    def slug(self) -> str:
        """The arm's folder name: recipe and overrides, shortened with a hash of the overrides when
        it would pass 150 characters (a file name may hold 255 bytes)."""
        name = self.recipe.replace("/", "_")
        if self.overrides:
            name += "__" + "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", o) for o in self.overrides)
        if len(name) > 150:
            digest = hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:12]
            name = f"{name[:130]}__{digest}"
        return name


@dataclass(frozen=True)
class Study:
    title: str
    arms: tuple[Arm, ...]           # the first is the baseline
    measures: tuple[str, ...] = ()  # extra tables: "robustness", "balance", "agreement"


CART = "papers/cartesianmoe/"
RMOE = "papers/rmoe/"
COMP = "papers/competesmoe/"
SMOE_SHARE = Arm("SMoE-Share", CART + "smoe-share-base-tiny")
CARTESIAN = Arm("CartesianMoE", CART + "cartesian-base-tiny")
SMOE_RMOE = Arm("SMoE", RMOE + "smoe-enwik8-tiny")
RMOE_GRU = Arm("RMoE (GRU)", RMOE + "rmoe-enwik8-tiny")
SMOE_154 = Arm("SMoE", COMP + "smoe-154m-tiny")
COMPETE = Arm("CompeteSMoE (2025)", COMP + "competesmoe-154m-tiny")
C = "model.moe.competition."
# moectl's default regularisers, which the 154M recipes used before they took the authors' code's
SWITCH_LOSSES = ("model.moe.balance_form=switch", "model.moe.balance_pooling=batch", "model.moe.z_loss_weight=0.001")
COMPETE_SWITCH = (C + "balance_weight=0.01", C + "balance_form=switch_top1", C + "balance_pooling=batch",
                  C + "balance_scores=softmax")

STUDIES: dict[str, Study] = {
    "cartesian": Study("CartesianMoE vs SMoE-Share, and routing robustness against top-K",
                       (SMOE_SHARE, CARTESIAN, Arm("SMoE-Top3", CART + "smoe-top3-base-tiny")),
                       measures=("robustness",)),
    "rmoe": Study("RMoE vs SMoE: the pair, and the routing analysis of the RMoE paper",
                  (SMOE_RMOE, RMOE_GRU,
                   Arm("RMoE, no output bias", RMOE_GRU.recipe, ("model.moe.router.output_bias=false",))),
                  measures=("balance",)),
    "rmoe-init": Study("RMoE with each router initialisation",
                       (SMOE_RMOE, RMOE_GRU,
                        Arm("RMoE, router N(0, 0.02)", RMOE_GRU.recipe, ("model.moe.router_init=scaled_normal",)),
                        Arm("RMoE, router sigma_moe", RMOE_GRU.recipe, ("model.moe.router_init=sigma_moe",)),
                        Arm("SMoE, router N(0, 0.02)", SMOE_RMOE.recipe, ("model.moe.router_init=scaled_normal",))),
                       measures=("balance",)),
    "competesmoe": Study("CompeteSMoE (2025) vs SMoE, and its ablations",
                         (SMOE_154, COMPETE,
                          Arm("rate 0", COMPETE.recipe, (C + "rate=0",)),
                          Arm("router loss 0.01", COMPETE.recipe, (C + "router_loss_weight=0.01",)),
                          Arm("router loss 0.1", COMPETE.recipe, (C + "router_loss_weight=0.1",)),
                          Arm("softmax gates", COMPETE.recipe, (C + "gate=softmax",)),
                          Arm("warm-up 5%", COMPETE.recipe, (C + "warmup=0.05",)),
                          Arm("SMoE, Switch balance + z-loss", SMOE_154.recipe, SWITCH_LOSSES),
                          Arm("CompeteSMoE, Switch balances + z-loss", COMPETE.recipe,
                              SWITCH_LOSSES + COMPETE_SWITCH)),
                         measures=("agreement",)),
}


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.slug() / f"seed{seed}"


def train_cmd(arm: Arm, seed: int, target: Path) -> list[str]:
    return ["moectl", "train", arm.recipe, f"seed={seed}", *arm.overrides, "--run-dir", str(target), "-q"]


def eval_cmd(target: Path) -> list[str]:
    return ["moectl", "eval", str(target), "--no-plots", "-q"]


def _run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(" ".join(cmd), flush=True)
    proc = subprocess.run([sys.executable, "-m", *cmd], env=env, stdout=subprocess.DEVNULL)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def produce(arm: Arm, seed: int, out: Path, threads: int) -> None:
    """Train (unless finished) and evaluate (unless evaluated) one run."""
    target = run_dir(out, arm, seed)
    run = RunDir(target)
    if not run.summary.is_file():
        _run(train_cmd(arm, seed, target), threads)
    if not run.eval_results.is_file():
        _run(eval_cmd(target), threads)


# ----------------------------------------------------------------------------- measures


def _stat(values: list[float | None], digits: int) -> str:
    """"mean ± sd" of the finite values, as `moectl compare` prints them."""
    return fmt_stat(mean_sd([v for v in values if v is not None and math.isfinite(v)]), digits)


def _results(target: Path) -> dict:
    return RunDir(target).read_eval_results()


def _records(target: Path) -> list[dict]:
    return RunDir(target).read_metrics()


def _mean_offdiag(matrix: list[list[float]], adjacent: bool) -> float:
    n = len(matrix)
    pairs = [(i, i + 1) for i in range(n - 1)] if adjacent else [(i, j) for i in range(n) for j in range(n) if i != j]
    return statistics.mean(matrix[i][j] for i, j in pairs) if pairs else math.nan


def robustness_table(study: Study, seeds: list[int], out: Path) -> list[str]:
    lines = ["| arm | perplexity | perplexity without each token's top-1 expert | ratio |", "|---|---|---|---|"]
    for arm in study.arms:
        ppl, rob = [], []
        for s in seeds:
            r = _results(run_dir(out, arm, s))
            ppl.append(r["perplexity"])
            robust = r.get("robustness") or {}
            rob.append(robust.get("perplexity") if robust.get("defined") else None)
        ratio = [b / a for a, b in zip(ppl, rob, strict=True) if b is not None]
        lines.append(f"| {arm.label} | {_stat(ppl, 2)} | {_stat(rob, 2)} | {_stat(ratio, 2)} |")
    return lines


def balance_table(study: Study, seeds: list[int], out: Path) -> list[str]:
    lines = ["| arm | router entropy (nats) | inner balance p(1)/p(2) | outer balance (top-K mass) "
             "| load imbalance (worst layer) | logit std | binned MI, adjacent layers | top-1 MI, adjacent layers |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in study.arms:
        cols: dict[str, list[float]] = {k: [] for k in ("entropy", "inner", "outer", "imb", "logit", "mi", "mi1")}
        for s in seeds:
            r = _results(run_dir(out, arm, s))["routing"]
            o, mi = r["overall"], r["mutual_information"]
            cols["entropy"].append(o["entropy"])
            cols["inner"].append(o["inner_balance"])
            cols["outer"].append(o["outer_balance"])
            cols["imb"].append(o["imbalance_max"])
            cols["logit"].append(o["logit_std"])
            cols["mi"].append(_mean_offdiag(mi["binned"], adjacent=True))
            cols["mi1"].append(_mean_offdiag(mi["top1"], adjacent=True))
        lines.append(f"| {arm.label} | {_stat(cols['entropy'], 3)} | {_stat(cols['inner'], 2)} "
                     f"| {_stat(cols['outer'], 3)} "
                     f"| {_stat(cols['imb'], 2)} | {_stat(cols['logit'], 3)} | {_stat(cols['mi'], 3)} "
                     f"| {_stat(cols['mi1'], 3)} |")
    return lines


def agreement_table(study: Study, seeds: list[int], out: Path) -> list[str]:
    """How often the router agreed with the competition: while training (on the competition steps,
    the router's choice for the same tokens; from logs/metrics.jsonl) and at the end (moectl eval
    runs the competition on the validation tokens)."""
    lines = ["| arm | competitions (layer-forwards) | training: router top-1 = first winner | training: overlap "
             "| end: router top-1 = first winner | end: overlap |", "|---|---|---|---|---|---|"]
    for arm in study.arms:
        n, t_top1, t_over, e_top1, e_over = [], [], [], [], []
        for s in seeds:
            target = run_dir(out, arm, s)
            recs = [r for r in _records(target) if r.get("type") == "train"]
            comp = [r for r in recs if r.get("competitions")]
            n.append(sum(r["competitions"] for r in comp))
            weight = sum(r["competitions"] for r in comp)
            if weight:
                t_top1.append(sum(r["compete_agree_top1"] * r["competitions"] for r in comp) / weight)
                t_over.append(sum(r["compete_agree_overlap"] * r["competitions"] for r in comp) / weight)
            layers = _results(target)["routing"]["layers"].values()
            # results.json version 1 named it competition_agreement
            agree = [v.get("variant_agreement") or v["competition_agreement"] for v in layers
                     if v.get("variant_agreement") or v.get("competition_agreement")]
            if agree:
                e_top1.append(statistics.mean(a["top1"] for a in agree))
                e_over.append(statistics.mean(a["overlap"] for a in agree))
        lines.append(f"| {arm.label} | {_stat(n, 0)} | {_stat(t_top1, 3)} | {_stat(t_over, 3)} | {_stat(e_top1, 3)} "
                     f"| {_stat(e_over, 3)} |")
    return lines


MEASURES = {"robustness": robustness_table, "balance": balance_table, "agreement": agreement_table}


def report(name: str, study: Study, seeds: list[int], out: Path) -> str:
    runs = [run_dir(out, arm, s) for arm in study.arms for s in seeds]
    result = compare_paths(runs, group_by="recipe")
    if len(result.groups) != len(study.arms):
        raise MoectlError(f"study {name}: two of its arms trained the same recipe", hint="check STUDIES")
    labels = "; ".join(f"`{g.label}` = {a.label}" for g, a in zip(result.groups, study.arms, strict=True))
    # compare.md's own headings become bold lines inside this document's section
    md = [("**" + line.lstrip("# ") + "**") if line.startswith("#") else line
          for line in to_markdown(result).strip().splitlines()[1:]]
    parts = [f"### {study.title}", "", f"`moectl compare {' '.join(map(str, runs))}`", "",
             *md, "", f"Arms: {labels}."]
    for m in study.measures:
        parts += ["", *MEASURES[m](study, seeds, out)]
    return "\n".join(parts)


def list_studies(seeds: list[int], out: Path) -> str:
    lines = []
    for name, study in STUDIES.items():
        lines.append(f"{name}: {study.title}")
        for arm in study.arms:
            target = run_dir(out, arm, seeds[0]).parent / "seed{S}"
            lines.append(f"  {arm.label}: {' '.join(train_cmd(arm, 0, target)).replace('seed=0', 'seed={S}')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", help=f"which studies (default all): {', '.join(STUDIES)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/studies"))
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (each with cores / jobs threads)")
    ap.add_argument("--report-only", action="store_true", help="print the tables from finished runs")
    ap.add_argument("--list", action="store_true", help="print the studies and their rows' commands")
    ap.add_argument("--arm", default=None, help="only this arm (its label, as --list prints it) and the study's "
                                                "baseline, in the one study given")
    args = ap.parse_args()
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown:
        sys.exit(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    if args.list:
        print(list_studies(args.seeds, args.out))
        return
    chosen = {n: STUDIES[n] for n in (args.studies or STUDIES)}
    if args.arm is not None:
        if len(chosen) != 1:
            sys.exit("--arm needs exactly one study")
        (name, study), = chosen.items()
        arms = [a for a in study.arms[1:] if a.label == args.arm]
        if not arms:
            sys.exit(f"study {name} has no arm {args.arm!r}; its arms: {', '.join(a.label for a in study.arms[1:])}")
        chosen = {name: replace(study, arms=(study.arms[0], *arms))}
    if not args.report_only:
        todo = list(dict.fromkeys((arm, s) for st in chosen.values() for s in args.seeds
                                  for arm in st.arms))
        threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            futures = [pool.submit(produce, arm, s, args.out, threads) for arm, s in todo]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)   # a failed run stops the queue
                raise
    try:
        for name, study in chosen.items():
            print(report(name, study, args.seeds, args.out), end="\n\n")
    except MoectlError as e:
        sys.exit(e.render())


if __name__ == "__main__":
    main()
