"""The recipe schema: one typed, strict description of a run, built here and nowhere else.

The sections below are fixed; the sections of the engine's registered parts (routers, block kinds,
routed-layer variants, `moectl.core.registry`) come from their options dataclasses, and
`recipe_schema()` builds the whole schema from them: `model.moe.router` and `model.moe.block`
(sections selected by `kind`) and one optional `model.moe.<variant>` section per variant. A plugin
that registers a part (`moectl.recipe.plugins`) makes the next `recipe_schema()` a new schema that
includes it; a schema is never changed once built.

Every field carries a description; `moectl recipes schema` turns the schema into JSON Schema and
docs/recipe-reference.md is generated from it, so the schema is the single source of truth for
what a recipe may say. Checks that involve several fields live in `checks.py` so that their errors
can name the exact key path.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)

from moectl import tracking  # noqa: F401  (registers the built-in trackers)
from moectl.core import registry
from moectl.errors import MoectlError
from moectl.recipe import plugins

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------- model


def _layers_value(v: Any) -> Any:
    """`layers` is a word or an explicit list; give one clear error instead of one per branch."""
    if isinstance(v, str):
        if v not in ("all", "every_other"):
            raise ValueError(f"must be 'all', 'every_other' or a list of layer indices, got {v!r}")
        return v
    if isinstance(v, list):
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ValueError(f"layer indices must be integers, got {bad[0]!r}")
        return v
    raise ValueError(f"must be 'all', 'every_other' or a list of layer indices, got {v!r}")


MoELayers = Annotated[
    Union[str, list[int]],
    BeforeValidator(_layers_value),
    WithJsonSchema({"anyOf": [{"enum": ["all", "every_other"]},
                              {"type": "array", "items": {"type": "integer", "minimum": 0}}]}),
]


class MoEConfig(Section):
    """Which layers are Mixture-of-Experts layers and how they route."""

    num_experts: PosInt = Field(..., description="Routed experts per MoE layer (N).")
    top_k: PosInt = Field(
        ...,
        description="Experts per token (k). For `topp` it is the nominal k used for parameter and "
        "FLOP accounting; for `expert_choice` it sets the expert capacity.",
    )
    expert_hidden: PosInt = Field(..., description="Hidden width of each routed expert.")
    layers: MoELayers = Field(
        "all",
        description="MoE placement: 'all', 'every_other' (starting at the first MoE-eligible layer) "
        "or an explicit list of layer indices.",
    )
    first_dense: NonNegInt = Field(
        0, description="Number of leading layers kept dense (with 'all' or 'every_other')."
    )
    shared_experts: NonNegInt = Field(0, description="Always-on shared experts per MoE layer.")
    shared_hidden: PosInt | None = Field(
        None, description="Hidden width of each shared expert (default: expert_hidden)."
    )
    shared_mix: Literal["add", "gate", "sigmoid"] = Field(
        "add",
        description="How shared and routed outputs combine: 'add' (sum), 'gate' (learned "
        "per-token 2-way softmax) or 'sigmoid' (routed + sigmoid(w . x) * shared, as Qwen2-MoE).",
    )
    shared_reduce: Literal["sum", "mean"] = Field(
        "sum",
        description="How several shared experts combine: 'sum' (one always-on FFN of their total "
        "width) or 'mean' (that FFN's output divided by shared_experts: their average, as the "
        "CartesianMoE code's fine-grained baseline).",
    )
    capacity_factor: PosFloat | None = Field(
        None,
        description="Token-choice capacity: each expert takes at most ceil(c * T * k / N) slots per "
        "batch, overflow is dropped (the residual carries it). null = dropless.",
    )
    init: Literal["scaled_normal", "torch_default", "sigma_moe"] | None = Field(
        None, description="Initialisation of the MoE layers' routers, experts and shared experts, when it differs "
        "from model.init: scaled_normal, torch_default (PyTorch's module defaults) or sigma_moe (the "
        "sigma-MoE/MoEUT code: gates and keys N(0, 1/fan_in), values N(0, 1/(E*F))). null = model.init.")
    router_init: Literal["scaled_normal", "torch_default", "sigma_moe"] | None = Field(
        None, description="Initialisation of the routers alone (and their shared recurrent cell), when it "
        "differs from model.moe.init. null = model.moe.init.")
    expert_bias: bool = Field(
        False, description="Biases after every expert projection (GPT-OSS); the triton backend runs these unfused.")
    backend: Literal["auto", "loop", "grouped_mm", "triton"] = Field(
        "auto",
        description="Expert computation (the same numbers, different speed): 'auto' (grouped_mm where it "
        "runs, else the loop), 'loop' (plain reference), 'grouped_mm' (one grouped GEMM per matrix), "
        "'triton' (moectl's fused gather/GEMM/scatter kernels; CUDA, needs triton). A backend that "
        "cannot run on the device or dtype falls back to the loop with a warning.",
    )
    aux_loss_weight: NonNegFloat = Field(0.01, description="Weight of the load-balance loss.")
    z_loss_weight: NonNegFloat = Field(0.001, description="Weight of the router z-loss.")
    balance_form: Literal["switch", "switch_top1", "entropy"] = Field(
        "switch", description="Form of the load-balance loss: 'switch' (E * sum_e f_e * P_e with f over every routed "
        "slot: Switch, GShard, Mixtral, Megablocks), 'switch_top1' (f over each token's first choice only) or "
        "'entropy' (sum_e P_e log P_e, the negative entropy of the mean routing distribution: sigma-MoE, MoEUT, the "
        "CompeteSMoE 2025 language-model code).")
    balance_pooling: Literal["batch", "sequence"] = Field(
        "batch", description="What the balance loss averages over: the whole batch (expert counts summed over "
        "data-parallel processes) or each sequence, the loss then averaged over sequences.")
    balance_over_layers: Literal["sum", "mean"] = Field(
        "sum", description="How the weighted balance losses of the routed layers add up: their sum, or their mean "
        "(Megablocks' batched loss, behind the RMoE paper's 0.91B runs), which divides the effective weight by the "
        "number of routed layers. Applies to the competition balance loss too.")
    # `router`, `block` and one optional section per routed-layer variant (`competition`) come from
    # the engine's registries (`recipe_schema()`), so a user's own parts fit in too.

    def layer_indices(self, n_layers: int) -> list[int]:
        """The indices of the MoE layers in a model of `n_layers` layers."""
        if isinstance(self.layers, list):
            return sorted(self.layers)
        step = 1 if self.layers == "all" else 2
        return list(range(self.first_dense, n_layers, step))


class RopeScaling(Section):
    """RoPE frequencies stretched for a longer context (as Hugging Face's rope_parameters)."""

    kind: Literal["linear", "llama3", "yarn"] = Field(
        ..., description="linear: every frequency divided by factor; llama3 (Llama 3.1): long wavelengths "
        "divided by factor, short ones kept, a linear blend between; yarn (YaRN: Qwen3, DeepSeek-V3, GPT-OSS): "
        "a ramp over pair indices between beta_fast and beta_slow turns, and an attention temperature.")
    factor: Annotated[float, Field(ge=1)] = Field(..., description="How much longer the context becomes.")
    low_freq_factor: PosFloat = Field(1.0, description="llama3: wavelengths above original_context / this are scaled.")
    high_freq_factor: PosFloat = Field(4.0, description="llama3: wavelengths below original_context / this are kept.")
    original_context: PosInt = Field(8192, description="llama3, yarn: the context the model was first trained on.")
    beta_fast: PosFloat = Field(32.0, description="yarn: pairs turning more than this many times over "
                                "original_context keep their frequency.")
    beta_slow: PosFloat = Field(1.0, description="yarn: pairs turning fewer than this many times are divided by "
                                "factor.")
    mscale: PosFloat | None = Field(None, description="yarn: with mscale_all_dim, the attention factor is "
                                    "(0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1) (DeepSeek).")
    mscale_all_dim: PosFloat | None = Field(None, description="yarn: see mscale.")
    attention_factor: PosFloat | None = Field(None, description="yarn: multiply queries and keys by this after "
                                              "RoPE; null: from factor (0.1 ln f + 1) or mscale.")
    truncate: bool = Field(True, description="yarn: round the ramp's bounds outwards to whole pairs.")


class LatentAttention(Section):
    """Multi-head latent attention (DeepSeek-V2/V3): queries (optionally through a low-rank latent)
    and keys/values through a shared low-rank latent, each head's key split into a part without
    position and a RoPE part shared by all heads (decoupled RoPE)."""

    q_rank: PosInt | None = Field(None, description="Rank of the query latent (q_lora_rank); null: queries "
                                  "project directly (DeepSeek-V2-Lite).")
    kv_rank: PosInt = Field(..., description="Rank of the shared key/value latent (kv_lora_rank).")
    nope_dim: PosInt = Field(..., description="Per-head query/key dimensions without position (qk_nope_head_dim).")
    rope_dim: PosInt = Field(..., description="Query/key dimensions with RoPE (qk_rope_head_dim); the key's is "
                             "shared by all heads.")
    v_dim: PosInt = Field(..., description="Per-head value dimensions (v_head_dim).")


class ModelConfig(Section):
    """A decoder-only transformer (pre-norm, RMSNorm, RoPE, causal attention)."""

    vocab_size: PosInt = Field(..., description="Vocabulary size (the tokenizer's size must fit in it).")
    d_model: PosInt = Field(..., description="Residual stream width (d).")
    n_layers: PosInt = Field(..., description="Number of transformer layers.")
    n_heads: PosInt = Field(..., description="Attention heads; d_model must be divisible by it unless "
                            "head_dim is set.")
    n_kv_heads: PosInt | None = Field(
        None, description="Key/value heads for grouped-query attention (default: n_heads)."
    )
    ffn_hidden: NonNegInt = Field(
        ..., description="Hidden width of the dense FFN layers; 0: dense layers are attention only (no FFN), "
        "as the odd layers of the CompeteSMoE 2024 enwik8 L model.")
    activation: Literal["swiglu", "gelu", "relu", "swiglu_clamped"] = Field(
        "swiglu", description="FFN and expert activation; swiglu has three matrices, gelu and relu two; "
        "swiglu_clamped is GPT-OSS's (the gate clamped above at 7 through x sigmoid(1.702 x), times the up "
        "projection clamped to [-7, 7] plus one; three matrices)."
    )
    seq_len: PosInt = Field(1024, description="Training context length in tokens.")
    rope_theta: PosFloat = Field(10000.0, description="RoPE base.")
    rope_scaling: RopeScaling | None = Field(None, description="Stretch RoPE for a longer context; null = off.")
    norm_eps: PosFloat = Field(1e-5, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the LM head.")
    init_std: PosFloat = Field(0.02, description="Std of the normal initialisation of weights.")
    scale_residual_init: bool = Field(
        True, description="Scale output projections' init by 1/sqrt(2 * n_layers) (GPT-2 style)."
    )
    init: Literal["scaled_normal", "torch_default"] = Field(
        "scaled_normal", description="Initialisation scheme: scaled_normal (N(0, init_std), output projections "
        "scaled by scale_residual_init) or torch_default (what PyTorch's modules draw: U(+-1/sqrt(fan_in)) for "
        "linear maps, N(0, 1) embeddings). model.moe.init and model.moe.router_init override it for MoE parts."
    )
    head_dim: PosInt | None = Field(
        None, description="Attention head size (default: d_model / n_heads); queries project to "
        "n_heads * head_dim (Qwen3-MoE sets it apart from d_model)."
    )
    attention_bias: Literal["none", "qkv", "all"] = Field(
        "none", description="Biases on the attention projections: none, on q/k/v (Qwen2), or on "
        "q/k/v and the output projection (Llama's attention_bias)."
    )
    qk_norm: Literal["none", "head", "projection"] = Field(
        "none", description="RMSNorm of queries and keys before RoPE: per head over head_dim "
        "(Qwen3), over the whole projection (OLMoE), or none."
    )
    qkv_clip: PosFloat | None = Field(
        None, description="Clamp queries, keys and values to [-c, c] after projection and qk_norm "
        "(OLMoE's clip_qkv); null = off."
    )
    sliding_window: PosInt | None = Field(
        None, description="Sliding-window attention: a query attends to itself and the window - 1 positions "
        "before it (Mistral, GPT-OSS), in the layers sliding_layers names; null = every layer sees its whole past."
    )
    sliding_layers: Literal["all", "even", "odd"] | list[NonNegInt] = Field(
        "all", description="With sliding_window, the layers that use it: all, even (0, 2, ...: GPT-OSS's "
        "alternation), odd, or a list of layer indices (Qwen2's top layers); the others attend fully."
    )
    latent_attention: LatentAttention | None = Field(
        None, description="Multi-head latent attention (DeepSeek-V2/V3) instead of the standard attention; "
        "n_kv_heads and head_dim do not apply. null = standard."
    )
    attention_sinks: bool = Field(
        False, description="A learned logit per head that joins every query's softmax (and then is dropped), so a "
        "head can attend to nothing (GPT-OSS's sinks)."
    )
    moe: MoEConfig | None = Field(None, description="Mixture-of-Experts settings; null = dense model.")


# --------------------------------------------------------------------------- data


class StdlibSource(Section):
    """The Python standard library's source files of the running interpreter: a varied corpus of
    tens of MB on every machine, no network needed."""

    kind: Literal["stdlib"] = Field("stdlib", description="Source kind.")
    include_tests: bool = Field(True, description="Include the standard library's test suite (about 60% of it).")


class FilesSource(Section):
    """Local files: .txt (one document per file), .jsonl / .json (one document per record),
    .parquet (one per row); any of them gzipped (.gz)."""

    kind: Literal["files"] = Field("files", description="Source kind.")
    paths: Annotated[list[str], Field(min_length=1)] = Field(
        ..., description="Files or glob patterns (`**` allowed), relative to the working directory."
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.parquet records.")


class HFSource(Section):
    """A Hugging Face dataset (needs the `datasets` package: moectl's data extra)."""

    kind: Literal["hf"] = Field("hf", description="Source kind.")
    name: str = Field(..., description="Dataset name on the Hub, or a builder such as json, parquet, text.")
    config: str | None = Field(None, description="Dataset configuration name.")
    split: str = Field("train", description="Split to read documents from.")
    data_files: list[str] | None = Field(None, description="Data files for builder datasets (json, parquet, ...).")
    revision: str | None = Field(None, description="Dataset revision (branch, tag or commit).")
    text_field: str = Field("text", description="Column holding the text.")


def _default_source_kind(v: Any) -> Any:
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "files", **v} if "paths" in v else {"kind": "stdlib", **v}
    return v


SourceConfig = Annotated[
    Union[StdlibSource, FilesSource, HFSource],
    Field(discriminator="kind"),
    BeforeValidator(_default_source_kind),
]


class BPETokenizer(Section):
    """Train a byte-level BPE tokenizer (vocabulary model.vocab_size) on the training split."""

    kind: Literal["bpe"] = Field("bpe", description="Tokenizer kind.")
    train_bytes: PosInt = Field(
        20_000_000, description="Train on at most this many bytes of training documents."
    )


class FileTokenizer(Section):
    """Load an existing tokenizer (a tokenizer.json, or a folder that holds one)."""

    kind: Literal["file"] = Field("file", description="Tokenizer kind.")
    path: str = Field(..., description="tokenizer.json or a folder containing it.")
    eot_token: str | None = Field(
        None, description="End-of-text token placed between documents (default: the first of "
        "<|endoftext|>, </s>, <eos>, <|end_of_text|> in the vocabulary)."
    )
    add_special_tokens: bool = Field(
        False, description="Give every document and prompt the tokenizer's own special tokens (its template, "
        "e.g. a Llama tokenizer's BOS), as transformers' tokenizers do by default; importing a Hugging Face "
        "model sets it when its tokenizer adds them."
    )


def _default_tokenizer_kind(v: Any) -> Any:
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "file", **v} if "path" in v else {"kind": "bpe", **v}
    return v


TokenizerConfig = Annotated[
    Union[BPETokenizer, FileTokenizer],
    Field(discriminator="kind"),
    BeforeValidator(_default_tokenizer_kind),
]


class DataConfig(Section):
    """Where text comes from, how it is tokenised, and the train/validation split."""

    source: SourceConfig = Field(default_factory=StdlibSource, description="The documents; `kind` selects it.")
    tokenizer: TokenizerConfig = Field(default_factory=BPETokenizer, description="The tokenizer; `kind` selects it.")
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.01, description="Share of documents held out for validation (by document, from the seed)."
    )
    max_documents: PosInt | None = Field(None, description="Use only the first N documents of the source.")
    split_seed: Seed | None = Field(
        None, description="Seed of the train/validation split (default: the recipe's seed). Fix it to "
        "compare runs of several seeds on the same validation set."
    )
    cache_dir: str | None = Field(
        None, description="Tokenizer and token-shard cache (default: $MOECTL_CACHE or ~/.cache/moectl)."
    )


