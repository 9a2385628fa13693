"""`moectl train`: the training loop, for CPU, one GPU, DDP and FSDP alike.

    train(recipe) -> TrainResult        Trainer(recipe, processes).run()

Setting up (`Trainer.__init__`): where the run starts (`moectl.train.resume`: the run folder, the
checkpoint to resume from, the recipe that continues it), the data (the first process builds the
cache), the model on its device wrapped for data parallelism, AdamW, the model's routing plan, and,
when resuming, the checkpoint's weights, optimizer, random generators and plan. A step
(`moectl.train.step.TrainStep`) trains one global batch. After a step (`after_step`): logging,
validation and checkpoints at their intervals. A signal (Ctrl-C, SIGTERM) is honoured at the end of
the step in progress: a checkpoint is saved and the run exits with code 130.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moectl import __version__, provenance, tracking
from moectl.checkpoint import load_weights, restore_training_state, save_checkpoint, tied_aliases
from moectl.core.moe import RouterContractError
from moectl.core.stats import RoutingAccumulator
from moectl.data.loader import PackedSequences, TrainOrder, eval_indices, eval_rounds
from moectl.data.prepare import PreparedData, prepare_data
from moectl.data.sources import DataError
from moectl.errors import MoectlError, RuntimeFailure
from moectl.eval.validation import evaluate
from moectl.factory import build_model
from moectl.profile import measure
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe
from moectl.rundir import RunDir, default_run_path
from moectl.train import parallel
from moectl.train.compiling import compile_model
from moectl.train.expert_parallel import ExpertSharding
from moectl.train.lock import RunLock
from moectl.train.metrics import MetricsLog
from moectl.train.optim import Schedule, apply_hyperparameters, make_optimizer, set_lr
from moectl.train.progress import Progress
from moectl.train.resume import (
    budget_before,
    check_run_folder,
    check_tokenizers,
    init_source,
    plan_start,
    recoverable,
)
from moectl.train.step import StepOutcome, TrainStep

MAX_CONSECUTIVE_SKIPS = 20


class Interrupted(MoectlError):
    """A clean stop on request (Ctrl-C, SIGTERM) with a checkpoint saved: not an error."""

    exit_code = 130
    agreed = True   # every process saw the same stop flag

    def render(self) -> str:
        return f"stopped: {self.message}" + (f"\n  hint: {self.hint}" if self.hint else "")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _count(value: Any) -> int:
    """A non-negative integer from JSON, else 0 (older checkpoints have no such field)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _agreed(error: MoectlError) -> MoectlError:
    error.agreed = True
    return error


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
    steps_run: int = 0            # steps this invocation trained (0: the run had finished already)
    val_tokens: int = 0           # target tokens the final validation loss averages over
    val_split_tokens: int = 0     # target tokens of the whole validation split (what `moectl eval` takes)
    mfu: float = 0.0              # model FLOPs utilisation of this invocation's steps, against `mfu_peak`
    mfu_peak: str = ""            # the peak FLOP/s MFU is stated against, and where it comes from


@dataclass
class TrainState:
    """Where the run is; what a checkpoint's trainer.json records (with the data position, which
    follows from the step)."""

    step: int = 0                 # optimizer steps done
    tokens: int = 0               # training tokens seen
    skipped: int = 0              # steps skipped for a non-finite loss (on_nonfinite: skip)
    consecutive_skips: int = 0
    val_loss: float = math.nan    # the latest validation loss
    val_tokens: int = 0           # the target tokens it averaged over
    last_saved: int = 0           # the step of the latest checkpoint


@dataclass
class LogWindow:
    """What accumulates between two training log records."""

    loss: float = 0.0
    aux: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    routing: RoutingAccumulator = field(default_factory=RoutingAccumulator)

    def add(self, outcome: StepOutcome, tokens: int) -> None:
        self.loss += outcome.loss
        self.aux += outcome.aux
        self.steps += 1
        self.tokens += tokens
        for records in outcome.records:
            self.routing.add(records)


