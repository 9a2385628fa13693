"""Kill a training run with SIGKILL at random moments, resume it each time, and check nothing is lost.

    python bench/sigkill.py --kills 20 --steps 300

A tiny recipe checkpoints every step. The script trains it once without interruption (the
reference), then again in another folder, killing the process with SIGKILL at a random moment
(uniform within --window seconds of each start) and starting it again with
`--resume auto`, `--kills` times, and then lets it finish. It reports:

  checkpoints lost   complete checkpoints that vanished or broke (must be 0); `latest` must never
                     name a missing or incomplete folder, nor go backwards
  kills during a write  kills that left a half-written checkpoint folder behind (tidied on resume)
  equal              whether the final weights and the per-step training losses equal the
                     reference's bit for bit
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moectl.rundir import ModelFolder, RunDir, step_of  # noqa: E402  (the repository's moectl, put on the path above)

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


def corpus(root: Path) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = root / "corpus"
    out.mkdir()
    for i, name in enumerate(["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "heapq.py"]):
        (out / f"doc{i}.txt").write_text((stdlib / name).read_text())
    return out


def start(recipe: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moectl", "train", str(recipe), "--run-dir", str(run), "-q"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def complete_steps(run: Path) -> set[int]:
    try:
        return {step_of(p) for p in RunDir(run).checkpoints.steps()}
    except OSError:
        return set()


def latest_step(run: Path) -> int | None:
    latest = RunDir(run).checkpoints.latest()   # raises if it names a broken folder
    return step_of(latest) if latest is not None else None


def losses(run: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in RunDir(run).read_metrics() if rec["type"] == "train"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=6.0,
                    help="each kill comes uniformly within 0.5 s to this many seconds of a start")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="moectl-sigkill-"))
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus(root), cache=root / "cache", steps=args.steps))

    t0 = time.perf_counter()
    ref = root / "reference"
    proc = start(recipe, ref)
    if proc.wait() != 0:
        print(proc.stderr.read(), file=sys.stderr)
        return 1
    duration = time.perf_counter() - t0
    print(f"reference: {args.steps} steps in {duration:.1f} s")

    run = root / "killed"
    seen: set[int] = set()
    lost, backwards, mid_write, last_latest, kills = 0, 0, 0, -1, 0
    for k in range(args.kills):
        if last_latest == args.steps:
            print("the run has finished; stopping early (raise --steps for more kills)")
            break
        proc = start(recipe, run)
        time.sleep(rng.uniform(0.5, args.window))
        if proc.poll() is not None:   # it finished before the kill came
            print(f"kill {k + 1:2d}: the run had finished; stopping early")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        now = complete_steps(run)
        lost += len(seen - now)
        seen |= now
        if RunDir(run).checkpoints.temporaries():
            mid_write += 1
        step = latest_step(run)
        if step is not None:
            backwards += step < last_latest
            last_latest = step
        print(f"kill {k + 1:2d}: latest step {step}, {len(now)} complete checkpoints")
    proc = start(recipe, run)
    code = proc.wait()
    if code != 0:
        print(proc.stderr.read(), file=sys.stderr)
        return 1
    lost += len(seen - complete_steps(run))

    from safetensors.torch import load_file

    a, b = (load_file(ModelFolder(RunDir(r).checkpoints.step_dir(args.steps)).weights) for r in (ref, run))
    weights_equal = set(a) == set(b) and all(bool((a[n] == b[n]).all()) for n in a)
    losses_equal = losses(ref) == losses(run)
    print(f"kills: {kills}   kills during a checkpoint write: {mid_write}")
    print(f"checkpoints lost: {lost}   latest went backwards: {backwards}")
    print(f"equal to the uninterrupted run: weights {weights_equal}, per-step losses {losses_equal}")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if lost == 0 and backwards == 0 and weights_equal and losses_equal else 1


if __name__ == "__main__":
    sys.exit(main())
