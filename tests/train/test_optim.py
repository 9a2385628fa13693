from __future__ import annotations

import pytest
import torch

from moectl.core import MoETransformer
from moectl.recipe.schema import TrainConfig
from moectl.train.optim import lr_factor, param_groups
from tests.core.helpers import tiny_args


def test_no_decay_on_norms_biases_embeddings():
    args = tiny_args(shared_experts=1, shared_mix="gate")
    model = MoETransformer(args)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in no_decay_names
    assert all("norm" in n or n.endswith("bias") or n == "embed.weight" for n in no_decay_names)
    assert "layers.0.mlp.moe.experts.w1" in decay_names and "head.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def _curve(**kw):
    cfg = TrainConfig(**kw)
    return [lr_factor(s, 100, cfg) for s in range(100)]


def test_warmup_cosine():
    c = _curve(warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert c[0] == pytest.approx(0.1) and c[9] == pytest.approx(1.0)
    assert c[10] == pytest.approx(1.0) and c[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[10:], c[11:], strict=False))


def test_wsd():
    c = _curve(warmup_steps=5, lr_schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert c[5:80] == [1.0] * 75
    assert c[-1] == pytest.approx(0.0) and c[90] == pytest.approx(0.45)


def test_constant():
    assert _curve(lr_schedule="constant", warmup_steps=2)[1:] == [1.0] * 99


def test_optimizer_is_adamw():
    from moectl.train.optim import make_optimizer

    opt = make_optimizer(MoETransformer(tiny_args()), TrainConfig(lr=1e-3, beta2=0.99))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)


def test_resumed_optimizer_takes_the_recipes_settings():
    """After loading a checkpoint's optimizer state, the recipe's betas, eps and weight decay apply
    (decay only on the decay group), and each step's lr is a function of the step alone."""
    from moectl.train.optim import apply_hyperparameters, make_optimizer, set_lr

    model = MoETransformer(tiny_args())
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    new = TrainConfig(lr=5e-4, weight_decay=0.3, beta1=0.8, beta2=0.9, adam_eps=1e-6, warmup_steps=10,
                      max_steps=100)
    apply_hyperparameters(opt, new)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert set_lr(opt, 4, 100, new) == pytest.approx(5e-4 * 5 / 10)
    assert all(g["lr"] == pytest.approx(2.5e-4) for g in opt.param_groups)
