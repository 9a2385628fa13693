"""Sliding-window attention: a query at position i attends to keys i - W + 1 .. i, in the layers
`sliding_layers` names; the same with a KV cache; refused settings; counted FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from moectl.core import ModelArgs, MoETransformer
from moectl.core.layers import Attention, attention_mask, rope_tables


def reference(attn: Attention, x, rope, window):
    """Attention written out: every score, masked outside the causal window, softmax, values."""
    q, k, v = attn.project(x)
    from moectl.core.layers import apply_rope_reference

    S = x.shape[1]
    q, k = apply_rope_reference(q, rope[0][:S], rope[1][:S]), apply_rope_reference(k, rope[0][:S], rope[1][:S])
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    i, j = torch.arange(S)[:, None], torch.arange(S)
    allowed = (j <= i) & (j > i - window)
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(x.shape[0], S, -1))


@pytest.mark.parametrize("window", [1, 3, 7, 50])
def test_windowed_attention_matches_the_formula(window):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, window=window)
    x = torch.randn(2, 12, 32)
    rope = rope_tables(12, 8, 1e4, torch.device("cpu"))
    torch.testing.assert_close(attn(x, rope), reference(attn, x, rope, window), rtol=1e-5, atol=1e-6)


def test_masks_with_a_cache():
    # 3 cached positions, 2 new queries (positions 3 and 4), window 2: keys 2..3 and 3..4
    assert attention_mask(3, 2, 2, torch.device("cpu")).tolist() == [[False, False, True, True, False],
                                                                     [False, False, False, True, True]]
    assert attention_mask(0, 4, None, torch.device("cpu")) is None          # plain causal
    assert attention_mask(5, 1, None, torch.device("cpu")) is None          # one query sees everything
    assert attention_mask(0, 4, 10, torch.device("cpu")) is None            # a window that does not bind


def _model(**kw):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64, seq_len=32, **kw)
    return MoETransformer(args).eval()


@pytest.mark.parametrize("layers,windows", [("all", [4, 4, 4, 4]), ("even", [4, None, 4, None]),
                                            ("odd", [None, 4, None, 4]), ([1, 2], [None, 4, 4, None])])
def test_the_layers_that_slide(layers, windows):
    model = _model(sliding_window=4, sliding_layers=layers)
    assert [b.attn.window for b in model.layers] == windows


def test_decoding_with_the_cache_equals_the_full_forward():
    """Greedy decoding token by token (the KV cache, masks with a past) gives the logits of one
    forward over the whole sequence, with the window binding."""
    model = _model(sliding_window=3, sliding_layers="even")
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(32)
        steps = [model(tokens[:, :5], cache=cache).logits]
        for t in range(5, 16):
            steps.append(model(tokens[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # and the window matters: without it the logits past position 3 differ
    plain = _model()
    with torch.no_grad():
        assert not torch.allclose(plain(tokens).logits[:, 5:], full[:, 5:], atol=1e-3)


def test_flops_count_the_keys_a_query_sees():
    windowed, plain = Attention(32, 4, 4, window=8), Attention(32, 4, 4)
    assert plain.flops_per_token(128) - windowed.flops_per_token(128) == 2 * (128 - 8) * 4 * 8


@pytest.mark.parametrize(("overrides", "words"), [
    (["model.sliding_layers=even"], "has no effect without model.sliding_window"),
    (["model.sliding_window=8", "model.sliding_layers=[0, 9]"], "names a layer the model does not have"),
])
def test_refused_settings(overrides, words, corpus, write, cli):
    from tests.conftest import train_recipe_text

    r = cli("recipes", "validate", write("r.yaml", train_recipe_text(corpus)), *overrides)
    assert r.exit_code == 2 and words in r.output, r.output


def test_build_counts_and_describes_the_2025_attention_parts(cli):
    """`moectl build` counts what these parts add (sink logits, latent projections) and says what
    they do: windows, sinks, latent attention's KV cache, YaRN's temperature."""
    r = cli("build", "quickstart", "model.attention_sinks=true", "model.sliding_window=64", "--json")
    assert r.exit_code == 0, r.output
    import json

    report = json.loads(r.output)
    plain = json.loads(cli("build", "quickstart", "--json").output)
    attention = lambda rep: rep["params"]["components"]["attention"]["total"]
    assert attention(report) - attention(plain) == 4 * 4          # 4 layers x 4 heads of sink logits
    assert any("sliding-window attention: 64 positions" in n for n in report["notes"])
    assert any("attention sinks" in n for n in report["notes"])
    latent = json.loads(cli("build", "quickstart", "model.qk_norm=none",
                            "model.latent_attention={q_rank: 64, kv_rank: 32, nope_dim: 16, rope_dim: 8, v_dim: 16}",
                            "model.rope_scaling={kind: yarn, factor: 4, original_context: 128}", "--json").output)
    assert any("KV cache holds 160 values per token" in n for n in latent["notes"])
    assert any("RoPE scaled yarn x4 from 128 positions, attention temperature 1.1386" in n for n in latent["notes"])
    # 4 layers: wq_a 128x64, wq_b 64x96, wkv_a 128x40, wkv_b 32x128, wo 64x128 (the latent norms count as norms)
    assert attention(latent) == 4 * (128 * 64 + 64 * 96 + 128 * 40 + 32 * 128 + 64 * 128)
