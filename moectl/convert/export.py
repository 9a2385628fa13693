"""moectl run -> Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

A model that a transformers class computes exactly (see `families.native_family`) is written in
that family's config and tensor layout; any other is written with generated modeling code for
`from_pretrained(..., trust_remote_code=True)`: moectl's engine itself (`moectl/core/`, flattened by
`flatten`), the plugin modules its parts come from, and the thin wrapper `modeling_moectl.py`, with
`auto_map` in config.json. Router weights and biases stay fp32 whatever the dtype of the rest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moectl import __version__
from moectl.checkpoint import check_weight_specs, finite, tied_aliases
from moectl.convert import families
from moectl.convert.flatten import PREFIX, WRAPPER, flat_modules
from moectl.convert.hfio import (
    CONFIG_JSON,
    DEFAULT_SHARD_BYTES,
    GENERATION_CONFIG,
    SPECIAL_TOKENS,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    LazyWeights,
    Spec,
    TensorSource,
    write_weights_plan,
)
from moectl.convert.output import check_target, staged_folder
from moectl.core.accounting import component_parameters
from moectl.errors import MoectlError
from moectl.recipe.load import resolved
from moectl.rundir import ModelFolder
from moectl.runs import Run, folder_record, load_run

DTYPES = {"auto": "", "fp32": "float32", "bf16": "bfloat16"}   # auto: each tensor in its stored dtype


@dataclass
class ExportResult:
    out: Path
    architecture: str                 # the transformers class, or MoectlForCausalLM
    family: str | None                # the native family, or None for generated code
    files: list[str]
    why_not_native: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def imported_family(run: Run) -> str | None:
    """The family a model folder was imported from (its convert.json), or None."""
    info = folder_record(run, "convert_info") or {}
    return info["family"] if info.get("kind") == "import" and isinstance(info.get("family"), str) else None


def export_hf(source: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
              generated: bool = False, step: int | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportResult:
    """Write a run or model folder as a Hugging Face folder. Streaming: the weights are read one
    tensor at a time from the checkpoint and written one at a time into the shards, each in its
    own dtype (`dtype` "auto") or cast to fp32 / bf16; router tensors stay fp32."""
    out = Path(out)
    if dtype not in DTYPES:
        raise MoectlError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_target(out, force, Path(source))
    run = load_run(source, step=step, weights=False)
    m = run.recipe.model
    family, reasons = (None, {}) if generated else families.native_family(m, prefer=imported_family(run))
    code = flat_modules(run.model.args) if family is None else {}   # refuses a part it cannot write first
    notes = []
    if m.moe is not None and m.moe.capacity_factor is not None:
        notes.append("the exported model routes dropless: model.moe.capacity_factor limits training batches only "
                     "(as in moectl's own decoding)")
    weights = _checked_source(run)
    # Tensors in the target dtype, except everything of a router (weights, biases, buffers).
    router_names = {name for name, _, component, _ in component_parameters(run.model, buffers=True)
                    if component == "router"}

    def target(name: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        if name in router_names:
            return torch.float32
        return stored if dtype == "auto" else getattr(torch, DTYPES[dtype])

    state = _Cast(weights, target, run.checkpoint)
    written = next((state.spec(k).dtype for k in state.names() if k not in router_names
                    and state.spec(k).dtype.is_floating_point), torch.float32)
    eot = run.tokenizer.eot_id if run.tokenizer is not None else None
    if family is not None:
        config = family.hf_config(m)
        plan = families.to_hf_plan(state, families.Layout.of(family, m))
    else:
        config = generated_config(run)
        plan = {PREFIX + k: (state.spec(k), lambda k=k: state.get(k)) for k in state.names()}
    # An imported model's text settings go back as they came (special token ids, generation
    # defaults, chat template); a model moectl trained has its end-of-text token and nothing else.
    text = folder_record(run, "text_settings") or {}
    ids = {"bos_token_id": None, "eos_token_id": eot, "pad_token_id": None, **text.get("ids", {})}
    dtype_name = str(written).removeprefix("torch.")
    config.update(dtype=dtype_name, torch_dtype=dtype_name, **ids, moectl_version=__version__)
    generation = text.get("generation") or {"eos_token_id": eot, "pad_token_id": eot}
    if family is None:
        generation = {**generation, "use_cache": False}
    with staged_folder(out, force) as tmp:
        files = write_weights_plan(tmp, [(k, spec) for k, (spec, _) in plan.items()], lambda k: plan[k][1](),
                                   max_shard_bytes)
        _write_json(tmp / CONFIG_JSON, config)
        _write_json(tmp / GENERATION_CONFIG, generation)
        files += [CONFIG_JSON, GENERATION_CONFIG]
        for name, code_text in code.items():
            (tmp / name).write_text(code_text, encoding="utf-8")
            files.append(name)
        if run.tokenizer is not None:
            files += write_tokenizer_files(tmp, run.tokenizer.path, run.tokenizer.inner.id_to_token(eot), m.seq_len,
                                           text, run.tokenizer.add_special_tokens)
        else:
            notes.append(f"{source} holds no tokenizer.json: the folder has no tokenizer files")
    arch = config["architectures"][0]
    return ExportResult(out, arch, family.name if family else None, files, reasons, notes)


def _checked_source(run: Run) -> TensorSource:
    """The checkpoint's tensors, read one at a time, once their names, shapes and dtypes are checked
    against the model (tied aliases left out); each is checked to be finite when it is read."""
    aliases = tied_aliases(run.model)
    weights = ModelFolder(run.checkpoint).weights
    if not weights.is_file():
        raise MoectlError(f"{run.checkpoint} holds no {weights.name}", hint="give a complete checkpoint")
    src = LazyWeights(run.checkpoint, file=weights)
    check_weight_specs(run.model, {k: (src.spec(k).shape, src.spec(k).dtype) for k in src.names()},
                       run.checkpoint, aliases)
    return families.Renamed(src, lambda k: k, keep=lambda k: k not in aliases)


class _Cast(TensorSource):
    """A source's tensors cast to `target(name, stored dtype)` as they are read, and checked finite."""

    def __init__(self, src: TensorSource, target, where: Path):
        self.src, self.target, self.where = src, target, where

    def names(self) -> list[str]:
        return self.src.names()

    def __contains__(self, name: object) -> bool:
        return name in self.src

    def spec(self, name: str) -> Spec:
        stored = self.src.spec(name)
        return Spec(self.target(name, stored.dtype), stored.shape)

    def get(self, name: str) -> torch.Tensor:
        t = self.src.get(name)
        if not finite(t):
            raise MoectlError(f"{self.where}: its weights hold NaN or infinite values ({name})",
                              hint="the checkpoint is damaged: use another checkpoint of the run (checkpoints/step-*)")
        return t.to(self.target(name, t.dtype))


