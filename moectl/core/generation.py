"""Sampling text from a trained model, one token at a time with a KV cache.

The prompt is run once (the prefill) into the model's KV cache; every new token is then a forward
of one token against the cache. Both route as in decoding (`RoutingMode.decoding`: no capacity
limit, which would make a token's experts depend on the other tokens of its forward), so a token
gets the logits it would get in one forward over the whole sequence in decoding mode
(`RoutingMode(decoding=True)`).

Sampling runs on the CPU in fp32 with its own `torch.Generator` seeded from `seed`: the same
seed gives the same tokens on every call (and the global random generators are never touched).
Generation never goes past the model's trained `seq_len` positions: it stops there. A request
that cannot be served (an empty or too long prompt, bad sampling settings, a router that is not
causal) raises `GenerationError`, which the command line prints as a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from moectl.core.model import MoETransformer

StopReason = Literal["max_new_tokens", "stop_id", "stop", "seq_len"]


class GenerationError(ValueError):
    """A generation request that cannot be served, with a hint on what to change."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass
class Generation:
    """New token ids (the prompt and a stop id excluded) and why generation ended: it made
    `max_new_tokens`, sampled a stop id, `stop(new_ids)` said so, or the model's seq_len positions
    were full."""

    ids: list[int]
    stopped: StopReason


def non_causal_routers(model: MoETransformer) -> list[str]:
    """The kinds of the model's routers whose choice for a token depends on other tokens."""
    kinds = {layer.router.kind or type(layer.router).__name__ for layer in model.routed_layers()
             if not getattr(layer.router, "causal", True)}
    return sorted(kinds)


def check_generatable(model: MoETransformer) -> None:
    """Refuse (GenerationError) a model whose routing looks at the whole batch: decoding
    one token at a time would route it differently from training and give wrong text."""
    kinds = non_causal_routers(model)
    if kinds:
        raise GenerationError(
            f"cannot generate with router {', '.join(kinds)}: it is not causal (a token's experts depend on "
            "the other tokens of the batch, later ones included), so a token decoded alone would be routed "
            "unlike in training and the text would be wrong",
            hint="generate with a run whose router is causal (topk, topp, hash, recurrent)")


def capacity_note(model: MoETransformer) -> str | None:
    """The note to give once when the model was trained with a capacity limit (off in decoding)."""
    moe = model.args.moe
    if moe is None or moe.capacity_factor is None:
        return None
    return (f"the run routes with a capacity limit (model.moe.capacity_factor = {moe.capacity_factor}); it is off "
            "during generation: the limit depends on the other tokens of a batch, so every token goes to the "
            "experts its router chose")


def _check_settings(prompt_ids: list[int], max_new_tokens: int, seq_len: int, temperature: float,
                    top_k: int | None, top_p: float | None) -> None:
    if not prompt_ids:
        raise GenerationError("the prompt is empty: generation continues a prompt of at least one token",
                          hint="give some prompt text")
    if len(prompt_ids) > seq_len:
        raise GenerationError(f"the prompt is {len(prompt_ids)} tokens, longer than the model's {seq_len} positions "
                          f"(model.seq_len)", hint=f"shorten the prompt to at most {seq_len - 1} tokens")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be at least 0, not {max_new_tokens}")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be at least 0 (0 = greedy), not {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be at least 1, not {top_k}",
                              hint="leave it unset to sample from every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must lie in (0, 1], not {top_p}",
                              hint="leave it unset to sample from every token")


def next_token(logits_V: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator) -> int:
    """One token from next-token logits: the most probable at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most probable tokens and then to the
    smallest set of most probable ones whose probability reaches top_p (at least one)."""
    logits = logits_V.detach().float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[logits.topk(top_k).indices] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(descending=True, stable=True)
        before = probs.cumsum(-1) - probs          # probability ranked above each token
        drop = torch.zeros_like(logits, dtype=torch.bool)
        drop[order[before >= top_p]] = True        # the first token always stays (before = 0)
        logits = logits.masked_fill(drop, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_ids: set[int] | None = None,
             stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens (see `generate_ids`); also says why
    it stopped. The model is run in eval mode under inference mode and left as it was."""
    check_generatable(model)
    seq_len = model.args.seq_len
    _check_settings(prompt_ids, max_new_tokens, seq_len, temperature, top_k, top_p)
    budget = min(max_new_tokens, seq_len - len(prompt_ids))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        with torch.inference_mode():
            cache = model.new_cache(seq_len)
            tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            while len(new) < budget:
                logits = model(tokens, cache=cache).logits[0, -1]
                tok = next_token(logits, temperature, top_k, top_p, generator)
                if stop_ids and tok in stop_ids:
                    return Generation(new, "stop_id")
                new.append(tok)
                if stop is not None and stop(new):
                    return Generation(new, "stop")
                tokens = torch.tensor([[tok]], dtype=torch.long, device=device)
    finally:
        model.train(was_training)
    return Generation(new, "max_new_tokens" if len(new) == max_new_tokens else "seq_len")


def generate_ids(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_ids: set[int] | None = None, stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The new token ids (not the prompt) of continuing `prompt_ids` by up to `max_new_tokens`.

    `temperature` 0 is greedy decoding (then top_k and top_p change nothing); otherwise tokens
    are drawn at that temperature from the `top_k` most probable and the smallest nucleus of
    probability `top_p`, with a generator seeded from `seed` (the same seed, the same tokens).
    Generation stops early when it samples one of `stop_ids` (which is not returned), when
    `stop(new_ids)` is true (the ids that made it true are returned), or when prompt and new
    tokens fill the model's `seq_len` positions. Refuses (GenerationError) a model with a
    non-causal router, an empty prompt, a prompt longer than seq_len, and bad settings."""
    return generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop_ids=stop_ids, stop=stop).ids