class StopFlag:
    """First SIGINT/SIGTERM/SIGHUP asks for a clean stop at the end of the step; a second one
    aborts. `request_stop` asks the same of the flag in use (the command line calls it when its
    output is closed: `| head`, a closed terminal)."""

    active: StopFlag | None = None
    pending: str | None = None   # a stop asked for before the loop began (its reason)

    def __init__(self) -> None:
        self.requested = False
        self.reason = "interrupted"
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGHUP:
            self.reason = "the terminal closed"

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        StopFlag.active = self
        if StopFlag.pending is not None:
            self.requested, self.reason, StopFlag.pending = True, StopFlag.pending, None
        return self

    def __exit__(self, *exc) -> None:
        StopFlag.active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def request_stop(reason: str) -> None:
    """Ask the training loop for a clean stop (checkpoint, exit 130): the loop in progress, or the
    next one to start in this process (it then stops after its first step)."""
    flag = StopFlag.active
    if flag is None:
        StopFlag.pending = reason
    elif not flag.requested:
        flag.requested, flag.reason = True, reason


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def train(recipe: Recipe, *, run_dir: str | Path | None = None, resume: str = "auto",
          show_progress: bool = True, console=None, quiet: bool = False) -> TrainResult:
    """Train a recipe's model in the run folder (default runs/<name>) and return the summary.

    `resume` is "auto" (continue from the run's latest checkpoint, if any), "never" (refuse a run
    folder that has checkpoints) or a checkpoint / run folder to start from. Launched by several
    processes (`--nproc`, torchrun, accelerate), each calls this and trains its share of the
    global batch; the process group is left in order on the way out, also on failure."""
    procs = parallel.start()
    trainer = None
    try:
        trainer = Trainer(recipe, procs, run_dir=run_dir, resume=resume, show_progress=show_progress,
                          console=console, quiet=quiet)
        result = trainer.run()
    except RouterContractError as e:   # a user's router broke the contract (maybe on one process only)
        parallel.close(procs, wait=False)
        raise MoectlError(str(e), hint="fix the router's forward (see docs/engine.md, the router contract)") from None
    except MoectlError as e:
        parallel.close(procs, wait=e.agreed)   # together when every process raised it, else at once
        raise
    except RuntimeError as e:
        parallel.close(procs, wait=False)
        if procs.world > 1 and parallel.lost_peer(e):
            raise RuntimeFailure(f"process {procs.rank}: another process of the run stopped, so this one stops too",
                                 hint="the first process that failed says why, above") from None
        raise
    except BaseException:
        parallel.close(procs, wait=False)
        raise
    finally:
        if trainer is not None:
            trainer.lock.release()
    parallel.close(procs, wait=True)
    return result


