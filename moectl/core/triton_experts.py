"""The `triton` expert backend: grouped GEMMs that gather and scatter rows themselves.

In the style of ScatterMoE (Tan et al., 2024), nothing is copied into expert order. The routed
slots are sorted by expert (`order_N`, on device) and cut into index blocks of BLOCK_M slots that
never straddle two experts: an expert with n slots gets ceil(n / BLOCK_M) blocks, so padding is in
the block table, not in copies of tokens. Two kernels do all the matrix work:

  _group_gemm    Y[out(i)] (+)= scale_i * X[in(i)] @ W[e(i)] for the slots i of each block, where
                 in() and out() are optional row maps (a gather and a scatter) and W may be read
                 transposed through its strides;
  _group_wgrad   dW[e] = sum over e's slots of A[a(i)]^T B[b(i)], the weight gradient.

Forward: A = X[tok] @ W1, B = X[tok] @ W3 (gathered, written in expert order), h = act(A) * B in
torch, then w_i * h_i @ W2 written straight to slot positions (the routing-weight multiply is in
the second GEMM) and summed over each token's K slots. Backward runs the same two kernels with
transposed weights and the gradients' own gathers. fp32 inputs use IEEE fp32 products (no TF32).

Nothing here runs without triton; on CPU it runs under TRITON_INTERPRET=1 (slowly: for tests).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from moectl.core.layers import ACTIVATIONS

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:   # the backend reports itself unavailable; nothing else needs triton
    AVAILABLE = False


def interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for the device."""
    return (64, 64, 32) if device.type == "cuda" and not interpreted() else (32, 32, 32)


