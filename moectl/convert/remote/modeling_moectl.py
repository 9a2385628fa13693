# Modeling code for a model exported by moectl (`moectl convert RUN --to hf OUT`).
#
# Self-contained: it needs only torch and transformers, never moectl. It computes what moectl's
# engine computes in evaluation (dropless routing; a competing layer routes with its router) for
# every built-in part: routers topk (softmax or sigmoid scores, aux-loss-free selection biases),
# topp, hash, expert_choice and recurrent (RMoE); the standard and cartesian blocks; shared experts
# mixed by sum, 2-way gate or sigmoid gate; grouped-query attention with optional biases, q/k
# normalisation and clipping; interleaved RoPE. Load it with
#     AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
# The model's settings are config.moectl_model (the `model` section of its moectl recipe).

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class MoectlConfig(PretrainedConfig):
    model_type = "moectl"

    def __init__(self, moectl_model=None, **kwargs):
        self.moectl_model = dict(moectl_model or {})
        m = self.moectl_model
        if m:
            kwargs.setdefault("vocab_size", m["vocab_size"])
            kwargs.setdefault("hidden_size", m["d_model"])
            kwargs.setdefault("num_hidden_layers", m["n_layers"])
            kwargs.setdefault("num_attention_heads", m["n_heads"])
            kwargs.setdefault("max_position_embeddings", m["seq_len"])
            kwargs.setdefault("tie_word_embeddings", m.get("tie_embeddings", False))
        super().__init__(**kwargs)