class Trainer:
    """One training run: `Trainer(recipe, processes, ...)` sets everything up, `run()` trains."""

    def __init__(self, recipe: Recipe, procs: parallel.Processes, *, run_dir: str | Path | None = None,
                 resume: str = "auto", show_progress: bool = True, console=None, quiet: bool = False):
        self.procs, self.console = procs, console
        self.show_progress = show_progress and procs.main and not quiet
        self.log = (console.print if console is not None else print) if procs.main and not quiet else _silent
        self.run_dir = RunDir(run_dir or recipe.train.run_dir or default_run_path(recipe.name))
        # Another training may be writing to an existing folder: find out before reading it. A new
        # folder is locked when it is first written (so a run that fails early leaves none behind).
        try:   # before the lock file: nothing lands among someone's files (every process sees the same)
            check_run_folder(self.run_dir)
        except MoectlError as e:
            raise _agreed(e) from None
        locked_early = self.run_dir.path.is_dir()
        self.lock = RunLock(self.run_dir.path)
        if locked_early:
            self.lock = self._on_main(lambda: RunLock(self.run_dir.path).acquire()) or self.lock
        try:
            try:   # decided from the recipe and the run folder, which every process reads alike
                self.start = plan_start(self.run_dir, recipe, resume, procs.world, self.log)
            except MoectlError as e:
                raise _agreed(e) from None
            self.recipe, self.cfg = self.start.recipe, self.start.recipe.train
            self._set_up()
            self.finished = self.start.checkpoint is not None and self.state.step >= self.start.total_steps
            if self.finished:
                self.lock.release()
            else:
                if not locked_early:   # the same on every process, so all take part in _on_main
                    self.lock = self._on_main(lambda: RunLock(self.run_dir.path).acquire()) or self.lock
                # the log keeps the steps up to the checkpoint (an attempt past it did not count)
                self._on_main(lambda: self.run_dir.keep_metrics_up_to(self.state.step))
                self._write_run_folder()
        except BaseException:
            self.lock.release()
            raise

    def _set_up(self) -> None:
        recipe, procs, start = self.recipe, self.procs, self.start
        self.data = self._prepare_data()
        try:
            check_tokenizers(self.run_dir, self.data.tokenizer_path, start)
        except MoectlError as e:
            raise _agreed(e) from None
        self.train_seqs, self.val_seqs = self._sequences()
        self.order = TrainOrder(len(self.train_seqs), recipe.seed, self.cfg.batch_size, self.cfg.grad_accum,
                                procs.world, procs.rank)
        self.val_plan = (eval_indices(len(self.val_seqs), self.cfg.batch_size, self.cfg.eval_batches, procs.world,
                                      procs.rank),
                         eval_rounds(len(self.val_seqs), self.cfg.batch_size, self.cfg.eval_batches, procs.world))
        self.core = build_model(recipe)
        if start.checkpoint is None and self.cfg.init_from:
            self._init_from()
        self.sharding = None
        if self.cfg.expert_parallel > 1:   # experts split over processes: before the optimizer sees them
            try:
                self.sharding = ExpertSharding(self.core, procs.rank, procs.world, self.cfg.expert_parallel)
            except MoectlError as e:
                raise _agreed(e) from None
            if recipe.model.moe.backend == "triton":
                self.log("note: with train.expert_parallel the triton backend runs unfused (grouped_mm): its fused "
                         "kernels gather rows of experts that live on other processes")
        self.core.activation_checkpointing = self.cfg.activation_checkpointing
        if self.cfg.compile:
            compile_model(self.core, lambda m: self.log(f"warning: {m}"))
        self.aliases = tied_aliases(self.core)   # before sharding, which hides them
        self.model = parallel.wrap(self.core, self.cfg.parallel, procs,
                                   experts=self.sharding.parameters() if self.sharding is not None else None)
        self.core.count_reducer = parallel.all_reduce_sum if procs.world > 1 else None
        self.optimizer = make_optimizer(self.core, self.cfg)
        if self.sharding is not None:
            self.sharding.optimizer = self.optimizer
        bf16 = resolve_precision(self.cfg.precision, procs.device) == "bf16"
        self.step_fn = TrainStep(self.model, self.core, self.optimizer, device=procs.device, bf16=bf16,
                                 grad_clip=self.cfg.grad_clip, compiled=self.cfg.compile, world=procs.world,
                                 sharding=self.sharding)
        torch.manual_seed(recipe.seed * 7919 + 17 * procs.rank + 1)   # training-time noise (jitter), per process
        self.plan = self.core.make_plan(recipe.seed, start.total_steps)
        self.state = TrainState()
        self.schedule = Schedule.fresh(start.total_steps)
        if start.checkpoint is not None:
            self._resume()
        for note in self.core_notes():
            self.log(f"note: {note}")

    def core_notes(self) -> list[str]:
        """What a user must know before trusting this run's numbers (non-causal routing)."""
        notes = []
        for layer in self.core.routed_layers()[:1]:
            if not getattr(layer.router, "causal", True):
                notes.append(f"the {layer.router.kind} router is not causal: a token's routing depends on later "
                             "tokens of its sequence, so training and validation losses are optimistic for a "
                             "language model (see docs/routing.md)")
        return notes

    def _on_main(self, fn):
        """Run `fn` on the first process; a MoectlError there is raised on every process (printed
        once) instead of leaving the others at a barrier. Returns fn's value on the first process."""
        failure: MoectlError | None = None
        value = None
        if self.procs.main:
            try:
                value = fn()
            except MoectlError as e:
                failure = e
        flag = torch.tensor(float(failure is not None), device=self.procs.device)
        if parallel.all_reduce_max(flag).item():
            raise _agreed(failure or MoectlError("the first process of the run failed; it says why above"))
        return value

    # ----------------------------------------------------------------- setting up

    def _init_from(self) -> None:
        """Weights of a fresh run from another run, checkpoint or weights folder (train.init_from)."""
        try:
            checkpoint, _ = init_source(self.cfg.init_from)
        except MoectlError as e:
            raise _agreed(e) from None
        try:
            load_weights(checkpoint, self.core)
        except MoectlError as e:
            raise _agreed(MoectlError(f"train.init_from: {e.message}", hint=e.hint)) from None
        self.log(f"starting from the weights of {checkpoint}")

    def _prepare_data(self) -> PreparedData:
        """The first process builds the cache, the others then find it."""
        data = self._on_main(lambda: prepare_data(self.recipe, show_progress=self.show_progress, log=self.log))
        return data if data is not None else prepare_data(self.recipe, show_progress=False, log=self.log)

    def _sequences(self) -> tuple[PackedSequences, PackedSequences]:
        seq_len = self.recipe.model.seq_len
        seqs = {split: PackedSequences(self.data.tokens(split), seq_len) for split in ("train", "val")}
        for split, s in seqs.items():
            if len(s) == 0:
                raise DataError(f"the {split} split has {self.data.splits[split].tokens} tokens, fewer than one "
                                f"sequence of model.seq_len + 1 = {seq_len + 1}",
                                hint="add data, lower model.seq_len" + (", or raise data.val_fraction"
                                                                        if split == "val" else ""))
        return seqs["train"], seqs["val"]

    def _resume(self) -> None:
        checkpoint, total = self.start.checkpoint, self.start.total_steps
        saved = recoverable(checkpoint, lambda: restore_training_state(
            checkpoint, self.model, self.optimizer, rank=self.procs.rank, core=self.core, aliases=self.aliases,
            localize=self.sharding.localize if self.sharding is not None else None))
        apply_hyperparameters(self.optimizer, self.cfg)   # the recipe's settings win over the checkpoint's
        if self.plan is not None and "plan" in saved:
            why_not = self.plan.resume(saved["plan"])
            if why_not:
                self.log(f"{why_not}: using the plan drawn from this run's seed")
        self.state = TrainState(step=saved["step"], tokens=saved["tokens"], skipped=saved.get("skipped_steps", 0),
                                last_saved=saved["step"], val_loss=_number(saved.get("val_loss")),
                                val_tokens=_count(saved.get("val_tokens")))
        self.log(f"resuming {self.run_dir.path} from {checkpoint.name} (step {self.state.step})")
        before = Schedule.from_state(saved.get("schedule"),
                                     budget_before(checkpoint, self.start.tokens_per_step, total))
        self.schedule = before.resumed(self.state.step, total, self.cfg)
        if self.schedule is not before and self.state.step < total:
            self.log(f"the budget changed ({before.total} -> {total} steps): the learning rate continues "
                     f"from {self.schedule.lr(self.state.step, self.cfg):.3g} at step {self.state.step} and follows "
                     f"the {self.cfg.lr_schedule} shape to the end (docs/training.md)")

    def _write_run_folder(self) -> None:
        if self.procs.main:
            self.run_dir.write_run_files(dump_recipe(self.recipe), self.data.tokenizer_path,
                                         {**self.data.index, "cache": str(self.data.dir)})
            self.run_dir.checkpoints.root.mkdir(exist_ok=True)
            self.run_dir.checkpoints.clean_temporaries()
        parallel.barrier()

    # ----------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        total = self.start.total_steps
        if self.finished:   # nothing to do, and nothing in the run folder changes
            self.log(f"{self.run_dir.path} has already run {self.state.step} of {total} steps; nothing to do")
            return self._finished_summary()
        self.metrics = MetricsLog(self.run_dir, self.procs.main, self.cfg.tensorboard, resume_step=self.state.step)
        try:
            self._start_trackers()
        except BaseException:
            self.metrics.close("failed")
            raise
        dtype = torch.bfloat16 if self.step_fn.bf16 else torch.float32
        self.peak = measure.device_peak(self.procs.device, dtype, self.cfg.peak_tflops)
        self.peak_flops = self.peak.flops
        self.log(f"MFU is stated against {self.peak.describe()}" + (" per process" if self.procs.world > 1 else ""))
        self.flops_per_token = measure.train_flops_per_token(self.core)
        self.window = LogWindow()
        self.progress = Progress(self.show_progress, total, self.state.step, self.console)
        t_start, first_step = time.perf_counter(), self.state.step
        try:
            with StopFlag() as stop, self.progress:
                for step in range(self.state.step, total):
                    self.train_step(step)
                    if self._stop_agreed(stop) and self.state.step < total:
                        self._save_and_stop()
        except BaseException as e:
            self.metrics.close("stopped" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed")
            raise
        self.metrics.close("finished")
        return self._summary(time.perf_counter() - t_start, total - first_step)

    def _start_trackers(self) -> None:
        """The recipe's experiment trackers (train.track), on the first process, resumed into the
        tracker runs this run folder started before."""
        sections = tracking.sections(self.cfg.track)
        if not (sections and self.procs.main):
            return
        trackers = tracking.Trackers(sections)
        run = tracking.TrackedRun(
            name=self.run_dir.path.name, recipe_name=self.recipe.name, run_dir=self.run_dir.path,
            folder=self.run_dir.tracking, config=self.recipe.model_dump(mode="json"),
            provenance=provenance.record(self.procs.world), resume_step=self.state.step)
        self.metrics.attach(trackers)
        self.run_dir.write_tracking_state(trackers.start(run, self.run_dir.read_tracking_state()))
        self.log(f"tracking with {', '.join(sections)}")

    def train_step(self, step: int) -> None:
        """One optimizer step (`step` counts from 0), then what comes after it."""
        lr = set_lr(self.optimizer, step, self.start.total_steps, self.cfg, self.schedule)
        micro = [self.train_seqs.batch(self.order.indices(step, m)) for m in range(self.cfg.grad_accum)]
        outcome = self.step_fn(micro, step)
        self.state.tokens += self.start.tokens_per_step
        if outcome.stepped:
            self.state.consecutive_skips = 0
        else:
            self._nonfinite(step, outcome)
        self.state.step = step + 1
        self.after_step(outcome, lr)

    def _nonfinite(self, step: int, outcome: StepOutcome) -> None:
        """A non-finite loss or gradient norm: stop (latest stays the last good checkpoint) or skip."""
        self.metrics.write({"type": "nonfinite", "step": step + 1, "loss": outcome.loss,
                            "grad_norm": outcome.grad_norm})
        if self.cfg.on_nonfinite == "stop":
            ckpts = self.run_dir.checkpoints
            latest = ckpts.latest() if ckpts.latest_file.exists() else None
            raise _agreed(RuntimeFailure(
                f"non-finite loss or gradient norm at step {step + 1} (loss {outcome.loss}, gradient norm "
                f"{outcome.grad_norm}); stopped. latest checkpoint: {latest.name if latest else 'none'}",
                hint="lower train.lr, keep train.grad_clip on, or set train.on_nonfinite=skip"))
        self.state.skipped += 1
        self.state.consecutive_skips += 1
        if self.state.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise _agreed(RuntimeFailure(f"{self.state.consecutive_skips} consecutive non-finite steps; stopped",
                                         hint="lower train.lr"))

    def after_step(self, outcome: StepOutcome, lr: float) -> None:
        """Logging, validation and checkpoints, each at its interval (and all at the last step)."""
        done, cfg = self.state.step, self.cfg
        last = done == self.start.total_steps
        self.window.add(outcome, self.start.tokens_per_step)
        if done % cfg.log_every == 0 or last:
            self._log_window(done, outcome, lr)
        else:
            self.progress.update(done, {"loss": outcome.loss, "lr": lr})
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            self.validate(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last:
            self.save()

    def _log_window(self, done: int, outcome: StepOutcome, lr: float) -> None:
        w = self.window
        seconds = max(time.perf_counter() - w.t0, 1e-9)
        tps = w.tokens / seconds
        record = {"type": "train", "step": done, "tokens": self.state.tokens, "loss": w.loss / w.steps,
                  "aux_loss": w.aux / w.steps, "lr": lr, "grad_norm": outcome.grad_norm, "tokens_per_s": tps,
                  "mfu": tps * self.flops_per_token / (self.procs.world * self.peak_flops),
                  "epoch": self.order.epoch_of(done), **w.routing.summary(parallel.all_reduce_sum)}
        if self.sharding is not None:   # the exchange as its own stage: mean over processes
            mine = torch.tensor([self.sharding.clock.take()], device=self.procs.device)
            spent = parallel.all_reduce_sum(mine).item() / self.procs.world
            record.update(exchange_s_per_step=spent / w.steps, exchange_share=min(spent / seconds, 1.0))
        self.metrics.write(record)
        self.progress.update(done, record)
        self.window = LogWindow()

    def validate(self, done: int) -> None:
        batches, rounds = self.val_plan
        loss, routing = evaluate(self.model, self.val_seqs, batches, self.procs.device, self.step_fn.autocast,
                                 reduce=parallel.all_reduce_sum, rounds=rounds)
        self.state.val_loss, self.state.val_tokens = loss, routing["val_tokens"]
        self.metrics.write({"type": "eval", "step": done, "tokens": self.state.tokens, "val_loss": loss,
                            "val_ppl": math.exp(min(loss, 50)), **routing})
        self.progress.note(f"step {done}: validation loss {loss:.4f} ({self.state.val_tokens:,} tokens)")

    def save(self) -> Path:
        """A checkpoint of the current step (collective: every process calls it)."""
        s, cfg, world = self.state, self.cfg, self.procs.world
        trainer = {"step": s.step, "tokens": s.tokens, "skipped_steps": s.skipped,
                   "data": {"order": "step", "epoch": self.order.epoch_of(s.step)},
                   "global_batch": cfg.batch_size * cfg.grad_accum * world, "batch_size": cfg.batch_size,
                   "grad_accum": cfg.grad_accum, "world_size": world, "schedule": self.schedule.state_dict(),
                   "val_loss": s.val_loss if math.isfinite(s.val_loss) else None, "val_tokens": s.val_tokens}
        meta = {"moectl": __version__, "recipe": self.recipe.name, "provenance": provenance.record(world)}
        path = save_checkpoint(self.run_dir.checkpoints, s.step, self.model, self.optimizer, trainer, meta,
                               rank=self.procs.rank, world_size=world, barrier=parallel.barrier,
                               keep_last=cfg.keep_last,
                               plan_state=self.plan.state_dict() if self.plan is not None else None,
                               aliases=self.aliases,
                               globalize=self.sharding.globalize if self.sharding is not None else None)
        s.last_saved = s.step
        return path

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether any process was asked to stop (all agree, so all stop at the same step)."""
        flag = torch.tensor(float(stop.requested), device=self.procs.device)
        return parallel.all_reduce_max(flag).item() > 0

    def _save_and_stop(self) -> None:
        if self.state.last_saved != self.state.step:
            self.save()
        flag = StopFlag.active
        reason = flag.reason if flag is not None else "interrupted"
        raise Interrupted(f"{reason} at step {self.state.step}; checkpoint saved to "
                          f"{self.run_dir.checkpoints.step_dir(self.state.step)}", hint="continue with --resume auto")

    def _finished_summary(self) -> TrainResult:
        """The summary a finished run wrote, read back (or rebuilt from its checkpoint)."""
        try:
            saved = self.run_dir.read_summary() or {}
            optional = {"val_tokens", "val_split_tokens", "mfu", "mfu_peak"}   # absent from older summaries
            return TrainResult(**{k: saved[k] for k in TrainResult.__dataclass_fields__
                                  if k != "steps_run" and (k in saved or k not in optional)}, steps_run=0)
        except (MoectlError, KeyError, TypeError):
            return TrainResult(str(self.run_dir.path), self.start.total_steps, self.state.tokens, 0.0, 0.0, 0,
                               self.state.val_loss, self.data.val_unigram_entropy, self.state.skipped, steps_run=0)

    def _summary(self, seconds: float, steps_run: int) -> TrainResult:
        result = TrainResult(
            run_dir=str(self.run_dir.path), steps=self.start.total_steps, tokens=self.state.tokens, seconds=seconds,
            tokens_per_s=steps_run * self.start.tokens_per_step / max(seconds, 1e-9),
            peak_memory_bytes=measure.peak_memory(self.procs.device)[0] or 0, final_val_loss=self.state.val_loss,
            val_unigram_entropy=self.data.val_unigram_entropy, skipped_steps=self.state.skipped,
            steps_run=steps_run, val_tokens=self.state.val_tokens,
            val_split_tokens=len(self.val_seqs) * self.val_seqs.seq_len)
        if steps_run:
            result.mfu = result.tokens_per_s * self.flops_per_token / (self.procs.world * self.peak.flops)
            result.mfu_peak = self.peak.describe()
        if self.procs.main:
            self.run_dir.write_summary({**asdict(result), "provenance": provenance.record(self.procs.world)})
        return result


def _silent(*args: Any, **kwargs: Any) -> None:
    """The log of a process that prints nothing (not the first, or --quiet)."""
