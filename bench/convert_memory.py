"""Peak memory of `moectl convert` on a model of real size, both ways, measured with /usr/bin/time -v.

Writes a synthetic Hugging Face folder of the chosen shape (random bf16 weights, safetensors shards
of --shard-mb, written tensor by tensor so the generator itself stays small), then runs

    moectl convert HF --from hf MOECTL        (import)
    moectl convert MOECTL --to hf BACK        (export, dtype auto: bf16 stays bf16)

each in its own process under /usr/bin/time -v, and prints the peak resident memory of each next to
the largest shard, one layer's weights, and the bound 1.3 x largest shard + one layer. It checks that
BACK holds the same tensors as HF, bit for bit.

    python bench/convert_memory.py --shape qwen3_moe          # ~1.5B parameters, 2.8 GiB in bf16
    python bench/convert_memory.py --shape dots1              # the same size, DeepSeek-V3-style routing
    python bench/convert_memory.py --shape deepseek_v3        # latent attention and that routing
    python bench/convert_memory.py --shape qwen3_moe --tiny   # a few MB (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moectl.convert import families
from moectl.convert.hfio import SAFE_INDEX, LazyWeights, Spec, write_safetensors
from moectl.factory import build_model
from moectl.recipe.load import validate

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # Qwen3-MoE: 1.50B parameters (1.37B in 20 x 64 experts of 352), GQA 16/4, head_dim 64
    "qwen3_moe": dict(vocab_size=32768, d_model=1024, n_layers=20, n_heads=16, n_kv_heads=4, head_dim=64,
                      ffn_hidden=2816, seq_len=4096, qk_norm="head",
                      moe=dict(num_experts=64, top_k=8, expert_hidden=352, router=dict(renormalize=True))),
    # dots1: DeepSeek-V3's routed layer (sigmoid, selection bias, 8 groups keep 4, scale 2.5, 2 shared
    # experts, a dense first layer) on Qwen3 attention; about the same size
    "dots1": dict(vocab_size=32768, d_model=1024, n_layers=20, n_heads=16, n_kv_heads=4, head_dim=64,
                  ffn_hidden=2816, seq_len=4096, qk_norm="head",
                  moe=dict(num_experts=64, top_k=6, expert_hidden=352, first_dense=1, shared_experts=2,
                           router=dict(score_func="sigmoid", selection_bias=True, groups=8, topk_groups=4,
                                       routed_scaling=2.5))),
    # DeepSeek-V3: latent attention (query rank 384, key/value rank 256) and dots1's routed layer
    "deepseek_v3": dict(vocab_size=32768, d_model=1024, n_layers=20, n_heads=16, ffn_hidden=2816, seq_len=4096,
                        latent_attention=dict(q_rank=384, kv_rank=256, nope_dim=64, rope_dim=32, v_dim=64),
                        moe=dict(num_experts=64, top_k=6, expert_hidden=352, first_dense=1, shared_experts=2,
                                 router=dict(score_func="sigmoid", selection_bias=True, groups=8, topk_groups=4,
                                             routed_scaling=2.5))),
}
TINY = dict(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, seq_len=128)


def write_synthetic(shape: str, tiny: bool, folder: Path, shard_bytes: int) -> tuple[int, int]:
    """A Hugging Face folder of the shape with random bf16 weights. Returns (largest shard bytes,
    one MoE layer's weight bytes)."""
    model = dict(SHAPES[shape])
    if tiny:
        model.update(TINY, moe=dict(model["moe"], num_experts=8, expert_hidden=32, top_k=2))
        if shape in ("dots1", "deepseek_v3"):
            model["moe"]["router"] = dict(model["moe"]["router"], groups=4, topk_groups=2)
        if "latent_attention" in model:
            model.update(latent_attention=dict(q_rank=16, kv_rank=16, nope_dim=8, rope_dim=8, v_dim=8))
    if "latent_attention" in model:
        for key in ("head_dim", "n_kv_heads", "qk_norm"):
            model.pop(key, None)
    recipe = validate({"name": "bench", "model": model}, {}, "bench")
    meta = build_model(recipe, device="meta")
    family = families.families()[shape]
    specs = {k: Spec(torch.bfloat16 if v.is_floating_point() else v.dtype, tuple(v.shape))
             for k, v in meta.state_dict().items()}

    class Random(families.base.TensorSource):
        def names(self):
            return list(specs)

        def __contains__(self, name):
            return name in specs

        def spec(self, name):
            return specs[name]

        def get(self, name):
            g = torch.Generator().manual_seed(hash(name) % 2**31)
            return (torch.randn(specs[name].shape, generator=g) * 0.02).to(torch.bfloat16)

    plan = families.to_hf_plan(Random(), families.Layout.of(family, recipe.model))
    folder.mkdir(parents=True)
    shards, size = [[]], 0
    for name, (spec, _) in plan.items():
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards, strict=True):
        write_safetensors(folder / file, [(n, plan[n][0]) for n in names], lambda n: plan[n][1]())
        weight_map.update(dict.fromkeys(names, file))
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = family.hf_config(recipe.model)
    config.update(dtype="bfloat16", torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    largest = max((folder / f).stat().st_size for f in files)
    layer = max(sum(p.numel() for p in block.parameters()) for block in meta.layers) * 2   # bf16 bytes
    return largest, layer


def peak_rss(args: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `moectl ARGS` under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "moectl", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"moectl {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return kb * 1024, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3_moe")
    ap.add_argument("--tiny", action="store_true", help="a few MB instead of ~3 GB (checks the script)")
    ap.add_argument("--shard-mb", type=float, default=400.0, help="shard size of the synthetic source")
    ap.add_argument("--keep", type=Path, help="work here and keep the folders (default: a temporary folder)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="moectl-convert-mem-"))
    try:
        src, mid, back = work / "hf", work / "moectl", work / "back"
        shard = int((0.05 if args.tiny else args.shard_mb) * 2**20)
        largest, layer = write_synthetic(args.shape, args.tiny, src, shard)
        total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        imp, t_imp = peak_rss(["convert", str(src), str(mid), "--from", "hf"])
        exp, t_exp = peak_rss(["convert", str(mid), str(back), "--to", "hf", "--max-shard-size", f"{shard}B"])
        a, b = LazyWeights(src), LazyWeights(back)
        same = set(a.names()) == set(b.names()) and all(torch.equal(a.get(k), b.get(k)) for k in a.names())
        bound = 1.3 * largest + layer
        gib = 2**30
        print(f"{args.shape}{' (tiny)' if args.tiny else ''}: {total / gib:.2f} GiB of bf16 weights in "
              f"{len(list(src.glob('*.safetensors')))} shards; largest shard {largest / gib:.3f} GiB, one layer "
              f"{layer / gib:.3f} GiB; bound 1.3 x shard + layer = {bound / gib:.3f} GiB")
        print(f"import  peak {imp / gib:.3f} GiB  ({imp / bound:.2f} x bound)  {t_imp:.1f} s")
        print(f"export  peak {exp / gib:.3f} GiB  ({exp / bound:.2f} x bound)  {t_exp:.1f} s")
        print(f"round trip bit for bit, bf16 kept: {same}")
        return 0 if same else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
