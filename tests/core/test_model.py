from __future__ import annotations

import pytest
import torch

from moectl.core import MoETransformer, router_registry
from moectl.core.layers import Attention, rope_tables
from tests.core.helpers import tiny_args


def _model(**moe):
    torch.manual_seed(0)
    return MoETransformer(tiny_args(**moe))


def _batch(B=2, S=16, V=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def test_forward_shapes_and_losses():
    model = _model()
    x, y = _batch()
    out = model(x, y)
    assert out.logits is None   # with targets the loss is computed without keeping logits
    full = model(x, y, return_logits=True)
    assert full.logits.shape == (2, 16, 64)
    torch.testing.assert_close(full.loss, out.loss)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.05)
    assert len(out.records) == 2
    torch.testing.assert_close(out.aux_loss, sum(r.loss for r in out.records))
    for r in out.records:
        assert r.load_E.sum().item() == 2 * 16 * 2
        assert set(r.losses) == {"load_balance", "z_loss"}


@pytest.mark.parametrize("kind", sorted(k for k in router_registry() if k != "expert_choice"))
def test_causal(kind):
    """Changing a later token never changes earlier logits (token-choice routing is per token)."""
    model = _model(router_kind=kind).eval()
    x, _ = _batch(B=1)
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 64
    a, b = model(x).logits, model(x2).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_expert_choice_is_not_causal():
    """Expert choice looks at the whole batch (documented): a future token can change the past."""
    model = _model(router_kind="expert_choice").eval()
    torch.manual_seed(3)
    x, _ = _batch(B=1)
    changed = False
    for pos in range(8, 16):
        x2 = x.clone()
        x2[0, pos] = (x2[0, pos] + 7) % 64
        changed |= not torch.allclose(model(x).logits[:, :8], model(x2).logits[:, :8])
    assert changed


def _grads(model, x, y):
    model.zero_grad()
    out = model(x, y)
    out.total_loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["topk", "topp", "hash"])
def test_activation_checkpointing_same_result(kind):
    """Recomputation gives the same loss, aux loss and gradients, with jitter on, counting aux once."""
    model = _model(router_kind=kind, router_options={"jitter_eps": 0.2} if kind == "topk" else {})
    model.train()
    x, y = _batch()
    torch.manual_seed(5)
    ref, ref_grads = _grads(model, x, y)
    model.activation_checkpointing = True
    torch.manual_seed(5)
    out, grads = _grads(model, x, y)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert len(out.records) == len(ref.records)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_gqa_matches_repeated_heads():
    torch.manual_seed(0)
    attn = Attention(32, n_heads=4, n_kv_heads=2)
    attn.init_weights(0.2, 0.2)
    x = torch.randn(2, 8, 32)
    rope = rope_tables(8, 8, 10000.0, x.device)
    full = Attention(32, n_heads=4, n_kv_heads=4)
    with torch.no_grad():
        full.wq.weight.copy_(attn.wq.weight)
        full.wo.weight.copy_(attn.wo.weight)
        for src, dst in ((attn.wk, full.wk), (attn.wv, full.wv)):
            w = src.weight.view(2, 8, 32)
            dst.weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    torch.testing.assert_close(attn(x, rope), full(x, rope), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    args = tiny_args()
    args.tie_embeddings = True
    model = MoETransformer(args)
    assert model.head.weight is model.embed.weight


def test_dense_model_has_no_records():
    args = tiny_args()
    args.moe = None
    out = MoETransformer(args)(*_batch())
    assert out.records == [] and out.aux_loss.item() == 0


def test_after_step_reaches_routers():
    model = _model(router_options={"bias_update_rate": 0.5})
    loads = [torch.tensor([4.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    model.after_step(loads)
    first, second = (layer.router.expert_bias for layer in model.routed_layers())
    assert first.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert second.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_seeded_init_is_reproducible():
    a, b = _model(), _model()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("options", [dict(head_dim=12), dict(attention_bias="qkv"), dict(attention_bias="all"),
                                     dict(qk_norm="head"), dict(qk_norm="projection"), dict(qkv_clip=0.05)])
def test_attention_options_are_causal_and_take_effect(options):
    import dataclasses

    torch.manual_seed(0)
    plain = MoETransformer(tiny_args())
    torch.manual_seed(0)
    model = MoETransformer(dataclasses.replace(tiny_args(), **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "_norm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    attn = model.layers[0].attn
    hd = options.get("head_dim", 8)
    assert attn.wq.out_features == 4 * hd and attn.wo.in_features == 4 * hd
    assert (attn.wq.bias is not None) == (options.get("attention_bias", "none") != "none")
    assert (attn.wo.bias is not None) == (options.get("attention_bias") == "all")
    if "qk_norm" in options:
        assert attn.q_norm.weight.shape == ((hd,) if options["qk_norm"] == "head" else (4 * hd,))
    x, _ = _batch(B=1)
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 64
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
        assert not torch.allclose(a, plain.eval()(x).logits, atol=1e-4)
    torch.testing.assert_close(a[:, :10], b[:, :10])


def test_sigmoid_shared_mix():
    torch.manual_seed(0)
    layer = MoETransformer(tiny_args(shared_experts=1, shared_mix="sigmoid")).routed_layers()[0]
    assert layer.shared_gate.weight.shape == (1, 32) and layer.shared_gate.bias is None
    x = torch.randn(5, 32)
    routed = torch.randn(5, 32)
    want = routed + torch.sigmoid(x @ layer.shared_gate.weight.t()) * layer.shared(x)
    torch.testing.assert_close(layer.mix_shared(routed, x), want)
