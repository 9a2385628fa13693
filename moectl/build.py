"""`moectl build`: what a recipe's model costs, computed on the meta device (nothing allocated), and
an initialised model folder (`--save`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from safetensors.torch import save_model

from moectl.core.accounting import TRAIN_FLOPS_FACTOR, count_parameters, training_memory
from moectl.core.experts import ExpertBank
from moectl.core.init import describe
from moectl.core.layers import rope_attention_factor
from moectl.errors import MoectlError
from moectl.factory import build_model
from moectl.fsutil import atomic_dir
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe
from moectl.rundir import ModelFolder


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}" if n / factor < 100 else f"{n / factor:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for factor, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{n:.0f} B"


@dataclass
class BuildReport:
    name: str
    rows: dict[str, tuple[int, float]]
    total: int
    active: float
    embedding: int
    seq_len: int
    flops_forward: int
    memory: dict[str, int]
    moe: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    expert_parallel: int = 1
    per_rank: dict[str, int] | None = None   # memory of one process with the experts split expert_parallel ways

    @property
    def flops_train(self) -> int:
        return TRAIN_FLOPS_FACTOR * self.flops_forward

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": {"total": self.total, "active": round(self.active), "embedding": self.embedding,
                       "components": {k: {"total": t, "active": round(a)} for k, (t, a) in self.rows.items()}},
            "flops_per_token": {"forward": self.flops_forward, "train": self.flops_train, "seq_len": self.seq_len},
            "memory_bytes": self.memory,
            "moe": self.moe,
            **({"expert_parallel": {"degree": self.expert_parallel, "memory_bytes_per_rank": self.per_rank}}
               if self.per_rank else {}),
            "notes": self.notes,
        }


def per_rank_memory(model, total: int, degree: int) -> dict[str, int]:
    """Training memory of one process when every expert bank is split `degree` ways (expert
    parallelism): its share of the experts, and every other parameter whole."""
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    if not banks:
        raise MoectlError(f"--expert-parallel {degree}: the model has no routed experts to place on other processes",
                          hint="use it with an MoE recipe")
    uneven = sorted({b.num_experts for b in banks if b.num_experts % degree})
    if uneven:
        raise MoectlError(f"--expert-parallel {degree} must divide every routed layer's number of experts "
                          f"({', '.join(map(str, uneven))} experts cannot be split {degree} ways)",
                          hint="choose a degree that divides model.moe.num_experts")
    experts = sum(p.numel() for b in banks for p in b.parameters())
    mem = training_memory(total - experts + experts // degree)
    return {"weights": mem.weights, "grads": mem.grads, "optimizer": mem.optimizer, "total": mem.total}


def build_report(recipe: Recipe, expert_parallel: int = 1) -> BuildReport:
    model = build_model(recipe, device="meta")
    counts = count_parameters(model)
    mem = training_memory(counts.total)
    moe_info, notes = None, []
    m = recipe.model.moe
    if m is not None:
        layers = model.routed_layers()
        moe_info = {
            "layers": model.args.moe.layers, "num_experts": m.num_experts, "top_k": m.top_k,
            "expert_hidden": m.expert_hidden, "router": m.router.kind, "shared_experts": m.shared_experts,
            "routed_layers": len(layers), "block": m.block.kind,
            "regularisers": layers[0].regularisers(model.args.moe) if layers else [],
        }
        extra = TRAIN_FLOPS_FACTOR * sum(layer.expected_extra_flops_per_token(len(layers)) for layer in layers)
        if extra:
            moe_info["extra_train_flops_per_token"] = round(extra)
            notes.append(f"about {human(extra)} extra training FLOPs per token on average, beyond routing to top_k "
                         "experts; not part of the FLOPs or MFU above.")
    # What each part has to say about itself (windows, sinks, latent attention, varying experts per
    # token, two sub-layers, ...), once per distinct note.
    for module in model.modules():
        for note in getattr(module, "build_notes", lambda: [])():
            if note not in notes:
                notes.append(note)
    cfg = recipe.model
    rs = cfg.rope_scaling
    if rs is not None:
        temperature = rope_attention_factor(rs.model_dump())
        notes.append(f"RoPE scaled {rs.kind} x{rs.factor:g}" + (f" from {rs.original_context} positions"
                     if rs.kind != "linear" else "") + (f", attention temperature {temperature:.4f}"
                                                        if temperature != 1.0 else "") + ".")
    notes.append(describe(cfg.init, m.init if m else None, m.router_init if m else None, cfg.init_std,
                          cfg.scale_residual_init) + ".")
    notes.append("memory: fp32 weights + fp32 gradients + AdamW moments (2 x fp32); activations excluded.")
    per_rank = per_rank_memory(model, counts.total, expert_parallel) if expert_parallel > 1 else None
    return BuildReport(
        per_rank=per_rank, expert_parallel=expert_parallel,
        name=recipe.name, rows=counts.rows, total=counts.total, active=counts.active,
        embedding=counts.embedding, seq_len=recipe.model.seq_len,
        flops_forward=model.flops_per_token(),
        memory={"weights": mem.weights, "grads": mem.grads, "optimizer": mem.optimizer, "total": mem.total},
        moe=moe_info, notes=notes,
    )


def render(report: BuildReport, console) -> None:
    table = Table(title=f"{report.name}: parameters", title_justify="left")
    table.add_column("component")
    table.add_column("total", justify="right")
    table.add_column("active / token", justify="right")
    table.add_column("share", justify="right")
    for comp, (total, active) in report.rows.items():
        table.add_row(comp, f"{total:,}", f"{round(active):,}", f"{100 * total / max(report.total, 1):.1f}%")
    table.add_section()
    table.add_row("[bold]total", f"[bold]{report.total:,}", f"[bold]{round(report.active):,}", "100%")
    console.print(table)
    head = report.rows.get("lm_head", (0, 0))[0]
    body = f" ({human(report.total - report.embedding - head)} without the LM head)" if head else ""
    console.print(f"[bold]parameters[/]  total {human(report.total)}   active/token {human(report.active)}   "
                  f"embedding {human(report.embedding)}   non-embedding {human(report.total - report.embedding)}{body}")
    if report.moe:
        m = report.moe
        where = f"{len(m['layers'])} MoE layer(s) {m['layers']}"
        if m["routed_layers"] != len(m["layers"]):
            where += f" ({m['block']}: {m['routed_layers']} routed sub-layers)"
        console.print(f"[bold]MoE[/]  {where}   "
                      f"{m['num_experts']} experts x {m['expert_hidden']}   top_k {m['top_k']}   "
                      f"router {m['router']}   shared {m['shared_experts']}")
        if m["regularisers"]:
            console.print("[bold]losses[/]  " + escape("; ".join(m["regularisers"])))
    console.print(f"[bold]FLOPs/token[/]  forward {human(report.flops_forward)}   "
                  f"train (3x) {human(report.flops_train)}   at seq_len {report.seq_len}")
    mem = report.memory
    console.print(f"[bold]training memory[/]  weights {human_bytes(mem['weights'])} + grads "
                  f"{human_bytes(mem['grads'])} + optimizer {human_bytes(mem['optimizer'])} = "
                  f"{human_bytes(mem['total'])}")
    if report.per_rank:
        r = report.per_rank
        console.print(f"[bold]per process, experts split {report.expert_parallel} ways[/]  weights "
                      f"{human_bytes(r['weights'])} + grads {human_bytes(r['grads'])} + optimizer "
                      f"{human_bytes(r['optimizer'])} = {human_bytes(r['total'])}")
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")


def save_initial(recipe: Recipe, target: Path) -> None:
    """An initialised model (from the recipe's seed) and its resolved recipe, written atomically as
    a model folder that `moectl train --resume`, `train.init_from`, `eval` and `profile` read."""
    model = build_model(recipe)
    with atomic_dir(Path(target)) as tmp:
        folder = ModelFolder(tmp)
        save_model(model, str(folder.weights))
        folder.write_recipe(dump_recipe(recipe))
