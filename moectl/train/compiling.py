"""`train.compile: true`: torch.compile of each transformer block, with a per-block way out.

Blocks are compiled one by one in place (their forward is replaced; parameters, state-dict keys,
checkpoints and activation checkpointing are unchanged); each block compiles once, in the first
steps (the limit of recompilations is raised to allow one per block). Parts the compiler cannot
trace run as they are inside the compiled block (graph
breaks: the grouped GEMM on CPU, a router's first-forward contract check). A block whose
compilation fails is named in a message and runs eagerly; the others stay compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def compile_model(model: nn.Module, warn: Callable[[str], None]) -> list[str]:
    """Compile every block of `model.layers` in place; returns the names of those compiled."""
    if not hasattr(torch, "compile"):
        warn("train.compile: this torch has no torch.compile; the model runs eagerly")
        return []
    # Each block specialises on its own constants (its index, its layers' names), so each compiles
    # once; the default limit of recompilations per code object would leave later blocks eager.
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 4 * len(model.layers) + 8))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 16 * len(model.layers) + 64)
    compiled = []
    stateful = getattr(model, "router_shared", None) is not None
    if stateful:
        # A routing state that crosses blocks (RMoE's recurrent cell) comes out of compiled blocks
        # with gradients about 1e-3 off eager ones (torch 2.13; measured by bench/compile_check.py):
        # such blocks keep their MLP part eager and compile their attention only.
        warn("train.compile: the recurrent router's state crosses blocks, which compiled blocks do not "
             "differentiate exactly; the MLP parts (layers.*.mlp) run eagerly and only attention is compiled")
    for i, block in enumerate(model.layers):
        target = block.attn if stateful else block
        name = f"layers.{i}{'.attn' if stateful else ''} ({type(target if stateful else block.mlp).__name__})"
        _compile_block(target, name, warn)
        compiled.append(name)
    return compiled


def _compile_block(block: nn.Module, name: str, warn: Callable[[str], None]) -> None:
    eager = block.forward
    fast = torch.compile(eager)

    def forward(*args: Any, **kwargs: Any):
        if block.forward is not forward:   # replaced (fell back) meanwhile
            return block.forward(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except Exception as e:
            if not compiler_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warn(f"train.compile: {name} could not be compiled ({type(e).__name__}: {first[:200]}); "
                 "it runs eagerly")
            block.forward = eager
            return eager(*args, **kwargs)

    block.forward = forward


def compiler_error(e: BaseException) -> bool:
    """Whether an exception comes from the compiler stack (dynamo, inductor, a C++ compiler) rather
    than from the model's own code, which must surface as it is."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses")) or \
        type(e).__name__ in ("BackendCompilerFailed", "InductorError", "CppCompileError")
