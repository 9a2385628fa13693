"""The stacked expert bank, its compute backends, and dispatch/combine of routed slots.

Expert weights are stacked per expert: w1 (gate) and w3 (up) are [E, D, F], w2 (down) is [E, F, D];
non-gated activations (gelu, relu) have no w3. Every backend reads the same weights:

  loop        one matmul per expert over its rows; the plain reference.
  grouped_mm  one grouped GEMM per matrix over all experts (torch.nn.functional.grouped_mm), with
              device-side offsets and no host sync; falls back to the loop where it cannot run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.layers import ACTIVATIONS, mlp_matrices

# --------------------------------------------------------------------------- backends


def experts_loop(x_ND: Tensor, counts_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                 act: Callable[[Tensor], Tensor]) -> Tensor:
    """Reference: rows of x are grouped by expert (counts_E rows each, then unused rows)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        rows = x_ND[start:start + n]
        h = act(rows @ w1[e])
        if w3 is not None:
            h = h * (rows @ w3[e])
        outs.append(h @ w2[e])
        start += n
    tail = x_ND.shape[0] - start
    if tail:
        outs.append(x_ND.new_zeros(tail, w2.shape[-1]))
    return torch.cat(outs, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects the zero-stride gradients that e.g. `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_warned: set[tuple[str, torch.dtype]] = set()


def grouped_mm_available(x: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """Whether grouped_mm can run these operands: it needs the op, a supported device and dtype,
    and 16-byte-aligned row strides."""
    if _GROUPED_MM is None or x.dtype != w1.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 8:
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    item = x.element_size()
    return all((n * item) % 16 == 0 for n in (w1.shape[1], w1.shape[2], w2.shape[2]))


def experts_grouped(x_ND: Tensor, counts_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                    act: Callable[[Tensor], Tensor]) -> Tensor:
    if not grouped_mm_available(x_ND, w1, w2):
        key = (x_ND.device.type, x_ND.dtype)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"grouped_mm cannot run on {key[0]} / {key[1]} with these sizes; "
                          "using the loop backend", stacklevel=2)
        return experts_loop(x_ND, counts_E, w1, w3, w2, act)
    offs = counts_E.cumsum(0).to(torch.int32)
    # Rows past the last offset (unused slots) are never written by the kernel, in the forward
    # output or in the backward's input gradient: mask both ways so no stale memory leaks out.
    used = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs[-1]).unsqueeze(-1)
    zero = x_ND.new_zeros(())
    x_ND = torch.where(used, x_ND, zero)
    h = act(_ContiguousGrad.apply(_GROUPED_MM(x_ND, w1, offs=offs)))
    if w3 is not None:
        h = h * _ContiguousGrad.apply(_GROUPED_MM(x_ND, w3, offs=offs))
    y = _ContiguousGrad.apply(_GROUPED_MM(h, w2, offs=offs))
    return torch.where(used, y, zero)


BACKENDS: dict[str, Callable[..., Tensor]] = {"loop": experts_loop, "grouped_mm": experts_grouped}


# --------------------------------------------------------------------------- the bank


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights."""

    component = "experts"

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu",
                 backend: str = "grouped_mm", active_fraction: float = 1.0):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation, self.backend = activation, backend
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.active_fraction = active_fraction   # share of the bank one token uses (k / E), for counting

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def _operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Input and weights in the compute dtype: autocast's dtype when it is on (autocast does not
        cover grouped_mm), else the weights' own."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            w1, w2 = w1.to(dt), w2.to(dt)
            w3 = w3.to(dt) if w3 is not None else None
        return x.to(w1.dtype), w1, w3, w2

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Rows of x_ND sorted by expert, counts_E rows per expert (trailing rows are unused)."""
        x, w1, w3, w2 = self._operands(x_ND)
        return BACKENDS[self.backend](x, counts_E, w1, w3, w2, self.act)

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: [E, T, D] (for methods that compare all experts)."""
        x, w1, w3, w2 = self._operands(x_TD)
        x = x.unsqueeze(0).expand(self.num_experts, -1, -1)
        h = self.act(torch.bmm(x, w1))
        if w3 is not None:
            h = h * torch.bmm(x, w3)
        return torch.bmm(h, w2)

    def flops_per_slot(self) -> int:
        return mlp_matrices(self.activation) * 2 * self.d_model * self.hidden

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation}, backend={self.backend}")


# --------------------------------------------------------------------------- dispatch / combine


def sort_slots(expert_ids_TK: Tensor, valid_TK: Tensor | None, num_experts: int) -> tuple[Tensor, Tensor]:
    """Order the T*K slots by expert (unused slots last) and count rows per expert, on device."""
    flat = expert_ids_TK.reshape(-1)
    if valid_TK is not None:
        flat = flat.masked_fill(~valid_TK.reshape(-1), num_experts)
    order_N = torch.argsort(flat, stable=True)
    counts_E = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return order_N, counts_E


def run_experts(bank: ExpertBank, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor,
                valid_TK: Tensor | None) -> tuple[Tensor, Tensor]:
    """Dispatch tokens to their experts, run the bank once, combine with the weights.

    Returns (y_TD, counts_E). Combining gathers each slot's output back into [T, K, D] and takes a
    weighted sum over K, which is deterministic (no scatter-add of duplicates)."""
    T, K = expert_ids_TK.shape
    order_N, counts_E = sort_slots(expert_ids_TK, valid_TK, bank.num_experts)
    y_ND = bank(x_TD[order_N // K], counts_E)
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    y_TKD = y_ND[inverse_N].view(T, K, -1)
    y_TD = (y_TKD * weights_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(1)
    return y_TD, counts_E
