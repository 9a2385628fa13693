"""The stacked expert bank, its compute backends, and dispatch/combine of routed slots.

Expert weights are stacked per expert: w1 (gate) and w3 (up) are [E, D, F], w2 (down) is [E, F, D];
non-gated activations (gelu, relu) have no w3. Every backend reads the same weights
(`model.moe.backend`):

  loop        one matmul per expert over its rows; the plain reference.
  grouped_mm  one grouped GEMM per matrix over all experts (torch.nn.functional.grouped_mm), with
              device-side offsets and no host sync; falls back to the loop where it cannot run.
  triton      moectl's fused kernels (moectl.core.triton_experts): the gather of token rows, the
              scatter of outputs and the routing-weight multiply happen inside the grouped GEMMs,
              forward and backward; CUDA, or anywhere under TRITON_INTERPRET=1.
  auto        the fastest that runs on the device and dtype (`resolve_backend`).

loop and grouped_mm compute on rows already in expert order (dispatch and combine are separate
steps, `run_experts`); triton takes the tokens as they are and does all three.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.core.layers import ACTIVATIONS, GATED, GLUS, mlp_matrices
from moectl.core.stages import record_stage

# --------------------------------------------------------------------------- backends


def _hidden(g: Tensor, u: Tensor | None, act: Callable[[Tensor], Tensor], glu) -> Tensor:
    """An expert's hidden units from its gate (and up) projections: act(g) * u, act(g) without an
    up projection, or the gated unit `glu(g, u)` (GPT-OSS's clamped SwiGLU)."""
    if glu is not None:
        return glu(g, u)
    return act(g) if u is None else act(g) * u


def experts_loop(x_ND: Tensor, counts_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                 act: Callable[[Tensor], Tensor], tail: bool = True, biases: tuple | None = None,
                 glu: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Reference: rows of x are grouped by expert (counts_E rows each, then unused rows).
    `biases`: (b1, b3, b2) of every expert, added after each projection (GPT-OSS)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        rows = x_ND[start:start + n]
        g = rows @ w1[e]
        u = rows @ w3[e] if w3 is not None else None
        if biases is not None:
            g = g + biases[0][e]
            u = u + biases[1][e] if u is not None else None
        y = _hidden(g, u, act, glu) @ w2[e]
        outs.append(y + biases[2][e] if biases is not None else y)
        start += n
    rest = x_ND.shape[0] - start
    if rest:
        outs.append(x_ND.new_zeros(rest, w2.shape[-1]))
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
_warned: set[tuple[str, str, torch.dtype]] = set()


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


def _warn_fallback(backend: str, x: Tensor, why: str) -> None:
    key = (backend, x.device.type, x.dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{backend} cannot run on {key[1]} / {key[2]} {why}; using the loop backend", stacklevel=3)


@torch.compiler.disable   # grouped_mm's compile-time shape check admits only CUDA's bf16: run it as it is
def experts_grouped(x_ND: Tensor, counts_E: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor,
                    act: Callable[[Tensor], Tensor], tail: bool = True, biases: tuple | None = None,
                    glu: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """`tail`: rows may follow the last expert's (unused slots); without them no masking is needed.
    `biases` as for the loop: each row gets its expert's (an index per row, made on the host)."""
    if not grouped_mm_available(x_ND, w1, w2):
        _warn_fallback("grouped_mm", x_ND, "with these sizes")
        return experts_loop(x_ND, counts_E, w1, w3, w2, act, biases=biases, glu=glu)
    offs = counts_E.cumsum(0).to(torch.int32)
    used = None
    if tail:
        # Rows past the last offset (unused slots) are never written by the kernel, in the forward
        # output or in the backward's input gradient: mask both ways so no stale memory leaks out.
        used = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs[-1]).unsqueeze(-1)
        x_ND = torch.where(used, x_ND, x_ND.new_zeros(()))
    g = _ContiguousGrad.apply(_GROUPED_MM(x_ND, w1, offs=offs))
    u = _ContiguousGrad.apply(_GROUPED_MM(x_ND, w3, offs=offs)) if w3 is not None else None
    expert_of_row = None
    if biases is not None:   # the expert of each row (unused rows: the last expert's, masked below)
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts_E), device=x_ND.device), counts_E,
                                                output_size=int(counts_E.sum()))
        expert_of_row = F.pad(expert_of_row, (0, x_ND.shape[0] - expert_of_row.numel()), value=len(counts_E) - 1)
        g = g + biases[0][expert_of_row]
        u = u + biases[1][expert_of_row] if u is not None else None
    y = _ContiguousGrad.apply(_GROUPED_MM(_hidden(g, u, act, glu), w2, offs=offs))
    if expert_of_row is not None:
        y = y + biases[2][expert_of_row]
    return y if used is None else torch.where(used, y, y.new_zeros(()))


