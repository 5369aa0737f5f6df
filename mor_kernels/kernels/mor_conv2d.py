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
  bf16x2 GEMM emulation) and one gives ``dx``'s rank part with the rank filters repeated. Where the pixel
  blocks are too few to fill the GPU (:func:`bwd_split`), the ``C_out`` loop is split as the linear kernels
  split theirs (:mod:`.mor_lora`): each split writes its ``dB`` partial columns and a float32 ``dh`` partial,
  and the split that arrives last sums the ``dh`` partials in split order (bitwise repeatable for one shape)
  and finishes the block;
- ``_finite_ranks_kernel``: ``lora_a`` with non-finite values zeroed, repeated ``REPS`` times along the ranks,
  for those backward convolutions (a zero of ``dz_rank`` times a NaN filter would be NaN).

The ``dB`` and gate partials are reduced by :func:`.mor_lora_bwd.reduce` (the linear backward's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import _dot, _gates, _rank_list, _split_arrive, _split_sum, on_tensor_device, padded_ranks, split_buffers
from .mor_lora_bwd import reduce
from .mor_lora_tiles import MAX_SPLIT_K, NUM_SMS, cdiv

BLOCK_M = 32  # pixels per program
BLOCK_N = 64  # output channels per program (forward) / per dy step (backward)
BLOCK_R = 16  # rank channels of dz_rank per step
MIN_BWD_STEPS = 2  # fewest BLOCK_N-wide C_out steps per split of the backward


def bwd_split(batch: int, pixels: int, c_out: int) -> int:
    """The splits of ``_conv_bwd_kernel``'s ``C_out`` loop, a power of two up to 8, a function of the shapes alone:
    doubled while the grid (``cdiv(pixels, 32)`` pixel blocks per sample) has fewer programs than an H100/H200
    has SMs (132) and each split keeps ``MIN_BWD_STEPS`` 64-wide steps. A split's partial is only its ``dh``
    (32 x RP floats, 2 KB at RP = 16, against 4 KB of ``dy`` per step), so short splits cost little. At batch 1:

    ==============  ============  ======  ========
    H x W x C_out   pixel blocks  splits  programs
    ==============  ============  ======  ========
    64x64x320       128           2       256
    32x32x640       32            4       128
    16x16x1280      8             8       64 (was 8)
    8x8x1280        2             8       16 (was 2)
    ==============  ============  ======  ========
    """
    programs = -(-pixels // BLOCK_M) * batch
    split = 1
    while programs * split < NUM_SMS and split < MAX_SPLIT_K and c_out >= 2 * split * BLOCK_N * MIN_BWD_STEPS:
        split *= 2
    return split


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
    rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, False)
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
    dy_ptr, zr_ptr, b_ptr, idx_ptr, gate_ptr, dz_ptr, part_ptr, gpart_ptr, ws_ptr, lock_ptr,
    P, c_out, ranks, num_shared, num_routed, scaling,
    stride_yb, stride_yc, stride_yp, stride_rb, stride_rc, stride_rp, stride_bn, stride_br, stride_ib,
    stride_db, stride_dc, stride_dp,
    TOP_K: tl.constexpr, RP: tl.constexpr, NEED_DZ: tl.constexpr, SPLIT_DZ: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DG: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """dy ``(B, C_out, P)``, z_rank ``(B, R, P)`` -> dz ``(B, R (x2 with SPLIT_DZ), P)`` in dz's dtype, partials
    ``part (B, n_m, RP, C_out)`` of ``h^T dy`` and ``gpart (B, n_m, RP)`` of the gate gradient (float32).
    Grid ``(n_m = cdiv(P, BLOCK_M), SPLIT, B)``: split ``s`` runs the ``C_out`` steps ``[s n / SPLIT, (s + 1) n /
    SPLIT)``; with ``SPLIT > 1`` it writes its ``dh`` partial to ``ws (n_m B, SPLIT, BLOCK_M, RP)`` and counts
    itself in ``lock[tile]``, and the split that counts last sums the partials in split order and finishes."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    n_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < P
    p = tl.arange(0, RP)
    rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, False)
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
    n_steps = tl.cdiv(c_out, BLOCK_N)
    n_lo = (pid_s * n_steps // SPLIT) * BLOCK_N
    n_hi = ((pid_s + 1) * n_steps // SPLIT) * BLOCK_N
    for n0 in range(n_lo, n_hi, BLOCK_N):
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
    last = True
    if SPLIT > 1:
        tile = pid_b * n_m + pid_m
        last = _split_arrive(dh, dh, ws_ptr, ws_ptr, lock_ptr, tile, pid_s, SPLIT, False, BLOCK_M, BLOCK_N, RP)
        if last:
            _, dh = _split_sum(ws_ptr, ws_ptr, lock_ptr, tile, SPLIT, False, BLOCK_M, BLOCK_N, RP)
    if last:
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


@on_tensor_device
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
    grid = (cdiv(n_pix, BLOCK_M), cdiv(c_out, BLOCK_N), batch)
    _conv_up_kernel[grid](
        z, z_rank, lora_b, bias if bias is not None else z, idx, gate,
        n_pix, c_out, num_shared, ranks - num_shared, scaling,
        *_pixels(z), *_pixels(z_rank), *lora_b.stride(), idx.shape[1],
        TOP_K=idx.shape[1], RP=rp, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return z


@on_tensor_device
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
    n_m = cdiv(n_pix, BLOCK_M)
    part = torch.empty((batch, n_m, rp, c_out) if need_db else (0,), dtype=torch.float32, device=dev)
    gpart = torch.empty((batch, n_m, rp) if need_dg else (0,), dtype=torch.float32, device=dev)
    splits = bwd_split(batch, n_pix, c_out)
    _, ws, lock = split_buffers(part, n_m * batch, splits, BLOCK_M, 0, rp)
    _conv_bwd_kernel[(n_m, splits, batch)](
        dy, z_rank, lora_b, idx, gate, dz if dz is not None else part, part, gpart, ws, lock,
        n_pix, c_out, ranks, num_shared, ranks - num_shared, scaling,
        *_pixels(dy), *_pixels(z_rank), *lora_b.stride(), idx.shape[1],
        *(_pixels(dz) if dz is not None else (0, 0, 0)),
        TOP_K=idx.shape[1], RP=rp, NEED_DZ=need_dz, SPLIT_DZ=split, NEED_DB=need_db, NEED_DG=need_dg,
        SPLIT=splits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    if need_db or need_dg:
        reduce(part, gpart, idx, gate, num_shared, ranks, rp, n_m, 0, c_out, None, db, dgate)
    return dz, db, dgate


@on_tensor_device
def finite_ranks(lora_a: torch.Tensor, reps: int) -> torch.Tensor:
    """``lora_a (R, C_in, kh, kw)`` with non-finite values zeroed, repeated ``reps`` times: ``(reps R, C_in, kh,
    kw)``, one launch."""
    a = lora_a.contiguous()
    ranks, n = a.shape[0], a[0].numel()
    out = torch.empty((reps * ranks, *a.shape[1:]), dtype=a.dtype, device=a.device)
    if out.numel():
        _finite_ranks_kernel[(ranks, cdiv(n, 1024))](a, out, ranks, n, REPS=reps, BLOCK=1024)
    return out
