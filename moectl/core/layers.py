"""Dense building blocks: RMSNorm, rotary embeddings, causal attention, feed-forward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.cache import KVCache

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu,
                                                      "swiglu_clamped": F.silu}
GATED = ("swiglu", "swiglu_clamped")   # activations with a gate and an up projection (w1, w3)
CLAMP_ALPHA, CLAMP_LIMIT = 1.702, 7.0    # GPT-OSS's swiglu_alpha and swiglu_limit


def clamped_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """GPT-OSS's gated unit: the gate clamped above at 7 through x * sigmoid(1.702 x), times the up
    projection clamped to [-7, 7] plus one."""
    gate = gate.clamp(max=CLAMP_LIMIT)
    return (up.clamp(-CLAMP_LIMIT, CLAMP_LIMIT) + 1) * (gate * torch.sigmoid(gate * CLAMP_ALPHA))


# Gated units other than act(gate) * up, by activation name: (gate, up) -> hidden
GLUS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"swiglu_clamped": clamped_swiglu}


def mlp_matrices(activation: str) -> int:
    """Matrices per FFN: 3 for the gated units (SwiGLU, clamped SwiGLU), 2 otherwise (the FLOPs
    convention's m)."""
    return 3 if activation in GATED else 2


class RMSNorm(nn.RMSNorm):
    component = "norm"


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device: torch.device | None = None) -> Tensor:
    """The rotation frequency of each pair [head_dim/2], fp32. `scaling` stretches long wavelengths
    for a longer context: {"kind": "linear", "factor": f} divides every frequency by f; "llama3"
    (Llama 3.1) divides those whose wavelength exceeds original_context / low_freq_factor by f,
    keeps those below original_context / high_freq_factor, and blends linearly in between; "yarn"
    (Peng et al., 2023) keeps the pairs that turn more than beta_fast times over the original context,
    divides those that turn fewer than beta_slow times by f, and ramps linearly between, over pair
    indices (see `yarn_ramp`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    if scaling["kind"] == "linear":
        return inv_freq / factor
    if scaling["kind"] == "yarn":
        keep = yarn_ramp(head_dim, theta, scaling).to(inv_freq.device)   # 1: extrapolate (kept), 0: interpolate
        return inv_freq / factor * (1 - keep) + inv_freq * keep
    context, low, high = scaling["original_context"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    ratio = context / (2 * math.pi / inv_freq)          # how many wavelengths fit the original context
    blend = ((ratio - low) / (high - low)).clamp(0.0, 1.0)   # 0: long waves (scaled), 1: short (kept)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def yarn_ramp(head_dim: int, theta: float, scaling: dict) -> Tensor:
    """YaRN's share of each pair's frequency that is kept, [head_dim/2]: 1 for pair indices below the
    one that turns beta_fast times over the original context, 0 above the one that turns beta_slow
    times, linear between (bounds rounded outwards unless `truncate` is false)."""

    def pair_turning(turns: float) -> float:   # the (fractional) dimension whose wave turns `turns` times
        return head_dim * math.log(scaling["original_context"] / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.get("beta_fast", 32.0)), pair_turning(scaling.get("beta_slow", 1.0))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp


def rope_attention_factor(scaling: dict | None) -> float:
    """How much RoPE scaling multiplies the rotated queries and keys (YaRN's attention temperature:
    `attention_factor`, else 0.1 ln(f) + 1, or the ratio of that with `mscale` and `mscale_all_dim`);
    1 for the other scalings."""
    if not scaling or scaling["kind"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return m(mscale) / m(all_dim) if mscale and all_dim else m(1.0)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device,
                scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables [S, head_dim/2] in fp32 (times YaRN's attention factor when it has one)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    factor = rope_attention_factor(scaling)
    if factor != 1.0:
        return angles.cos() * factor, angles.sin() * factor
    return angles.cos(), angles.sin()


def apply_rope(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angles (interleaved layout), as one complex
    product per pair: the arithmetic of `apply_rope_reference` (equal up to the last bit's
    rounding), in one kernel forward and one backward. Compiled graphs take the real form, which
    the compiler fuses (it does not generate code for complex numbers), and so do inputs whose
    pairs cannot be viewed as complex numbers."""
    if torch.compiler.is_compiling() or x_BHSd.stride(-1) != 1 or x_BHSd.storage_offset() % 2:
        return apply_rope_reference(x_BHSd, cos, sin)
    x = torch.view_as_complex(x_BHSd.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x * torch.complex(cos, sin)).flatten(-2).to(x_BHSd.dtype)


