from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import train_run, trains

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# (family, variant) -> config keyword arguments: every family's optional features on and off.
VARIANTS = {
    ("mixtral", "base"): dict(num_local_experts=4, num_experts_per_tok=2),
    ("mixtral", "tied-mha-headdim"): dict(num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=True,
                                          num_key_value_heads=4, head_dim=16, rope_theta=5e5),
    ("qwen2_moe", "base"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24),
    ("qwen2_moe", "nobias-norm-dense"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=40, qkv_bias=False,
                                             norm_topk_prob=True, mlp_only_layers=[1]),
    ("qwen2_moe", "sparse-step"): dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, decoder_sparse_step=2),
    ("qwen3_moe", "base"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=12),
    ("qwen3_moe", "bias-norm-dense-tied"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                attention_bias=True, norm_topk_prob=True, mlp_only_layers=[0],
                                                tie_word_embeddings=True),
    ("olmoe", "base"): dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    ("olmoe", "clip-bias-norm"): dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0,
                                      clip_qkv=0.3, attention_bias=True, norm_topk_prob=True),
    ("llama", "base"): dict(),
    ("llama", "llama3-rope"): dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                    "rope_theta": 5e5}),
    ("mixtral", "linear-rope"): dict(num_local_experts=4, num_experts_per_tok=2,
                                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    ("llama", "bias-tied-mha-headdim"): dict(attention_bias=True, tie_word_embeddings=True, num_key_value_heads=4,
                                             head_dim=12),
    ("qwen3", "base"): dict(head_dim=12),
    ("qwen3", "bias-tied-mha-linear-rope"): dict(attention_bias=True, tie_word_embeddings=True, num_key_value_heads=4,
                                                 rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e6}),
    ("qwen3", "qwen3-0.6b-tied"): dict(head_dim=16, tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e6),
    # dots.llm1's shape (2 shared experts, a dense first layer, scaling 2.5, renormalised), DeepSeek-V3's
    # group limit (4 groups, 2 kept), and attention biases with tied embeddings and raw weights
    ("dots1", "dots.llm1"): dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                                 moe_intermediate_size=16, first_k_dense_replace=1, norm_topk_prob=True,
                                 routed_scaling_factor=2.5, sliding_window=None, head_dim=12),
    ("dots1", "groups"): dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                              n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5,
                              sliding_window=None),
    ("dots1", "bias-tied-raw"): dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                     moe_intermediate_size=16, attention_bias=True, tie_word_embeddings=True,
                                     sliding_window=None),
    # YaRN as Qwen3 ships it (factor 4 over the original context), and with DeepSeek's mscale pair and
    # its own betas
    ("qwen3", "yarn"): dict(head_dim=12, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                          "original_max_position_embeddings": 16}),
    ("qwen3_moe", "yarn"): dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                 "original_max_position_embeddings": 16}),
    ("llama", "yarn-mscale"): dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4,
                                                    "original_max_position_embeddings": 32, "mscale": 1.0,
                                                    "mscale_all_dim": 0.707, "beta_fast": 24, "beta_slow": 2}),
    # GPT-OSS: gpt-oss-20b's shape (alternating windows, YaRN with truncate false, sinks, biases,
    # the clamped SwiGLU), one without windows, and one of MHA with plain RoPE
    ("gpt_oss", "gpt-oss-20b"): dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
                                     sliding_window=8, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                        "beta_fast": 32.0, "beta_slow": 1.0,
                                                                        "truncate": False, "rope_theta": 150000.0,
                                                                        "original_max_position_embeddings": 16}),
    ("gpt_oss", "window-covers-context"): dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                                               head_dim=8, sliding_window=64,
                                               rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                                                "original_max_position_embeddings": 32}),
    ("gpt_oss", "mha-default-rope"): dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=16,
                                          num_key_value_heads=4, sliding_window=6,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # DeepSeek-V3's shape (query latent, 4 groups keep 2, scale 2.5, a dense first layer, YaRN with
    # the mscale pair), Moonlight / V2-Lite's direct queries, and Kimi K2's attention biases
    ("deepseek_v3", "v3"): dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                moe_intermediate_size=16, first_k_dense_replace=1, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4,
                                q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                v_head_dim=8, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                               "original_max_position_embeddings": 16,
                                                               "mscale": 1.0, "mscale_all_dim": 1.0}),
    ("deepseek_v3", "moonlight-direct-q"): dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                                                moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
                                                topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
                                                num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    ("deepseek_v3", "kimi-k2-biases"): dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                            moe_intermediate_size=16, first_k_dense_replace=0, n_group=1,
                                            topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                                            num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
                                            qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, attention_bias=True),
    # DeepSeek-V2's shape (query latent, group-limited greedy over 4 groups, scale 16), V2-Lite's
    # (direct queries, greedy top-6 of 8 with 2 shared experts, a dense first layer), and YaRN's mscale
    ("deepseek_v2", "v2"): dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                moe_intermediate_size=16, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                n_group=4, topk_group=2, routed_scaling_factor=16.0, num_key_value_heads=4,
                                q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    ("deepseek_v2", "v2-lite"): dict(n_routed_experts=8, num_experts_per_tok=6, n_shared_experts=2,
                                     moe_intermediate_size=16, first_k_dense_replace=1, topk_method="greedy",
                                     num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                     qk_rope_head_dim=8, v_head_dim=8),
    ("deepseek_v2", "yarn-mscale"): dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                         moe_intermediate_size=16, first_k_dense_replace=0, topk_method="greedy",
                                         routed_scaling_factor=1.0, num_key_value_heads=4, q_lora_rank=16,
                                         kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
                                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                          "original_max_position_embeddings": 16, "mscale": 0.707,
                                                          "mscale_all_dim": 0.707}),
    # Qwen2.5-7B's shape (GQA, theta 1e6, untied), Qwen2.5-0.5B's (tied), and MHA with linear RoPE
    ("qwen2", "qwen2.5-7b"): dict(rope_theta=1e6),
    ("qwen2", "qwen2.5-0.5b-tied"): dict(rope_theta=1e6, tie_word_embeddings=True, num_key_value_heads=1),
    ("qwen2", "mha-linear-rope"): dict(num_key_value_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                               "rope_theta": 1e6}),
    # Mistral-7B v0.3 (no window, theta 1e6), Mistral-Nemo (head_dim apart from d_model / heads), and
    # v0.1's window where it covers the whole context
    ("mistral", "7b-v0.3"): dict(sliding_window=None, rope_theta=1e6),
    ("mistral", "nemo-headdim"): dict(sliding_window=None, head_dim=12, rope_theta=1e6),
    ("mistral", "7b-v0.1-window"): dict(sliding_window=64),
    # sliding windows that bind (the test sequences are longer than the window): every layer
    # (Mistral v0.1, Mixtral), Qwen2's top layers, an explicit alternation, dots1's top layers
    ("mistral", "binding-window"): dict(sliding_window=8),
    ("mixtral", "binding-window"): dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    ("qwen2", "sliding-top-layers"): dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ("qwen3", "alternating-windows"): dict(head_dim=12, use_sliding_window=True, sliding_window=6,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ("dots1", "sliding-top-layers"): dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                          moe_intermediate_size=16, sliding_window=8, max_window_layers=2),
}


def hf_config(family: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**SIZES, **kw})


def hf_model(family: str, seed: int = 0, **kw):
    """A tiny random transformers model of the family, every tensor perturbed (norm weights,
    biases and all), so that no reordering can hide behind ones and zeros."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def rel_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


@pytest.fixture(scope="session")
def tokens():
    import torch

    return torch.randint(0, SIZES["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
@trains
def dense_run(corpus, tmp_path_factory) -> Path:
    """A tiny trained dense run with a tokenizer."""
    return train_run(corpus, tmp_path_factory.mktemp("convert-dense"), "dense", ["model.moe=null"])
