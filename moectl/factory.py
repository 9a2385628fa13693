"""From a validated recipe to engine objects. The one place that knows both sides."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moectl.recipe.schema import ModelConfig, Recipe

if TYPE_CHECKING:
    import torch

    from moectl.core import ModelArgs, MoETransformer


def model_args(cfg: ModelConfig) -> ModelArgs:
    from moectl.core import ModelArgs, MoEArgs
    from moectl.core.config import CompetitionArgs

    moe = None
    if cfg.moe is not None:
        m = cfg.moe
        moe = MoEArgs(
            num_experts=m.num_experts, top_k=m.top_k, expert_hidden=m.expert_hidden,
            layers=m.layer_indices(cfg.n_layers), shared_experts=m.shared_experts,
            shared_hidden=m.shared_hidden, shared_mix=m.shared_mix, capacity_factor=m.capacity_factor,
            backend=m.backend, aux_loss_weight=m.aux_loss_weight, z_loss_weight=m.z_loss_weight,
            block=m.block, router_kind=m.router.kind, router_options=m.router.model_dump(exclude={"kind"}),
            competition=CompetitionArgs(**m.competition.model_dump()) if m.competition else None,
        )
    return ModelArgs(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, ffn_hidden=cfg.ffn_hidden, activation=cfg.activation,
        seq_len=cfg.seq_len, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
        scale_residual_init=cfg.scale_residual_init, moe=moe,
    )


def build_model(recipe: Recipe, device: str | torch.device | None = None) -> MoETransformer:
    """Instantiate the recipe's model, initialised from the recipe's seed. device="meta" builds the
    structure without allocating memory (for counting)."""
    import torch

    from moectl.core import MoETransformer

    args = model_args(recipe.model)
    if str(device) == "meta":
        with torch.device("meta"):
            return MoETransformer(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = MoETransformer(args)
    return model.to(device) if device is not None else model
