"""Kill a training run with SIGKILL while it trains, resume it each time, and check nothing is lost.

    python bench/sigkill.py --kills 20

A tiny recipe checkpoints every step. The script trains it once without interruption (the
reference; it also measures the start-up time up to the first checkpoint and the time of a step),
then again in another folder, `--kills` times: start the process with `--resume auto`, wait until
that attempt has published a new checkpoint (so start-up is over and training is under way), wait
a random time uniform within --window seconds (default: the time of --window-steps steps, and never
more than half the time left to the end), kill it with SIGKILL. Then the run is let finish.

For every kill it records whether the kill landed after the attempt's first checkpoint (`latest`
moved forward during the attempt: "while training") and whether it interrupted a checkpoint write
(a half-written temporary checkpoint folder was left behind; the next attempt tidies it). It
reports:

  kills                  how many kills were sent, how many landed while training, how many during
                         a checkpoint write
  checkpoints lost       complete checkpoints that vanished or broke (must be 0); `latest` must never
                         name a missing or incomplete folder, nor go backwards
  equal                  whether the final weights and the per-step training losses equal the
                         reference's bit for bit

and exits 1, naming the reason, when a checkpoint was lost, `latest` was broken or went backwards,
the result differs from the reference, or fewer than --min-training-kills kills (default: half of
--kills, at least 1) landed while training.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moectl.errors import MoectlError  # noqa: E402  (the repository's moectl, put on the path above)
from moectl.rundir import ModelFolder, RunDir, step_of  # noqa: E402

RECIPE = """\
name: sigkill
seed: 0
model: {{vocab_size: 512, d_model: 32, n_layers: 2, n_heads: 4, ffn_hidden: 64, seq_len: 32,
        moe: {{num_experts: 4, top_k: 2, expert_hidden: 32}}}}
data:
  source: {{kind: files, paths: ["{corpus}/*.txt"]}}
  val_fraction: 0.2
  cache_dir: {cache}
train: {{max_steps: {steps}, batch_size: 4, lr: 1.0e-3, log_every: 1, eval_every: null, checkpoint_every: 1,
        keep_last: {steps}}}
