"""`moectl train`: the training loop, for CPU, one GPU, DDP and FSDP alike.

    train(recipe) -> TrainResult        Trainer(recipe, processes).run()

Setting up (`Trainer.__init__`): the run folder and the checkpoint to resume from, the data (the
first process builds the cache), the model on its device wrapped for data parallelism, AdamW, the
model's routing plan, and, when resuming, the checkpoint's weights, optimizer, random generators
and plan. A step (`train_step`): every micro-batch runs forward (under autocast, applied here
once) and backward, with gradients synchronised on the last one; the processes agree on whether
the loss and gradient norm are finite; gradients are clipped; the learning rate of the step is
set and AdamW steps; routers adapt to the step's global expert loads. After a step
(`after_step`): logging, validation and checkpoints at their intervals. A signal (Ctrl-C,
SIGTERM) is honoured at the end of the step in progress: a checkpoint is saved and the run exits
with code 130.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moectl import __version__
from moectl.checkpoint import (
    CheckpointDir,
    load_weights,
    read_trainer_state,
    restore_training_state,
    save_checkpoint,
    tied_aliases,
)
from moectl.core.moe import RouterContractError
from moectl.core.stages import record_stage
from moectl.core.stats import RoutingAccumulator
from moectl.data.loader import PackedSequences, TrainOrder, eval_indices, eval_rounds
from moectl.data.prepare import PreparedData, prepare_data
from moectl.data.sources import DataError
from moectl.errors import Issue, MoectlError, RecipeError, RuntimeFailure
from moectl.eval.validation import evaluate
from moectl.factory import build_model
from moectl.fsutil import atomic_copy, atomic_write_text
from moectl.profile import measure
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe
from moectl.runs import check_same_run, resume_point
from moectl.train import parallel
from moectl.train.lock import RunLock
from moectl.train.metrics import MetricsLog
from moectl.train.optim import Schedule, apply_hyperparameters, make_optimizer, set_lr
from moectl.train.progress import Progress

MAX_CONSECUTIVE_SKIPS = 20


class Interrupted(MoectlError):
    """A clean stop on request (Ctrl-C, SIGTERM) with a checkpoint saved: not an error."""

    exit_code = 130
    agreed = True   # every process saw the same stop flag

    def render(self) -> str:
        return f"stopped: {self.message}" + (f"\n  hint: {self.hint}" if self.hint else "")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files define the same tokenizer (equal as JSON)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return json.loads(Path(a).read_text()) == json.loads(Path(b).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


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


@dataclass
class TrainState:
    """Where the run is; what a checkpoint's trainer.json records (with the data position, which
    follows from the step)."""

    step: int = 0                 # optimizer steps done
    tokens: int = 0               # training tokens seen
    skipped: int = 0              # steps skipped for a non-finite loss (on_nonfinite: skip)
    consecutive_skips: int = 0
    val_loss: float = math.nan    # the latest validation loss
    last_saved: int = 0           # the step of the latest checkpoint


@dataclass
class StepResult:
    """One optimizer step, agreed across processes."""

    loss: float
    aux: float
    grad_norm: float
    lr: float


@dataclass
class LogWindow:
    """What accumulates between two training log records."""

    loss: float = 0.0
    aux: float = 0.0
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    routing: RoutingAccumulator = field(default_factory=RoutingAccumulator)

    def add(self, result: StepResult, tokens: int) -> None:
        self.loss += result.loss
        self.aux += result.aux
        self.steps += 1
        self.tokens += tokens


class StopFlag:
    """First SIGINT/SIGTERM asks for a clean stop at the end of the step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
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


