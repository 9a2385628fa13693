"""Hugging Face folder -> moectl model folder, from which `moectl train`, `eval` and `generate` work.

The folder holds config.yaml (a complete recipe whose `train.init_from` is the folder itself, as
an absolute path, and whose tokenizer is the folder's tokenizer.json), model.safetensors and
convert.json (where it came from). `moectl train OUT train.max_steps=N` trains from the converted
weights with fresh optimizer state and writes its checkpoints into the same folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch

from moectl import __version__, progress
from moectl.checkpoint import check_weight_specs, finite, tied_aliases
from moectl.convert import families
from moectl.convert.flatten import PREFIX
from moectl.convert.hfio import (
    CHAT_TEMPLATE,
    CONFIG_JSON,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    LazyWeights,
    Spec,
    dequantizing,
    read_config,
    read_json,
    write_safetensors,
)
from moectl.convert.output import check_target, staged_folder
from moectl.data.tokenizer import load_tokenizer, template_tokens
from moectl.errors import MoectlError, RecipeError
from moectl.factory import build_model
from moectl.fsutil import write_json
from moectl.recipe.load import dump_recipe, run_name_from, validate
from moectl.rundir import ModelFolder


@dataclass
class HFModel:
    """A Hugging Face folder read into moectl's terms."""

    family: str                     # the family's name, or "moectl" for moectl's own exports
    model: dict[str, Any]           # a recipe's model section
    tensors: dict[str, Any]         # moectl tensor name -> (Spec, make): read when made
    tokenizer: Path | None
    eos_token: str | None
    plugins: list[str] = field(default_factory=list)   # modules the model's parts come from
    special: bool = False            # its tokenizer adds template tokens (a BOS) to every text
    text: dict[str, Any] = field(default_factory=dict)   # text settings, written back on export

    @property
    def state(self) -> dict[str, Any]:
        """Every tensor, in memory (for what needs them all at once, like upcycling)."""
        return {name: make() for name, (_, make) in self.tensors.items()}


@dataclass
class ImportResult:
    out: Path
    family: str
    notes: list[str] = field(default_factory=list)


def is_hf_folder(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_JSON).is_file() and not ModelFolder(p).config.is_file()


def read_hf_model(src: Path) -> HFModel:
    src = Path(src)
    cfg = read_config(src)
    where = str(src)
    plugins: list[str] = []
    if cfg.get("model_type") == "moectl":
        model, plugins = cfg.get("moectl_model"), cfg.get("moectl_plugins") or []
        if not isinstance(model, dict) or not isinstance(plugins, list):
            raise MoectlError(f"{where}: config.json has no moectl_model section", hint="the config.json is damaged")
        family = "moectl"
    else:
        fam = families.family_of(cfg, where)
        family, model = fam.name, fam.model_section(cfg, where)
    recipe = validate_recipe({"name": "import", "model": model, **({"plugins": plugins} if plugins else {})}, where)
    meta = build_model(recipe, device="meta")
    aliases = tied_aliases(meta)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k not in aliases}
    weights = dequantizing(LazyWeights(src), cfg, where)   # headers only: every tensor is read when it is written
    if family == "moectl":
        names = weights.names()
        if all(k.startswith(PREFIX) for k in names):   # the generated wrapper holds the engine as `model`
            weights = families.Renamed(weights, lambda k: k[len(PREFIX):])
        plan = {k: (weights.spec(k), lambda k=k, w=weights: w.get(k)) for k in weights.names() if k not in aliases}
        check_weight_specs(meta, {k: (spec.shape, spec.dtype) for k, (spec, _) in plan.items()}, src, aliases)
    else:
        plan = families.from_hf_plan(weights, families.Layout.of(fam, recipe.model), expected, where)
    tensors = {k: (spec, _checked_finite(k, make, where)) for k, (spec, make) in plan.items()}
    tok = src / TOKENIZER_JSON
    special = False
    if tok.is_file():
        inner, _ = load_tokenizer(tok, what=str(tok))
        special = any(template_tokens(inner))
    return HFModel(family, model, tensors, tok if tok.is_file() else None, _eos_token(src, cfg, tok), plugins,
                   special, text_settings(src, cfg))


