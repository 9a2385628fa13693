"""`moectl generate` and `moectl.core.generation`: KV-cache parity, sampling, limits and refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from moectl.core import MoETransformer, RoutingMode
from moectl.core.compete import CompetitionOptions
from moectl.core.generation import (
    GenerationError,
    check_generatable,
    generate,
    generate_ids,
    next_token,
)
from tests.conftest import train_recipe_text
from tests.core.helpers import tiny_args

DECODING = RoutingMode(decoding=True)

CONFIGS = {
    "topk": dict(),
    "topk-sigmoid-bias": dict(router_options=dict(score_func="sigmoid", renormalize=False, bias_update_rate=0.01)),
    "topp": dict(router_kind="topp", router_options=dict(p=0.6)),
    "hash": dict(router_kind="hash"),
    "recurrent": dict(router_kind="recurrent", router_options=dict(hidden=16)),
    "recurrent-lstm-residual": dict(router_kind="recurrent", router_options=dict(hidden=16, cell="lstm",
                                                                                 logit_residual=0.5)),
    "cartesian": dict(block="cartesian"),
    "shared-add": dict(shared_experts=1),
    "shared-gate": dict(shared_experts=1, shared_mix="gate"),
    "competition": dict(competition=CompetitionOptions()),
    "capacity": dict(capacity_factor=0.5),
    "gqa": dict(n_kv_heads=2),
    "shared-sigmoid": dict(shared_experts=1, shared_mix="sigmoid"),
    "attention-head-norm-bias-clip": dict(model=dict(n_kv_heads=2, head_dim=12, attention_bias="all",
                                                     qk_norm="head", qkv_clip=0.5)),
    "attention-projection-norm": dict(model=dict(qk_norm="projection", attention_bias="qkv")),
}


def tiny_model(seed: int = 0, n_kv_heads: int | None = None, model: dict | None = None, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    args = tiny_args(**kw)
    if n_kv_heads is not None:
        args = dataclasses.replace(args, n_kv_heads=n_kv_heads)
    args = dataclasses.replace(args, **(model or {}))
    model = MoETransformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:   # not zeros and ones
                p.copy_(1 + 0.3 * torch.randn(p.shape) if "norm" in name else 0.3 * torch.randn(p.shape))
        for layer in model.routed_layers():
            bias = getattr(layer.router, "expert_bias", None)
            if bias is not None:   # a trained-looking selection bias, so it takes part in the check
                bias.copy_(torch.randn(bias.shape) * 0.1)
            if layer.shared_gate is not None and layer.shared_gate.bias is not None:
                layer.shared_gate.bias.copy_(torch.randn(2))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_one_forward(name):
    model = tiny_model(**CONFIGS[name])
    tokens = torch.randint(0, model.args.vocab_size, (1, model.args.seq_len),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens, mode=DECODING).logits
        cache = model.new_cache()
        pieces = [model(tokens[:, :5], cache=cache).logits]             # prefill
        pieces += [model(tokens[:, i:i + 1], cache=cache).logits for i in range(5, 9)]   # one at a time
        pieces.append(model(tokens[:, 9:], cache=cache).logits)        # a block after a cache
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(pieces, 1), reference, rtol=1e-5, atol=1e-5)


def test_decoding_turns_the_capacity_limit_off():
    model = tiny_model(capacity_factor=0.5)
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        capped, decoding = model(tokens).records, model(tokens, mode=DECODING).records
    assert sum(float(r.dropped) for r in capped) > 0
    assert sum(float(r.dropped) for r in decoding) == 0


def test_the_cache_refuses_more_than_its_positions():
    model = tiny_model()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="16 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), mode=DECODING).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_is_deterministic_and_matches_uncached_decoding():
    model = tiny_model(router_kind="recurrent", router_options=dict(hidden=16))
    prompt = [3, 14, 15, 9]
    first = generate_ids(model, prompt, 8)
    assert len(first) == 8
    assert generate_ids(model, prompt, 8) == first
    assert first == _greedy_without_cache(model, prompt, 8)


def test_generation_feeds_one_token_at_a_time_after_the_prompt():
    model = tiny_model()
    seen = []
    model.embed.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    assert len(generate_ids(model, [1, 2, 3, 4], 5)) == 5
    assert seen == [(1, 4), (1, 1), (1, 1), (1, 1), (1, 1)]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_generator_alone():
    model = tiny_model()
    prompt = [1, 2, 3]
    rng = torch.get_rng_state()
    a = generate_ids(model, prompt, 12, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert generate_ids(model, prompt, 12, temperature=1.5, seed=7) == a
    assert generate_ids(model, prompt, 12, temperature=1.5, seed=8) != a
    assert a != generate_ids(model, prompt, 12)   # sampling, not greedy


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model = tiny_model()
    prompt = [5, 6, 7]
    greedy = generate_ids(model, prompt, 10)
    assert generate_ids(model, prompt, 10, temperature=2.0, top_k=1, seed=3) == greedy
    assert generate_ids(model, prompt, 10, temperature=2.0, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    drawn_k = {next_token(logits, 1.0, 3, None, gen) for _ in range(400)}
    assert drawn_k == {0, 1, 2}
    probs = logits.softmax(-1)           # 0.55, 0.20, 0.12, ...: the nucleus of 0.7 is {0, 1}
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    drawn_p = {next_token(logits, 1.0, None, 0.7, gen) for _ in range(400)}
    assert drawn_p == {0, 1}
    assert len({next_token(logits, 1.0, None, None, gen) for _ in range(400)}) == 6


def test_generation_stops_at_seq_len():
    model = tiny_model()      # seq_len 16
    result = generate(model, list(range(10)), 100, temperature=1.0)
    assert len(result.ids) == 6 and result.stopped == "seq_len"
    assert generate(model, list(range(10)), 6).stopped == "max_new_tokens"
    assert generate_ids(model, list(range(16)), 5) == []
    with pytest.raises(GenerationError, match="longer than the model's 16 positions"):
        generate_ids(model, list(range(17)), 5)


def test_stop_ids_and_stop_callback():
    model = tiny_model()
    prompt = [9, 8, 7]
    greedy = generate_ids(model, prompt, 10)
    stop_id = greedy[3]
    cut = greedy.index(stop_id)
    result = generate(model, prompt, 10, stop_ids={stop_id})
    assert result.ids == greedy[:cut] and result.stopped == "stop_id"   # the stop id is left out
    assert generate_ids(model, prompt, 10, stop=lambda new: len(new) >= 4) == greedy[:4]


def test_bad_settings_are_refused():
    model = tiny_model()
    for kwargs in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=0.0),
                   dict(temperature=1.0, top_p=1.5)):
        with pytest.raises(GenerationError):
            generate_ids(model, [1], 3, **kwargs)
    with pytest.raises(GenerationError, match="prompt is empty"):
        generate_ids(model, [], 3)


def test_expert_choice_is_refused():
    model = tiny_model(router_kind="expert_choice")
    with pytest.raises(GenerationError, match="expert_choice: it is not causal") as err:
        check_generatable(model)
    assert err.value.hint
    with pytest.raises(GenerationError, match="not causal"):
        generate_ids(model, [1, 2], 3)
    check_generatable(tiny_model())


def test_the_model_is_left_in_training_mode():
    model = tiny_model().train()
    generate_ids(model, [1, 2], 2)
    assert model.training


# --------------------------------------------------------------------------- the command


def _files(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cli_generates_text_and_writes_nothing(cli, trained_run):
    before = _files(trained_run)
    result = cli("generate", trained_run, "--prompt", "def", "--temperature", "0", "--max-new-tokens", "8",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def") and len(result.stdout.strip()) > len("def")
    again = cli("generate", trained_run, "--prompt", "def", "--temperature", "0", "--max-new-tokens", "8")
    assert again.exit_code == 0 and again.stdout == result.stdout
    assert _files(trained_run) == before


def test_cli_samples_reproducibly(cli, trained_run):
    args = ("generate", trained_run, "--prompt", "import ", "--temperature", "1.0", "--max-new-tokens", "10")
    one, two = cli(*args, "--seed", "1"), cli(*args, "--seed", "1")
    assert one.exit_code == 0 and one.stdout == two.stdout
    both = cli(*args, "--seed", "1", "--num-samples", "2")
    assert both.exit_code == 0
    assert both.stdout.count("--- sample") == 2 and "(seed 2)" in both.stdout
    assert cli(*args, "--num-samples", "2", "--temperature", "0").exit_code == 2


def test_cli_stops_at_seq_len_with_a_note(cli, trained_run):
    result = cli("generate", trained_run, "--prompt", "def", "--temperature", "0", "--max-new-tokens", "500")
    assert result.exit_code == 0, result.output
    assert "fill the model's 32 positions" in result.stderr


def test_cli_refuses_bad_prompts(cli, trained_run):
    empty = cli("generate", trained_run, "--prompt", "")
    assert empty.exit_code == 2
    assert "--prompt is empty" in empty.stderr and "hint" in empty.stderr
    long = cli("generate", trained_run, "--prompt", "def f(x):\n    return x\n" * 20)
    assert long.exit_code == 2
    assert "positions" in long.stderr and "shorten the prompt" in long.stderr


@pytest.fixture(scope="module")
def saved(corpus, trained_run, tmp_path_factory):
    """Initialised checkpoints (`moectl build --save`) of the trained run's recipe, changed by
    overrides; `with_tokenizer` gives them the trained run's tokenizer."""
    from typer.testing import CliRunner

    from moectl.cli.app import app

    root = tmp_path_factory.mktemp("saved")
    recipe = root / "recipe.yaml"
    recipe.write_text(train_recipe_text(corpus))

    def save(name: str, *overrides: str, with_tokenizer: bool = False) -> Path:
        out = root / name
        result = CliRunner().invoke(app, ["build", str(recipe), *overrides, "--save", str(out)])
        assert result.exit_code == 0, result.output
        if with_tokenizer:
            shutil.copy(trained_run / "tokenizer.json", out / "tokenizer.json")
        return out

    return save


def test_cli_refuses_expert_choice(cli, saved):
    folder = saved("ec", "model.moe.router.kind=expert_choice", with_tokenizer=True)
    result = cli("generate", folder, "--prompt", "def")
    assert result.exit_code == 2
    assert "not causal" in result.stderr


def test_cli_needs_a_tokenizer(cli, saved):
    result = cli("generate", saved("plain"), "--prompt", "def")
    assert result.exit_code == 2
    assert "no tokenizer" in result.stderr


def test_cli_notes_the_capacity_limit_once(cli, saved):
    folder = saved("cap", "model.moe.capacity_factor=1.0", with_tokenizer=True)
    result = cli("generate", folder, "--prompt", "def", "--num-samples", "2", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("capacity_factor = 1.0") == 1
    plain = cli("generate", saved("nocap", with_tokenizer=True), "--prompt", "def", "--max-new-tokens", "4")
    assert plain.exit_code == 0 and "capacity" not in plain.stderr
