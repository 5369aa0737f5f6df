"""Triton pass of the fused MoR convolution (MOR_SPEC 2.2, sample routing).

The base convolution and the rank (down) convolution run as ONE torch/cuDNN call with ``lora_a``
appended to the base weight as extra output channels, giving ``z (B, C_out + R, H_out, W_out)``.
``_conv_up_kernel`` then gathers each sample's active rank channels of ``z``, applies the gates and
the scaling, does the 1x1 up-projection ``h B^T`` over channels and adds the base channels and the
bias, writing ``y`` once (and, for the backward, the compact rank activations ``u``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import _dot, _gates, _rank_list, padded_ranks

BLOCK_M = 32  # pixels per program
BLOCK_N = 64  # output channels per program


@triton.jit
def _conv_up_kernel(
    z_ptr, b_ptr, bias_ptr, idx_ptr, gate_ptr, y_ptr, u_ptr,
    P, c_out, num_shared, num_routed, scaling,
    stride_zb, stride_zc, stride_zp, stride_bn, stride_br, stride_ib, stride_yb, stride_yc, stride_yp,
    TOP_K: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """z ``(B, C_out + R, P)`` -> y ``(B, C_out, P)`` = z[:, :C_out] + bias + B (scaling g z[:, C_out:]);
    u ``(B, P, RP)`` float32 (rank list order). Grid ``(cdiv(P, BLOCK_M), cdiv(C_out, BLOCK_N), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < P
    mask_n = offs_n < c_out
    p = tl.arange(0, RP)
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, False)
    z_b = z_ptr + pid_b * stride_zb
    u = tl.load(
        z_b + (c_out + rank[None, :]) * stride_zc + offs_m[:, None] * stride_zp,
        mask=mask_m[:, None] & active[None, :],
        other=0.0,
    ).to(tl.float32)
    g = _gates(idx_ptr, gate_ptr, stride_ib, 0, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, False, BLOCK_M)  # fmt: skip
    bt = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + rank[:, None] * stride_br,
        mask=active[:, None] & mask_n[None, :],
        other=0.0,
    )
    acc = _dot((u * g).to(bt.dtype), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(z_b + offs_n[None, :] * stride_zc + offs_m[:, None] * stride_zp, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_b * stride_yb + offs_n[None, :] * stride_yc + offs_m[:, None] * stride_yp
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_U:
        tl.store(u_ptr + (pid_b * P + offs_m[:, None]) * RP + p[None, :], u, mask=mask_m[:, None] & (pid_n == 0))


def out_format(z: torch.Tensor) -> torch.memory_format:
    """``y`` keeps the convolution output's layout (channels_last stays channels_last)."""
    if z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_up(z, lora_b, bias, idx, gate, num_shared: int, scaling: float, store_u: bool):
    """z ``(B, C_out + R, H, W)`` -> ``y (B, C_out, H, W)`` (``z.dtype``, z's memory format) and ``u`` float32
    ``(B, H*W, RP)`` (``(0,)`` unless ``store_u``)."""
    batch, channels, height, width = z.shape
    c_out, ranks = lora_b.shape
    assert channels == c_out + ranks and idx.is_contiguous() and gate.is_contiguous()
    n_pix = height * width
    if z.stride(2) != z.stride(3) * width:  # H and W must flatten into one pixel stride
        z = z.contiguous()
    rp = padded_ranks(ranks, num_shared, idx.shape[1], False)
    y = torch.empty((batch, c_out, height, width), dtype=z.dtype, device=z.device, memory_format=out_format(z))
    u = torch.empty((batch, n_pix, rp) if store_u else (0,), dtype=torch.float32, device=z.device)
    if y.numel() == 0:
        return y, u.zero_()
    grid = (triton.cdiv(n_pix, BLOCK_M), triton.cdiv(c_out, BLOCK_N), batch)
    _conv_up_kernel[grid](
        z, lora_b, bias if bias is not None else y, idx, gate, y, u if store_u else y,
        n_pix, c_out, num_shared, ranks - num_shared, scaling,
        z.stride(0), z.stride(1), z.stride(3), *lora_b.stride(), idx.shape[1],
        y.stride(0), y.stride(1), y.stride(3),
        TOP_K=idx.shape[1], RP=rp, HAS_BIAS=bias is not None, STORE_U=store_u, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return y, u
