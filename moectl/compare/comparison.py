"""Comparing finished runs: final metrics per group of runs (a recipe's seeds), mean and sample
standard deviation over the group, and differences against a baseline group paired by seed.

    runs = load_runs(["runs/smoe-s0", "runs/smoe-s1", "runs/rmoe-s0", "runs/rmoe-s1"])
    result = compare_runs(runs, group_by="recipe", baseline=None)   # baseline: the first group
    print(to_markdown(result))

Everything here is plain Python on the files a run folder holds (config.yaml, logs/summary.json,
logs/metrics.jsonl, eval/results.json); nothing is imported from torch. docs/compare.md describes
the rules and the compare.json format (`Comparison.to_dict`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moectl import provenance
from moectl.errors import MoectlError
from moectl.fsutil import json_safe
from moectl.rundir import RunDir, damaged

FORMAT = "moectl.compare"
VERSION = 1

# Keys that say where a run lives, not what it trains: never part of a group's identity.
LOCATION_KEYS = ("train.run_dir", "data.cache_dir")
# Also left out when grouping by recipe: the seeds of one recipe form its group, whatever it is called.
SEED_AND_NAME_KEYS = ("seed", "name", "description")

RUN_HINT = "give run folders written by `moectl train` (runs/<name>)"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int
    delta: bool = True      # the table shows its paired difference to the baseline
    table: bool = True      # shown in the table (compare.json always holds every metric)


METRICS = (
    Metric("val_loss", "val loss", "nats/token", 4),
    Metric("perplexity", "ppl", "", 2),
    Metric("bits_per_byte", "bits/byte", "bits", 4),
    Metric("robust_perplexity", "robust ppl", "", 2),
    Metric("routing_entropy", "entropy", "nats", 3, delta=False),
    Metric("max_imbalance", "imbalance", "max/mean load", 2, delta=False),
    Metric("tokens_per_s", "tokens/s", "tokens/s", 0, delta=False, table=False),
)
METRIC = {m.key: m for m in METRICS}


@dataclass
class RunData:
    """What compare reads from one finished run folder."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]          # logs/metrics.jsonl
    results: dict[str, Any] | None         # eval/results.json, if `moectl eval` wrote one

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


# --------------------------------------------------------------------------- reading runs


def validation_curve(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, validation losses) of a run's evaluation records, non-finite losses left out."""
    points = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"
              and isinstance(r.get("step"), int) and _num(r.get("val_loss")) is not None]
    return [s for s, _ in points], [v for _, v in points]


def read_run(path: str | Path) -> RunData:
    """Read one finished run folder, or raise a MoectlError that says what is wrong with it."""
    p = Path(path)
    if not p.exists():
        raise MoectlError(f"no such run folder: {path}", hint=RUN_HINT)
    if not p.is_dir():
        raise MoectlError(f"{path} is a file, not a run folder", hint=RUN_HINT)
    run = RunDir(p)
    if not run.config.is_file():
        raise MoectlError(f"{path} is not a run folder (no config.yaml)", hint=RUN_HINT)
    config = run.read_config()
    summary = run.read_summary()
    if summary is None:
        raise MoectlError(f"{path} has not finished training (no logs/summary.json)",
                          hint=f"finish it first (`moectl train {path}` continues it), or leave it out")
    if "final_val_loss" not in summary:
        raise damaged(run.summary, "no final_val_loss")
    records = run.read_metrics()
    results = run.read_eval_results()
    if results is not None and _num(results.get("loss")) is None:
        raise damaged(run.eval_results, "no finite loss")
    return RunData(p, config, summary, records, results)


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Read several run folders; none given, or one given twice, is an error."""
    if not paths:
        raise MoectlError("no runs to compare", hint="give two or more run folders, e.g. "
                          "moectl compare runs/a runs/b")
    seen: dict[Path, str] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise MoectlError(f"{p} is given twice (as {seen[key]} too)", hint="give each run once")
        seen[key] = str(p)
    return [read_run(p) for p in paths]


# --------------------------------------------------------------------------- metrics


def _num(x: Any) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _routing(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean routing entropy over layers and the worst layer's imbalance, last logged training window."""
    last = next((r for r in reversed(records) if r.get("type") == "train"), {})
    layers = last.get("layers") if isinstance(last.get("layers"), dict) else {}
    entropies = [_num(v.get("entropy")) for v in layers.values() if isinstance(v, dict)]
    entropy = statistics.mean(entropies) if entropies and None not in entropies else None
    return {"routing_entropy": entropy, "max_imbalance": _num(last.get("imbalance_max"))}


