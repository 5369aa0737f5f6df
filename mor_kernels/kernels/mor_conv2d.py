"""Triton kernels of the fused MoR convolution (MOR_SPEC 2.2, sample routing) around torch's (cuDNN's)
convolutions ``z = conv(x, W0)`` and ``z_rank = conv(x, A)`` (all ``R`` ranks as output channels):

- ``_conv_up_kernel``: ``y = z + bias + B (scaling g z_rank)`` written over ``z`` in place (``z`` is the op's
  own buffer), gathering each sample's active rank channels of ``z_rank``; the up-projection is a dot over
  the rank list;
- ``_conv_bwd_kernel``: per pixel block of a sample, ``dh = dy B`` over the rank list (``dy`` read once, also
  for the ``dB`` partial ``h^T dy``), ``du = scaling g dh`` and the gradient of the rank channels
  ``dz_rank (B, R, H, W)``: each rank's ``du`` summed over the positions that hold it, by selection (a NaN of
  one rank never reaches another's channel), zero for the ranks the sample does not pick. For 16-bit inputs
  it is written as two channel blocks, ``hi = round(dz)`` and ``lo = round(dz - hi)``, so that one 16-bit
  convolution over ``2R`` channels gives ``dA`` with float32-accurate ``dz`` (the split-precision trick of
  bf16x2 GEMM emulation) and one gives ``dx``'s rank part with the rank filters repeated;
- ``_finite_ranks_kernel``: ``lora_a`` with non-finite values zeroed, repeated ``REPS`` times along the ranks,
  for those backward convolutions (a zero of ``dz_rank`` times a NaN filter would be NaN).

The ``dB`` and gate partials are reduced by :func:`.mor_lora_bwd.reduce` (the linear backward's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import _dot, _gates, _rank_list, padded_ranks
from .mor_lora_bwd import reduce

BLOCK_M = 32  # pixels per program
BLOCK_N = 64  # output channels per program (forward) / per dy step (backward)
BLOCK_R = 16  # rank channels of dz_rank per step


@triton.jit
def _conv_up_kernel(
    z_ptr, zr_ptr, b_ptr, bias_ptr, idx_ptr, gate_ptr,
    P, c_out, num_shared, num_routed, scaling,
    stride_zb, stride_zc, stride_zp, stride_rb, stride_rc, stride_rp, stride_bn, stride_br, stride_ib,
    TOP_K: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """z ``(B, C_out, P)`` <- z + bias + B (scaling g z_rank) with z_rank ``(B, R, P)``, in place (each element read
    and written by one program). Grid ``(cdiv(P, BLOCK_M), cdiv(C_out, BLOCK_N), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < P
    mask_n = offs_n < c_out
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, False)
    u = tl.load(
        zr_ptr + pid_b * stride_rb + rank[None, :] * stride_rc + offs_m[:, None] * stride_rp,
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
    acc = _dot(tl.where(g != 0, u * g, 0.0).to(bt.dtype), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    mask = mask_m[:, None] & mask_n[None, :]
    z_ptrs = z_ptr + pid_b * stride_zb + offs_n[None, :] * stride_zc + offs_m[:, None] * stride_zp
    acc += tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    dy_ptr, zr_ptr, b_ptr, idx_ptr, gate_ptr, dz_ptr, part_ptr, gpart_ptr,
    P, c_out, ranks, num_shared, num_routed, scaling,
    stride_yb, stride_yc, stride_yp, stride_rb, stride_rc, stride_rp, stride_bn, stride_br, stride_ib,
    stride_db, stride_dc, stride_dp,
    TOP_K: tl.constexpr, RP: tl.constexpr, NEED_DZ: tl.constexpr, SPLIT_DZ: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """dy ``(B, C_out, P)``, z_rank ``(B, R, P)`` -> dz ``(B, R (x2 with SPLIT_DZ), P)`` in dz's dtype, partials
    ``part (B, n_m, RP, C_out)`` of ``h^T dy`` and ``gpart (B, n_m, RP)`` of the gate gradient (float32).
    Grid ``(n_m = cdiv(P, BLOCK_M), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    n_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < P
    p = tl.arange(0, RP)
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, False)
    g = _gates(idx_ptr, gate_ptr, stride_ib, 0, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, False, BLOCK_M)  # fmt: skip
    u = tl.load(
        zr_ptr + pid_b * stride_rb + rank[None, :] * stride_rc + offs_m[:, None] * stride_rp,
        mask=mask_m[:, None] & active[None, :],
        other=0.0,
    ).to(tl.float32)
    ht = tl.trans(tl.where(g != 0, u * g, 0.0))
    part_row = part_ptr + ((pid_b * n_m + pid_m) * RP + p[:, None]) * c_out
    dh = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    dy_b = dy_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yp
    for n0 in range(0, c_out, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < c_out
        dyt = tl.load(dy_b + offs_n[None, :] * stride_yc, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + rank[None, :] * stride_br,
            mask=mask_n[:, None] & active[None, :],
            other=0.0,
        )
        dh = _dot(dyt, bt, dh)
        if NEED_DB:
            part = _dot(ht, dyt.to(tl.float32), tl.zeros((RP, BLOCK_N), dtype=tl.float32))
            tl.store(part_row + offs_n[None, :], part, mask=mask_n[None, :])
    if NEED_DG:
        tl.store(gpart_ptr + (pid_b * n_m + pid_m) * RP + p, tl.sum(dh * u * scaling, axis=0))
    if NEED_DZ:
        du = tl.where(g != 0, dh * g, 0.0)
        dz_b = dz_ptr + pid_b * stride_db + offs_m[:, None] * stride_dp
        for r0 in range(0, ranks, BLOCK_R):
            cols = r0 + tl.arange(0, BLOCK_R)
            holds = (rank[:, None] == cols[None, :]) & active[:, None]  # (RP, BLOCK_R)
            dz = tl.sum(tl.where(holds[None, :, :], du[:, :, None], 0.0), axis=1)  # (BLOCK_M, BLOCK_R)
            mask = mask_m[:, None] & (cols < ranks)[None, :]
            hi = dz.to(dz_ptr.dtype.element_ty)
            tl.store(dz_b + cols[None, :] * stride_dc, hi, mask=mask)
            if SPLIT_DZ:
                lo = (dz - hi.to(tl.float32)).to(dz_ptr.dtype.element_ty)
                tl.store(dz_b + (ranks + cols[None, :]) * stride_dc, lo, mask=mask)


@triton.jit
def _finite_ranks_kernel(a_ptr, out_ptr, ranks, n, REPS: tl.constexpr, BLOCK: tl.constexpr):
    """out ``(REPS R, n)`` = lora_a ``(R, n)`` (contiguous) with non-finite values zeroed, repeated ``REPS``
    times along the ranks. Grid ``(R, cdiv(n, BLOCK))``."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    a = tl.load(a_ptr + r * n + offs, mask=mask, other=0.0)
    af = a.to(tl.float32)
    a = tl.where((af == af) & (tl.abs(af) < float("inf")), a, tl.zeros_like(a))
    for rep in tl.static_range(REPS):
        tl.store(out_ptr + (rep * ranks + r) * n + offs, a, mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch


def _pixels(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of a 4-D tensor whose H and W flatten into one pixel stride."""
    assert t.stride(2) == t.stride(3) * t.shape[3] or t.shape[2] == 1, "H and W must flatten"
    return t.stride(0), t.stride(1), t.stride(3)


def conv_up(z, z_rank, lora_b, bias, idx, gate, num_shared: int, scaling: float) -> torch.Tensor:
    """``z (B, C_out, H, W) <- z + bias + B (scaling g z_rank)`` in place (``z`` must be the caller's own
    buffer) and returned; ``z_rank (B, R, H, W)``, idx/gate ``(B, k)`` contiguous."""
    batch, c_out, height, width = z.shape
    ranks = lora_b.shape[1]
    assert z_rank.shape == (batch, ranks, height, width) and idx.is_contiguous() and gate.is_contiguous()
    n_pix = height * width
    if z.numel() == 0:
        return z
    rp = padded_ranks(ranks, num_shared, idx.shape[1], False)
    grid = (triton.cdiv(n_pix, BLOCK_M), triton.cdiv(c_out, BLOCK_N), batch)
    _conv_up_kernel[grid](
        z, z_rank, lora_b, bias if bias is not None else z, idx, gate,
        n_pix, c_out, num_shared, ranks - num_shared, scaling,
        *_pixels(z), *_pixels(z_rank), *lora_b.stride(), idx.shape[1],
        TOP_K=idx.shape[1], RP=rp, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return z


def rank_backward(dy, z_rank, lora_b, idx, gate, num_shared: int, scaling: float, needs, dz_dtype, split: bool):
    """The rank side of the conv backward, two launches. ``needs = (dz, dB, dgate)``. Returns ``dz`` (``(B, 2R,
    H, W)`` with ``split``: ``round(dz)`` then ``round(dz - round(dz))``, else ``(B, R, H, W)``; ``dz_dtype``,
    dy's memory format), ``dB (C_out, R)`` in lora_b's dtype, ``dgate`` float32 ``(B, k)``; None when not
    needed."""
    need_dz, need_db, need_dg = needs
    batch, c_out, height, width = dy.shape
    ranks = lora_b.shape[1]
    n_pix = height * width
    dev = dy.device
    fmt = torch.channels_last if dy.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    dz = None
    if need_dz:
        dz = torch.empty((batch, ranks * (2 if split else 1), height, width), dtype=dz_dtype, device=dev,
                         memory_format=fmt)  # fmt: skip
    db = torch.empty((c_out, ranks), dtype=lora_b.dtype, device=dev) if need_db else None
    dgate = torch.empty(idx.shape, dtype=torch.float32, device=dev) if need_dg else None
    if batch * n_pix == 0:
        for t in (dz, db, dgate):
            if t is not None:
                t.zero_()
        return dz, db, dgate
    rp = padded_ranks(ranks, num_shared, idx.shape[1], False)
    n_m = triton.cdiv(n_pix, BLOCK_M)
    part = torch.empty((batch, n_m, rp, c_out) if need_db else (0,), dtype=torch.float32, device=dev)
    gpart = torch.empty((batch, n_m, rp) if need_dg else (0,), dtype=torch.float32, device=dev)
    _conv_bwd_kernel[(n_m, batch)](
        dy, z_rank, lora_b, idx, gate, dz if dz is not None else part, part, gpart,
        n_pix, c_out, ranks, num_shared, ranks - num_shared, scaling,
        *_pixels(dy), *_pixels(z_rank), *lora_b.stride(), idx.shape[1],
        *(_pixels(dz) if dz is not None else (0, 0, 0)),
        TOP_K=idx.shape[1], RP=rp, NEED_DZ=need_dz, SPLIT_DZ=split, NEED_DB=need_db, NEED_DG=need_dg,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    if need_db or need_dg:
        reduce(part, gpart, idx, num_shared, ranks, rp, n_m, 0, c_out, None, db, dgate)
    return dz, db, dgate


def finite_ranks(lora_a: torch.Tensor, reps: int) -> torch.Tensor:
    """``lora_a (R, C_in, kh, kw)`` with non-finite values zeroed, repeated ``reps`` times: ``(reps R, C_in, kh,
    kw)``, one launch."""
    a = lora_a.contiguous()
    ranks, n = a.shape[0], a[0].numel()
    out = torch.empty((reps * ranks, *a.shape[1:]), dtype=a.dtype, device=a.device)
    if out.numel():
        _finite_ranks_kernel[(ranks, triton.cdiv(n, 1024))](a, out, ranks, n, REPS=reps, BLOCK=1024)
    return out
