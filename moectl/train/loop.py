"""The training loop: one function, on accelerate, for CPU, one GPU, DDP and FSDP.

Order of events in a step: each micro-batch runs forward and backward (gradient sync only on the
last one), the processes agree on whether the loss was finite, gradients are clipped, the
optimizer and the schedule step, and routers adapt to the step's global expert loads
(aux-loss-free biases). Logging, validation and checkpoints follow at their intervals. A signal
(Ctrl-C, SIGTERM) is honoured at the end of the step in progress: a checkpoint is saved and the
run exits with code 130.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moectl import __version__
from moectl.checkpoint import CheckpointDir, is_checkpoint, load_checkpoint, save_checkpoint
from moectl.core.compete import make_schedule
from moectl.data.loader import PackedSequences, TrainOrder, eval_indices
from moectl.data.prepare import prepare_data
from moectl.data.sources import DataError
from moectl.errors import Issue, MoectlError, RecipeError, RuntimeFailure
from moectl.factory import build_model
from moectl.fsutil import atomic_write_text
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe
from moectl.train import dist
from moectl.train.metrics import (
    MetricsLog,
    RoutingAccumulator,
    measure_peak_flops,
    peak_memory_bytes,
)
from moectl.train.optim import lr_factor, make_optimizer

MAX_CONSECUTIVE_SKIPS = 20


class Interrupted(MoectlError):
    exit_code = 130


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int
    final_val_loss: float
    val_unigram_entropy: float
    skipped_steps: int


class _StopFlag:
    """First SIGINT/SIGTERM asks for a clean stop at the end of the step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A process may train more than once (notebooks, tests): forget the last run's settings, but keep
    # the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    cfg = recipe.train
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    mp = "bf16" if resolve_precision(cfg.precision, device) == "bf16" else "no"
    return Accelerator(mixed_precision=mp, cpu=not cuda), mp


def _resolve_resume(ckpts: CheckpointDir, resume: str, run_dir: Path) -> Path | None:
    if resume == "never":
        if ckpts.steps() or ckpts.latest_file.exists():
            raise MoectlError(f"{run_dir} already holds checkpoints",
                              hint="continue it with --resume auto, or start elsewhere with --run-dir")
        return None
    if resume == "auto":
        return ckpts.latest()
    path = Path(resume)
    if path.is_dir() and not is_checkpoint(path):
        inner = CheckpointDir(path / "checkpoints").latest() if (path / "checkpoints").is_dir() else None
        if inner is None:
            raise MoectlError(f"--resume {resume}: not a checkpoint or a run folder with checkpoints")
        return inner
    if not is_checkpoint(path):
        raise MoectlError(f"--resume {resume}: no complete checkpoint there",
                          hint="give a step-* folder, a run folder, or use --resume auto")
    return path


def _check_same_run(run_dir: Path, recipe: Recipe, sections: tuple[str, ...] = ("model", "data", "seed")) -> None:
    """Resuming with a different model or data would silently train something else: refuse."""
    import yaml

    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return
    old = yaml.safe_load(old_path.read_text())
    new = json.loads(json.dumps(recipe.model_dump(mode="json")))
    issues = []
    for section in sections:
        if old.get(section) != new.get(section):
            issues.append(Issue(section, f"differs from {old_path}"))
    if issues:
        raise RecipeError(str(run_dir), issues, hint="resume with the recipe the run was started with, "
                          "or start a new run with --run-dir")


