"""`train.compile` against eager: the same recipe, initialisation and batches, trained a few steps
both ways in one process; prints each step's loss difference and the compile and step times.

    python bench/compile_check.py                              # quickstart + every tiny paper recipe
    python bench/compile_check.py quickstart papers/rmoe/rmoe-enwik8-tiny --steps 5

Exit status 1 when a recipe's losses differ by more than --tolerance (relative) at any step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def tiny_recipes() -> list[str]:
    return ["quickstart"] + sorted(str(p.relative_to(REPO / "recipes").with_suffix(""))
                                   for p in (REPO / "recipes" / "papers").rglob("*-tiny.yaml"))


def train(recipe, compiled: bool, steps: int, batch: int) -> tuple[list[float], float, float]:
    from moectl.factory import build_model
    from moectl.train.compiling import compile_model
    from moectl.train.optim import make_optimizer

    model = build_model(recipe).train()
    model.make_plan(recipe.seed, steps)
    if compiled:
        torch._dynamo.reset()   # each recipe compiles afresh, as in its own training process
        compile_model(model, warn=lambda m: print("   ", m))
    opt = make_optimizer(model, recipe.train)
    g = torch.Generator().manual_seed(0)
    losses, first, rest = [], 0.0, 0.0
    for step in range(steps):
        x = torch.randint(0, recipe.model.vocab_size, (batch, recipe.model.seq_len + 1), generator=g)
        t0 = time.perf_counter()
        out = model(x[:, :-1], x[:, 1:], step=step)
        out.total_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        dt = time.perf_counter() - t0
        first, rest = (dt, rest) if step == 0 else (first, rest + dt)
    return losses, first, rest / max(steps - 1, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe names or files (default: quickstart + tiny paper recipes)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference allowed")
    a = ap.parse_args()
    from moectl.recipe.load import load_recipe

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps of {a.batch} sequences")
    failed = 0
    for name in a.recipes or tiny_recipes():
        recipe = load_recipe(name)
        eager, _, t_eager = train(recipe, False, a.steps, a.batch)
        comp, t_compile, t_comp = train(recipe, True, a.steps, a.batch)
        diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(eager, comp, strict=True))
        ok = diff <= a.tolerance
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:45s} max rel. loss diff {diff:.1e}  first step {t_compile:6.1f} s  "
              f"step eager {1e3 * t_eager:7.1f} ms  compiled {1e3 * t_comp:7.1f} ms  final loss {comp[-1]:.4f}",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