def run_metrics(run: RunData, source: str) -> dict[str, float | None]:
    """The run's final metrics; `source` "eval" takes the quality metrics from eval/results.json,
    "training" from logs/summary.json (perplexity = exp(final validation loss))."""
    out: dict[str, float | None] = dict.fromkeys(METRIC)
    if source == "eval" and run.results is not None:
        r = run.results
        robust = r.get("robustness") if isinstance(r.get("robustness"), dict) else {}
        out.update(val_loss=_num(r.get("loss")), perplexity=_num(r.get("perplexity")),
                   bits_per_byte=_num(r.get("bits_per_byte")),
                   robust_perplexity=_num(robust.get("perplexity")) if robust.get("defined") else None)
    else:
        loss = _num(run.summary.get("final_val_loss"))
        out.update(val_loss=loss, perplexity=math.exp(loss) if loss is not None and loss < 700 else None)
    out.update(_routing(run.records), tokens_per_s=_num(run.summary.get("tokens_per_s")))
    return out


def choose_source(runs: list[RunData]) -> tuple[str, list[str]]:
    """"eval" when every run has eval/results.json, else "training" for all (never a mix: the two
    measure over different tokens), with notes saying so."""
    have = [r for r in runs if r.results is not None]
    if runs and len(have) == len(runs):
        notes = [f"{r.path}: evaluated at step {r.results.get('step')} of {r.summary.get('steps')}"
                 for r in runs if r.results.get("step") not in (None, r.summary.get("steps"))]
        data = {json.dumps([*((r.results.get("data") or {}).get(k) for k in ("description", "split", "tokens")),
                            r.results.get("bytes")], default=str) for r in runs}
        if len(data) > 1:
            notes.append("the runs were evaluated on different data, or on different amounts of it (--batches; "
                         "see data and bytes in each eval/results.json): their scores may not be comparable")
        return "eval", notes
    if have:
        return "training", [f"eval/results.json left unused: only {len(have)} of {len(runs)} runs have one "
                            "(metrics of different evaluations are not comparable; run `moectl eval` on "
                            "the others to use them)"]
    return "training", []


# --------------------------------------------------------------------------- statistics


def mean_sd(values: list[float]) -> dict[str, Any]:
    """{"n", "mean", "sd"}: the mean and the sample standard deviation (n - 1; None below 2 values)."""
    return {"n": len(values), "mean": statistics.mean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None}


def _seed_order(seed: Any) -> tuple:
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed))


