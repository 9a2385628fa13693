"""The key/value cache of token-by-token decoding.

A forward with a cache (`model(tokens_BS, cache=cache)`) attends its tokens to every token the
cache holds, places them at positions `cache.length ...` (rotary embeddings included) and then
appends their keys and values. Feeding a sequence in pieces through one cache gives the logits of
one forward over the whole sequence, because every part of the model is causal and, while
decoding, no routing step looks at other tokens of the batch (`RoutingMode.decoding`).

Buffers are allocated on the first forward, at the cache's `max_len` positions, with the batch
size, device and dtype of the keys they hold: later forwards must use the same batch size.
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    """Keys and values [B, kv_heads, max_len, head_dim] of each attention layer, `length` filled."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0                      # positions filled (the next token's position)
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def append(self, layer: int, k_BHSd: Tensor, v_BHSd: Tensor) -> tuple[Tensor, Tensor]:
        """Write a forward's new keys and values at positions length.. of `layer` and return all
        of that layer's keys and values so far (views, not copies). The cache's length moves on
        only at `advance`, once every layer has written (so a recomputed layer writes the same
        positions again)."""
        S = k_BHSd.shape[2]
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.length} are filled and a "
                             f"forward of {S} tokens does not fit")
        if self.keys[layer] is None:
            B, H, _, d = k_BHSd.shape
            self.keys[layer] = k_BHSd.new_zeros(B, H, self.max_len, d)
            self.values[layer] = v_BHSd.new_zeros(B, H, self.max_len, v_BHSd.shape[-1])   # (MLA: its own size)
        keys, values = self.keys[layer], self.values[layer]
        if keys.shape[0] != k_BHSd.shape[0]:
            raise ValueError(f"the KV cache was filled with a batch of {keys.shape[0]}, not {k_BHSd.shape[0]}")
        keys[:, :, self.length:end] = k_BHSd
        values[:, :, self.length:end] = v_BHSd
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Count `n` more filled positions (the model calls it after each forward)."""
        self.length += n

    def room(self) -> int:
        """Positions left."""
        return self.max_len - self.length