def apply_rope_reference(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotation written out on real numbers."""
    x = x_BHSd.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHSd.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with optional grouped key/value heads. Options (all off by
    default): biases on the q/k/v projections (`bias="qkv"`) or on all four (`"all"`); RMSNorm of
    queries and keys before RoPE, per head over head_dim (`qk_norm="head"`) or over the whole
    projection (`"projection"`); clamping q, k and v to [-qkv_clip, qkv_clip] after that; a sliding
    `window` (a query at position i sees keys i - window + 1 .. i); `sinks`, a learned logit per
    head that joins every query's softmax and is dropped after it (GPT-OSS)."""

    component = "attention"

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
                 bias: str = "none", qk_norm: str = "none", qkv_clip: float | None = None,
                 norm_eps: float = 1e-5, window: int | None = None, sinks: bool = False):
        super().__init__()
        self.window = window
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.qk_norm, self.qkv_clip = qk_norm, qkv_clip
        q_out, kv_out = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, q_out, bias=bias != "none")
        self.wk = nn.Linear(d_model, kv_out, bias=bias != "none")
        self.wv = nn.Linear(d_model, kv_out, bias=bias != "none")
        self.wo = nn.Linear(q_out, d_model, bias=bias == "all")
        self.q_norm = self.k_norm = None
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_out, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_out, eps=norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.sinks is not None:   # a sink that starts at logit 0
            nn.init.zeros_(self.sinks)

    def project(self, x_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values [B, heads, S, head_dim], normalised and clipped, before RoPE."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qkv_clip is not None:
            c = self.qkv_clip
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """`rope` holds the tables of this forward's positions. With a `cache`, the new tokens sit
        after the `cache.length` cached ones: their keys and values are appended (as `layer`) and
        each new query attends to every cached key and, causally, to the new ones."""
        B, S, _ = x_BSD.shape
        q, k, v = self.project(x_BSD)
        cos, sin = rope[0][:S], rope[1][:S]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(layer, k, v)
        mask = attention_mask(past, S, self.window, q.device)
        if self.sinks is not None:
            if mask is None and not past:   # plain causal attention, written out
                mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
            y = attention_with_sinks(q, k, v, mask, self.sinks)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not past,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def build_notes(self) -> list[str]:
        notes = []
        if self.window is not None:
            notes.append(f"sliding-window attention: {self.window} positions in some or all layers (a query attends "
                         "to at most that many keys; FLOPs count those).")
        if self.sinks is not None:
            notes.append("attention sinks: a learned logit per head joins every softmax (attention written out).")
        return notes

    def flops_per_token(self, seq_len: int) -> int:
        d, dh, nh, nkv = self.wq.in_features, self.head_dim, self.n_heads, self.n_kv_heads
        seen = seq_len if self.window is None else min(seq_len, self.window)   # keys a query attends to
        return 2 * d * dh * (nh + 2 * nkv) + 2 * nh * dh * d + 2 * seen * nh * dh


LATENT_NORM_EPS = 1e-6   # the latent RMSNorms' epsilon in DeepSeek's reference (whatever the model's)


def latent_softmax_scale(args) -> float:
    """Latent attention's softmax scale: 1/sqrt(nope_dim + rope_dim), times DeepSeek's YaRN
    correction (0.1 mscale_all_dim ln f + 1)^2 when the RoPE scaling has an mscale_all_dim."""
    la = args.latent_attention
    scale = (la["nope_dim"] + la["rope_dim"]) ** -0.5
    rs = args.rope_scaling
    if rs and rs.get("kind") == "yarn" and rs.get("mscale_all_dim") and rs["factor"] > 1:
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        scale *= m * m
    return scale


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Queries: x -> wq_a -> RMSNorm -> wq_b (with a
    `q_rank`), or x -> wq; each head's query is [nope_dim | rope_dim]. Keys and values: x -> wkv_a
    gives a latent of kv_rank and one rope_dim key shared by all heads; the latent, normalised,
    -> wkv_b gives each head's [key nope_dim | value v_dim]. RoPE rotates the rope parts only (in
    moectl's interleaved pairs, DeepSeek's own layout); scores are scaled by `softmax_scale`.
    The KV cache holds the expanded keys and values."""

    component = "attention"

    def __init__(self, d_model: int, n_heads: int, q_rank: int | None, kv_rank: int, nope_dim: int, rope_dim: int,
                 v_dim: int, bias: bool = False, window: int | None = None, softmax_scale: float | None = None):
        super().__init__()
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim = n_heads, nope_dim, rope_dim, v_dim
        self.kv_rank = kv_rank
        self.window, self.sinks = window, None
        self.softmax_scale = softmax_scale or (nope_dim + rope_dim) ** -0.5
        qk = nope_dim + rope_dim
        if q_rank is None:
            self.wq, self.wq_a, self.q_norm, self.wq_b = nn.Linear(d_model, n_heads * qk, bias=False), None, None, None
        else:
            self.wq = None
            self.wq_a = nn.Linear(d_model, q_rank, bias=bias)
            self.q_norm = RMSNorm(q_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(q_rank, n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_rank + rope_dim, bias=bias)
        self.kv_norm = RMSNorm(kv_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(kv_rank, n_heads * (nope_dim + v_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_dim, d_model, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for lin in (self.wq_a, self.wkv_a, self.wo):
            if lin is not None and lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        B, S, _ = x_BSD.shape
        H, n, r = self.n_heads, self.nope_dim, self.rope_dim
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q = q.view(B, S, H, n + r).transpose(1, 2)
        kv = self.wkv_a(x_BSD)
        latent, k_rope = kv.split([self.kv_rank, r], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, H, n + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([n, self.v_dim], dim=-1)
        cos, sin = rope[0][:S], rope[1][:S]
        q_rope = apply_rope(q[..., n:], cos, sin)
        k_rope = apply_rope(k_rope.view(B, 1, S, r), cos, sin).expand(B, H, S, r)
        q = torch.cat([q[..., :n], q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(layer, k, v)
        mask = attention_mask(past, S, self.window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not past,
                                           scale=self.softmax_scale)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def build_notes(self) -> list[str]:
        H, n, r, v = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = f"query rank {self.wq_a.out_features}" if self.wq_a is not None else "direct queries"
        notes = [f"latent attention: {q}, key/value rank {self.kv_rank}, {H} heads of {n} + {r} (RoPE, shared key) "
                 f"query/key and {v} value dimensions; the KV cache holds {H * (n + r + v):,} values per token and "
                 "layer (expanded keys and values)."]
        if self.window is not None:
            notes.append(f"sliding-window attention: {self.window} positions in some or all layers.")
        return notes

    def flops_per_token(self, seq_len: int) -> int:
        d, H, n, r, v = self.wkv_a.in_features, self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = (2 * d * H * (n + r) if self.wq is not None
             else 2 * d * self.wq_a.out_features + 2 * self.wq_a.out_features * H * (n + r))
        kv = 2 * d * (self.kv_rank + r) + 2 * self.kv_rank * H * (n + v)
        seen = seq_len if self.window is None else min(seq_len, self.window)
        return q + kv + 2 * H * v * d + seen * H * (n + r + v)


def attention_with_sinks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sinks_H: Tensor) -> Tensor:
    """softmax([q k^T / sqrt(d), sink]) without the sink's column, times v: each head's sink logit
    takes a share of every query's attention. Written out (scaled-dot-product attention has no
    sinks); `mask` [S, keys] bool or None (every key visible)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks_H.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return (probs @ v.float()).to(v.dtype)