# --------------------------------------------------------------------------- groups


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as {dotted.key: value}; null values and empty sections are left out (a
    section that is off reads the same written or not)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif v is not None:
            out[key] = v
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [value in a, value in b]} for every flattened key whose values differ (None: unset)."""
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass
class Group:
    """Runs compared as one: the seeds of one recipe (or a single run with --group-by run)."""

    label: str
    recipe: str                                   # the recipe name of its first run
    content: dict[str, Any]                       # the flattened recipe that defines the group
    runs: list[RunData]
    metrics: list[dict[str, float | None]] = field(default_factory=list)   # one per run
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    paired: dict[str, dict[str, Any]] | None = None                          # None: the baseline
    differs: dict[str, list[Any]] = field(default_factory=dict)              # from the baseline

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def column(self, key: str) -> list[float | None]:
        return [m[key] for m in self.metrics]

    def by_seed(self, key: str) -> dict[Any, float | None]:
        return {r.seed: m[key] for r, m in zip(self.runs, self.metrics, strict=True)}


def group_runs(runs: list[RunData], by: str = "recipe") -> list[Group]:
    """Groups in the order their first run was given. By "recipe": runs whose resolved recipes are
    equal once seed, name, description and location keys are left out; one seed each. By "run":
    every run alone."""
    if by not in ("recipe", "run"):
        raise MoectlError(f"cannot group by {by!r}", hint="group by 'recipe' or 'run'")
    drop = LOCATION_KEYS + (SEED_AND_NAME_KEYS if by == "recipe" else ())
    groups: dict[str, Group] = {}
    for i, run in enumerate(runs):
        content = {k: v for k, v in flatten(run.config).items() if k not in drop}
        key = json.dumps(content, sort_keys=True, default=str) if by == "recipe" else str(i)
        groups.setdefault(key, Group("", run.name, content, [])).runs.append(run)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: _seed_order(r.seed))
        for a, b in zip(g.runs, g.runs[1:], strict=False):
            if a.seed == b.seed:
                raise MoectlError(f"{a.path} and {b.path} are the same recipe with the same seed ({a.seed})",
                                  hint="give one of them, or compare them one by one with --group-by run")
    (_recipe_labels if by == "recipe" else _run_labels)(out)
    return out


def _short(value: Any) -> str:
    text = "unset" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _recipe_labels(groups: list[Group]) -> None:
    """The recipe name; groups of different recipes with one name get what sets them apart from
    the first of that name (two keys, and how many more)."""
    first: dict[str, Group] = {}
    for i, g in enumerate(groups, 1):
        if g.recipe not in first:
            first[g.recipe], g.label = g, g.recipe
            continue
        diff = differences(first[g.recipe].content, g.content)
        words = ", ".join(f"{k}={_short(v[1])}" for k, v in list(diff.items())[:2])
        more = f", +{len(diff) - 2} more" if len(diff) > 2 else ""
        g.label = f"{g.recipe} ({words}{more})" if diff else f"{g.recipe} #{i}"
    _make_unique(groups)


def _run_labels(groups: list[Group]) -> None:
    """The run folder's name, with as many parent folders as it takes to tell runs apart."""
    parts = [Path(g.runs[0].path).parts for g in groups]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    for g, label in zip(groups, labels, strict=True):
        g.label = label
    _make_unique(groups)


def _make_unique(groups: list[Group]) -> None:
    seen: set[str] = set()
    for i, g in enumerate(groups, 1):
        if g.label in seen:
            g.label = f"{g.label} #{i}"
        seen.add(g.label)


def pick_baseline(groups: list[Group], baseline: str | None) -> Group:
    """The group labelled `baseline`, or the group holding the run folder `baseline`; default the
    first group."""
    if baseline is None:
        return groups[0]
    for g in groups:
        if g.label == baseline:
            return g
    target = Path(baseline).resolve()
    for g in groups:
        if any(r.path.resolve() == target for r in g.runs):
            return g
    raise MoectlError(f"--baseline {baseline!r} is none of the groups",
                      hint="give a group's label or one of its run folders; the groups are: "
                           + "; ".join(repr(g.label) for g in groups))


def paired_difference(group: Group, base: Group, key: str, by_seed: bool = True) -> dict[str, Any]:
    """Mean and sample sd over the seeds both groups have of (group's metric - baseline's metric).
    Without `by_seed` (groups of one run each) the two runs are paired whatever their seeds."""
    if not by_seed:
        a, b = group.metrics[0][key], base.metrics[0][key]
        ok = a is not None and b is not None
        return {**mean_sd([a - b] if ok else []), "seeds": [[group.seeds[0], base.seeds[0]]] if ok else []}
    mine, theirs = group.by_seed(key), base.by_seed(key)
    seeds = [s for s in mine if s in theirs and mine[s] is not None and theirs[s] is not None]
    return {**mean_sd([mine[s] - theirs[s] for s in seeds]), "seeds": seeds}


# --------------------------------------------------------------------------- the comparison


SOURCES = {"eval": "eval/results.json (moectl eval)",
           "training": "the end of training (logs/summary.json; perplexity = exp(loss))"}