def _total_steps(recipe: Recipe, tokens_per_step: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    raise RecipeError("recipe", [Issue("train.max_steps", "training needs a budget: set train.max_steps "
                                                          "or train.max_tokens")])


def attach_competition_schedule(core, seed: int, total_steps: int):
    """Give the model CompeteSMoE's schedule for this run (drawn from the seed, the same on every
    process) and return it, or None without competition."""
    comp = core.args.moe.competition if core.args.moe else None
    if comp is None:
        return None
    core.competition_schedule = make_schedule(comp, seed, total_steps, len(core.routed_layers()))
    return core.competition_schedule


def shard_model(model, device: torch.device, world: int) -> None:
    """FSDP2: shard every transformer block and the remaining root parameters over all processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = only measure it); works on plain and sharded parameters."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def evaluate(model, seqs: PackedSequences, batches: list[list[int]], device,
             autocast=nullcontext) -> tuple[float, dict[str, Any]]:
    """Mean next-token loss over the validation batches of all processes, and how the validation
    tokens were routed (per-layer loads, imbalance, entropy, ...)."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    routing = RoutingAccumulator()
    for idx in batches:
        x, y = seqs.batch(idx)
        with autocast():
            out = model(x.to(device), y.to(device))
        total += torch.stack([out.loss.double() * y.numel(), torch.tensor(float(y.numel()), device=device)])
        routing.add(out.records)
    total = dist.all_reduce_sum(total)
    model.train()
    loss = (total[0] / total[1]).item() if total[1] > 0 else math.nan
    return loss, routing.summary(dist.all_reduce_sum)


def train(recipe: Recipe, *, run_dir: str | Path | None = None, resume: str = "auto",
          show_progress: bool = True, console=None) -> TrainResult:
    cfg = recipe.train
    acc, mixed_precision = _accelerator(recipe)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    main = acc.is_main_process
    log = (console.print if console is not None else print) if main else (lambda *a, **k: None)

    run = Path(run_dir or cfg.run_dir or Path("runs") / recipe.name)
    ckpts = CheckpointDir(run / "checkpoints")
    resume_from = _resolve_resume(ckpts, resume, run)
    if resume_from is not None:
        _check_same_run(run, recipe)
        source_run = resume_from.parent.parent   # <run>/checkpoints/step-N
        if source_run.resolve() != run.resolve():
            _check_same_run(source_run, recipe, sections=("model",))   # new data or seed is fine
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * recipe.model.seq_len
    total_steps = _total_steps(recipe, tokens_per_step)

    # Data: rank 0 builds the cache, the others then find it. A failure on rank 0 is re-raised on
    # every rank (printed once), instead of leaving the others waiting at a barrier.
    failure: MoectlError | None = None
    if main:
        try:
            data = prepare_data(recipe, show_progress=show_progress, log=log)
        except MoectlError as e:
            failure = e
    if dist.all_reduce_max(torch.tensor(float(failure is not None), device=device)).item():
        raise failure or MoectlError("data preparation failed on the first process")
    if not main:
        data = prepare_data(recipe, show_progress=False, log=log)
    train_seqs = PackedSequences(data.tokens("train"), recipe.model.seq_len)
    val_seqs = PackedSequences(data.tokens("val"), recipe.model.seq_len)
    for split, seqs in (("train", train_seqs), ("val", val_seqs)):
        if len(seqs) == 0:
            raise DataError(f"the {split} split has {data.index['splits'][split]['tokens']} tokens, fewer than one "
                            f"sequence of model.seq_len + 1 = {recipe.model.seq_len + 1}",
                            hint="add data, lower model.seq_len" + (", or raise data.val_fraction" if split == "val" else ""))
    order = TrainOrder(len(train_seqs), recipe.seed, cfg.batch_size, cfg.grad_accum, world, rank)
    val_batches = eval_indices(len(val_seqs), cfg.batch_size, cfg.eval_batches, world, rank)

    # Model, optimizer, schedule.
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")  # noqa: E731
    model = build_model(recipe)
    model.activation_checkpointing = cfg.activation_checkpointing
    flops_per_token = 3 * model.flops_per_token()
    fsdp = cfg.parallel == "fsdp" and world > 1
    if fsdp:
        shard_model(model, device, world)
        optimizer = make_optimizer(model, cfg)
    else:
        optimizer = make_optimizer(model, cfg)
        model, optimizer = acc.prepare(model, optimizer)   # device placement, DDP when world > 1
    core = acc.unwrap_model(model)
    core.count_reducer = dist.all_reduce_sum if world > 1 else None
    inner_opt = getattr(optimizer, "optimizer", optimizer)

    def gradient_sync(sync: bool):
        """Synchronise gradients only on the last micro-batch of a step."""
        if fsdp:
            model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync or world == 1 else acc.no_sync(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner_opt, lambda s: lr_factor(s, total_steps, cfg))
    torch.manual_seed(recipe.seed * 7919 + 17 * rank + 1)   # training-time noise (jitter), per process

    schedule = attach_competition_schedule(core, recipe.seed, total_steps)
    start_step, tokens_seen, skipped = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, inner_opt, rank=rank)
        saved = state.get("extra", {}).get("competition")
        if schedule is not None and saved is not None and not schedule.resume(saved):
            log(f"the checkpoint's competition schedule ({saved.get('kind', 'fixed')}, {saved['total_steps']} "
                f"steps) does not fit this run ({schedule.kind}, {total_steps} steps): using one drawn from the seed")
        scheduler.load_state_dict(state["scheduler"])
        start_step, tokens_seen, skipped = state["step"], state["tokens"], state.get("skipped_steps", 0)
        # The recipe's optimizer settings win over the checkpoint's (a resumed run may change them).
        scheduler.base_lrs = [cfg.lr] * len(inner_opt.param_groups)
        for group in inner_opt.param_groups:
            group.update(lr=cfg.lr * lr_factor(start_step, total_steps, cfg), betas=(cfg.beta1, cfg.beta2),
                         eps=cfg.adam_eps)
        inner_opt.param_groups[0]["weight_decay"] = cfg.weight_decay   # group 0 decays (see param_groups)
        log(f"resuming {run} from {resume_from.name} (step {start_step})")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        ckpts.root.mkdir(exist_ok=True)
        ckpts.clean_temporaries()
        atomic_write_text(run / "config.yaml", dump_recipe(recipe))
        shutil.copyfile(data.tokenizer_path, run / "tokenizer.json")
        atomic_write_text(run / "data.json", json.dumps({**data.index, "cache": str(data.dir)}, indent=2))
    dist.barrier()
    metrics = MetricsLog(run, main, cfg.tensorboard, resume_step=start_step)
    peak = measure_peak_flops(device, torch.bfloat16 if mixed_precision == "bf16" else torch.float32)
    if start_step >= total_steps:
        log(f"{run} has already run {start_step} of {total_steps} steps; nothing to do")

    def checkpoint(step: int) -> Path:
        trainer_state = {"step": step, "tokens": tokens_seen, "scheduler": scheduler.state_dict(),
                         "skipped_steps": skipped, "data": {"order": "step", "epoch": order.epoch_of(step)}}
        extra = {"competition": schedule.state_dict()} if schedule is not None else {}
        return save_checkpoint(ckpts, step, model, inner_opt, trainer_state,
                               {"moectl": __version__, "recipe": recipe.name}, rank=rank, world_size=world,
                               barrier=dist.barrier, keep_last=cfg.keep_last, extra=extra)

    step_routing, window_routing = RoutingAccumulator(), RoutingAccumulator()
    window = {"loss": 0.0, "aux": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
    val_loss, last_saved, t_start = math.nan, start_step, time.perf_counter()
    progress = _Progress(show_progress and main, total_steps, start_step, console)
    consecutive_skips = 0
    try:
        with _StopFlag() as stop, progress:
            for step in range(start_step, total_steps):
                loss_sum = torch.zeros((), device=device)
                aux_sum = torch.zeros((), device=device)
                step_routing.reset()
                for micro in range(cfg.grad_accum):
                    x, y = train_seqs.batch(order.indices(step, micro))
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with gradient_sync(micro == cfg.grad_accum - 1), autocast():
                        out = model(x, y, step=step)
                        acc.backward(out.total_loss / cfg.grad_accum)
                    loss_sum += out.loss.detach()
                    aux_sum += out.aux_loss.detach()
                    step_routing.add(out.records)
                    window_routing.add(out.records)
                grad_norm = clip_gradients(model, cfg.grad_clip)
                agreed = dist.all_reduce_sum(torch.stack([loss_sum, aux_sum, grad_norm.float().to(device)]))
                loss = agreed[0].item() / (cfg.grad_accum * world)
                aux = agreed[1].item() / (cfg.grad_accum * world)
                norm = agreed[2].item() / world
                tokens_seen += tokens_per_step
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    metrics.write({"type": "nonfinite", "step": step + 1, "loss": loss, "grad_norm": norm})
                    if cfg.on_nonfinite == "stop":
                        latest = ckpts.latest() if ckpts.latest_file.exists() else None
                        raise RuntimeFailure(
                            f"non-finite loss or gradient norm at step {step + 1} (loss {loss}, gradient norm "
                            f"{norm}); stopped. "
                            f"latest checkpoint: {latest.name if latest else 'none'}",
                            hint="lower train.lr, keep train.grad_clip on, or set train.on_nonfinite=skip")
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    consecutive_skips += 1
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                        raise RuntimeFailure(f"{consecutive_skips} consecutive non-finite steps; stopped",
                                             hint="lower train.lr")
                    scheduler.step()
                else:
                    consecutive_skips = 0
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step_routing.names:
                        loads = dist.all_reduce_sum(torch.stack(step_routing.load))
                        core.after_step(list(loads))
                window["loss"] += loss
                window["aux"] += aux
                window["steps"] += 1
                window["tokens"] += tokens_per_step
                done = step + 1
                lr = inner_opt.param_groups[0]["lr"]
                last = done == total_steps
                if done % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window["t0"]
                    tps = window["tokens"] / max(elapsed, 1e-9)
                    record = {"type": "train", "step": done, "tokens": tokens_seen,
                              "loss": window["loss"] / window["steps"], "aux_loss": window["aux"] / window["steps"],
                              "lr": scheduler.get_last_lr()[0], "grad_norm": norm, "tokens_per_s": tps,
                              "mfu": tps * flops_per_token / (world * peak), "epoch": order.epoch_of(done),
                              **window_routing.summary(dist.all_reduce_sum)}
                    metrics.write(record)
                    progress.update(done, record)
                    window = {"loss": 0.0, "aux": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
                    window_routing.reset()
                else:
                    progress.update(done, {"loss": loss, "lr": lr})
                if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                    val_loss, val_routing = evaluate(model, val_seqs, val_batches, device, autocast)
                    metrics.write({"type": "eval", "step": done, "tokens": tokens_seen, "val_loss": val_loss,
                                   "val_ppl": math.exp(min(val_loss, 50)), **val_routing})
                    progress.note(f"step {done}: validation loss {val_loss:.4f}")
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last:
                    checkpoint(done)
                    last_saved = done
                stop_now = dist.all_reduce_max(torch.tensor(float(stop.requested), device=device)).item() > 0
                if stop_now and not last:
                    if last_saved != done:
                        checkpoint(done)
                    raise Interrupted(f"interrupted at step {done}; checkpoint saved to "
                                      f"{ckpts.step_dir(done)}", hint="continue with --resume auto")
    finally:
        metrics.close()

    seconds = time.perf_counter() - t_start
    steps_run = total_steps - start_step
    result = TrainResult(
        run_dir=str(run), steps=total_steps, tokens=tokens_seen, seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / max(seconds, 1e-9),
        peak_memory_bytes=peak_memory_bytes(device), final_val_loss=val_loss,
        val_unigram_entropy=data.index["val_unigram_entropy"], skipped_steps=skipped)
    if main:
        atomic_write_text(run / "logs" / "summary.json", json.dumps(asdict(result), indent=2))
    return result


class _Progress:
    """A rich progress bar when interactive; plain log lines otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, console) -> None:
        from rich.console import Console

        self.enabled = enabled
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self.total, self.start = total, start
        self.info = ""
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # Two lines: the bar, then the metrics (too wide to share a line on a narrow terminal).
            self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=self.console)
            self.bar.columns = (*self.bar.columns, TextColumn("\n{task.fields[info]}", justify="left"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> _Progress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def update(self, step: int, r: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "tokens_per_s" in r:
            parts = [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s",
                     f"MFU {100 * r['mfu']:.1f}%"]
            if "load_balance" in r:
                parts += [f"aux {r['load_balance']:.3f}", f"z {r.get('z_loss', 0):.2f}",
                          f"imb {r['imbalance_max']:.2f}"]
            self.info = "  ".join(parts)
            if not self.live:
                self.console.print(f"step {step}/{self.total}  {self.info}", highlight=False)
        if self.live:
            self.bar.update(self.task, completed=step, info=self.info)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