def _checked_finite(name: str, make, where: str):
    """`make`, refusing a tensor with NaN or infinite values when it is made."""

    def checked() -> torch.Tensor:
        t = make()
        if not finite(t):
            raise MoectlError(f"{where}: tensor {name} holds NaN or infinite values",
                              hint="the checkpoint is damaged; download it again")
        return t

    return checked


TEXT_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token", "chat_template")


def text_settings(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """What a Hugging Face folder says about text beyond its tokenizer.json, kept so that an export
    writes it back: special tokens and the chat template (tokenizer_config.json, chat_template.jinja),
    the special token ids (config.json) and the generation defaults (generation_config.json). JSON
    and plain text only; a template is kept as text, never run by moectl."""
    out: dict[str, Any] = {}
    if (src / TOKENIZER_CONFIG).is_file():
        tc = read_json(src / TOKENIZER_CONFIG, TOKENIZER_CONFIG)
        for key in TEXT_KEYS:
            value = tc.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, (str, bool)) or (key == "chat_template" and isinstance(value, list)):
                out[key] = value
    jinja = src / CHAT_TEMPLATE
    if "chat_template" not in out and jinja.is_file():
        try:
            out["chat_template"] = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise MoectlError(f"{jinja} cannot be read as UTF-8 text", hint="download the model again") from None
    ids = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if _token_ids(cfg.get(k))}
    if ids:
        out["ids"] = ids
    if (src / GENERATION_CONFIG).is_file():
        gen = read_json(src / GENERATION_CONFIG, GENERATION_CONFIG)
        out["generation"] = {k: v for k, v in gen.items() if not k.startswith("_") and k != "transformers_version"
                             and (isinstance(v, (int, float, str, bool)) or _token_ids(v))}
    return out


def _token_ids(value: Any) -> bool:
    """A token id or a non-empty list of them."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                           for v in value)


def _eos_token(src: Path, cfg: dict[str, Any], tok: Path) -> str | None:
    """The end-of-text token: tokenizer_config.json's eos_token, else config.json's eos_token_id."""
    if (src / TOKENIZER_CONFIG).is_file():
        eos = read_json(src / TOKENIZER_CONFIG, TOKENIZER_CONFIG).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    eos_id = cfg.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if isinstance(eos_id, int) and tok.is_file():
        inner, _ = load_tokenizer(tok, what=str(tok))
        return inner.id_to_token(eos_id)
    return None


def validate_recipe(data: dict[str, Any], where: str):
    try:
        return validate(data, {}, where)
    except RecipeError as e:
        raise MoectlError(f"{where}: the model it describes is not one moectl can build:\n{e.render()}",
                          hint=families.CONVERT_HINT) from None


def folder_recipe(out: Path, base: dict[str, Any], model: dict[str, Any], tokenizer: bool, eos: str | None,
                  name: str | None = None, special: bool = False) -> dict[str, Any]:
    """A recipe that trains (and evaluates) a converted folder in place. `special`: documents and
    prompts get the tokenizer's template tokens (its BOS), as transformers gives them."""
    out = Path(out).resolve()
    data = json.loads(json.dumps(base))
    data["name"] = name or run_name_from(out.name)
    data["model"] = model
    data.setdefault("data", {})
    if tokenizer:
        data["data"]["tokenizer"] = {"kind": "file", "path": str(ModelFolder(out).tokenizer), "eot_token": eos,
                                     **({"add_special_tokens": True} if special else {})}
    train = data.setdefault("train", {})
    train["init_from"] = str(out)
    train.pop("run_dir", None)   # `moectl train OUT` trains in OUT
    return data


