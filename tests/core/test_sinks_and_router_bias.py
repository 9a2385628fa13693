"""GPT-OSS's attention sinks and router bias, against the formulas transformers writes out."""

from __future__ import annotations

import math

import pytest
import torch

from moectl.core import ModelArgs, MoETransformer
from moectl.core.layers import Attention, apply_rope_reference, rope_tables
from moectl.core.routers import RouteContext, make_router
from tests.core.helpers import router_args


def sink_reference(attn: Attention, x, rope, window=None):
    """transformers' eager GPT-OSS attention: scores, mask, the sink appended per head, the max
    subtracted, softmax, the sink's column dropped."""
    q, k, v = attn.project(x)
    S = x.shape[1]
    q, k = apply_rope_reference(q, rope[0][:S], rope[1][:S]), apply_rope_reference(k, rope[0][:S], rope[1][:S])
    groups = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * attn.head_dim ** -0.5
    i, j = torch.arange(S)[:, None], torch.arange(S)
    allowed = (j <= i) & ((j > i - window) if window else True)
    scores = scores + torch.where(allowed, 0.0, float("-inf"))
    logits = torch.cat([scores, attn.sinks.reshape(1, -1, 1, 1).expand(x.shape[0], -1, S, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    y = logits.softmax(-1)[..., :-1] @ v
    return attn.wo(y.transpose(1, 2).reshape(x.shape[0], S, -1))


@pytest.mark.parametrize("window", [None, 4])
def test_attention_sinks_match_the_formula(window):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, bias="all", window=window, sinks=True)
    with torch.no_grad():
        attn.sinks.copy_(torch.randn(4) * 2)
    x = torch.randn(2, 10, 32)
    rope = rope_tables(10, 8, 1e4, torch.device("cpu"))
    torch.testing.assert_close(attn(x, rope), sink_reference(attn, x, rope, window), rtol=1e-5, atol=1e-6)
    # a sink takes attention away: a very negative one changes nothing, a large one almost everything
    with torch.no_grad():
        attn.sinks.fill_(-1e4)
        plain = Attention(32, 4, 2, bias="all", window=window)
        plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "sinks"})
        torch.testing.assert_close(attn(x, rope), plain(x, rope), rtol=1e-5, atol=1e-6)


def test_sinks_decode_like_the_full_forward():
    torch.manual_seed(0)
    model = MoETransformer(ModelArgs(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=32,
                                     attention_sinks=True, sliding_window=3, sliding_layers="even")).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.sinks.copy_(torch.randn(4))
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(32)
        steps = [model(tokens[:, :4], cache=cache).logits]
        steps += [model(tokens[:, t:t + 1], cache=cache).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_router_bias_matches_gpt_oss_routing():
    """GPT-OSS routes by the top-k of W x + b and a softmax over those k logits: the same experts
    and weights as moectl's softmax over all experts, renormalised over the k."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    cfg = transformers.GptOssConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=3)
    theirs = GptOssTopKRouter(cfg)
    ours = make_router(router_args("topk", d_model=16, num_experts=8, top_k=3, gate_bias=True))
    torch.manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(8, 16))
        theirs.bias.copy_(torch.randn(8))
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
    x = torch.randn(20, 16)
    _, w_theirs, ids_theirs = theirs(x)
    out = ours(x, RouteContext())
    a = torch.zeros(20, 8).scatter(1, ids_theirs, w_theirs)
    b = torch.zeros(20, 8).scatter(1, out.expert_ids_TK, out.weights_TK)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert math.isclose(float(out.logits_TE[0, 0]), float(x[0] @ theirs.weight[0] + theirs.bias[0]), rel_tol=1e-5)


def test_no_native_family_drops_them():
    """A model with sinks or a router bias is written as generated code, never as a class that
    would leave them out."""
    from moectl.convert.families import native_family
    from moectl.recipe.load import validate

    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48,
                moe=dict(num_experts=4, top_k=2, expert_hidden=16))
    for extra in (dict(attention_sinks=True), dict(moe=dict(base["moe"], router=dict(gate_bias=True)))):
        found, reasons = native_family(validate({"model": {**base, **extra}}, {}, "t").model)
        assert found is None, reasons