ACT = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _linear32(x, weight, bias=None):
    """Router arithmetic in fp32, as moectl does it, whatever dtype the model runs in."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _frequencies(head_dim, theta, scaling, device):
    """Per-pair rotation frequencies; `scaling` linear (all divided by factor) or llama3 (long
    wavelengths divided, short ones kept, blended between)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if not scaling:
        return inv
    if scaling["kind"] == "linear":
        return inv / scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    w = ((scaling["original_context"] * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (1 - w) * inv / scaling["factor"] + w * inv


def _rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1])."""
    t = x.float().unflatten(-1, (-1, 2))
    a, b = t[..., 0], t[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


class FFN(nn.Module):
    def __init__(self, d, hidden, act):
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False) if act == "swiglu" else None
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = ACT[self.act](self.w1(x))
        return self.w2(h * self.w3(x) if self.w3 is not None else h)


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        d, self.nh = m["d_model"], m["n_heads"]
        self.nkv = m.get("n_kv_heads") or self.nh
        self.hd = m.get("head_dim") or d // self.nh
        bias = m.get("attention_bias", "none")
        self.wq = nn.Linear(d, self.nh * self.hd, bias=bias != "none")
        self.wk = nn.Linear(d, self.nkv * self.hd, bias=bias != "none")
        self.wv = nn.Linear(d, self.nkv * self.hd, bias=bias != "none")
        self.wo = nn.Linear(self.nh * self.hd, d, bias=bias == "all")
        self.qk_norm, self.clip = m.get("qk_norm", "none"), m.get("qkv_clip")
        eps = m.get("norm_eps", 1e-5)
        if self.qk_norm != "none":
            per_head = self.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.hd if per_head else self.nh * self.hd, eps=eps)
            self.k_norm = nn.RMSNorm(self.hd if per_head else self.nkv * self.hd, eps=eps)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, S, -1, self.hd) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if self.nkv != self.nh:
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


# ----------------------------------------------------------------------------- routers


def _topk(scores, k, renormalize, bias=None):
    choose = scores if bias is None else scores + bias
    ids = choose.topk(k, dim=-1).indices
    w = scores.gather(-1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return ids, w, None


class Router(nn.Module):
    """Every built-in router kind; `forward(x, token_ids, shared, state) -> (ids, weights, valid, state)`."""

    def __init__(self, m, moe):
        super().__init__()
        o = self.o = dict(moe.get("router") or {"kind": "topk"})
        self.kind, self.E, self.k = o.get("kind", "topk"), moe["num_experts"], moe["top_k"]
        d = m["d_model"]
        if self.kind == "hash":
            self.register_buffer("table", torch.zeros(m["vocab_size"], self.E))
            return
        if self.kind == "recurrent":
            self.weight = nn.Parameter(torch.zeros(self.E, o.get("hidden", 128)))
            self.projector = None if o.get("shared_projector") else nn.Linear(
                d, o.get("hidden", 128), bias=o.get("projector_bias", False))
            return
        self.weight = nn.Parameter(torch.zeros(self.E, d))
        if self.kind == "topk" and o.get("bias_update_rate", 0) > 0:
            self.register_buffer("expert_bias", torch.zeros(self.E))
        else:
            self.expert_bias = None

    def forward(self, x, token_ids, shared, state):
        o, T = self.o, x.shape[0]
        if self.kind == "hash":
            probs = self.table[token_ids].float().softmax(-1)
            return (*_topk(probs, self.k, True), state)
        if self.kind == "recurrent":
            with torch.autocast(x.device.type, enabled=False):
                proj = self.projector if self.projector is not None else shared.projector
                xp = _linear32(x, proj.weight, proj.bias)
                hidden = self.weight.shape[1]
                if state is None or not o.get("pass_state", True):
                    h0 = xp.new_zeros(T, hidden)
                    c0 = xp.new_zeros(T, hidden) if o.get("cell", "gru") == "lstm" else None
                else:
                    h0, c0, _ = state
                if o.get("cell", "gru") == "lstm":
                    h, c = shared.cell(xp, (h0, c0))
                else:
                    h, c = shared.cell(xp, h0), None
                logits = F.linear(h, self.weight.float())
                if o.get("logit_residual", 0.0) and state is not None:
                    logits = logits + o["logit_residual"] * state[2]
            ids, w, valid = _topk(logits.softmax(-1), self.k, o.get("renormalize", True))
            return ids, w, valid, (h, c, logits)
        logits = _linear32(x, self.weight)
        if self.kind == "topk":
            if o.get("score_func", "softmax") == "softmax":
                scores = logits.softmax(-1)
            else:
                scores = logits.sigmoid()
            return (*_topk(scores, self.k, o.get("renormalize", True), self.expert_bias), state)
        probs = logits.softmax(-1)
        if self.kind == "topp":
            max_k = o.get("max_k") or self.E
            sp, order = probs.sort(dim=-1, descending=True)
            sp, order = sp[:, :max_k], order[:, :max_k]
            before = F.pad(sp.cumsum(-1)[:, :-1], (1, 0))
            valid = before <= o.get("p", 0.4)
            valid[:, 0] = True
            return order, sp * valid, valid, state
        if self.kind == "expert_choice":
            cap = max(1, min(T, math.ceil(o.get("capacity_factor", 1.0) * T * self.k / self.E)))
            picked = torch.zeros_like(probs, dtype=torch.bool)
            picked.scatter_(0, probs.topk(cap, dim=0).indices, True)
            width = max(1, int(picked.sum(1).max()))
            rank = picked.float() * 2 - torch.arange(self.E, device=probs.device) / self.E
            ids = rank.topk(width, dim=-1).indices
            valid = picked.gather(-1, ids)
            return ids, probs.gather(-1, ids) * valid, valid, state
        raise ValueError(f"router kind {self.kind!r} is not one this modeling code knows")


class Experts(nn.Module):
    def __init__(self, E, d, hidden, act):
        super().__init__()
        self.act = act
        self.w1 = nn.Parameter(torch.zeros(E, d, hidden))
        self.w3 = nn.Parameter(torch.zeros(E, d, hidden)) if act == "swiglu" else None
        self.w2 = nn.Parameter(torch.zeros(E, hidden, d))

    def forward(self, x, ids, weights, valid):
        """Each used slot's expert on its token, summed with the routing weights (dropless)."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            w1, w2 = w1.to(dt), w2.to(dt)
            w3 = w3.to(dt) if w3 is not None else None
        x = x.to(w1.dtype)
        out = x.new_zeros(x.shape[0], w2.shape[-1])
        used = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        for e in range(w1.shape[0]):
            tok, slot = torch.nonzero((ids == e) & used, as_tuple=True)
            if tok.numel() == 0:
                continue
            rows = x[tok]
            h = ACT[self.act](rows @ w1[e])
            if w3 is not None:
                h = h * (rows @ w3[e])
            y = (h @ w2[e]) * weights[tok, slot].to(x.dtype).unsqueeze(-1)
            out.index_add_(0, tok, y)
        return out


class RoutedFFN(nn.Module):
    def __init__(self, m):
        super().__init__()
        moe = m["moe"]
        d, act = m["d_model"], m.get("activation", "swiglu")
        self.router = Router(m, moe)
        self.experts = Experts(moe["num_experts"], d, moe["expert_hidden"], act)
        n_shared = moe.get("shared_experts", 0)
        self.shared = self.shared_gate = None
        if n_shared:
            self.shared = FFN(d, n_shared * (moe.get("shared_hidden") or moe["expert_hidden"]), act)
            self.shared_scale = 1.0 / n_shared if moe.get("shared_reduce", "sum") == "mean" else 1.0
            mix = moe.get("shared_mix", "add")
            if mix != "add":
                self.shared_gate = nn.Linear(d, 2 if mix == "gate" else 1, bias=mix == "gate")

    def forward(self, x, token_ids, shared, state):
        ids, w, valid, state = self.router(x, token_ids, shared, state)
        if valid is not None:
            w = w * valid
        y = self.experts(x, ids, w, valid)
        if self.shared is None:
            return y, state
        s = self.shared(x)
        if self.shared_scale != 1.0:
            s = s * self.shared_scale
        if self.shared_gate is None:
            return y + s, state
        g = _linear32(x, self.shared_gate.weight, self.shared_gate.bias)
        if g.shape[-1] == 1:
            return y + g.sigmoid().to(y.dtype) * s, state
        c = g.softmax(-1).to(y.dtype)
        return c[:, :1] * y + c[:, 1:] * s, state


