"""The decoder-only MoE transformer.

Each layer is attention followed by an "MLP part" that owns its norm(s) and residual(s): a dense
FFN, or on MoE layers a registered block kind (`register_block`: the standard layer, CartesianMoE's
two sub-layers, or a user's own). A recurrent routing state
(None for memoryless routers) is threaded explicitly through the layer loop, and every routed layer
returns a `RoutingRecord`, so auxiliary losses are plain return values: under activation
checkpointing the recomputed forward's records are discarded and nothing is counted twice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moectl.core import registry
from moectl.core.cache import KVCache
from moectl.core.config import ModelArgs
from moectl.core.init import MOE_ONLY, apply_scheme, moe_parts
from moectl.core.layers import (
    Attention,
    FeedForward,
    LatentAttention,
    RMSNorm,
    latent_softmax_scale,
    rope_tables,
)
from moectl.core.losses import IGNORE_INDEX, SWITCH_BATCH, BalanceSpec, head_cross_entropy
from moectl.core.moe import RoutedFFN, RoutingPlan, RoutingRecord, routed_layer_class
from moectl.core.routers.base import PLAIN, RouteContext, RoutingMode
from moectl.core.stages import record_stage

MLPResult = tuple[Tensor, Any, list[RoutingRecord]]
# Builds the next routed layer of the model, in forward order, from its name.
NewRouted = Callable[[str], RoutedFFN]


class DenseMLP(nn.Module):
    """A dense layer's MLP part, h + FFN(RMSNorm(h)); with ffn_hidden 0 nothing (attention only)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.empty = args.ffn_hidden == 0
        if self.empty:
            return
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.ffn = FeedForward(args.d_model, args.ffn_hidden, args.activation)

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        if self.empty:
            return h_BSD, state, []
        with record_stage("norms"):
            u = self.norm(h_BSD)
        with record_stage("dense_ffn"):
            return h_BSD + self.ffn(u), state, []

    def flops_per_token(self) -> int:
        return 0 if self.empty else self.ffn.flops_per_token()


class MoEBlock(nn.Module):
    """Base of MoE block kinds: the "MLP part" of a MoE layer. A kind registers with its options
    (`@register_block("name", options=...)`); it is built as `cls(args, layer_idx, new_routed)`,
    where `new_routed(name)` makes each of its routed layers in forward order, and its forward is
    `(h_BSD, ctx, state) -> (h_BSD, state, [records])`. Class-level hooks: `check(moe)`,
    `build_notes()`."""

    @classmethod
    def check(cls, moe: Any) -> list[tuple[str, str]]:
        return []

    def build_notes(self) -> list[str]:
        return []


registry.blocks.base = MoEBlock


def register_block(name: str, *, options: type):
    """Class decorator: make a MoEBlock subclass selectable as `model.moe.block: name`."""
    return registry.blocks.register(name, options=options)


@dataclass
class StandardOptions:
    """The standard MoE layer: one routed FFN after a norm, with a residual."""


@register_block("standard", options=StandardOptions)
class MoEMLP(MoEBlock):
    """The standard MoE layer: h + RoutedFFN(RMSNorm(h))."""

    def __init__(self, args: ModelArgs, layer_idx: int, new_routed: NewRouted):
        super().__init__()
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe = new_routed(f"L{layer_idx}")

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        with record_stage("norms"):
            u_TD = self.norm(h_BSD).flatten(0, 1)
        y_TD, state, record = self.moe(u_TD, ctx, state)
        return h_BSD + y_TD.view_as(h_BSD), state, [record]

    def flops_per_token(self) -> int:
        return self.moe.flops_per_token()


@dataclass
class CartesianOptions:
    """CartesianMoE: two routed sub-layers in sequence; model.moe.expert_hidden is the sub-expert
    width (half that of a matched SMoE expert)."""


@register_block("cartesian", options=CartesianOptions)
class CartesianMLP(MoEBlock):
    """CartesianMoE (Su et al., 2024): two routed sub-layers in sequence, so an "expert" is a pair
    (a, b) of sub-experts from two sets, each sub-expert shared by N pairs:

        h_mid = h + RoutedFFN_A(RMSNorm_A(h))
        out   = h_mid + RoutedFFN_B(RMSNorm_B(h_mid))      (residual 2 adds to h_mid)

    Each sub-layer has its own router, sub-experts (model.moe.expert_hidden, half the width of a
    matched SMoE expert), optional shared expert, and balance loss; a recurrent routing state
    advances once per sub-layer."""

    def __init__(self, args: ModelArgs, layer_idx: int, new_routed: NewRouted):
        super().__init__()
        self.norm_a = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe_a = new_routed(f"L{layer_idx}a")
        self.norm_b = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe_b = new_routed(f"L{layer_idx}b")

    def build_notes(self) -> list[str]:
        return ["cartesian: each MoE layer is two routed sub-layers; experts and active parameters count "
                "both sets of sub-experts."]

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        with record_stage("norms"):
            u_a = self.norm_a(h_BSD).flatten(0, 1)
        y_a, state, rec_a = self.moe_a(u_a, ctx, state)
        h_mid = h_BSD + y_a.view_as(h_BSD)
        with record_stage("norms"):
            u_b = self.norm_b(h_mid).flatten(0, 1)
        y_b, state, rec_b = self.moe_b(u_b, ctx, state)
        return h_mid + y_b.view_as(h_BSD), state, [rec_a, rec_b]

    def flops_per_token(self) -> int:
        return self.moe_a.flops_per_token() + self.moe_b.flops_per_token()