# --------------------------------------------------------------------------- training


class TrainConfig(Section):
    """The optimisation: budget, batch, optimizer, schedule, precision, logging and checkpoints."""

    run_dir: str | None = Field(None, description="Run folder (default: runs/<name>).")
    init_from: str | None = Field(
        None, description="Start a fresh run from these weights instead of a random initialisation: a run "
        "folder, a checkpoint (step-*) folder, or a folder holding model.safetensors (what `moectl convert` "
        "writes). The tensors must fit the model. Ignored when the run resumes from a checkpoint of its own."
    )
    max_steps: PosInt | None = Field(None, description="Budget in optimizer steps (give this or max_tokens).")
    max_tokens: PosInt | None = Field(
        None, description="Budget in training tokens; converted to steps of the global batch."
    )
    batch_size: PosInt = Field(8, description="Sequences per micro-batch on each process.")
    grad_accum: PosInt = Field(1, description="Micro-batches per optimizer step.")
    lr: PosFloat = Field(3e-4, description="Peak learning rate.")
    min_lr_ratio: Fraction = Field(0.1, description="Final learning rate as a fraction of lr (cosine, wsd).")
    lr_schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="After warmup: cosine decay, warmup-stable-decay, or constant."
    )
    warmup_steps: NonNegInt = Field(0, description="Linear warmup steps from 0 to lr.")
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="wsd: the final share of steps over which lr decays linearly."
    )
    weight_decay: NonNegFloat = Field(0.1, description="AdamW weight decay (not on norms, biases, embeddings).")
    beta1: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="AdamW beta1.")
    beta2: Annotated[float, Field(ge=0, lt=1)] = Field(0.95, description="AdamW beta2.")
    adam_eps: PosFloat = Field(1e-8, description="AdamW epsilon.")
    grad_clip: NonNegFloat = Field(1.0, description="Clip the global gradient norm to this value; 0 disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 otherwise."
    )
    activation_checkpointing: bool = Field(False, description="Recompute each block in the backward pass.")
    compile: bool = Field(False, description="torch.compile each transformer block (same numbers; the first "
                          "steps take longer while it compiles). A block that fails to compile is named and runs "
                          "eagerly. Pays off on GPUs; see docs/profile.md for CPU.")
    eval_every: PosInt | None = Field(
        200, description="Validate every N steps (and at the end); null = only at the end.")
    eval_batches: PosInt = Field(20, description="Validation batches (of batch_size sequences) per evaluation.")
    log_every: PosInt = Field(10, description="Write metrics every N steps.")
    checkpoint_every: PosInt | None = Field(
        500, description="Save a checkpoint every N steps (and at the end); null = only at the end."
    )
    keep_last: PosInt = Field(3, description="Checkpoints to keep (older ones are deleted).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss stops the run (latest stays the last good checkpoint) or skips the step."
    )
    tensorboard: bool = Field(False, description="Also log to TensorBoard under <run>/tb (needs tensorboard).")
    peak_tflops: PosFloat | None = Field(
        None, description="The device's peak TFLOP/s that MFU is stated against (per process). null: moectl's "
        "datasheet table for known GPUs, a load-proof measurement on CPUs, else a measured matmul.")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallelism with several processes.")
    expert_parallel: PosInt = Field(
        1, description="Expert parallelism: split every routed layer's experts over this many processes (it must "
        "divide num_experts and the process count); tokens travel to their experts and back (docs/training.md).")