BACKENDS: dict[str, Callable[..., Tensor]] = {"loop": experts_loop, "grouped_mm": experts_grouped}
BACKEND_NAMES = ("auto", "loop", "grouped_mm", "triton")


def _triton():
    """moectl's Triton kernels, imported when first needed: importing them imports triton (an
    optional extra) when it is installed, which every run that never uses them would pay for."""
    from moectl.core import triton_experts

    return triton_experts


def triton_usable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None when it can."""
    triton_experts = _triton()
    if not triton_experts.AVAILABLE:
        return "triton is not installed (moectl's triton extra: pip install 'triton>=3.0')"
    if device.type != "cuda" and not triton_experts.interpreted():
        return "its kernels need CUDA (or TRITON_INTERPRET=1, the slow interpreter)"
    return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that `auto` means on a device and dtype: grouped_mm where it runs (the CPU and
    bf16 on CUDA since Ampere), else the loop. The Triton kernels are chosen by name; see
    docs/profile.md for how they compare."""
    if backend != "auto":
        return backend
    ok = _GROUPED_MM is not None and (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) or (
        device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8))
    return "grouped_mm" if ok else "loop"


# --------------------------------------------------------------------------- the bank


class Exchange(Protocol):
    """What expert parallelism installs on a bank (`moectl.train.expert_parallel`): the bank then
    holds only its process's experts, and the exchange moves rows to the processes that hold theirs."""

    def __call__(self, x_ND: Tensor, counts_E: Tensor, run_local: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Rows sorted by global expert id (counts_E rows each, unused rows after): every row run by its
        expert wherever that expert lives (`run_local(rows, local_counts)` here), outputs in the same order."""
        ...

    def every_expert(self, x_TD: Tensor, run_local: Callable[[Tensor], Tensor]) -> Tensor:
        """Every expert of the layer on every token of this process: [E, T, D]
        (`run_local(x)` gives this process's experts on x: [E_local, T', D])."""
        ...


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights."""

    component = "experts"

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu",
                 backend: str = "auto", active_fraction: float = 1.0, bias: bool = False):
        super().__init__()
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown expert backend {backend!r}; known: {', '.join(BACKEND_NAMES)}")
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation, self.backend = activation, backend
        self.act, self.glu = ACTIVATIONS[activation], GLUS.get(activation)
        gated = activation in GATED
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if gated else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        # Biases after each projection (GPT-OSS): b1, b3 [E, hidden], b2 [E, d_model]; zero at the start
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias and gated else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.active_fraction = active_fraction   # share of the bank one token uses (k / E), for counting
        # Expert parallelism: when the training side shards the bank over processes it installs an
        # exchange here (moectl.train.expert_parallel); the engine itself knows no collectives.
        self.exchange: Exchange | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=out_std)
        for b in self.biases() or ():
            if b is not None:
                nn.init.zeros_(b)

    def biases(self) -> tuple | None:
        """(b1, b3, b2) in the order the backends take them, or None for a bank without biases."""
        return None if self.b1 is None else (self.b1, self.b3, self.b2)

    def operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Input and weights in the compute dtype: on a GPU autocast's dtype when it is on (autocast
        does not cover grouped_mm), else the weights' own. On the CPU the experts stay in the
        weights' dtype under autocast: its bf16 matmul kernels are rebuilt for every new row count,
        and routing gives each expert a new count every step (measured in docs/benchmarks.md)."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        if torch.is_autocast_enabled(x.device.type) and x.device.type != "cpu":
            dt = torch.get_autocast_dtype(x.device.type)
            w1, w2 = w1.to(dt), w2.to(dt)
            w3 = w3.to(dt) if w3 is not None else None
        return x.to(w1.dtype), w1, w3, w2

    def backend_for(self, x: Tensor) -> str:
        """The backend this forward runs: `auto` resolved for the compute device and dtype, and
        `triton` replaced by the loop (with a warning, once) where it cannot run."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.w1.dtype
        name = resolve_backend(self.backend, x.device, dtype)
        if name == "triton":
            why = triton_usable(x.device)
            if why is not None:
                _warn_fallback("triton", x, f"({why})")
                return "loop"
        return name

    def fused_backend(self, x: Tensor) -> bool:
        """Whether this forward's backend does dispatch and combine itself (triton: not for biases or
        the clamped SwiGLU, which its kernels do not compute; those run unfused)."""
        return (self.backend == "triton" and self.exchange is None and self.b1 is None and self.glu is None
                and self.backend_for(x) == "triton")

    def compute(self, x_ND: Tensor, counts_E: Tensor, tail: bool = True,
                operands: tuple[Tensor, Tensor | None, Tensor] | None = None) -> Tensor:
        """The experts on rows sorted by expert (counts_E rows each; with `tail`, unused rows may
        follow). `operands`: the weights already in the compute dtype (from `operands`)."""
        if operands is None:
            x_ND, w1, w3, w2 = self.operands(x_ND)
        else:
            w1, w3, w2 = operands
        name = self.backend_for(x_ND)
        fn = BACKENDS.get(name, experts_loop)
        extra = {"biases": self._biases_like(w1), "glu": self.glu}
        if self.exchange is not None:   # rows travel to the process holding their expert, and back
            fn = BACKENDS.get(name, experts_grouped)   # triton's fused path needs every expert here: unfused
            return self.exchange(x_ND, counts_E, lambda rows, counts: fn(rows, counts, w1, w3, w2, self.act,
                                                                          tail=False, **extra))
        return fn(x_ND, counts_E, w1, w3, w2, self.act, tail=tail, **extra)

    def _biases_like(self, w: Tensor) -> tuple | None:
        """The biases in the compute dtype of `w`."""
        b = self.biases()
        return None if b is None else tuple(t.to(w.dtype) if t is not None else None for t in b)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Rows of x_ND sorted by expert, counts_E rows per expert (trailing rows are unused)."""
        return self.compute(x_ND, counts_E)

    def fused_forward(self, x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor) -> Tensor:
        """The Triton backend's whole routed computation: y_TD = sum_k w[t, k] * expert(x_t)."""
        x, w1, w3, w2 = self.operands(x_TD)
        return _triton().triton_moe(x, order_N, counts_E, weights_TK, w1, w3, w2, self.activation)

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: [E, T, D] (for methods that compare all experts). Under
        expert parallelism the exchange brings every process's tokens to every expert and back."""
        x, w1, w3, w2 = self.operands(x_TD)

        biases = self._biases_like(w1)

        def run(x: Tensor) -> Tensor:   # this bank's experts (all of them, or its process's share)
            x = x.unsqueeze(0).expand(w1.shape[0], -1, -1)
            g = torch.bmm(x, w1)
            u = torch.bmm(x, w3) if w3 is not None else None
            if biases is not None:
                g = g + biases[0].unsqueeze(1)
                u = u + biases[1].unsqueeze(1) if u is not None else None
            y = torch.bmm(_hidden(g, u, self.act, self.glu), w2)
            return y + biases[2].unsqueeze(1) if biases is not None else y

        return run(x) if self.exchange is None else self.exchange.every_expert(x, run)

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
    sorted_N, order_N = torch.sort(flat, stable=True)
    # Counts from the sorted ids' boundaries: deterministic, and of a fixed size (no data-dependent
    # shape, so compiled graphs do not break here).
    bounds = torch.searchsorted(sorted_N, torch.arange(num_experts + 1, device=flat.device))
    return order_N, bounds.diff()


