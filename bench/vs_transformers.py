"""Training throughput of moectl against transformers' Mixtral, side by side in one process.

The same model (sizes, untied embeddings, SDPA attention, top-k softmax routing with the balance
loss on in both) is trained with AdamW in moectl and in `transformers.MixtralForCausalLM` with
each experts implementation transformers offers on the device. Steps are interleaved (one round
of every implementation, then the next round), so a shared machine's drift hits them all alike;
the script prints each rate (median over rounds) and moectl's ratio to the best transformers one.

    python bench/vs_transformers.py                        # fp32 and bf16 autocast, defaults below
    python bench/vs_transformers.py --dtype bf16 --rounds 5 --backend grouped_mm
    python bench/vs_transformers.py --d-model 512 --layers 8 --experts 16 --top-k 2 --seq 512

Needs transformers (`pip install -e .[hf]`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512, help="expert width")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both",
                    help="fp32 weights and math, or fp32 weights under bf16 autocast")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each implementation once per round)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    ap.add_argument("--backend", default=None,
                    help="moectl expert backend (default: auto); several as a comma list")
    ap.add_argument("--compile", action="store_true", help="also time moectl with train.compile")
    ap.add_argument("--hf-impls", default="eager,grouped_mm",
                    help="transformers experts implementations to try (batched_mm copies every expert's "
                         "weights per routed token: gigabytes at the default sizes)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return ap.parse_args()


def moectl_model(a, backend: str):
    from moectl.core import ModelArgs, MoEArgs, MoETransformer

    args = ModelArgs(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                     ffn_hidden=a.hidden, seq_len=a.seq,
                     moe=MoEArgs(num_experts=a.experts, top_k=a.top_k, expert_hidden=a.hidden,
                                 layers=list(range(a.layers)), backend=backend, aux_loss_weight=0.01,
                                 z_loss_weight=0.0))
    return MoETransformer(args)


def transformers_model(a, impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.hidden,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                        num_local_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=a.seq,
                        output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False,
                        attn_implementation="sdpa")
    cfg._experts_implementation = impl
    return MixtralForCausalLM(cfg)


def transformers_impls(wanted: str) -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return [n for n in wanted.split(",") if n == "eager" or n in ALL_EXPERTS_FUNCTIONS]


class Runner:
    """One implementation: its model, optimizer and a step function."""

    def __init__(self, name: str, model, step, dtype: str, device: torch.device):
        self.name, self.model, self.step_fn = name, model.to(device).train(), step
        # Both sides get AdamW's fused kernel (moectl's trainer uses it; a transformers user would
        # pick it too), so the optimizer does not decide the ratio.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.dtype, self.device = dtype, device
        self.rates: list[float] = []
        self.loss = float("nan")

    def step(self, tokens, targets) -> None:
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bf16"
               else contextlib.nullcontext())
        with ctx:
            loss = self.step_fn(self.model, tokens, targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())


def moectl_step(model, tokens, targets):
    out = model(tokens, targets, step=0)
    return out.loss + out.aux_loss


def transformers_step(model, tokens, targets):
    out = model(input_ids=tokens, labels=targets)
    return out.loss   # includes router_aux_loss_coef * aux_loss


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(a, dtype: str, device: torch.device) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen).to(device)
    # transformers shifts labels itself; moectl takes next-token targets.
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    runners = []
    for backend in (a.backend or "auto").split(","):
        runners.append(Runner(f"moectl {backend}", moectl_model(a, backend), moectl_step, dtype, device))
        if a.compile:
            from moectl.train.compiling import compile_model

            m = moectl_model(a, backend)
            compile_model(m, warn=print)
            runners.append(Runner(f"moectl {backend} compiled", m, moectl_step, dtype, device))
    for impl in transformers_impls(a.hf_impls):
        try:
            model = transformers_model(a, impl)
        except (ValueError, ImportError) as e:
            print(f"  transformers {impl}: not available here ({str(e).splitlines()[0]})")
            continue
        runners.append(Runner(f"transformers {impl}", model, lambda m, t, _y: transformers_step(m, t, t),
                              dtype, device))
    # transformers' labels are the inputs (it shifts inside); give it the un-shifted tokens.
    feeds = {id(r): (x, y) if r.step_fn is moectl_step else (x, x) for r in runners}
    for r in runners:
        for _ in range(a.warmup):
            r.step(*feeds[id(r)])
    for _ in range(a.rounds):
        for r in runners:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                r.step(*feeds[id(r)])
            sync(device)
            r.rates.append(a.steps * a.batch * a.seq / (time.perf_counter() - t0))
    rates = {r.name: statistics.median(r.rates) for r in runners}
    spread = {r.name: (min(r.rates), max(r.rates)) for r in runners}
    print(f"\n{dtype}: tokens/s, median of {a.rounds} rounds x {a.steps} steps (min-max)")
    for r in runners:
        lo, hi = spread[r.name]
        print(f"  {r.name:28s} {rates[r.name]:9,.0f}   ({lo:,.0f}-{hi:,.0f})   last loss {r.loss:.3f}")
    best_hf = max((v, k) for k, v in rates.items() if k.startswith("transformers"))
    for name, v in rates.items():
        if name.startswith("moectl"):
            print(f"  ratio {name} / {best_hf[1]}: {v / best_hf[0]:.2f}x")


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench/vs_transformers.py needs transformers: pip install -e '.[hf]'") from None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: d_model {a.d_model}, {a.layers} layers (all MoE), {a.heads} heads, {a.experts} experts "
          f"top-{a.top_k}, expert width {a.hidden}, vocab {a.vocab}, seq {a.seq}, batch {a.batch}, AdamW")
    for dtype in (["fp32", "bf16"] if a.dtype == "both" else [a.dtype]):
        bench(a, dtype, device)


if __name__ == "__main__":
    main()