if AVAILABLE:

    @triton.jit
    def _row_map(rows_ptr, rows, mask, MAPPED: tl.constexpr):
        """rows_ptr[rows] where the kernel reads or writes through a row map, else the rows themselves."""
        if MAPPED:
            return tl.load(rows_ptr + rows, mask=mask, other=0)
        else:
            return rows

    @triton.jit
    def _group_gemm(X, W, Y, in_rows, out_rows, scale, block_expert, block_start, block_end,
                    N, K, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, ACCUM: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert + pid_m)
        start = tl.load(block_start + pid_m)
        end = tl.load(block_end + pid_m)
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < end   # unused blocks have start = end = 0
        e = tl.maximum(e, 0)
        src = _row_map(in_rows, rows, mask_m, GATHER)
        dst = _row_map(out_rows, rows, mask_m, SCATTER)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            x = tl.load(X + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if SCALE:
            acc = acc * tl.load(scale + rows, mask=mask_m, other=0.0)[:, None]
        ptr = Y + dst[:, None] * stride_ym + cols[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        if ACCUM:
            acc += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_wgrad(A, B, DW, a_rows, b_rows, starts, counts, M, N,
                     stride_am, stride_ak, stride_bm, stride_bn, stride_we, stride_wm, stride_wn,
                     GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        e = tl.program_id(0).to(tl.int64)   # e * stride_we passes 2**31 for large banks
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        start = tl.load(starts + e)
        count = tl.load(counts + e)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, count, BLOCK_K):
            local = r0 + tl.arange(0, BLOCK_K)
            mask_r = local < count
            rows = start + local
            ia = _row_map(a_rows, rows, mask_r, GATHER_A)
            ib = _row_map(b_rows, rows, mask_r, GATHER_B)
            a = tl.load(A + ia[None, :] * stride_am + rm[:, None] * stride_ak,
                        mask=mask_r[None, :] & mask_m[:, None], other=0.0)
            b = tl.load(B + ib[:, None] * stride_bm + rn[None, :] * stride_bn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        tl.store(DW + e * stride_we + rm[:, None] * stride_wm + rn[None, :] * stride_wn,
                 acc.to(DW.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def block_table(counts_E: Tensor, block_m: int, n_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """(expert, first row, end row) of every index block, on device and without a host sync. The
    table has room for the most blocks any routing can need (ceil(N / BLOCK_M) + E); blocks past
    the real ones have expert -1 and no rows."""
    E = counts_E.numel()
    dev = counts_E.device
    per_expert = (counts_E + block_m - 1) // block_m
    cum = per_expert.cumsum(0)
    starts_E = counts_E.cumsum(0) - counts_E
    b = torch.arange((n_slots + block_m - 1) // block_m + E, device=dev)
    e = torch.searchsorted(cum, b, right=True)
    real = e < E
    ec = e.clamp(max=E - 1)
    first = cum[ec] - per_expert[ec]
    start = starts_E[ec] + (b - first) * block_m
    end = starts_E[ec] + counts_E[ec]
    zero = torch.zeros_like(start)
    return torch.where(real, ec, -1), torch.where(real, start, zero), torch.where(real, end, zero)


def _gemm(X: Tensor, W: Tensor, Y: Tensor, table, *, transpose_w: bool = False, in_rows: Tensor | None = None,
          out_rows: Tensor | None = None, scale: Tensor | None = None, accumulate: bool = False) -> None:
    """Y[out(i)] (+)= scale_i * X[in(i)] @ W[e(i)] (W[e]^T with `transpose_w`), for the table's slots."""
    expert, start, end = table
    bm, bn, bk = blocks(X.device)
    w_k, w_n = (W.stride(2), W.stride(1)) if transpose_w else (W.stride(1), W.stride(2))
    K = W.shape[2] if transpose_w else W.shape[1]
    N = W.shape[1] if transpose_w else W.shape[2]
    dummy = start
    grid = (expert.numel(), triton.cdiv(N, bn))
    _group_gemm[grid](X, W, Y, in_rows if in_rows is not None else dummy, out_rows if out_rows is not None else dummy,
                      scale if scale is not None else X, expert, start, end, N, K,
                      X.stride(0), X.stride(1), W.stride(0), w_k, w_n, Y.stride(0), Y.stride(1),
                      GATHER=in_rows is not None, SCATTER=out_rows is not None, SCALE=scale is not None,
                      ACCUM=accumulate, IEEE=X.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def _wgrad(A: Tensor, B: Tensor, starts: Tensor, counts: Tensor, E: int, *, a_rows: Tensor | None = None,
           b_rows: Tensor | None = None, out_dtype: torch.dtype) -> Tensor:
    """dW[e] = sum over e's slots of A[a(i)]^T B[b(i)]: [E, A's width, B's width]."""
    M, N = A.shape[1], B.shape[1]
    dW = torch.empty(E, M, N, device=A.device, dtype=out_dtype)
    bm, bn, bk = blocks(A.device)
    grid = (E, triton.cdiv(M, bm), triton.cdiv(N, bn))
    _group_wgrad[grid](A, B, dW, a_rows if a_rows is not None else starts, b_rows if b_rows is not None else starts,
                       starts, counts, M, N, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                       dW.stride(0), dW.stride(1), dW.stride(2), GATHER_A=a_rows is not None,
                       GATHER_B=b_rows is not None, IEEE=A.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return dW


def _activation(name: str):
    return ACTIVATIONS[name]


class _TritonMoE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor, w1: Tensor,
                w3: Tensor | None, w2: Tensor, activation: str) -> Tensor:
        T, K = weights_TK.shape
        E, D, Fh = w1.shape
        N = T * K
        x = x_TD.contiguous()
        token_N = order_N // K if K > 1 else order_N
        w_sorted = weights_TK.reshape(-1).float().index_select(0, order_N).contiguous()
        table = block_table(counts_E, blocks(x.device)[0], N)
        A = x.new_empty(N, Fh)
        _gemm(x, w1, A, table, in_rows=token_N)
        B = None
        if w3 is not None:
            B = x.new_empty(N, Fh)
            _gemm(x, w3, B, table, in_rows=token_N)
        act = _activation(activation)
        h = act(A) if B is None else act(A) * B
        y_slots = x.new_zeros(N, D)   # slots no expert takes (dropped) stay zero
        _gemm(h, w2, y_slots, table, out_rows=order_N, scale=w_sorted)
        ctx.save_for_backward(x, A, B, w_sorted, order_N, token_N, counts_E, w1, w3, w2)
        ctx.table, ctx.activation, ctx.shape = table, activation, (T, K)
        ctx.w_dtype = weights_TK.dtype
        return y_slots.view(T, K, D).sum(1) if K > 1 else y_slots

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        x, A, B, w_sorted, order_N, token_N, counts_E, w1, w3, w2 = ctx.saved_tensors
        T, K = ctx.shape
        E, D, Fh = w1.shape
        N = T * K
        table = ctx.table
        g = g_TD.to(x.dtype).contiguous()
        starts = counts_E.cumsum(0) - counts_E
        used = (torch.arange(N, device=x.device) < counts_E.sum()).unsqueeze(-1)
        # d h (before the routing weight): g[token] @ W2[e]^T
        dh_raw = x.new_empty(N, Fh)
        _gemm(g, w2, dh_raw, table, transpose_w=True, in_rows=token_N)
        dh_raw = torch.where(used, dh_raw, dh_raw.new_zeros(()))
        act = _activation(ctx.activation)
        with torch.enable_grad():
            a_ = A.detach().requires_grad_(True)
            b_ = B.detach().requires_grad_(True) if B is not None else None
            h_ = act(a_) if b_ is None else act(a_) * b_
        h = torch.where(used, h_.detach(), h_.new_zeros(()))
        d_w_sorted = (h.float() * dh_raw.float()).sum(-1)
        d_weights = torch.zeros(N, device=x.device, dtype=torch.float32).index_copy_(0, order_N, d_w_sorted)
        dh = dh_raw * w_sorted.to(dh_raw.dtype).unsqueeze(-1)
        d_ab = torch.autograd.grad(h_, (a_,) if b_ is None else (a_, b_), dh)
        dA = torch.where(used, d_ab[0], d_ab[0].new_zeros(())).contiguous()
        dB = torch.where(used, d_ab[1], d_ab[1].new_zeros(())).contiguous() if b_ is not None else None
        hw = (h * w_sorted.to(h.dtype).unsqueeze(-1)).contiguous()
        dW2 = _wgrad(hw, g, starts, counts_E, E, b_rows=token_N, out_dtype=w2.dtype)
        dW1 = _wgrad(x, dA, starts, counts_E, E, a_rows=token_N, out_dtype=w1.dtype)
        dW3 = _wgrad(x, dB, starts, counts_E, E, a_rows=token_N, out_dtype=w3.dtype) if dB is not None else None
        dx_slots = x.new_zeros(N, D)
        _gemm(dA, w1, dx_slots, table, transpose_w=True, out_rows=order_N)
        if dB is not None:
            _gemm(dB, w3, dx_slots, table, transpose_w=True, out_rows=order_N, accumulate=True)
        dx = dx_slots.view(T, K, D).sum(1) if K > 1 else dx_slots
        return (dx, None, None, d_weights.view(T, K).to(ctx.w_dtype), dW1, dW3, dW2, None)


def triton_moe(x_TD: Tensor, order_N: Tensor, counts_E: Tensor, weights_TK: Tensor, w1: Tensor,
               w3: Tensor | None, w2: Tensor, activation: str) -> Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_t) for the slots `order_N` sorts by expert
    (`moectl.core.experts.sort_slots`; slots past sum(counts_E) are unused and contribute 0)."""
    if not AVAILABLE:
        raise RuntimeError("the triton expert backend needs triton (moectl's triton extra: pip install 'triton>=3.0')")
    return _TritonMoE.apply(x_TD, order_N, counts_E, weights_TK, w1, w3, w2, activation)
