"""Dense building blocks: RMSNorm, rotary embeddings, causal attention, feed-forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.cache import KVCache

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}


def mlp_matrices(activation: str) -> int:
    """Matrices per FFN: 3 for the gated SwiGLU, 2 otherwise (the FLOPs convention's m)."""
    return 3 if activation == "swiglu" else 2


class RMSNorm(nn.RMSNorm):
    component = "norm"


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin tables [S, head_dim/2] in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angles (interleaved layout)."""
    x = x_BHSd.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHSd.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with optional grouped key/value heads (no biases)."""

    component = "attention"

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """`rope` holds the tables of this forward's positions. With a `cache`, the new tokens sit
        after the `cache.length` cached ones: their keys and values are appended (as `layer`) and
        each new query attends to every cached key and, causally, to the new ones."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope[0][:S], rope[1][:S]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(layer, k, v)
        mask = None
        if past and S > 1:   # query i (position past + i) sees keys 0 .. past + i
            mask = torch.arange(past + S, device=q.device) <= torch.arange(past, past + S, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def flops_per_token(self, seq_len: int) -> int:
        d, dh, nh, nkv = self.wq.in_features, self.head_dim, self.n_heads, self.n_kv_heads
        return 2 * d * dh * (nh + 2 * nkv) + 2 * nh * dh * d + 2 * seq_len * nh * dh


class FeedForward(nn.Module):
    """Dense FFN: SwiGLU (w2(silu(w1 x) * w3 x)) or a plain two-matrix MLP."""

    component = "dense_ffn"

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation, self.act = activation, ACTIVATIONS[activation]
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)

    def flops_per_token(self) -> int:
        return mlp_matrices(self.activation) * 2 * self.w1.in_features * self.w1.out_features
