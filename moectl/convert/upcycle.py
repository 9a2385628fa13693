"""Sparse upcycling: a dense model (a moectl run, or a Llama-style Hugging Face folder) into an MoE
whose experts start as copies of the dense FFN.

With granularity G the dense FFN's hidden units are split into G equal shards; expert e is a copy of
shard e mod G, so E experts are E/G copies of each shard ("virtual groups" of G experts). The G
experts of a group share one router row, so a token's top-k (k a multiple of G) takes whole groups;
each expert's output projection is scaled by G. With renormalised top-k weights the upcycled layer
then computes the dense FFN exactly, whatever the router's rows are, and training moves them apart.
`noise` adds N(0, (noise * std of the matrix)^2) to every expert matrix, which breaks the tie
between copies at the price of that exactness.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moectl.checkpoint import tied_aliases
from moectl.convert.importer import folder_recipe, is_hf_folder, read_hf_model, write_model_folder
from moectl.convert.output import check_target
from moectl.errors import MoectlError
from moectl.recipe.load import resolved
from moectl.runs import folder_record, load_run


@dataclass
class UpcycleResult:
    out: Path
    moe_layers: list[int]
    notes: list[str] = field(default_factory=list)


def parse_layers(spec: str, n_layers: int) -> str | list[int]:
    if spec in ("all", "every_other"):
        return spec
    try:
        layers = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise MoectlError(f"--layers {spec!r}: give 'all', 'every_other' or layer indices such as 1,3,5") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise MoectlError(f"--layers {spec!r}: layer indices must lie in 0..{n_layers - 1}")
    return layers


def w3_present(state: dict[str, Any]) -> bool:
    return any(k.endswith("ffn.w3.weight") or k.endswith("mlp.w3.weight") for k in state)


def _check_memory(experts: int, hidden: int, d_model: int, matrices: int, moe_layers: int) -> None:
    """Refuse an upcycle whose expert weights cannot fit in this machine's memory, before any is made."""
    need = 4 * experts * hidden * d_model * matrices * moe_layers   # fp32
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * total:
        raise MoectlError(f"cannot upcycle: {experts:,} experts per layer need about {need / 2**30:,.1f} GiB of expert "
                          f"weights, more than this machine's memory ({total / 2**30:,.1f} GiB)",
                          hint="use fewer --experts, a larger --granularity or fewer --layers")


def upcycle(src: str | Path, out: str | Path, *, experts: int, top_k: int, noise: float = 0.0,
            granularity: int = 1, layers: str = "all", seed: int = 0, force: bool = False,
            step: int | None = None, name: str | None = None) -> UpcycleResult:
    src, out = Path(src), Path(out)
    check_target(out, force, src)
    base, model, state, tokenizer, eos, origin, special, text = _dense_source(src, step)
    if model.get("moe") is not None:
        raise MoectlError(f"{src} is already an MoE model", hint="upcycle a dense model (no model.moe section)")
    F_hidden, n_layers = model["ffn_hidden"], model["n_layers"]
    problems = []
    if not F_hidden:
        problems.append("the model has no dense FFN to copy (ffn_hidden 0)")
    if experts < 2:
        problems.append("--experts must be at least 2")
    if not 1 <= top_k <= experts:
        problems.append(f"--top-k must lie in 1..{experts}")
    if granularity < 1 or F_hidden % granularity:
        problems.append(f"--granularity {granularity} must divide the FFN width {F_hidden}")
    elif experts % granularity or top_k % granularity:
        problems.append(f"--experts ({experts}) and --top-k ({top_k}) must be multiples of --granularity "
                        f"({granularity}), so that every token takes whole copies of the FFN")
    if not (noise >= 0 and noise < float("inf")):
        problems.append("--noise must be a finite number >= 0")
    if problems:
        raise MoectlError("cannot upcycle: " + "; ".join(problems))
    G, Fg = granularity, F_hidden // granularity
    moe_spec = parse_layers(layers, n_layers)
    moe_layers = (list(range(0, n_layers, 1 if moe_spec == "all" else 2)) if isinstance(moe_spec, str)
                  else moe_spec)
    _check_memory(experts, Fg, model["d_model"], 3 if w3_present(state) else 2, len(moe_layers))
    model = {**model, "moe": {"num_experts": experts, "top_k": top_k, "expert_hidden": Fg, "layers": moe_spec,
                              "router": {"kind": "topk", "renormalize": True}}}
    gen = torch.Generator().manual_seed(seed)
    std = float(model.get("init_std", 0.02))
    new = dict(state)
    for i in moe_layers:
        p = f"layers.{i}.mlp."
        w1 = new.pop(p + "ffn.w1.weight").float()         # [F, D]
        w3 = new.pop(p + "ffn.w3.weight", None)
        w2 = new.pop(p + "ffn.w2.weight").float()         # [D, F]
        shard = lambda w, s: w[s * Fg:(s + 1) * Fg]
        bank = {"w1": torch.stack([shard(w1, e % G).t() for e in range(experts)]),
                "w2": torch.stack([shard(w2.t(), e % G) * G for e in range(experts)])}
        if w3 is not None:
            bank["w3"] = torch.stack([shard(w3.float(), e % G).t() for e in range(experts)])
        for tensor, w in bank.items():
            if noise > 0:
                w = w + noise * w[0].std() * torch.randn(w.shape, generator=gen)
            new[p + "moe.experts." + tensor] = w.contiguous()
        rows = torch.randn(experts // G, w1.shape[1], generator=gen) * std
        new[p + "moe.router.weight"] = rows.repeat_interleave(G, dim=0).contiguous()
    notes = []
    if noise > 0:
        notes.append(f"--noise {noise}: the upcycled model no longer computes the dense model exactly")
    data = folder_recipe(out, base, model, tokenizer is not None, eos, name, special=special)
    write_model_folder(out, data, new, tokenizer, {"kind": "upcycle", "from": str(src.resolve()), "origin": origin,
                                                   "experts": experts, "top_k": top_k, "granularity": G,
                                                   "noise": noise, "seed": seed}, force, text)
    return UpcycleResult(out, moe_layers, notes)


def _dense_source(src: Path, step: int | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                                                        Path | None, str | None, str, bool, dict[str, Any]]:
    """(base recipe data, model section, state, tokenizer.json, eos token, origin, whether texts get
    the tokenizer's special tokens, text settings) of a moectl run or checkpoint, or of a Hugging
    Face folder."""
    if is_hf_folder(src):
        hf = read_hf_model(src)
        return {}, hf.model, hf.state, hf.tokenizer, hf.eos_token, hf.family, hf.special, hf.text
    run = load_run(src, step=step)
    data = resolved(run.recipe)
    base = {k: v for k, v in data.items() if k not in ("model", "name")}
    base.get("train", {}).pop("init_from", None)
    aliases = tied_aliases(run.model)
    state = {k: v for k, v in run.model.state_dict().items() if k not in aliases}
    tok = run.tokenizer
    eos = tok.inner.id_to_token(tok.eot_id) if tok is not None else None
    special = tok is not None and tok.add_special_tokens
    return (base, data["model"], state, tok.path if tok is not None else None, eos, "moectl", special,
            folder_record(run, "text_settings") or {})