@dataclass
class Comparison:
    group_by: str
    source: str                 # "eval" or "training": where the loss-type metrics come from
    baseline: str               # the baseline group's label
    groups: list[Group]
    notes: list[str]
    val_tokens: list[int] = field(default_factory=list)   # the tokens each run's loss averages over, if known

    def metrics(self, table: bool = False) -> list[Metric]:
        """The metrics that at least one run has (those of the table only, with `table`)."""
        return [m for m in METRICS if (m.table or not table) and any(g.stats[m.key]["n"] for g in self.groups)]

    def to_dict(self, curves: str | None = None) -> dict[str, Any]:
        """The compare.json document (format moectl.compare, version 1; docs/compare.md); `curves`:
        the file name of the validation-curve plot written next to it, if any."""
        return json_safe({
            "format": FORMAT, "version": VERSION, "group_by": self.group_by, "source": self.source,
            "baseline": self.baseline,
            "metrics": [{"key": m.key, "label": m.label, "unit": m.unit} for m in self.metrics()],
            "groups": [_group_dict(g) for g in self.groups],
            "notes": self.notes,
            "curves": curves,
        })


def _group_dict(g: Group) -> dict[str, Any]:
    return {
        "label": g.label, "recipe": g.recipe, "baseline": g.paired is None, "seeds": g.seeds,
        "runs": [{"path": str(r.path), "seed": r.seed, "steps": r.summary.get("steps"),
                  "tokens": r.summary.get("tokens"),
                  "eval_step": r.results.get("step") if r.results else None, "metrics": m}
                 for r, m in zip(g.runs, g.metrics, strict=True)],
        "stats": g.stats, "paired": g.paired, "differs_from_baseline": g.differs,
    }


def compare_runs(runs: list[RunData], group_by: str = "recipe", baseline: str | None = None) -> Comparison:
    """Group `runs`, compute every metric's mean and sd per group and its paired difference to the
    baseline group (`baseline`: a label or a run folder; default the first group)."""
    if not runs:
        raise MoectlError("no runs to compare", hint="give two or more run folders")
    source, notes = choose_source(runs)
    groups = group_runs(runs, group_by)
    base = pick_baseline(groups, baseline)
    for g in groups:
        g.metrics = [run_metrics(r, source) for r in g.runs]
        g.stats = {m.key: mean_sd([v for v in g.column(m.key) if v is not None]) for m in METRICS}
    for g in groups:
        if g is not base:
            g.paired = {m.key: paired_difference(g, base, m.key, group_by == "recipe") for m in METRICS}
            g.differs = differences(base.content, g.content)
    counts = [(r.results or {}).get("tokens_evaluated") if source == "eval" else r.summary.get("val_tokens")
              for r in runs]
    return Comparison(group_by, source, base.label, groups, notes + _notes(runs, groups, base),
                      [n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 0])


def _notes(runs: list[RunData], groups: list[Group], base: Group) -> list[str]:
    """What a reader should know before trusting the numbers."""
    notes = []
    for g in groups:
        if g is base:
            continue
        n = g.paired["val_loss"]["n"]
        if n == 0 and (not g.stats["val_loss"]["n"] or not base.stats["val_loss"]["n"]):
            notes.append(f"{g.label}: no paired difference (no finite validation loss)")
        elif n == 0:
            notes.append(f"{g.label}: no seed in common with the baseline ({base.label}), so no paired difference")
        elif n < max(len(g.runs), len(base.runs)):
            notes.append(f"{g.label}: {n} seed{'s' if n > 1 else ''} paired with the baseline; unpaired "
                         "runs count in the mean and sd but not in Δ")
    budgets = {g.label: sorted({r.summary.get("tokens") for r in g.runs}, key=str) for g in groups}
    if len({json.dumps(b, default=str) for b in budgets.values()}) > 1:
        notes.append("the groups were trained on different numbers of tokens: "
                     + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in budgets.items()))
    made = provenance.differences({str(r.path): r.summary.get("provenance") for r in runs})
    if made:
        notes.append("warning: the runs were not made alike (software, hardware or launch), which can move their "
                     "numbers: " + "; ".join(made))
    unsplit = [r for r in runs if (r.config.get("data") or {}).get("split_seed") is None]
    if unsplit and len({r.seed for r in unsplit}) > 1:
        why = ("it adds to the spread over seeds; a paired difference compares runs of one seed"
               if len(groups) < len(runs) else "their differences include that of the validation sets")
        notes.append("data.split_seed is unset, so runs of different seeds were validated on different "
                     f"held-out documents ({why}); set data.split_seed to fix the validation set")
    return notes


