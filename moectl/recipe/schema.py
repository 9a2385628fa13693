"""The recipe schema: one typed, strict description of a run.

Every field carries a description; `moectl recipes schema` turns this module into JSON Schema and
docs/recipe-reference.md is generated from it, so the schema is the single source of truth for
what a recipe may say. Checks that involve several fields live in `checks.py` so that their errors
can name the exact key path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------- routers


class TopKRouter(Section):
    """Token-choice top-k: each token picks its k highest-scoring experts."""

    kind: Literal["topk"] = Field("topk", description="Router kind.")
    score_func: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="How logits become scores: softmax over experts, or per-expert sigmoid."
    )
    renormalize: bool = Field(
        True, description="Divide the k selected scores by their sum (Mixtral); false keeps raw scores (Switch)."
    )
    jitter_eps: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="In training, multiply the router input by U(1-eps, 1+eps). 0 disables."
    )
    bias_update_rate: NonNegFloat = Field(
        0.0,
        description="Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this "
        "rate after each optimizer step towards balanced load. 0 disables.",
    )


class ExpertChoiceRouter(Section):
    """Expert choice: each expert picks its top-C tokens of the batch."""

    kind: Literal["expert_choice"] = Field("expert_choice", description="Router kind.")
    capacity_factor: PosFloat = Field(
        1.0, description="C = capacity_factor * T * top_k / num_experts tokens per expert."
    )


class HashRouter(Section):
    """Fixed routing from a random per-token-id table; nothing in it is learned."""

    kind: Literal["hash"] = Field("hash", description="Router kind.")
    seed: NonNegInt = Field(0, description="Seed of the fixed random [vocab, experts] table.")


class TopPRouter(Section):
    """Top-p: experts in descending probability until the cumulative probability exceeds p."""

    kind: Literal["topp"] = Field("topp", description="Router kind.")
    p: Annotated[float, Field(gt=0, le=1)] = Field(0.4, description="Cumulative probability threshold.")
    max_k: PosInt | None = Field(
        None, description="Most experts a token may use (default: num_experts)."
    )


class RecurrentRouter(Section):
    """RMoE's layerwise recurrent router: a cell shared by all MoE layers carries routing state
    across depth (per token); per-layer projector d -> hidden and router hidden -> experts."""

    kind: Literal["recurrent"] = Field("recurrent", description="Router kind.")
    hidden: PosInt = Field(128, description="Recurrent state size p (the paper's best: 128).")
    cell: Literal["gru", "rnn", "lstm"] = Field("gru", description="The shared recurrent cell.")
    pass_state: bool = Field(
        True, description="Pass the state from layer to layer; false = every layer starts from zero ('NP')."
    )
    detach_state: bool = Field(
        False, description="Same forward, but no gradient flows into the previous layers' state (ablation)."
    )
    logit_residual: NonNegFloat = Field(
        0.0, description="Add this multiple of the previous MoE layer's router logits ('r-alpha')."
    )
    shared_projector: bool = Field(False, description="One projector d -> hidden for all layers ('S-proj').")
    projector_bias: bool = Field(False, description="Give the projector a bias (the enwik8 variant).")
    renormalize: bool = Field(True, description="Divide the top-k weights by their sum.")


def _default_kind(v: Any) -> Any:
    """A router section without `kind` is the default top-k router."""
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "topk", **v}
    return v


RouterConfig = Annotated[
    Union[TopKRouter, ExpertChoiceRouter, HashRouter, TopPRouter, RecurrentRouter],
    Field(discriminator="kind"),
    BeforeValidator(_default_kind),
]


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


class CompetitionConfig(Section):
    """CompeteSMoE: on scheduled (layer, step) pairs in training, evaluate every expert and route to
    the strongest responses; the router learns to predict them. Defaults follow the 2025 paper."""

    rate: Fraction = Field(0.07, description="Probability that a MoE layer competes at a step (omega).")
    warmup: Fraction = Field(0.05, description="Fraction of training steps, at the start, without competition.")
    max_layers: PosInt = Field(3, description="Most layers competing in one step (A_max; fixed schedule).")
    schedule: Literal["fixed", "bernoulli"] = Field(
        "fixed", description="'fixed': drawn once from the seed, capped, saved in checkpoints (2025); "
        "'bernoulli': a fresh draw per layer and training forward from the seed, no cap (2024)."
    )
    response: Literal["mean_softplus", "l2_norm"] = Field(
        "mean_softplus", description="An expert's response to a token: mean softplus of its output (2025) "
        "or its L2 norm (2024)."
    )
    gate: Literal["linear", "softmax"] = Field(
        "linear", description="Winners' weights: responses divided by their sum (2025) or their softmax (2024)."
    )
    theta: NonNegFloat = Field(0.2, description="Weight of the winners-only term of the router loss.")
    router_loss_weight: NonNegFloat = Field(0.001, description="Weight of the router distillation loss.")
    diversity_weight: NonNegFloat = Field(0.005, description="Weight of the winners' diversity loss.")
    balance_weight: NonNegFloat = Field(0.01, description="Weight of the competition balance loss.")


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
    shared_mix: Literal["add", "gate"] = Field(
        "add",
        description="How shared and routed outputs combine: 'add' (sum) or 'gate' (learned "
        "per-token 2-way softmax).",
    )
    capacity_factor: PosFloat | None = Field(
        None,
        description="Token-choice capacity: each expert takes at most ceil(c * T * k / N) slots per "
        "batch, overflow is dropped (the residual carries it). null = dropless.",
    )
    backend: Literal["loop", "grouped_mm"] = Field(
        "grouped_mm",
        description="Expert computation: 'loop' (plain reference) or 'grouped_mm' (one grouped GEMM; "
        "falls back to the loop where the device or dtype cannot run it).",
    )
    aux_loss_weight: NonNegFloat = Field(0.01, description="Weight of the load-balance loss.")
    z_loss_weight: NonNegFloat = Field(0.001, description="Weight of the router z-loss.")
    router: RouterConfig = Field(default_factory=TopKRouter, description="The router; `kind` selects it.")
    block: Literal["standard", "cartesian"] = Field(
        "standard", description="MoE layer kind: 'standard' (one routed FFN) or 'cartesian' (CartesianMoE: "
        "two routed sub-layers in sequence; expert_hidden is the sub-expert width)."
    )
    competition: CompetitionConfig | None = Field(
        None, description="CompeteSMoE competition settings; null = none."
    )

    def layer_indices(self, n_layers: int) -> list[int]:
        """The indices of the MoE layers in a model of `n_layers` layers."""
        if isinstance(self.layers, list):
            return sorted(self.layers)
        step = 1 if self.layers == "all" else 2
        return list(range(self.first_dense, n_layers, step))


class ModelConfig(Section):
    """A decoder-only transformer (pre-norm, RMSNorm, RoPE, causal attention)."""

    vocab_size: PosInt = Field(..., description="Vocabulary size (the tokenizer's size must fit in it).")
    d_model: PosInt = Field(..., description="Residual stream width (d).")
    n_layers: PosInt = Field(..., description="Number of transformer layers.")
    n_heads: PosInt = Field(..., description="Attention heads; d_model must be divisible by it.")
    n_kv_heads: PosInt | None = Field(
        None, description="Key/value heads for grouped-query attention (default: n_heads)."
    )
    ffn_hidden: PosInt = Field(..., description="Hidden width of the dense FFN layers.")
    activation: Literal["swiglu", "gelu", "relu"] = Field(
        "swiglu", description="FFN and expert activation; swiglu has three matrices, the others two."
    )
    seq_len: PosInt = Field(1024, description="Training context length in tokens.")
    rope_theta: PosFloat = Field(10000.0, description="RoPE base.")
    norm_eps: PosFloat = Field(1e-5, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the LM head.")
    init_std: PosFloat = Field(0.02, description="Std of the normal initialisation of weights.")
    scale_residual_init: bool = Field(
        True, description="Scale output projections' init by 1/sqrt(2 * n_layers) (GPT-2 style)."
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
    """A Hugging Face dataset (needs the `datasets` package: pip install 'moectl[data]')."""

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
    split_seed: NonNegInt | None = Field(
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
    max_steps: PosInt | None = Field(None, description="Budget in optimizer steps (give this or max_tokens).")
    max_tokens: PosInt | None = Field(
        None, description="Budget in training tokens; converted to steps of the global batch."
    )
    batch_size: PosInt = Field(8, description="Sequences per micro-batch on each process.")
    grad_accum: PosInt = Field(1, description="Micro-batches per optimizer step.")
    lr: PosFloat = Field(3e-4, description="Peak learning rate.")
    min_lr_ratio: Fraction = Field(0.1, description="Final learning rate as a fraction of lr (cosine, wsd).")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
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
    eval_every: PosInt | None = Field(200, description="Validate every N steps (and at the end); null = only at the end.")
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
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallelism with several processes.")


class Recipe(Section):
    """A moectl recipe."""

    extends: str | None = Field(
        None,
        description="A base recipe (path relative to this file, or a shipped recipe name) whose "
        "values this file overrides; resolved before validation.",
    )
    name: str = Field("run", description="Run name; the default run folder is runs/<name>.")
    description: str = Field("", description="Free text shown by `moectl recipes list`.")
    seed: NonNegInt = Field(0, description="Seed for initialisation, data order and routing noise.")
    model: ModelConfig = Field(..., description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")


SECTION_TYPES: tuple[type[BaseModel], ...] = (Recipe,)