def checked_tokenizer(path: Path, vocab_limit: int) -> bytes:
    """The bytes of a tokenizer.json that will be written into a model folder, once checked: read
    once (a link is followed once, and what lands in the output is what was checked), a valid
    tokenizer, and no larger than the model's vocabulary."""
    try:
        raw = Path(path).read_bytes()
        inner = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except OSError as e:
        raise MoectlError(f"{path} cannot be read ({e.strerror or e})", hint="download the tokenizer again") from None
    except Exception as e:   # tokenizers raises a bare Exception for a malformed file
        raise MoectlError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {str(e)[:120]})",
                          hint="download the tokenizer again, or remove it and set data.tokenizer later") from None
    vocab = inner.get_vocab_size(with_added_tokens=True)
    if vocab > vocab_limit:
        raise MoectlError(f"{path} has {vocab:,} tokens but the model's vocabulary is {vocab_limit:,}: its ids would "
                          "not fit the embedding", hint="the tokenizer does not belong to this model")
    return raw


def write_model_folder(out: Path, recipe_data: dict[str, Any], state: dict[str, Any], tokenizer: Path | None,
                       provenance: dict[str, Any], force: bool, text: dict[str, Any] | None = None):
    """Validate the recipe, check the tensors fit it, and write the folder atomically. `state`
    holds tensors, or (Spec, make) pairs that make each tensor when it is written (one at a time)."""
    recipe = validate_recipe(recipe_data, str(out))
    plan = {k: v if isinstance(v, tuple) else (Spec(v.dtype, tuple(v.shape)), lambda v=v: v.contiguous())
            for k, v in state.items()}
    meta = build_model(recipe, device="meta")
    check_weight_specs(meta, {k: (spec.shape, spec.dtype) for k, (spec, _) in plan.items()}, out)
    in_memory = [k for k, v in state.items() if not isinstance(v, tuple) and not finite(v)]
    if in_memory:
        raise MoectlError(f"{out}: its weights would hold NaN or infinite values ({', '.join(in_memory[:3])})")
    with staged_folder(out, force) as tmp:
        folder = ModelFolder(tmp)
        advance = progress.current().task(f"writing {folder.weights.name}", len(plan), unit="tensors")
        write_safetensors(folder.weights, [(k, spec) for k, (spec, _) in plan.items()], lambda k: plan[k][1](),
                          advance=advance)
        folder.write_recipe(dump_recipe(recipe))
        if tokenizer is not None:
            folder.tokenizer.write_bytes(checked_tokenizer(tokenizer, recipe.model.vocab_size))
        folder.write_convert_info({**provenance, "moectl_version": __version__})
        if text:
            write_json(folder.text_settings, text)
    return recipe


def import_hf(src: str | Path, out: str | Path, *, force: bool = False, name: str | None = None) -> ImportResult:
    src, out = Path(src), Path(out)
    check_target(out, force, src)
    hf = read_hf_model(src)
    notes = []
    if hf.tokenizer is None:
        notes.append(f"{src} has no tokenizer.json: set data.tokenizer in {out}/config.yaml before training, and "
                     "eval/generate need a tokenizer too")
    seq_len = hf.model.get("seq_len", 0)
    if seq_len > 4096:
        notes.append(f"model.seq_len is the model's context, {seq_len}; train with a shorter one, e.g. "
                     "model.seq_len=1024")
    data = folder_recipe(out, {"plugins": hf.plugins} if hf.plugins else {}, hf.model, hf.tokenizer is not None,
                         hf.eos_token, name, special=hf.special)
    if hf.special:
        notes.append("its tokenizer adds special tokens to every text (a BOS): training, eval and generate add "
                     "them too (data.tokenizer.add_special_tokens)")
    write_model_folder(out, data, hf.tensors, hf.tokenizer,
                       {"kind": "import", "from": str(src.resolve()), "family": hf.family}, force, hf.text)
    return ImportResult(out, hf.family, notes)
