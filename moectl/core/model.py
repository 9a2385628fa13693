"""The decoder-only MoE transformer.

Each layer is attention followed by an "MLP part" that owns its norm(s) and residual(s): a dense
FFN, a standard MoE layer, or any block kind registered in `MLP_BLOCKS`. A recurrent routing state
(None for memoryless routers) is threaded explicitly through the layer loop, and every routed layer
returns a `RoutingRecord`, so auxiliary losses are plain return values: under activation
checkpointing the recomputed forward's records are discarded and nothing is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moectl.core.compete import BernoulliCompetition, CompeteFFN, CompetitionSchedule
from moectl.core.config import ModelArgs
from moectl.core.layers import Attention, FeedForward, RMSNorm, rope_tables
from moectl.core.moe import RoutedFFN, RoutingRecord
from moectl.core.routers.base import RouteContext, router_registry

MLPResult = tuple[Tensor, Any, list[RoutingRecord]]


class DenseMLP(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.ffn = FeedForward(args.d_model, args.ffn_hidden, args.activation)

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        return h_BSD + self.ffn(self.norm(h_BSD)), state, []

    def flops_per_token(self) -> int:
        return self.ffn.flops_per_token()


def routed_ffn(args: ModelArgs, name: str) -> RoutedFFN:
    """A routed FFN configured from the model's MoE arguments; a competing one (CompeteSMoE) when
    the arguments ask for competition."""
    moe = args.moe
    assert moe is not None
    kwargs = dict(
        d_model=args.d_model, num_experts=moe.num_experts, top_k=moe.top_k,
        expert_hidden=moe.expert_hidden, activation=args.activation, backend=moe.backend,
        router_kind=moe.router_kind, router_options=moe.router_options,
        shared_experts=moe.shared_experts, shared_hidden=moe.shared_hidden or moe.expert_hidden,
        shared_mix=moe.shared_mix, capacity_factor=moe.capacity_factor,
        aux_loss_weight=moe.aux_loss_weight, z_loss_weight=moe.z_loss_weight,
        vocab_size=args.vocab_size, name=name,
    )
    if moe.competition is not None:
        return CompeteFFN(competition=moe.competition, **kwargs)
    return RoutedFFN(**kwargs)


class MoEMLP(nn.Module):
    """The standard MoE layer: h + RoutedFFN(RMSNorm(h))."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe = routed_ffn(args, f"L{layer_idx}")

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        u_TD = self.norm(h_BSD).flatten(0, 1)
        y_TD, state, record = self.moe(u_TD, ctx, state)
        return h_BSD + y_TD.view_as(h_BSD), state, [record]

    def flops_per_token(self) -> int:
        return self.moe.flops_per_token()


class CartesianMLP(nn.Module):
    """CartesianMoE (Su et al., 2024): two routed sub-layers in sequence, so an "expert" is a pair
    (a, b) of sub-experts from two sets, each sub-expert shared by N pairs:

        h_mid = h + RoutedFFN_A(RMSNorm_A(h))
        out   = h_mid + RoutedFFN_B(RMSNorm_B(h_mid))      (residual 2 adds to h_mid)

    Each sub-layer has its own router, sub-experts (model.moe.expert_hidden, half the width of a
    matched SMoE expert), optional shared expert, and balance loss; a recurrent routing state
    advances once per sub-layer."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.norm_a = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe_a = routed_ffn(args, f"L{layer_idx}a")
        self.norm_b = RMSNorm(args.d_model, eps=args.norm_eps)
        self.moe_b = routed_ffn(args, f"L{layer_idx}b")

    def forward(self, h_BSD: Tensor, ctx: RouteContext, state: Any) -> MLPResult:
        y_a, state, rec_a = self.moe_a(self.norm_a(h_BSD).flatten(0, 1), ctx, state)
        h_mid = h_BSD + y_a.view_as(h_BSD)
        y_b, state, rec_b = self.moe_b(self.norm_b(h_mid).flatten(0, 1), ctx, state)
        return h_mid + y_b.view_as(h_BSD), state, [rec_a, rec_b]

    def flops_per_token(self) -> int:
        return self.moe_a.flops_per_token() + self.moe_b.flops_per_token()


# Block kinds for MoE layers: name -> constructor(args, layer_idx).
MLP_BLOCKS: dict[str, Callable[[ModelArgs, int], nn.Module]] = {"standard": MoEMLP, "cartesian": CartesianMLP}


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.attn = Attention(args.d_model, args.n_heads, args.kv_heads)
        self.mlp = mlp

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], ctx: RouteContext, state: Any) -> MLPResult:
        h = x_BSD + self.attn(self.attn_norm(x_BSD), rope)
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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        moe_layers = set(args.moe.layers) if args.moe else set()
        block_kind = args.moe.block if args.moe else "standard"
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.embed.component = "embedding"
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, MLP_BLOCKS[block_kind](args, i) if i in moe_layers else DenseMLP(args, i))
            for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.d_model, eps=args.norm_eps)
        self.head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.head.component = "lm_head"
        if args.tie_embeddings:
            self.head.weight = self.embed.weight
        for i, layer in enumerate(self.routed_layers()):
            layer.index = layer.router.index = i
        # A module all routers share (RMoE's recurrent cell), built once from the router's options.
        self.router_shared: nn.Module | None = None
        if args.moe is not None:
            router_cls = router_registry()[args.moe.router_kind]
            self.router_shared = router_cls.shared_module(d_model=args.d_model, num_experts=args.moe.num_experts,
                                                          **args.moe.router_options)
        # Which routed layers compete in a training forward (CompeteSMoE); set by the trainer
        # (`moectl.core.compete.make_schedule`). Consulted once per training forward, outside any
        # recomputed region, so activation checkpointing sees the same decision twice.
        self.competition_schedule: CompetitionSchedule | BernoulliCompetition | None = None
        self.activation_checkpointing = False
        self.count_reducer: Callable[[Tensor], Tensor] | None = None   # see RouteContext.reduce_counts
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2 * n_layers)."""
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

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None, *, step: int | None = None) -> ModelOutput:
        B, S = tokens_BS.shape
        x = self.embed(tokens_BS)
        rope = rope_tables(S, self.args.head_dim, self.args.rope_theta, tokens_BS.device)
        compete = frozenset()
        if self.competition_schedule is not None and step is not None and self.training and torch.is_grad_enabled():
            compete = self.competition_schedule.layers_at(step)
        ctx = RouteContext(token_ids_T=tokens_BS.reshape(-1), step=step, shared=self.router_shared,
                           reduce_counts=self.count_reducer, compete=compete)
        state: Any = None
        records: list[RoutingRecord] = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x, state, recs = checkpoint(layer, x, rope, ctx, state, use_reentrant=False)
            else:
                x, state, recs = layer(x, rope, ctx, state)
            records.extend(recs)
        logits = self.head(self.norm(x))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets_BS.reshape(-1), ignore_index=-100)
        aux = torch.stack([r.loss for r in records]).sum() if records else logits.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits, loss, aux, records)
