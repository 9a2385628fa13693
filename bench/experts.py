"""Expert backends side by side: the plain loop, grouped_mm and (on CUDA) the Triton kernels,
forward + backward of one routed layer, in one process. Prints absolute times, TFLOP/s, each
backend's speed-up over grouped_mm, and how far each output is from the loop's.

    python bench/experts.py                 # sizes for the device found (CUDA if present)
    python bench/experts.py --tokens 4096 --d-model 512 --hidden 1024 --experts 16 --top-k 2
    python bench/experts.py --backends grouped_mm,triton --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moectl.core import ModelArgs, MoEArgs
from moectl.core.moe import RoutedFFN
from moectl.core.routers import RouteContext

CONFIGS = {
    "cuda": [  # (tokens, d_model, expert_hidden, experts, top_k)
        (16384, 2048, 1408, 64, 6),   # fine-grained, DeepSeek-like
        (16384, 1024, 3072, 16, 2),   # CartesianMoE Large-like
        (16384, 768, 3072, 16, 2),    # CartesianMoE Base-like
        (8192, 1280, 448, 16, 4),     # RMoE 0.91B-like
    ],
    "cpu": [(2048, 256, 512, 8, 2), (2048, 256, 128, 32, 4)],
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_layer(layer, x, reps, device) -> float:
    times = []
    for i in range(reps + 3):
        _sync(device)
        t0 = time.perf_counter()
        y, _, rec = layer(x, RouteContext())
        (y.float().square().mean() + rec.loss).backward()
        _sync(device)
        if i >= 3:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def available_backends(device) -> list[str]:
    from moectl.core.experts import triton_usable

    names = ["loop", "grouped_mm"]
    if device.type == "cuda" and triton_usable(device) is None:
        names.append("triton")
    return names


def run(tokens, d, hidden, experts, k, device, dtype, reps, backends) -> None:
    layers = {}
    for backend in backends:
        torch.manual_seed(0)
        args = ModelArgs(vocab_size=8, d_model=d, n_layers=1, n_heads=1, ffn_hidden=hidden,
                         moe=MoEArgs(num_experts=experts, top_k=k, expert_hidden=hidden, layers=[0], backend=backend))
        layer = RoutedFFN(args)
        for m in layer.modules():
            if hasattr(m, "init_weights"):
                m.init_weights(0.02, 0.02)
        layers[backend] = layer.to(device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        ref = layers[backends[0]](x, RouteContext())[0].float()
        rel = {b: ((layers[b](x, RouteContext())[0].float() - ref).norm() / ref.norm()).item() for b in backends}
    times = {b: time_layer(layers[b], x, reps, device) for b in backends}
    flops = 3 * tokens * k * 3 * 2 * d * hidden   # fwd + bwd of the expert matmuls
    base = times.get("grouped_mm", times[backends[0]])
    cells = "  ".join(f"{b} {1e3 * t:8.2f} ms {flops / t / 1e12:6.1f} TF/s ({base / t:4.2f}x, diff {rel[b]:.0e})"
                      for b, t in times.items())
    print(f"T={tokens:6d} d={d:5d} F={hidden:5d} E={experts:3d} k={k}  {cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--backends", default=None, help="comma list (default: every one that runs here)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    backends = args.backends.split(",") if args.backends else available_backends(device)
    print(f"device {name}, torch {torch.__version__}, dtype {dtype}, median of {args.reps} fwd+bwd; "
          "speed-ups are over grouped_mm, diffs against the first backend")
    if args.tokens:
        run(args.tokens, args.d_model, args.hidden, args.experts, args.top_k, device, dtype, args.reps, backends)
        return
    for cfg in CONFIGS[device.type]:
        run(*cfg, device, dtype, args.reps, backends)


if __name__ == "__main__":
    main()