def _run_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", value):
        raise ValueError(f"{value!r} cannot name a run folder (runs/<name>): use letters, digits and . _ + -, "
                         "starting with a letter or digit, no path separators, at most 128 characters")
    return value


class Recipe(Section):
    """A moectl recipe."""

    extends: str | None = Field(
        None,
        description="A base recipe (path relative to this file, or a shipped recipe name) whose "
        "values this file overrides; resolved before validation.",
    )
    plugins: list[str] = Field(
        default_factory=list, description="Python modules to import before the recipe is validated: they may "
        "register routers, block kinds and routed-layer variants (see docs/engine.md)."
    )
    name: Annotated[str, AfterValidator(_run_name)] = Field(
        "run", description="Run name; the default run folder is runs/<name>. Letters, digits and . _ + - "
        "(no path separators); a recipe that `extends` another and sets no name is named after its file.")
    description: str = Field("", description="Free text shown by `moectl recipes list`.")
    seed: Seed = Field(0, description="Seed for initialisation, data order and routing noise (0 to 2^32 - 1).")
    model: ModelConfig = Field(..., description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")


# --------------------------------------------------------------------------- the parts' sections

_sections: dict[tuple[str, str], type] = {}        # (registry, kind) -> section, per options class
_schema: tuple[int, type[Recipe]] | None = None    # (registry version, the schema built for it)


def _docstring(entry) -> str:
    """The section's description: the options' docstring, else the class's."""
    for obj in (entry.options, entry.cls):
        doc = (obj.__doc__ or "").strip()
        if doc and not doc.startswith(f"{obj.__name__}("):   # not the dataclass's generated one
            return " ".join(doc.split())
    return ""


def section_for(registry_name: str, entry, with_kind: bool = True) -> type[Section]:
    """The strict schema section of one registered part, from its options dataclass."""
    key = (registry_name, entry.name)
    cached = _sections.get(key)
    if cached is not None and cached.__moectl_options__ is entry.options:
        return cached
    hints = typing.get_type_hints(entry.options, include_extras=True)
    reserved = [f.name for f in dataclasses.fields(entry.options)
                if f.name.startswith("model_") or hasattr(Section, f.name)]
    if reserved:
        raise ValueError(f"option name {reserved[0]!r} is reserved (pydantic uses it); rename the option")
    fields: dict[str, Any] = {}
    if with_kind:
        fields["kind"] = (Literal[entry.name], Field(entry.name, description="Which kind this section configures."))
    for f in dataclasses.fields(entry.options):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        if f.default is not dataclasses.MISSING:
            spec = Field(f.default, description=help_text, **meta)
        elif f.default_factory is not dataclasses.MISSING:
            spec = Field(default_factory=f.default_factory, description=help_text, **meta)
        else:
            spec = Field(..., description=help_text, **meta)
        fields[f.name] = (hints[f.name], spec)
    title = "".join(w.capitalize() for w in f"{entry.name}_{registry_name}".split("_"))
    section = create_model(title, __base__=Section, __doc__=_docstring(entry), **fields)
    section.__moectl_options__ = entry.options
    _sections[key] = section
    return section


def _kind_union(sections: list[type], default_kind: str, bare_name: bool) -> Any:
    """A `kind`-selected union of sections; a mapping without `kind` gets the default kind, and
    (with `bare_name`) a plain string is the name of a kind with default options."""

    def fill(v: Any) -> Any:
        if bare_name and isinstance(v, str):
            return {"kind": v}
        if isinstance(v, dict) and "kind" not in v:
            return {"kind": default_kind, **v}
        return v

    if len(sections) == 1:
        return Annotated[sections[0], BeforeValidator(fill)]
    return Annotated[Union[tuple(sections)], Field(discriminator="kind"), BeforeValidator(fill)]


def _sections_of(reg, registry_name: str, default: str | None = None, only=None) -> list[type]:
    """The sections of a registry's parts, the default kind first (an error names a part whose
    options cannot be a section, and that part is forgotten so the rest keep working)."""
    entries = [only] if only is not None else sorted(reg, key=lambda e: e.name != default)
    sections = []
    for e in entries:
        try:
            sections.append(section_for(registry_name, e, with_kind=registry_name not in ("variant", "tracker")))
        except Exception as err:   # a plugin's options that pydantic cannot validate
            reg.remove(e.name)
            raise MoectlError(f"{reg.what} {e.name!r} ({e.module}): its options ({e.options.__qualname__}) cannot "
                              f"be a recipe section: {type(err).__name__}: {str(err).splitlines()[0]}",
                              hint="give every option a plain type (bool, int, float, str, Literal[...], lists of "
                              "them, or None) and a default") from None
    return sections


def _moe_fields() -> dict[str, Any]:
    """model.moe's `router`, `block` and variant sections, from the registries as they are."""
    routers = _sections_of(registry.routers, "router", default="topk")
    blocks = _sections_of(registry.blocks, "block", default="standard")
    fields: dict[str, Any] = {
        "router": (_kind_union(routers, "topk", bare_name=False),
                   Field(default_factory=routers[0], description="The router; `kind` selects it.")),
        "block": (_kind_union(blocks, "standard", bare_name=True),
                  Field(default_factory=blocks[0],
                        description="What a MoE layer is made of; `kind` selects it (a bare kind name works too): "
                        + "; ".join(f"'{e.name}': {_docstring(e)}" for e in registry.blocks)))}
    for e in registry.variants:
        if e.name in MoEConfig.model_fields or e.name in fields:
            raise MoectlError(f"routed-layer variant {e.name!r} ({e.module}) clashes with the model.moe key of "
                              "the same name", hint="register it under another name")
        fields[e.name] = (_sections_of(registry.variants, "variant", only=e)[0] | None,
                          Field(None, description=e.summary))
    return fields


def _track_section() -> type[Section]:
    """train.track: one optional section per registered tracker; a section given switches it on."""
    fields = {e.name: (_sections_of(registry.trackers, "tracker", only=e)[0] | None,
                       Field(None, description=f"{_docstring(e)} Given (even as {{}}), it is switched on."))
              for e in sorted(registry.trackers, key=lambda e: e.name)}
    return create_model("TrackConfig", __base__=Section, __doc__="Experiment trackers (docs/training.md).", **fields)


def recipe_schema() -> type[Recipe]:
    """The schema of a recipe with the sections of every part registered so far (entry-point
    plugins imported first). Built once per state of the registries."""
    global _schema
    plugins.load_entry_points()
    version = registry.version()
    if _schema is None or _schema[0] != version:
        moe = create_model("MoEConfig", __base__=MoEConfig, __doc__=MoEConfig.__doc__, **_moe_fields())
        model = create_model("ModelConfig", __base__=ModelConfig, __doc__=ModelConfig.__doc__,
                             moe=(moe | None, ModelConfig.model_fields["moe"]))
        track = _track_section()
        track_help = "Experiment trackers besides logs/metrics.jsonl: wandb, mlflow, or a plugin's (docs/training.md)."
        train = create_model("TrainConfig", __base__=TrainConfig, __doc__=TrainConfig.__doc__,
                             track=(track, Field(default_factory=track, description=track_help)))
        train_help = Recipe.model_fields["train"].description
        schema = create_model("Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
                              model=(model, Recipe.model_fields["model"]),
                              train=(train, Field(default_factory=train, description=train_help)))
        _schema = (version, schema)
    return _schema[1]


def moe_schema() -> type[MoEConfig]:
    """The `model.moe` section of `recipe_schema()`."""
    model = recipe_schema().model_fields["model"].annotation
    return next(a for a in typing.get_args(model.model_fields["moe"].annotation) if a is not type(None))


def variant_fields() -> list[str]:
    """The model.moe keys of the registered routed-layer variants."""
    recipe_schema()
    return sorted(e.name for e in registry.variants)
