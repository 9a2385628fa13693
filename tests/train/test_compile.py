"""`train.compile: true`: the same losses as eager, and a block that fails to compile is named
and runs eagerly."""

from __future__ import annotations

import pytest
import torch

from moectl.train import compiling
from tests.conftest import train_recipe_text
from tests.train.helpers import losses

pytestmark = [pytest.mark.train, pytest.mark.processes]   # torch.compile starts its worker processes


def _train(cli, corpus, write, tmp_path, name, **settings):
    recipe = write(f"{name}.yaml", train_recipe_text(corpus, max_steps=3, eval_every="null",
                                                     checkpoint_every="null", **settings))
    result = cli("train", recipe, "--run-dir", tmp_path / name)
    assert result.exit_code == 0, result.output
    return losses(tmp_path / name), result.output


def _inductor_builds() -> str | None:
    """Why torch.compile's default backend cannot build a kernel in this environment, or None.
    (PyTorch's C++ kernels fail to link when torch is installed under a path with spaces.)"""
    try:
        torch.compile(lambda x: (x * 2).sin())(torch.randn(4))
    except Exception as e:   # whatever the compiler raises: this environment cannot compile
        return f"torch.compile cannot build kernels here ({type(e).__name__}; torch at {torch.__file__})"
    return None


@pytest.mark.slow
def test_compiled_training_matches_eager(cli, corpus, write, tmp_path):
    reason = _inductor_builds()
    if reason:
        pytest.skip(reason)
    eager, _ = _train(cli, corpus, write, tmp_path, "eager")
    compiled, out = _train(cli, corpus, write, tmp_path, "compiled", compile="true")
    assert "could not be compiled" not in out
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step


def test_block_that_fails_to_compile_runs_eagerly(cli, corpus, write, tmp_path, monkeypatch):
    class BackendCompilerFailed(Exception):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise BackendCompilerFailed("inductor: no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, _ = _train(cli, corpus, write, tmp_path, "eager")
    fallback, out = _train(cli, corpus, write, tmp_path, "fallback", compile="true")
    assert "layers.0 (MoEMLP) could not be compiled" in out and "layers.1 (MoEMLP)" in out
    assert "no C++ compiler found" in out and "runs eagerly" in out
    assert fallback == eager


def test_model_errors_are_not_swallowed():
    """An error of the model's own code under compile surfaces as it is (not as a fallback)."""
    assert not compiling.compiler_error(ValueError("shape mismatch"))
    exc = type("InductorError", (Exception,), {})
    assert compiling.compiler_error(exc("x"))


def test_recurrent_routing_compiles_attention_only():
    """RMoE's state crosses blocks; those blocks keep their MLP part eager (with a message)."""
    from moectl.core import ModelArgs, MoEArgs, MoETransformer
    from moectl.core.routers.recurrent import RecurrentOptions

    model = MoETransformer(ModelArgs(vocab_size=32, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, moe=MoEArgs(
        num_experts=4, top_k=2, expert_hidden=16, layers=[0, 1], router=RecurrentOptions(hidden=8))))
    said = []
    names = compiling.compile_model(model, said.append)
    assert names == ["layers.0.attn (Attention)", "layers.1.attn (Attention)"]
    assert any("recurrent router's state crosses blocks" in m for m in said)
    for block in model.layers:
        assert "forward" in vars(block.attn) and "forward" not in vars(block)
