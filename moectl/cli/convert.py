"""`moectl convert`: to and from Hugging Face folders, and dense-to-MoE upcycling."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.text import Text

from moectl.cli import common
from moectl.cli.common import handle_errors, single_process

SOURCE_HELP = ("With --to hf: a run folder, one of its checkpoints/step-* folders, or a folder written by "
               "`moectl convert`. With --from hf: a Hugging Face model folder (config.json and weights). "
               "With --upcycle: a dense model, either of those.")


def parse_size(text: str) -> int:
    from moectl.errors import MoectlError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise MoectlError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2000000000")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))
    if size < 1:
        raise MoectlError(f"--max-shard-size {text!r} must be at least one byte")
    return size


@handle_errors
def convert(
    source: Path = typer.Argument(..., help=SOURCE_HELP, metavar="SOURCE"),
    out: Path = typer.Argument(..., help="The folder to write (must not exist or be empty; see --force). It is "
                               "written under a temporary name and renamed when complete.", metavar="OUT"),
    to: str = typer.Option(None, "--to", help="Export to this format: 'hf' (a folder that "
                           "AutoModelForCausalLM.from_pretrained loads)."),
    from_: str = typer.Option(None, "--from", help="Import from this format: 'hf' (DeepSeek-V2/V3, GPT-OSS, "
                              "dots1, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; dense Llama, Mistral, Qwen2 and Qwen3; "
                              "or a folder moectl exported; FP8 and MXFP4 weights are dequantised; docs/convert.md "
                              "lists the families)."),
    upcycle: bool = typer.Option(False, "--upcycle", help="Turn a dense model into an MoE whose experts start as "
                                 "copies of its FFN (needs --experts and --top-k)."),
    dtype: str = typer.Option("auto", "--dtype", help="--to hf: dtype of the written weights: auto (each tensor "
                              "as stored: a bf16 import stays bf16, a trained fp32 run stays fp32), fp32 or bf16. "
                              "Router weights and biases stay fp32."),
    generated_code: bool = typer.Option(False, "--generated-code", help="--to hf: write moectl's generated "
                                        "modeling code (trust_remote_code=True) even where a native transformers "
                                        "class fits the model."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="--to hf: split the weights into "
                                       "safetensors shards of at most this size (with an index)."),
    experts: int = typer.Option(None, "--experts", help="--upcycle: experts per MoE layer (E)."),
    top_k: int = typer.Option(None, "--top-k", help="--upcycle: experts per token (K)."),
    noise: float = typer.Option(0.0, "--noise", help="--upcycle: add Gaussian noise of this many standard "
                                "deviations of each matrix to the expert copies (0: exact copies)."),
    granularity: int = typer.Option(1, "--granularity", help="--upcycle: split the FFN into G shards; each expert "
                                    "is a copy of one shard (E and K must be multiples of G)."),
    layers: str = typer.Option("all", "--layers", help="--upcycle: which layers become MoE layers: all, "
                               "every_other, or indices such as 1,3."),
    seed: int = typer.Option(0, "--seed", help="--upcycle: seed of the router initialisation and the noise."),
    step: int = typer.Option(None, "--step", help="Use the checkpoint of this step (default: the run's latest)."),
    name: str = typer.Option(None, "--name", help="--from hf / --upcycle: the run name in the written recipe "
                             "(default: the output folder's name)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty (only once the "
                               "new folder is complete)."),
) -> None:
    """Convert a model: export a run to a Hugging Face folder (--to hf), import one (--from hf), or upcycle a dense
    model into an MoE (--upcycle).

    Imports and upcycles write a moectl model folder: config.yaml (a recipe that trains the folder in place),
    model.safetensors, tokenizer.json. Continue with `moectl train OUT train.max_steps=N`, `moectl eval OUT` or
    `moectl generate OUT`. Exit codes: 0 done, 2 bad input (unknown architecture, missing or damaged files, shapes
    that do not fit, a non-empty OUT)."""
    from moectl.progress import JobProgress

    single_process("convert")
    _check_modes(to, from_, upcycle, experts, top_k)
    with common.terminate_cleanly(), JobProgress(console=common.stderr_console()):   # progress on stderr
        if to is not None:
            notes = _export(source, out, dtype, force, generated_code, step, parse_size(max_shard_size))
        elif from_ is not None:
            notes = _import(source, out, force, name)
        else:
            notes = _upcycle(source, out, experts=experts, top_k=top_k, noise=noise, granularity=granularity,
                             layers=layers, seed=seed, force=force, step=step, name=name)
    err = common.stderr_console()
    for note in notes:
        err.print(Text(f"note: {note}"))


def _check_modes(to, from_, upcycle, experts, top_k) -> None:
    from moectl.errors import MoectlError

    modes = [m for m, on in (("--to", to is not None), ("--from", from_ is not None), ("--upcycle", upcycle)) if on]
    if len(modes) != 1:
        raise MoectlError("say what to do: exactly one of --to hf, --from hf or --upcycle" if not modes else
                          f"{' and '.join(modes)} do not combine: give exactly one")
    for flag, value in (("--to", to), ("--from", from_)):
        if value is not None and value.lower() != "hf":
            raise MoectlError(f"{flag} {value!r}: the format moectl converts is 'hf' (Hugging Face)")
    if upcycle and (experts is None or top_k is None):
        raise MoectlError("--upcycle needs --experts E and --top-k K", hint="e.g. --upcycle --experts 8 --top-k 2")
    if not upcycle and any(v is not None for v in (experts, top_k)):
        raise MoectlError("--experts and --top-k belong to --upcycle")


def _export(source, out, dtype, force, generated_code, step, max_shard_bytes) -> list[str]:
    from moectl.convert.export import export_hf

    console = common.stdout_console()
    r = export_hf(source, out, dtype=dtype, force=force, generated=generated_code, step=step,
                  max_shard_bytes=max_shard_bytes)
    kind = f"{r.family} ({r.architecture})" if r.family else f"{r.architecture}, generated modeling code"
    console.print(f"wrote {r.out}: {kind}, {len(r.files)} files")
    if r.family is None and r.why_not_native and not generated_code:
        console.print("  no transformers class computes this model exactly: "
                      + "; ".join(f"{f}: {', '.join(w[:2])}" for f, w in list(r.why_not_native.items())[:3]))
    trust = ", trust_remote_code=True" if r.family is None else ""
    console.print(f"  load it with AutoModelForCausalLM.from_pretrained({str(r.out)!r}{trust})")
    return r.notes


def _import(source, out, force, name) -> list[str]:
    from moectl.convert.importer import import_hf

    r = import_hf(source, out, force=force, name=name)
    console = common.stdout_console()
    console.print(f"wrote {r.out}: a {r.family} model as a moectl model folder")
    console.print(f"  train it with: moectl train {r.out} train.max_steps=N    (also: moectl eval / generate {r.out})")
    return r.notes


def _upcycle(source, out, **options) -> list[str]:
    from moectl.convert.upcycle import upcycle as run_upcycle

    r = run_upcycle(source, out, **options)
    console = common.stdout_console()
    console.print(f"wrote {r.out}: {options['experts']} experts, top-{options['top_k']}, granularity "
                  f"{options['granularity']}, on layers {', '.join(map(str, r.moe_layers))}")
    console.print(f"  train it with: moectl train {r.out} train.max_steps=N")
    return r.notes