def compare_paths(paths: list[str | Path], group_by: str = "recipe", baseline: str | None = None) -> Comparison:
    """`compare_runs(load_runs(paths), ...)`."""
    return compare_runs(load_runs(paths), group_by, baseline)


# --------------------------------------------------------------------------- tables


def fmt_stat(stat: dict[str, Any], digits: int, signed: bool = False) -> str:
    """"mean ± sd" ("mean" alone for one value, "–" for none)."""
    if not stat["n"]:
        return "–"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign},.{digits}f}"
    return text if stat["sd"] is None else f"{text} ± {stat['sd']:,.{digits}f}"


def fmt_delta(stat: dict[str, Any], digits: int) -> str:
    return "– (no pairs)" if not stat["n"] else f"{fmt_stat(stat, digits, signed=True)} (n={stat['n']})"


def fmt_value(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(c: Comparison, per_seed: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table: per group its seeds, each metric's mean ± sd and,
    for loss-type metrics, the paired Δ to the baseline; `per_seed` adds each seed's loss."""
    metrics = c.metrics(table=True)
    header = ["group", "seeds"]
    for m in metrics:
        header.append(m.label)
        if per_seed and m.key == "val_loss":
            header.append("per seed")
        if m.delta:
            header.append(f"Δ {m.label}")
    rows = []
    for g in c.groups:
        row = [g.label, ", ".join(map(str, g.seeds))]
        for m in metrics:
            row.append(fmt_stat(g.stats[m.key], m.digits))
            if per_seed and m.key == "val_loss":
                row.append(", ".join(fmt_value(v, m.digits) for v in g.column(m.key)))
            if m.delta:
                row.append("baseline" if g.paired is None else fmt_delta(g.paired[m.key], m.digits))
        rows.append(row)
    return header, rows


def explanation(c: Comparison) -> str:
    how = ("Each cell: mean ± sample standard deviation over the group's runs. Δ: the group's metric "
           "minus the baseline's at the same seed, mean ± sample sd over the n seeds both have. "
           if c.group_by == "recipe" else "Each group is one run; Δ: its metric minus the baseline run's. ")
    tokens = ""
    if c.val_tokens:
        lo, hi = min(c.val_tokens), max(c.val_tokens)
        tokens = f"Losses over {lo:,} validation tokens{' each' if lo == hi else f' to {hi:,}'}. "
    return (f"Grouped by {c.group_by}; metrics from {SOURCES[c.source]}; baseline: {c.baseline}. {tokens}{how}"
            "ppl: perplexity; entropy: routing entropy (nats, mean over layers) and imbalance: the "
            "worst layer's max/mean expert load, both of the last logged training window.")


def to_markdown(c: Comparison) -> str:
    """compare.md: the table (with per-seed losses), what each group is, and the notes."""
    header, rows = table(c, per_seed=True)
    cell = lambda s: str(s).replace("|", "\\|")
    lines = [f"# Comparison of {sum(len(g.runs) for g in c.groups)} runs", "", explanation(c), "",
             "| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    lines += ["", "## Groups", ""]
    for g in c.groups:
        runs = ", ".join(f"`{r.path}` (seed {r.seed})" for r in g.runs)
        lines.append(f"- **{cell(g.label)}** (recipe `{g.recipe}`): {runs}")
        if g.differs:
            shown = [f"`{k}` {_short(a)} → {_short(b)}" for k, (a, b) in list(g.differs.items())[:8]]
            more = f" and {len(g.differs) - 8} more" if len(g.differs) > 8 else ""
            lines.append(f"  - differs from the baseline in {', '.join(shown)}{more}")
    if c.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in c.notes)]
    return "\n".join(lines) + "\n"