"""

POLL_S = 0.005   # how often the run folder is looked at while waiting for a checkpoint


def corpus(root: Path) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = root / "corpus"
    out.mkdir()
    for i, name in enumerate(["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "heapq.py"]):
        (out / f"doc{i}.txt").write_text((stdlib / name).read_text())
    return out


def start(recipe: Path, run: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as err:   # a file, not a pipe: a pipe nobody reads could stall the trainer
        return subprocess.Popen([sys.executable, "-m", "moectl", "train", str(recipe), "--run-dir", str(run), "-q"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)


def complete_steps(run: Path) -> set[int]:
    try:
        return {step_of(p) for p in RunDir(run).checkpoints.steps()}
    except OSError:
        return set()


def latest_step(run: Path) -> int | None:
    """The step `latest` names; raises MoectlError if it names a missing or incomplete folder."""
    latest = RunDir(run).checkpoints.latest()
    return step_of(latest) if latest is not None else None


def peek_latest(run: Path) -> int | None:
    """The step `latest` names, read without checking the folder (for polling a live run)."""
    try:
        return step_of(Path(RunDir(run).checkpoints.latest_file.read_text().strip()))
    except (OSError, UnicodeDecodeError):
        return None


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, before: int | None, timeout: float) -> bool:
    """Wait until `latest` names a step past `before` (True), or the process ends or `timeout`
    seconds pass (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        step = peek_latest(run)
        if step is not None and (before is None or step > before):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(POLL_S)
    return False


def kill_delay(rng: random.Random, window: float, step_time: float, steps_left: int) -> float:
    """Seconds to wait after an attempt's first checkpoint before killing it: uniform within
    `window`, but at most half the time the remaining `steps_left` steps take, so that the kill
    still lands while the run trains."""
    return rng.uniform(0.0, min(window, 0.5 * steps_left * step_time))


@dataclass
class Kill:
    before: int | None          # the step `latest` named before the attempt started
    after: int | None           # ... and after the kill
    in_write: bool              # a half-written checkpoint folder was left behind
    since_start: float          # seconds from the start of the attempt to the kill
    since_checkpoint: float | None   # seconds from its first new checkpoint to the kill (None: none seen)

    @property
    def while_training(self) -> bool:
        """The attempt had published at least one checkpoint of its own when it was killed."""
        return self.after is not None and (self.before is None or self.after > self.before)


@dataclass
class Tally:
    kills: int = 0
    training: int = 0
    in_write: int = 0
    lost: int = 0
    backwards: int = 0
    broken: int = 0

    def add(self, kill: Kill) -> None:
        self.kills += 1
        self.training += kill.while_training
        self.in_write += kill.in_write


def failures(t: Tally, min_training: int, weights_equal: bool, losses_equal: bool) -> list[str]:
    """Why the benchmark fails (empty when it passes)."""
    out = []
    if t.lost:
        out.append(f"{t.lost} complete checkpoint(s) vanished or broke")
    if t.broken:
        out.append(f"`latest` named a missing or incomplete folder after {t.broken} kill(s)")
    if t.backwards:
        out.append(f"`latest` went backwards {t.backwards} time(s)")
    if not weights_equal:
        out.append("the final weights differ from the uninterrupted run's")
    if not losses_equal:
        out.append("the per-step training losses differ from the uninterrupted run's")
    if t.training == 0 or t.training < min_training:
        out.append(f"only {t.training} of {t.kills} kill(s) landed while training (after the attempt's first "
                   f"checkpoint); at least {max(1, min_training)} needed: the kills came too early or the run "
                   "finished too soon (raise --steps)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=None,
                    help="each kill comes uniformly within this many seconds after the attempt's first new "
                         "checkpoint (default: the time of --window-steps steps, measured on the reference run)")
    ap.add_argument("--window-steps", type=float, default=4.0)
    ap.add_argument("--min-training-kills", type=int, default=None,
                    help="fail when fewer kills land while training (default: half of --kills, at least 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = ap.parse_args()
    min_training = max(1, args.kills // 2 if args.min_training_kills is None else args.min_training_kills)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="moectl-sigkill-"))
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus(root), cache=root / "cache", steps=args.steps))
    try:
        return run_benchmark(args, rng, root, recipe, min_training)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_benchmark(args, rng: random.Random, root: Path, recipe: Path, min_training: int) -> int:
    ref = root / "reference"
    t0 = time.perf_counter()
    proc = start(recipe, ref, root / "reference.err")
    if not wait_for_checkpoint(proc, ref, None, timeout=600):
        proc.kill()
        print((root / "reference.err").read_text()[-3000:], file=sys.stderr)
        print("FAIL: the reference run wrote no checkpoint", file=sys.stderr)
        return 1
    startup = time.perf_counter() - t0
    if proc.wait() != 0:
        print((root / "reference.err").read_text()[-3000:], file=sys.stderr)
        print("FAIL: the reference run failed", file=sys.stderr)
        return 1
    duration = time.perf_counter() - t0
    step_time = max(duration - startup, 1e-3) / max(args.steps - 1, 1)
    window = args.window if args.window is not None else args.window_steps * step_time
    print(f"reference: {args.steps} steps in {duration:.1f} s (start-up to the first checkpoint {startup:.1f} s, "
          f"then {1000 * step_time:.0f} ms a step); kills within {window:.2f} s of each attempt's first checkpoint")

    run = root / "killed"
    seen: set[int] = set()
    tally = Tally()
    last_latest = -1
    for k in range(args.kills):
        try:
            before = latest_step(run)
        except MoectlError:   # counted after the kill that broke it
            before = peek_latest(run)
        if before == args.steps:
            print("the run has finished; stopping early (raise --steps for more kills)")
            break
        temps_before = set(RunDir(run).checkpoints.temporaries())
        log = root / f"attempt-{k + 1}.err"
        started = time.perf_counter()
        proc = start(recipe, run, log)
        seen_checkpoint = wait_for_checkpoint(proc, run, before, timeout=max(120.0, 10 * startup))
        checkpoint_at = time.perf_counter() if seen_checkpoint else None
        if proc.poll() is not None:
            if proc.returncode != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
                print(f"FAIL: attempt {k + 1} exited with {proc.returncode}", file=sys.stderr)
                return 1
            print(f"kill {k + 1:2d}: the run had finished before the kill; stopping early (raise --steps)")
            break
        if seen_checkpoint:
            now_latest = peek_latest(run) or 0
            time.sleep(kill_delay(rng, window, step_time, args.steps - now_latest))
        if proc.poll() is not None:
            print(f"kill {k + 1:2d}: the run had finished before the kill; stopping early (raise --steps)")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.perf_counter()

        now = complete_steps(run)
        tally.lost += len(seen - now)
        seen |= now
        temps = set(RunDir(run).checkpoints.temporaries())
        try:
            after = latest_step(run)
        except MoectlError as e:
            tally.broken += 1
            print(f"kill {k + 1:2d}: {e}")
            after = peek_latest(run)
        if after is not None:
            tally.backwards += after < last_latest
            last_latest = max(last_latest, after)
        kill = Kill(before, after, in_write=bool(temps) and (seen_checkpoint or bool(temps - temps_before)),
                    since_start=killed_at - started,
                    since_checkpoint=None if checkpoint_at is None else killed_at - checkpoint_at)
        tally.add(kill)
        when = ("before its first checkpoint" if kill.since_checkpoint is None
                else f"{kill.since_checkpoint:.2f} s after its first checkpoint")
        print(f"kill {k + 1:2d}: {kill.since_start:.1f} s after start, {when}; latest step {before} -> {after}, "
              f"{len(now)} complete checkpoints" + ("; interrupted a checkpoint write" if kill.in_write else ""))

    proc = start(recipe, run, root / "final.err")
    if proc.wait() != 0:
        print((root / "final.err").read_text()[-3000:], file=sys.stderr)
        print("FAIL: the run did not finish after the kills", file=sys.stderr)
        return 1
    tally.lost += len(seen - complete_steps(run))

    from safetensors.torch import load_file

    a, b = (load_file(ModelFolder(RunDir(r).checkpoints.step_dir(args.steps)).weights) for r in (ref, run))
    weights_equal = set(a) == set(b) and all(bool((a[n] == b[n]).all()) for n in a)
    losses_equal = losses(ref) == losses(run)
    print(f"kills: {tally.kills}   while training (after the attempt's first checkpoint): {tally.training}   "
          f"during a checkpoint write: {tally.in_write}")
    print(f"checkpoints lost: {tally.lost}   latest went backwards: {tally.backwards}   "
          f"latest named a missing or incomplete folder: {tally.broken}")
    print(f"equal to the uninterrupted run: weights {weights_equal}, per-step losses {losses_equal}")
    problems = failures(tally, min_training, weights_equal, losses_equal)
    for p in problems:
        print(f"FAIL: {p}")
    if not problems:
        print("PASS")
    return 1 if problems else 0


def losses(run: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in RunDir(run).read_metrics() if rec["type"] == "train"}


if __name__ == "__main__":
    sys.exit(main())