def mlp_maker(args: ModelArgs) -> Callable[[int], nn.Module]:
    """Builds the MLP part of layer i: the MoE block kind on MoE layers, else a dense FFN. Routed
    layers get their index (ordinal in forward order) as they are built."""
    if args.moe is None:
        return lambda i: DenseMLP(args, i)
    block_cls, routed_cls = registry.blocks.of(args.moe.block).cls, routed_layer_class(args)
    moe_layers = set(args.moe.layers)
    count = itertools.count()

    def new_routed(name: str) -> RoutedFFN:
        return routed_cls(args, next(count), name)

    return lambda i: block_cls(args, i, new_routed) if i in moe_layers else DenseMLP(args, i)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(args.d_model, eps=args.norm_eps)
        if args.latent_attention:
            self.attn = LatentAttention(args.d_model, args.n_heads, **args.latent_attention,
                                        bias=args.attention_bias == "all", window=args.window(layer_idx),
                                        softmax_scale=latent_softmax_scale(args))
        else:
            self.attn = Attention(args.d_model, args.n_heads, args.kv_heads, args.head_size, args.attention_bias,
                                  args.qk_norm, args.qkv_clip, args.norm_eps, window=args.window(layer_idx),
                                  sinks=args.attention_sinks)
        self.mlp = mlp

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], ctx: RouteContext, state: Any,
                cache: KVCache | None = None) -> MLPResult:
        with record_stage("norms"):
            u = self.attn_norm(x_BSD)
        with record_stage("attention"):
            h = x_BSD + self.attn(u, rope, cache, self.layer_idx)
        return self.mlp(h, ctx, state)


@dataclass
class ModelOutput:
    logits: Tensor | None
    loss: Tensor | None               # mean next-token cross-entropy (when targets are given)
    aux_loss: Tensor                  # weighted sum of every routed layer's auxiliary losses
    records: list[RoutingRecord]

    @property
    def total_loss(self) -> Tensor:
        assert self.loss is not None, "no targets were given"
        return self.loss + self.aux_loss