def total_steps(recipe: Recipe, tokens_per_step: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    raise RecipeError("recipe", [Issue("train.max_steps", "training needs a budget: set train.max_steps "
                                                          "or train.max_tokens")])


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
            trainer.release()
    parallel.close(procs, wait=True)
    return result


class Trainer:
    """One training run: `Trainer(recipe, processes, ...)` sets everything up, `run()` trains."""

    def __init__(self, recipe: Recipe, procs: parallel.Processes, *, run_dir: str | Path | None = None,
                 resume: str = "auto", show_progress: bool = True, console=None, quiet: bool = False):
        self.recipe, self.cfg, self.procs = recipe, recipe.train, procs
        self.console, self.show_progress = console, show_progress and procs.main and not quiet
        quiet_log = lambda *a, **k: None  # noqa: E731
        self.log = (console.print if console is not None else print) if procs.main and not quiet else quiet_log
        self.run_dir = Path(run_dir or self.cfg.run_dir or Path("runs") / recipe.name)
        self.ckpts = CheckpointDir(self.run_dir / "checkpoints")
        # Another training may be writing to an existing folder: find out before reading it. A new
        # folder is locked when it is first written (so a run that fails early leaves none behind).
        self.locked_early = self.run_dir.is_dir()
        self.lock = RunLock(self.run_dir)
        if self.locked_early:
            self.lock = self._on_main(lambda: RunLock(self.run_dir).acquire()) or self.lock
        try:
            try:   # decided from the recipe and the run folder, which every process reads alike
                self.resume_from = self._resume_point(resume)
                self.saved = self._recoverable(read_trainer_state, self.resume_from) if self.resume_from else None
                self._keep_global_batch()
                self.tokens_per_step = (self.cfg.batch_size * self.cfg.grad_accum * procs.world
                                        * recipe.model.seq_len)
                self.total_steps = total_steps(self.recipe, self.tokens_per_step)
            except MoectlError as e:
                raise _agreed(e) from None
            self._set_up(show_progress)
        except BaseException:
            self.lock.release()
            raise

    def _set_up(self, show_progress: bool) -> None:
        recipe, procs = self.recipe, self.procs
        self.data = self._prepare_data(show_progress)
        try:
            self._check_tokenizers()
        except MoectlError as e:
            raise _agreed(e) from None
        self.train_seqs, self.val_seqs = self._sequences()
        self.order = TrainOrder(len(self.train_seqs), recipe.seed, self.cfg.batch_size, self.cfg.grad_accum,
                                procs.world, procs.rank)
        self.val_batches = eval_indices(len(self.val_seqs), self.cfg.batch_size, self.cfg.eval_batches,
                                        procs.world, procs.rank)
        self.val_rounds = eval_rounds(len(self.val_seqs), self.cfg.batch_size, self.cfg.eval_batches, procs.world)
        self.bf16 = resolve_precision(self.cfg.precision, procs.device) == "bf16"
        self.core = build_model(recipe)
        if self.resume_from is None and self.cfg.init_from:
            self._init_from(self.cfg.init_from)
        self.core.activation_checkpointing = self.cfg.activation_checkpointing
        if self.cfg.compile:
            from moectl.train.compiling import compile_model

            compile_model(self.core, lambda m: self.log(f"warning: {m}"))
        self.flops_per_token = measure.train_flops_per_token(self.core)
        self.aliases = tied_aliases(self.core)   # before sharding, which hides them
        self.model = parallel.wrap(self.core, self.cfg.parallel, procs)
        self.core.count_reducer = parallel.all_reduce_sum if procs.world > 1 else None
        self.optimizer = make_optimizer(self.core, self.cfg)
        torch.manual_seed(recipe.seed * 7919 + 17 * procs.rank + 1)   # training-time noise (jitter), per process
        self.plan = self.core.make_plan(recipe.seed, self.total_steps)
        self.state = TrainState()
        self.schedule = Schedule.fresh(self.total_steps)
        if self.resume_from is not None:
            self._resume()
        for note in self.core_notes():
            self.log(f"note: {note}")
        self.finished = self.resume_from is not None and self.state.step >= self.total_steps
        if self.finished:
            self.lock.release()
        else:
            if not self.locked_early:   # the same on every process, so all take part in _on_main
                self.lock = self._on_main(lambda: RunLock(self.run_dir).acquire()) or self.lock
            self._write_run_folder()

    def release(self) -> None:
        self.lock.release()

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

    def _keep_global_batch(self) -> None:
        """A resumed run keeps the global batch its checkpoint was trained with (so its data order
        and schedule stay those of the run): train.grad_accum follows the process count, or the
        resume is refused with the arithmetic."""
        if self.saved is None:
            return
        cfg, world = self.cfg, self.procs.world
        saved_global = self.saved.get("global_batch")
        if not isinstance(saved_global, int) or saved_global < 1:
            return   # a checkpoint from before the global batch was recorded
        if cfg.batch_size * cfg.grad_accum * world == saved_global:
            return
        per_micro = cfg.batch_size * world
        was = (f"{self.saved.get('batch_size', '?')} sequences x {self.saved.get('grad_accum', '?')} micro-batches "
               f"x {self.saved.get('world_size', '?')} processes")
        if saved_global % per_micro:
            raise MoectlError(
                f"{self.resume_from} was trained with a global batch of {saved_global} sequences ({was}); with "
                f"{world} processes of train.batch_size {cfg.batch_size} ({per_micro} per micro-batch) no whole "
                f"number of micro-batches gives {saved_global}",
                hint=f"resume with --nproc {self.saved.get('world_size', '?')}, or set train.batch_size so that "
                     f"batch_size x processes divides {saved_global}")
        accum = saved_global // per_micro
        self.log(f"keeping the run's global batch of {saved_global} sequences ({was}): train.grad_accum = {accum} "
                 f"with {world} processes")
        self.recipe = self.recipe.model_copy(update={"train": cfg.model_copy(update={"grad_accum": accum})})
        self.cfg = self.recipe.train

    def _recoverable(self, read, path: Path, *args, **kwargs):
        """`read(path, ...)`, with a damaged checkpoint's error naming the run's newest other
        complete checkpoint and how to resume from it. Every process reads the same files except
        its own random-generator state, so the error is the process's own (it says so itself)."""
        try:
            return read(path, *args, **kwargs)
        except MoectlError as e:
            ckpts = CheckpointDir(Path(path).parent)
            raise MoectlError(e.message, hint=ckpts.recovery_hint(path), exit_code=e.exit_code) from None

    def _check_tokenizers(self) -> None:
        """The tokens of a run keep their meaning: the data's tokenizer must be the one the run
        (and the run it resumes from, or whose weights it starts from) was trained with."""
        mine = self.data.tokenizer_path
        theirs = []
        own = self.run_dir / "tokenizer.json"
        if own.is_file() and (self.resume_from is not None or self.ckpts.steps()):
            theirs.append(("this run", own))
        if self.resume_from is not None:
            source = self.resume_from.parent.parent / "tokenizer.json"
            if source.is_file() and source.resolve() != own.resolve():
                theirs.append((f"the run of --resume {self.resume_from}", source))
        elif self.cfg.init_from:
            checkpoint, run = self._init_source()
            source = (run or checkpoint) / "tokenizer.json"
            if source.is_file():
                theirs.append((f"train.init_from {self.cfg.init_from}", source))
        for what, path in theirs:
            if not same_tokenizer(path, mine):
                raise MoectlError(
                    f"the data's tokenizer ({mine}) is not the tokenizer of {what} ({path}): token ids would change "
                    "meaning (the corpus or the tokenizer settings changed since that run started)",
                    hint="train on the data the run was trained on, or start a new run (--run-dir) with its own "
                         "tokenizer; to reuse that tokenizer, set data.tokenizer: {kind: file, path: " + str(path) + "}")

    # ----------------------------------------------------------------- setting up

    def _resume_point(self, resume: str) -> Path | None:
        resume_from = resume_point(self.run_dir, resume)
        if resume_from is not None:
            check_same_run(self.run_dir, self.recipe)
            source_run = resume_from.parent.parent   # <run>/checkpoints/step-N
            if source_run.resolve() != self.run_dir.resolve():
                check_same_run(source_run, self.recipe, sections=("model",))   # new data or seed is fine
        return resume_from

    def _budget_before(self) -> int:
        """The budget a checkpoint without saved schedule segments was trained towards: its run's
        config.yaml says (read before this run rewrites it); else this run's."""
        import yaml

        try:
            old = yaml.safe_load((self.resume_from.parent.parent / "config.yaml").read_text())["train"]
            steps, tokens = old.get("max_steps"), old.get("max_tokens")
            if isinstance(steps, int) and steps > 0:
                return steps
            if isinstance(tokens, int) and tokens > 0:
                return max(1, math.ceil(tokens / self.tokens_per_step))
            return self.total_steps
        except (OSError, yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
            return self.total_steps

    def _init_source(self) -> tuple[Path, Path | None]:
        """(checkpoint, run folder or None) that train.init_from names."""
        from moectl.runs import find_checkpoint

        try:
            return find_checkpoint(self.cfg.init_from)
        except MoectlError as e:
            raise _agreed(MoectlError(f"train.init_from: {e.message}", hint=e.hint)) from None

    def _init_from(self, source: str) -> None:
        """Weights of a fresh run from another run, checkpoint or weights folder (train.init_from)."""
        checkpoint, _ = self._init_source()
        try:
            load_weights(checkpoint, self.core)
        except MoectlError as e:
            raise _agreed(MoectlError(f"train.init_from: {e.message}", hint=e.hint)) from None
        self.log(f"starting from the weights of {checkpoint}")

    def _prepare_data(self, show_progress: bool) -> PreparedData:
        """The first process builds the cache, the others then find it."""
        data = self._on_main(lambda: prepare_data(self.recipe, show_progress=show_progress and self.show_progress,
                                                  log=self.log))
        return data if data is not None else prepare_data(self.recipe, show_progress=False, log=self.log)

    def _sequences(self) -> tuple[PackedSequences, PackedSequences]:
        seq_len = self.recipe.model.seq_len
        seqs = {split: PackedSequences(self.data.tokens(split), seq_len) for split in ("train", "val")}
        for split, s in seqs.items():
            if len(s) == 0:
                tokens = self.data.index["splits"][split]["tokens"]
                raise DataError(f"the {split} split has {tokens} tokens, fewer than one sequence of "
                                f"model.seq_len + 1 = {seq_len + 1}",
                                hint="add data, lower model.seq_len" + (", or raise data.val_fraction"
                                                                        if split == "val" else ""))
        return seqs["train"], seqs["val"]

    def _resume(self) -> None:
        saved = self._recoverable(restore_training_state, self.resume_from, self.model, self.optimizer,
                                  rank=self.procs.rank, core=self.core, aliases=self.aliases)
        apply_hyperparameters(self.optimizer, self.cfg)   # the recipe's settings win over the checkpoint's
        if self.plan is not None and "plan" in saved:
            why_not = self.plan.resume(saved["plan"])
            if why_not:
                self.log(f"{why_not}: using the plan drawn from this run's seed")
        self.state = TrainState(step=saved["step"], tokens=saved["tokens"], skipped=saved.get("skipped_steps", 0),
                                last_saved=saved["step"], val_loss=_number(saved.get("val_loss")))
        self.log(f"resuming {self.run_dir} from {self.resume_from.name} (step {self.state.step})")
        before = Schedule.from_state(saved.get("schedule"), self._budget_before())
        self.schedule = before.resumed(self.state.step, self.total_steps, self.cfg)
        if self.schedule is not before and self.state.step < self.total_steps:
            self.log(f"the budget changed ({before.total} -> {self.total_steps} steps): the learning rate continues "
                     f"from {self.schedule.lr(self.state.step, self.cfg):.3g} at step {self.state.step} and follows "
                     f"the {self.cfg.lr_schedule} shape to the end (docs/training.md)")

    def _write_run_folder(self) -> None:
        if self.procs.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpts.root.mkdir(exist_ok=True)
            self.ckpts.clean_temporaries()
            atomic_write_text(self.run_dir / "config.yaml", dump_recipe(self.recipe))
            target = self.run_dir / "tokenizer.json"
            if not (target.exists() and os.path.samefile(self.data.tokenizer_path, target)):
                atomic_copy(self.data.tokenizer_path, target)
            atomic_write_text(self.run_dir / "data.json",
                              json.dumps({**self.data.index, "cache": str(self.data.dir)}, indent=2))
        parallel.barrier()

    # ----------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        if self.finished:   # nothing to do, and nothing in the run folder changes
            self.log(f"{self.run_dir} has already run {self.state.step} of {self.total_steps} steps; nothing to do")
            return self._finished_summary()
        self.metrics = MetricsLog(self.run_dir, self.procs.main, self.cfg.tensorboard, resume_step=self.state.step)
        # a small matmul: measured at every start, it must be quick (a profile measures a larger one)
        self.peak_flops = measure.peak_flops(self.procs.device, torch.bfloat16 if self.bf16 else torch.float32,
                                             size=4096 if self.procs.device.type == "cuda" else 1024, reps=5)
        self.window = LogWindow()
        self.progress = Progress(self.show_progress, self.total_steps, self.state.step, self.console)
        t_start, first_step = time.perf_counter(), self.state.step
        try:
            with StopFlag() as stop, self.progress:
                for step in range(self.state.step, self.total_steps):
                    result = self.train_step(step)
                    self.after_step(result)
                    if self._stop_agreed(stop) and self.state.step < self.total_steps:
                        self._save_and_stop()
        finally:
            self.metrics.close()
        return self._summary(time.perf_counter() - t_start, self.total_steps - first_step)

    def autocast(self):
        """bf16 autocast around the forward when the run's precision is bf16, once, for every path."""
        return torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step (`step` counts from 0). Returns the loss and norm all processes agree on."""
        cfg, device = self.cfg, self.procs.device
        loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        step_routing = RoutingAccumulator()
        for micro in range(cfg.grad_accum):
            x, y = self.train_seqs.batch(self.order.indices(step, micro))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with parallel.gradient_sync(self.model, micro == cfg.grad_accum - 1):
                with self.autocast():
                    out = self.model(x, y, step=step)
                self._backward(out.total_loss / cfg.grad_accum)
            loss_sum += out.loss.detach()
            aux_sum += out.aux_loss.detach()
            step_routing.add(out.records)
            self.window.routing.add(out.records)
        grad_norm = parallel.clip_gradients(self.model, cfg.grad_clip)
        agreed = parallel.all_reduce_sum(torch.stack([loss_sum, aux_sum, grad_norm.float().to(device)]))
        n, world = cfg.grad_accum * self.procs.world, self.procs.world
        result = StepResult(agreed[0].item() / n, agreed[1].item() / n, agreed[2].item() / world,
                            set_lr(self.optimizer, step, self.total_steps, cfg, self.schedule))
        self.state.tokens += self.tokens_per_step
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
            self.state.consecutive_skips = 0
            with record_stage("optimizer"):
                self.optimizer.step()
            if step_routing.names:
                self.core.after_step(list(parallel.all_reduce_sum(torch.stack(step_routing.load))))
        else:
            self._nonfinite(step, result)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step + 1
        return result

    def _backward(self, loss: torch.Tensor) -> None:
        """loss.backward(); with train.compile a failure to compile the backward (which happens at
        the first backward, past the per-block fallback of the forward) is a message."""
        if not self.cfg.compile:
            loss.backward()
            return
        from moectl.train.compiling import compiler_error

        try:
            loss.backward()
        except Exception as e:   # noqa: BLE001  (only compiler failures are turned into messages)
            if not compiler_error(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise MoectlError(f"train.compile: compiling the backward pass failed ({type(e).__name__}: {first})",
                              hint="train with train.compile: false") from None

    def _nonfinite(self, step: int, result: StepResult) -> None:
        """A non-finite loss or gradient norm: stop (latest stays the last good checkpoint) or skip."""
        self.metrics.write({"type": "nonfinite", "step": step + 1, "loss": result.loss, "grad_norm": result.grad_norm})
        if self.cfg.on_nonfinite == "stop":
            latest = self.ckpts.latest() if self.ckpts.latest_file.exists() else None
            raise _agreed(RuntimeFailure(
                f"non-finite loss or gradient norm at step {step + 1} (loss {result.loss}, gradient norm "
                f"{result.grad_norm}); stopped. latest checkpoint: {latest.name if latest else 'none'}",
                hint="lower train.lr, keep train.grad_clip on, or set train.on_nonfinite=skip"))
        self.state.skipped += 1
        self.state.consecutive_skips += 1
        if self.state.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise _agreed(RuntimeFailure(f"{self.state.consecutive_skips} consecutive non-finite steps; stopped",
                                         hint="lower train.lr"))

    def after_step(self, result: StepResult) -> None:
        """Logging, validation and checkpoints, each at its interval (and all at the last step)."""
        done, cfg = self.state.step, self.cfg
        last = done == self.total_steps
        self.window.add(result, self.tokens_per_step)
        if done % cfg.log_every == 0 or last:
            self._log_window(done, result)
        else:
            self.progress.update(done, {"loss": result.loss, "lr": result.lr})
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            self.validate(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last:
            self.save()

    def _log_window(self, done: int, result: StepResult) -> None:
        w = self.window
        tps = w.tokens / max(time.perf_counter() - w.t0, 1e-9)
        record = {"type": "train", "step": done, "tokens": self.state.tokens, "loss": w.loss / w.steps,
                  "aux_loss": w.aux / w.steps, "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tps,
                  "mfu": tps * self.flops_per_token / (self.procs.world * self.peak_flops),
                  "epoch": self.order.epoch_of(done), **w.routing.summary(parallel.all_reduce_sum)}
        self.metrics.write(record)
        self.progress.update(done, record)
        self.window = LogWindow()

    def validate(self, done: int) -> None:
        loss, routing = evaluate(self.model, self.val_seqs, self.val_batches, self.procs.device, self.autocast,
                                 reduce=parallel.all_reduce_sum, rounds=self.val_rounds)
        self.state.val_loss = loss
        self.metrics.write({"type": "eval", "step": done, "tokens": self.state.tokens, "val_loss": loss,
                            "val_ppl": math.exp(min(loss, 50)), **routing})
        self.progress.note(f"step {done}: validation loss {loss:.4f}")

    def save(self) -> Path:
        """A checkpoint of the current step (collective: every process calls it)."""
        s = self.state
        cfg = self.cfg
        trainer = {"step": s.step, "tokens": s.tokens, "skipped_steps": s.skipped,
                   "data": {"order": "step", "epoch": self.order.epoch_of(s.step)},
                   "global_batch": cfg.batch_size * cfg.grad_accum * self.procs.world, "batch_size": cfg.batch_size,
                   "grad_accum": cfg.grad_accum, "world_size": self.procs.world,
                   "schedule": self.schedule.state_dict(),
                   "val_loss": s.val_loss if math.isfinite(s.val_loss) else None}
        path = save_checkpoint(self.ckpts, s.step, self.model, self.optimizer, trainer,
                               {"moectl": __version__, "recipe": self.recipe.name}, rank=self.procs.rank,
                               world_size=self.procs.world, barrier=parallel.barrier, keep_last=self.cfg.keep_last,
                               plan_state=self.plan.state_dict() if self.plan is not None else None,
                               aliases=self.aliases)
        s.last_saved = s.step
        return path

    def _stop_agreed(self, stop: StopFlag) -> bool:
        """Whether any process was asked to stop (all agree, so all stop at the same step)."""
        flag = torch.tensor(float(stop.requested), device=self.procs.device)
        return parallel.all_reduce_max(flag).item() > 0

    def _save_and_stop(self) -> None:
        if self.state.last_saved != self.state.step:
            self.save()
        raise Interrupted(f"interrupted at step {self.state.step}; checkpoint saved to "
                          f"{self.ckpts.step_dir(self.state.step)}", hint="continue with --resume auto")

    def _finished_summary(self) -> TrainResult:
        """The summary a finished run wrote, read back (or rebuilt from its checkpoint)."""
        try:
            saved = json.loads((self.run_dir / "logs" / "summary.json").read_text())
            return TrainResult(**{k: saved[k] for k in TrainResult.__dataclass_fields__ if k != "steps_run"},
                               steps_run=0)
        except (OSError, ValueError, KeyError, TypeError):
            return TrainResult(str(self.run_dir), self.total_steps, self.state.tokens, 0.0, 0.0, 0,
                               self.state.val_loss, self.data.index["val_unigram_entropy"], self.state.skipped,
                               steps_run=0)

    def _summary(self, seconds: float, steps_run: int) -> TrainResult:
        result = TrainResult(
            run_dir=str(self.run_dir), steps=self.total_steps, tokens=self.state.tokens, seconds=seconds,
            tokens_per_s=steps_run * self.tokens_per_step / max(seconds, 1e-9),
            peak_memory_bytes=measure.peak_memory(self.procs.device)[0] or 0, final_val_loss=self.state.val_loss,
            val_unigram_entropy=self.data.index["val_unigram_entropy"], skipped_steps=self.state.skipped,
            steps_run=steps_run)
        if self.procs.main:
            atomic_write_text(self.run_dir / "logs" / "summary.json", json.dumps(asdict(result), indent=2))
        return result