class DenseMLP(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.empty = m["ffn_hidden"] == 0   # attention-only layer
        if not self.empty:
            self.norm = nn.RMSNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))
            self.ffn = FFN(m["d_model"], m["ffn_hidden"], m.get("activation", "swiglu"))

    def forward(self, h, token_ids, shared, state):
        if self.empty:
            return h, state
        return h + self.ffn(self.norm(h)), state


class StandardMLP(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.norm = nn.RMSNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))
        self.moe = RoutedFFN(m)

    def forward(self, h, token_ids, shared, state):
        y, state = self.moe(self.norm(h).flatten(0, 1), token_ids, shared, state)
        return h + y.view_as(h), state


class CartesianMLP(nn.Module):
    def __init__(self, m):
        super().__init__()
        eps = m.get("norm_eps", 1e-5)
        self.norm_a, self.moe_a = nn.RMSNorm(m["d_model"], eps=eps), RoutedFFN(m)
        self.norm_b, self.moe_b = nn.RMSNorm(m["d_model"], eps=eps), RoutedFFN(m)

    def forward(self, h, token_ids, shared, state):
        y, state = self.moe_a(self.norm_a(h).flatten(0, 1), token_ids, shared, state)
        h = h + y.view_as(h)
        y, state = self.moe_b(self.norm_b(h).flatten(0, 1), token_ids, shared, state)
        return h + y.view_as(h), state


class Block(nn.Module):
    def __init__(self, m, moe_layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))
        self.attn = Attention(m)
        if not moe_layer:
            self.mlp = DenseMLP(m)
        else:
            block = m["moe"].get("block") or "standard"
            block = block.get("kind", "standard") if isinstance(block, dict) else block
            self.mlp = {"standard": StandardMLP, "cartesian": CartesianMLP}[block](m)

    def forward(self, x, cos, sin, token_ids, shared, state):
        return self.mlp(x + self.attn(self.attn_norm(x), cos, sin), token_ids, shared, state)


class RecurrentCore(nn.Module):
    def __init__(self, d, o):
        super().__init__()
        hidden = o.get("hidden", 128)
        self.cell = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}[o.get("cell", "gru")](hidden, hidden)
        self.projector = nn.Linear(d, hidden, bias=o.get("projector_bias", False)) if o.get("shared_projector") else None


def moe_layer_indices(m):
    moe = m.get("moe")
    if not moe:
        return set()
    layers = moe.get("layers", "all")
    if isinstance(layers, list):
        return set(layers)
    first = moe.get("first_dense", 0)
    return set(range(first, m["n_layers"], 1 if layers == "all" else 2))


class MoectlPreTrainedModel(PreTrainedModel):
    config_class = MoectlConfig
    base_model_prefix = "moectl"
    _keep_in_fp32_modules = ["router", "shared_gate", "router_shared"]
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.moectl_model.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class MoectlForCausalLM(MoectlPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        m = config.moectl_model
        self.m = m
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        moe_layers = moe_layer_indices(m)
        self.layers = nn.ModuleList(Block(m, i in moe_layers) for i in range(m["n_layers"]))
        self.norm = nn.RMSNorm(m["d_model"], eps=m.get("norm_eps", 1e-5))
        self.head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        router = (m.get("moe") or {}).get("router") or {}
        self.router_shared = RecurrentCore(m["d_model"], router) if router.get("kind") == "recurrent" else None
        if m.get("tie_embeddings"):
            self._tied_weights_keys = {"head.weight": "embed.weight"}
            self.head.weight = self.embed.weight
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No key/value cache: every step runs the whole sequence (routing may depend on it).
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise ValueError("this model needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: give sequences of one length, unpadded")
        m = self.m
        B, S = input_ids.shape
        hd = m.get("head_dim") or m["d_model"] // m["n_heads"]
        inv = _frequencies(hd, m.get("rope_theta", 10000.0), m.get("rope_scaling"), input_ids.device)
        ang = torch.outer(torch.arange(S, device=input_ids.device, dtype=torch.float32), inv)
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(input_ids)
        token_ids, state = input_ids.reshape(-1), None
        for block in self.layers:
            x, state = block(x, cos, sin, token_ids, self.router_shared, state)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