def generated_config(run: Run) -> dict[str, Any]:
    """config.json of a folder with generated code: the engine's arguments (what the wrapper
    builds), the recipe's model section and plugins (what `--from hf` imports back)."""
    m = run.recipe.model
    config = {"architectures": ["MoectlForCausalLM"], "model_type": "moectl",
              "auto_map": {"AutoConfig": f"{WRAPPER}.MoectlConfig",
                           "AutoModelForCausalLM": f"{WRAPPER}.MoectlForCausalLM"},
              "moectl_args": run.model.args.to_dict(), "moectl_model": resolved(run.recipe)["model"],
              "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
              "num_attention_heads": m.n_heads, "max_position_embeddings": m.seq_len,
              "tie_word_embeddings": m.tie_embeddings, "use_cache": False}
    if run.recipe.plugins:
        config["moectl_plugins"] = list(run.recipe.plugins)
    return config


def write_tokenizer_files(folder: Path, tokenizer_json: Path, eos: str | None, max_len: int,
                          text: dict[str, Any] | None = None, template: bool = False) -> list[str]:
    """tokenizer.json plus the two small files with which AutoTokenizer loads it as a fast tokenizer:
    an imported model's special tokens and chat template as they came (`text`), else the
    end-of-text token. `template`: the tokenizer's own special tokens are added to texts."""
    shutil.copyfile(tokenizer_json, folder / TOKENIZER_JSON)
    text = text or {}
    special: dict[str, Any] = {}
    if eos is not None:
        special = {"eos_token": eos, "pad_token": eos}
    special.update({k: text[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                    if isinstance(text.get(k), str)})
    flags = {"add_bos_token": text.get("add_bos_token", template), "add_eos_token": text.get("add_eos_token", False)}
    chat = {"chat_template": text["chat_template"]} if "chat_template" in text else {}
    _write_json(folder / TOKENIZER_CONFIG, {"tokenizer_class": "PreTrainedTokenizerFast",
                                            "model_max_length": max_len, "clean_up_tokenization_spaces": False,
                                            **flags, **special, **chat})
    _write_json(folder / SPECIAL_TOKENS, special)
    return [TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