class _Dispatch(torch.autograd.Function):
    """Rows of x_TD in slot order: out[i] = x[order[i] // K]. `order_N` is a permutation of the T*K
    slots, so the backward is a gather by its inverse and a sum over each token's K slots (no
    scatter-add, deterministic), where autograd's own indexing backward would accumulate."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.K = K
        return x_TD.index_select(0, order_N // K) if K > 1 else x_TD.index_select(0, order_N)

    @staticmethod
    def backward(ctx, g_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        g = g_ND.index_select(0, inverse_N)
        if ctx.K > 1:
            g = g.unflatten(0, (-1, ctx.K)).sum(1) if g.shape[0] else g.new_zeros(0, g.shape[-1])
        return g, None, None, None


class _Combine(torch.autograd.Function):
    """y_TD = sum_k w[t, k] * y_ND[slot (t, k)], a batched [1, K] x [K, D] product per token; the
    backward gathers by the permutation instead of scattering."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, w_TK: Tensor, order_N: Tensor, inverse_N: Tensor) -> Tensor:
        T, K = w_TK.shape
        y_TKD = y_ND.index_select(0, inverse_N).view(T, K, y_ND.shape[-1])
        w = w_TK.to(y_TKD.dtype)
        ctx.save_for_backward(y_TKD, w, order_N)
        ctx.w_dtype = w_TK.dtype
        with torch.autocast(y_ND.device.type, enabled=False):   # in the experts' dtype, not autocast's
            return torch.bmm(w.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_TKD, w, order_N = ctx.saved_tensors
        g_TD = g_TD.to(y_TKD.dtype)
        g_w = torch.bmm(y_TKD, g_TD.unsqueeze(-1)).squeeze(-1).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        g_y = None
        if ctx.needs_input_grad[0]:
            g_y = (w.unsqueeze(-1) * g_TD.unsqueeze(1)).flatten(0, 1).index_select(0, order_N)
        return g_y, g_w, None, None


def dispatch_reference(x_TD: Tensor, order_N: Tensor, K: int) -> Tensor:
    """The plain form of `_Dispatch` (autograd's indexing), for parity tests."""
    return x_TD[order_N // K]


def combine_reference(y_ND: Tensor, w_TK: Tensor, order_N: Tensor) -> Tensor:
    """The plain form of `_Combine`, for parity tests."""
    T, K = w_TK.shape
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    y_TKD = y_ND[inverse_N].view(T, K, -1)
    return (y_TKD * w_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(1)


def run_experts(bank: ExpertBank, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor,
                valid_TK: Tensor | None) -> tuple[Tensor, Tensor]:
    """Dispatch tokens to their experts, run the bank once, combine with the weights.

    Returns (y_TD, counts_E). Combining gathers each slot's output back into [T, K, D] and takes a
    weighted sum over K, which is deterministic (no scatter-add of duplicates)."""
    T, K = expert_ids_TK.shape
    with record_stage("dispatch"):
        order_N, counts_E = sort_slots(expert_ids_TK, valid_TK, bank.num_experts)
    if bank.fused_backend(x_TD):   # the backend gathers, scatters and weighs inside its kernels
        with record_stage("experts"):
            return bank.fused_forward(x_TD, order_N, counts_E, weights_TK), counts_E
    with record_stage("experts"):   # the weights in the compute dtype (a cast under GPU autocast)
        x, w1, w3, w2 = bank.operands(x_TD)
    with record_stage("dispatch"):
        inverse_N = torch.empty_like(order_N)
        inverse_N.index_copy_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))
        x_ND = _Dispatch.apply(x, order_N, inverse_N, K)
    with record_stage("experts"):
        y_ND = bank.compute(x_ND, counts_E, tail=valid_TK is not None, operands=(w1, w3, w2))
    with record_stage("combine"):
        return _Combine.apply(y_ND, weights_TK, order_N, inverse_N), counts_E
