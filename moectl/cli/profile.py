"""`moectl profile`: where a training step of a recipe's model spends its time, stage by stage."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from moectl.cli.common import (
    OVERRIDES_HELP,
    RECIPE_HELP,
    handle_errors,
    pick_device,
    single_process,
    stdout_console,
)


@handle_errors
def profile(
    recipe: str = typer.Argument(..., help=RECIPE_HELP + " A run folder's newest checkpoint gives the weights "
                                 "(so routing is the trained router's); a recipe profiles freshly initialised ones.",
                                 metavar="RECIPE_OR_RUN"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    steps: int = typer.Option(3, "--steps", min=1, max=1000, help="Steps timed without the profiler, then "
                              "the same number profiled."),
    warmup: int = typer.Option(2, "--warmup", min=0, max=1000, help="Untimed steps first (allocator, caches)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Sequences per step (default: the "
                                   "recipe's train.batch_size)."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N."),
    precision: str = typer.Option(None, "--precision", help="fp32 or bf16 (bf16 autocast); default: the "
                                  "recipe's train.precision (auto: bf16 on a GPU that has it, else fp32)."),
    trace: Path = typer.Option(None, "--trace", help="Also write the profiled steps as a Chrome trace (JSON; "
                               "opens in chrome://tracing or ui.perfetto.dev)."),
    json_out: Path = typer.Option(None, "--json", help="Also write every number as JSON to this file "
                                  "(fields: docs/profile.md)."),
    backends: bool = typer.Option(True, "--backends/--no-backends", help="Time every expert backend on the "
                                  "recipe's MoE layer shape (jagged and uniform routing)."),
) -> None:
    """Profile a training step (forward, backward, AdamW) of a recipe's model: time, FLOP/s and share per stage
    (router, dispatch, experts, combine, shared experts, attention, norms, head + loss, optimizer), kernel shares,
    peak memory, and the expert backends side by side."""
    single_process("profile")
    import torch

    from moectl.errors import MoectlError
    from moectl.factory import build_model
    from moectl.profile.run import run_profile, write_profile
    from moectl.recipe.load import load_recipe
    from moectl.train.optim import make_optimizer
    from moectl.train.trainer import resolve_precision

    if precision not in (None, "fp32", "bf16"):
        raise MoectlError(f"--precision {precision}: not a precision", hint="use fp32 or bf16")
    for path, flag in ((trace, "--trace"), (json_out, "--json")):
        if path is not None:
            if path.is_dir():
                raise MoectlError(f"{flag} {path} is a folder",
                                  hint=f"give {flag} a file name, e.g. {path}/profile.json")
            path.parent.mkdir(parents=True, exist_ok=True)   # before the work: a bad path fails at once
            if not os.access(path.parent, os.W_OK):
                raise MoectlError(f"{flag} {path}: its folder is not writable", hint="choose another place")
    rec = load_recipe(recipe, overrides or [])
    if rec.model.moe is None:
        note = "the model has no MoE layers: only the whole-model table is shown"
    elif rec.train.expert_parallel > 1:
        note = (f"one process with every expert: train.expert_parallel {rec.train.expert_parallel} is not applied "
                "here; a training run with it logs the exchange's time as its own stage (exchange_s_per_step and "
                "exchange_share in metrics.jsonl)")
    else:
        note = None
    dev = pick_device(device)
    bf16 = resolve_precision(precision or rec.train.precision, dev) == "bf16"
    if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MoectlError("--precision bf16: this GPU has no bf16", hint="use --precision fp32")
    model = build_model(rec, device=dev)
    weights = _load_run_weights(recipe, model, dev)
    optimizer = make_optimizer(model, rec.train)
    out = stdout_console()
    with out.status("profiling…"):
        prof = run_profile(model, optimizer, batch_size or rec.train.batch_size, dev, bf16, steps=steps,
                           warmup=warmup, trace=trace, backends=backends and rec.model.moe is not None,
                           seed=rec.seed, grad_clip=rec.train.grad_clip, peak_tflops=rec.train.peak_tflops)
    render(prof, out, weights, note)
    if json_out is not None:
        write_profile(prof, json_out)
        out.print(f"numbers written to {json_out}")
    if trace is not None:
        out.print(f"trace written to {trace}")


def _load_run_weights(arg: str, model, device) -> str:
    """Weights of the run's newest checkpoint when `arg` is a run or checkpoint folder holding one;
    a folder without a checkpoint yet (or a recipe) keeps the initialisation. Says which. Weights
    that cannot be read or do not fit the model are an error, not a silent fresh model."""
    from moectl.checkpoint import load_weights
    from moectl.errors import MoectlError
    from moectl.rundir import RunDir
    from moectl.runs import find_checkpoint

    if not Path(arg).is_dir():
        return "freshly initialised (from the recipe's seed)"
    try:
        checkpoint, _ = find_checkpoint(arg)
    except MoectlError:
        return f"freshly initialised ({arg} holds no checkpoint)"
    try:
        load_weights(checkpoint, model, device=device)
    except MoectlError as e:
        raise MoectlError(f"{checkpoint}: its weights cannot be used here: {e.message}",
                          hint=f"profile the recipe alone with freshly initialised weights: moectl profile "
                               f"{RunDir(arg).config}") from None
    return f"from {checkpoint}"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def render(prof, console, weights: str, note: str | None) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(f"[bold]device[/] {prof.device} · {prof.dtype} · torch {prof.torch_version} · "
                  f"{prof.tokens_per_step:,} tokens per step · weights {weights}")
    console.print(f"step {prof.step_ms:,.1f} ms ({prof.tokens_per_step / prof.step_ms * 1e3:,.0f} tokens/s; "
                  f"{prof.profiled_step_ms:,.1f} ms under the profiler) · MFU {100 * prof.mfu:.1f}% · peak memory "
                  + (f"{prof.peak_memory_mb:,.0f} MB ({prof.memory_kind})" if prof.peak_memory_mb else "unknown"))
    console.print(Text(f"MFU and each stage's share of peak are against {prof.peak_tflops:,.3f} TFLOP/s "
                       f"({prof.peak_source})"))
    if note:
        console.print(Text(note))
    for title, rows in (("Whole model, per step", prof.model_stages),
                        (f"MoE block {prof.block_name} alone (forward + backward of {prof.tokens_per_step:,} tokens)",
                         prof.block_stages)):
        if not rows:
            continue
        total = sum(r.total_ms for r in rows) or 1.0
        t = Table(title=title, title_justify="left")
        for col in ("stage", "forward ms", "backward ms", "total ms", "share", "TFLOP/s", "of peak"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for r in rows:
            rate = None if r.flops is None or r.total_ms <= 0 else r.flops / (r.total_ms * 1e-3) / 1e12
            t.add_row(r.stage.replace("_", " "), _ms(r.forward_ms), _ms(r.backward_ms), _ms(r.total_ms),
                      f"{100 * r.total_ms / total:.1f}%", "—" if rate is None else f"{rate:.3f}",
                      "—" if rate is None else f"{100 * rate / prof.peak_tflops:.0f}%")
        console.print(t)
    share = prof.kernel_share
    console.print("kernel time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
                  + f" (matmul + attention + loss: {100 * (1 - share['other']):.1f}%)")
    if prof.backends:
        s = prof.backend_shape
        t = Table(title=f"Expert backends: dispatch + experts + combine, forward + backward (T={s['tokens']}, "
                  f"d={s['d_model']}, F={s['expert_hidden']}, E={s['experts']}, k={s['top_k']})", title_justify="left")
        for col in ("backend", "routing", "ms", "TFLOP/s", "vs loop", "rel. diff", "note"):
            t.add_column(col, justify="left" if col in ("backend", "routing", "note") else "right")
        loop = {r.routing: r.ms for r in prof.backends if r.backend == "loop"}
        for r in prof.backends:
            base = loop.get(r.routing)
            t.add_row(r.backend, r.routing, _ms(r.ms), "—" if r.tflops is None else f"{r.tflops:.3f}",
                      "—" if r.ms is None or not base else f"{base / r.ms:.2f}x",
                      "—" if r.rel_diff is None else f"{r.rel_diff:.1e}", r.note)
        console.print(t)