def attention_mask(past: int, S: int, window: int | None, device: torch.device) -> Tensor | None:
    """Which keys each of S new queries sees, [S, past + S] bool, after `past` cached positions:
    query i (position past + i) sees keys 0 .. past + i, and with a `window` only the last `window`
    of them. None where plain causal attention says it (no cache, no binding window) or where every
    key is visible (one new query, no binding window)."""
    if window is None or window >= past + S:
        if not past or S == 1:
            return None
        return torch.arange(past + S, device=device) <= torch.arange(past, past + S, device=device)[:, None]
    q = torch.arange(past, past + S, device=device)[:, None]
    k = torch.arange(past + S, device=device)
    return (k <= q) & (k > q - window)


class FeedForward(nn.Module):
    """Dense FFN: SwiGLU (w2(silu(w1 x) * w3 x)), GPT-OSS's clamped SwiGLU, or a plain two-matrix MLP."""

    component = "dense_ffn"

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation, self.act, self.glu = activation, ACTIVATIONS[activation], GLUS.get(activation)
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation in GATED else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        if self.glu is not None:
            return self.w2(self.glu(self.w1(x), self.w3(x)))
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)

    def flops_per_token(self) -> int:
        return mlp_matrices(self.activation) * 2 * self.w1.in_features * self.w1.out_features