class MoETransformer(nn.Module):
    """A decoder-only MoE language model built from `ModelArgs`.

    `forward(tokens_BS, targets_BS=None, step=None)` returns a `ModelOutput`: logits, the mean
    next-token loss when targets are given, the weighted router losses and one `RoutingRecord` per
    routed layer. `step` is the optimizer step of a training forward; the routing plan (if the
    model's routed-layer variant has one, see `make_plan`) is consulted with it. The model is plain
    single-device code: parallelism, precision and activation checkpointing
    (`activation_checkpointing = True`) are switched on from outside."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.embed.component = "embedding"
        new_mlp = mlp_maker(args)
        self.layers = nn.ModuleList(TransformerBlock(args, i, new_mlp(i)) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.head.component = "lm_head"
        self.tie_weights()
        # A module all routers share (RMoE's recurrent cell), built once by the router class.
        self.router_shared: nn.Module | None = None
        self.balance = SWITCH_BATCH   # the balance loss every router computes (RouteContext.balance)
        if args.moe is not None:
            self.router_shared = registry.routers.of(args.moe.router).cls.shared_module(args)
            self.balance = BalanceSpec(args.moe.balance_form, args.moe.balance_pooling)
            if args.moe.balance_over_layers == "mean":   # each layer's balance weight over their number
                routed = self.routed_layers()
                for layer in routed:
                    layer.scale_balance(1 / len(routed))
            elif args.moe.balance_over_layers != "sum":
                raise ValueError(f"balance_over_layers must be 'sum' or 'mean', got {args.moe.balance_over_layers!r}")
        # Per-forward routing decisions of the routed-layer variant (`make_plan`), if any.
        self.plan: RoutingPlan | None = None
        self.activation_checkpointing = False
        self.count_reducer: Callable[[Tensor], Tensor] | None = None   # see RouteContext.reduce_counts
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the arguments ask for it (also after loading
        weights with `assign=True`, which replaces the parameters)."""
        if self.args.tie_embeddings:
            self.head.weight = self.embed.weight

    def make_plan(self, seed: int, total_steps: int) -> RoutingPlan | None:
        """Attach the routing plan of a training run of `total_steps` steps (drawn from `seed`, the
        same on every process) and return it; None when the routed layers have none."""
        layers = self.routed_layers()
        self.plan = type(layers[0]).make_plan(self.args, seed, total_steps, len(layers)) if layers else None
        return self.plan

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, output projections scaled by 1/sqrt(2 * n_layers), unless
        `args.init` / `args.moe.init` / `args.moe.router_init` name another scheme."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers) if self.args.scale_residual_init else std
        nn.init.normal_(self.embed.weight, std=std)
        if not self.args.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif module is not self and hasattr(module, "init_weights"):
                module.init_weights(std, out_std)
        # Other schemes redraw on top (the default scheme draws nothing more, so its models are
        # unchanged): the model's, then the MoE parts', then the routers' (see moectl.core.init).
        a = self.args
        if a.init in MOE_ONLY:
            raise ValueError(f"init scheme {a.init!r} is defined for MoE parts only: set it as moe.init")
        if a.init != "scaled_normal":
            apply_scheme(self, a.init, std, out_std)
        if a.moe is not None:
            current = a.init
            for scheme, routers_only in ((a.moe.init, False), (a.moe.router_init, True)):
                if scheme is not None and scheme != current:   # naming the inherited scheme changes nothing
                    for part in moe_parts(self, routers_only):
                        apply_scheme(part, scheme, std, out_std)
                current = scheme or current

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for decoding, of `max_len` positions (default: the trained seq_len)."""
        return KVCache(self.args.n_layers, max_len or self.args.seq_len)

    def routed_layers(self) -> list[RoutedFFN]:
        """Every routed FFN in forward order (the order of `ModelOutput.records`)."""
        return [m for m in self.modules() if isinstance(m, RoutedFFN)]

    @torch.no_grad()
    def after_step(self, loads: list[Tensor]) -> None:
        """Let routers adapt after an optimizer step (e.g. aux-loss-free biases), given the expert
        loads of that step in `routed_layers()` order (summed over micro-batches and ranks)."""
        for layer, load_E in zip(self.routed_layers(), loads, strict=True):
            layer.router.after_step(load_E)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token at training sequence length (the convention in docs/)."""
        s = seq_len or self.args.seq_len
        total = sum(b.attn.flops_per_token(s) + b.mlp.flops_per_token() for b in self.layers)
        return total + 2 * self.args.d_model * self.args.vocab_size

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None, *, step: int | None = None,
                mode: RoutingMode = PLAIN, cache: KVCache | None = None, return_logits: bool = False) -> ModelOutput:
        """`mode` routes for evaluation or decoding (`RoutingMode`: decoding, the drop-top-1
        perturbation, an observer of every layer's decisions); it changes no weight. With a `cache`
        (`new_cache`) the tokens continue the cached ones: they take the positions after them,
        attend to them, and are added to the cache; such a forward always routes as in decoding.
        With targets the loss is computed without materialising the logits (`head_cross_entropy`)
        and `logits` is None, unless `return_logits=True` asks for both."""
        B, S = tokens_BS.shape
        with record_stage("embedding"):
            x = self.embed(tokens_BS)
        past = 0 if cache is None else cache.length
        cos, sin = rope_tables(past + S, self.args.rope_dim, self.args.rope_theta, tokens_BS.device,
                               self.args.rope_scaling)
        rope = (cos[past:], sin[past:])
        plan = None
        if self.plan is not None and step is not None and self.training and torch.is_grad_enabled():
            plan = self.plan.at(step)
        if cache is not None and not mode.decoding:
            mode = replace(mode, decoding=True)
        ctx = RouteContext(token_ids_T=tokens_BS.reshape(-1), shared=self.router_shared,
                           reduce_counts=self.count_reducer, plan=plan, mode=mode, balance=self.balance, seq_len=S)
        state: Any = None
        records: list[RoutingRecord] = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x, state, recs = checkpoint(layer, x, rope, ctx, state, cache, use_reentrant=False)
            else:
                x, state, recs = layer(x, rope, ctx, state, cache)
            records.extend(recs)
        if cache is not None:
            cache.advance(S)
        with record_stage("norms"):
            h = self.norm(x)
        logits = loss = None
        with record_stage("head_loss"):
            if targets_BS is None or return_logits:
                logits = self.head(h)
            if targets_BS is not None:
                targets_T = targets_BS.reshape(-1)
                if logits is None:   # chunked and fused with its gradient; no logits kept
                    loss = head_cross_entropy(h.flatten(0, 1), self.head.weight, targets_T)
                else:
                    loss = F.cross_entropy(logits.float().flatten(0, 1), targets_T, ignore_index=IGNORE_INDEX)
        aux = torch.stack([r.loss for r in records]).sum() if records else h.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits, loss, aux, records)
