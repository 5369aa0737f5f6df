"""The CUDA tile kernels (csrc/cuda/mor_lora.cu, mor_lora_bwd.cu, conv_up.cu) run on the CPU, one emulated thread
block after the other (see extension_emulation.cpp), against the C++ CPU kernels and the reference.

This checks the CUDA kernels' index arithmetic, shared-memory layout, routing tables and ordered reductions on
machines without a GPU (the tensor-core forward too, with float operands and a host stand-in for the WMMA
fragment calls): blocks run either as one thread or as 256 host threads with real barriers, and
mor::route's warps as 32 host threads meeting at every shuffle. Timing-dependent races can still hide here; the
GPU tests (marked ``gpu``) are the final word.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from mor_kernels import _extension
from mor_kernels import reference as ref
from mor_kernels.testing import assert_parity, random_case

_C, WHY = _extension.load()
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no host C++ compiler to build the emulation"),
    pytest.mark.skipif(_C is None, reason=f"the compiled extension is not built here ({WHY})"),
]
HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "default": {},
    "t1": {"tokens": 1},
    "t70_r40": {"tokens": 70, "num_shared": 8, "num_routed": 32, "num_zero": 4, "top_k": 8, "d_in": 45, "d_out": 37},
    "r1": {"num_shared": 0, "num_routed": 1, "num_zero": 1, "top_k": 2},
    "zero_only_s0": {"zero_only_unit": True, "num_zero": 3, "top_k": 2, "num_shared": 0},
    "k_all": {"num_shared": 1, "num_routed": 4, "num_zero": 2, "top_k": 6},
    # 2 x 300 tokens: above the 256 tokens from which the backward's outer products split their token sums
    # (3 splits summed by split_sum_kernel)
    "t300_splits": {"batch": 2, "tokens": 300, "d_in": 20, "d_out": 70},
}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = tmp_path_factory.mktemp("emu") / "emu.so"
    src = os.path.join(HERE, "extension_emulation.cpp")
    cmd = [CXX, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas", "-o", str(lib), src]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    dll = ctypes.CDLL(str(lib))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    dll.emu_lora_fwd.argtypes = [p] * 8 + [i64] * 5 + [i32] * 3 + [f32, i32]
    dll.emu_lora_fwd_mma.argtypes = dll.emu_lora_fwd.argtypes
    dll.emu_lora_bwd.argtypes = [p] * 11 + [i64] * 4 + [i32] * 3 + [f32, i32]
    dll.emu_conv_up.argtypes = [p] * 8 + [i64] * 3 + [i32] * 3 + [f32]
    dll.emu_split_sum.argtypes = [p, p, i64, i64]
    dll.emu_route.argtypes = [p] * 5 + [i64] + [i32] * 4
    dll.emu_set_block_threads.argtypes = [i32]
    return dll


def _ptr(t):
    """A raw pointer to ``t``'s data; the caller keeps ``t`` alive during the call."""
    assert t is None or t.is_contiguous()
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _emu_forward(emu, c, base, tensor_cores=False, chunk=64, store_h=True):
    """The forward kernel over output-column chunks of ``chunk`` (64: as many chunks as 64-wide column steps,
    the most the host launcher uses), h poisoned first (the kernel writes it whole, zeros included)."""
    b, t, d_in = c.x.shape
    d_out, ranks = c.lora_b.shape
    bt = c.lora_b.t().contiguous()
    y = torch.full((b, t, d_out), float("nan"))
    h = torch.full((b, t, ranks), float("nan")) if store_h else None
    idx, gate = c.idx.contiguous(), c.gate.contiguous()
    k, token = idx.shape[-1], int(idx.dim() == 3)
    (emu.emu_lora_fwd_mma if tensor_cores else emu.emu_lora_fwd)(
        *map(_ptr, (c.x, c.lora_a, bt, idx, gate, base, y, h)),
        b,
        t,
        d_in,
        d_out,
        chunk,
        ranks,
        c.num_shared,
        k,
        c.scaling,
        token,
    )
    return y, h


# 1: each block runs as one thread in program order; 256 (the kernels' block size): one host thread per CUDA
# thread with real barriers, which exercises the work split across threads and the __syncthreads() placement.
@pytest.mark.parametrize("block_threads", [1, 256])
@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_lora_kernels_emulated(emu, case, routing, block_threads):
    emu.emu_set_block_threads(block_threads)
    c = random_case(routing=routing, **CASES[case], seed=31).to(torch.float32)
    b, t, d_in = c.x.shape
    d_out, ranks = c.lora_b.shape
    base = torch.randn(b, t, d_out)
    y, h = _emu_forward(emu, c, base)
    r = c.to(torch.float64)
    y64 = ref.mor_lora(r.x, r.lora_a, r.lora_b, r.idx, r.gate, r.num_shared, r.scaling, base=base.double())
    assert_parity(y, y64, dtype=torch.float32, name="emulated CUDA forward")

    dy = torch.randn(b, t, d_out)
    want = torch.ops.mor.lora_bwd(dy, c.x, c.lora_a, c.lora_b, c.idx, c.gate, h, c.num_shared, c.scaling, [True] * 4)
    got = [torch.full_like(w, float("nan")) for w in want]
    grad_bt = torch.full((ranks, d_out), float("nan"))
    k, token = c.idx.shape[-1], int(c.idx.dim() == 3)
    bt = c.lora_b.t().contiguous()  # kept alive across the call
    emu.emu_lora_bwd(
        *map(_ptr, (dy, c.x, c.lora_a, bt, c.idx, c.gate, h, got[0], got[1], grad_bt, got[3])),
        b,
        t,
        d_in,
        d_out,
        ranks,
        c.num_shared,
        k,
        c.scaling,
        token,
    )
    got[2] = grad_bt.t()
    for name, g, w in zip(("dx", "dlora_a", "dlora_b", "dgate"), got, want, strict=True):
        assert_parity(g, w, dtype=torch.float32, name=f"emulated CUDA {name}")


MMA_CASES = {
    **CASES,
    "d_out130_r17": {
        "tokens": 40,
        "num_shared": 3,
        "num_routed": 14,
        "num_zero": 2,
        "top_k": 5,
        "d_in": 70,
        "d_out": 130,
    },
}


@pytest.mark.parametrize("block_threads", [1, 256])
@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("case", list(MMA_CASES))
def test_cuda_tensor_core_forward_emulated(emu, case, routing, block_threads):
    """The WMMA forward (16-bit inputs on sm_80+) with float operands and a host stand-in for the fragment
    calls: its tiling over 16-wide rank and output tiles, the zero padding of the rank list, several output
    chunks and the shared-memory layout, against the reference; h equals the SIMT kernel's."""
    emu.emu_set_block_threads(block_threads)
    c = random_case(routing=routing, **MMA_CASES[case], seed=41).to(torch.float32)
    b, t, _ = c.x.shape
    base = torch.randn(b, t, c.lora_b.shape[0])
    y, h = _emu_forward(emu, c, base, tensor_cores=True)
    r = c.to(torch.float64)
    y64 = ref.mor_lora(r.x, r.lora_a, r.lora_b, r.idx, r.gate, r.num_shared, r.scaling, base=base.double())
    assert_parity(y, y64, dtype=torch.float32, name="emulated tensor-core forward")
    _, h_simt = _emu_forward(emu, c, base)
    torch.testing.assert_close(h, h_simt, rtol=1e-6, atol=1e-6)
    emu.emu_set_block_threads(1)


def _pixel_strides(t):
    """(batch, channel, pixel) strides of a 4-D tensor whose H and W flatten (as csrc/cuda/conv_up.cu reads them)."""
    assert t.stride(2) == t.stride(3) * t.shape[3]
    return torch.tensor([t.stride(0), t.stride(1), t.stride(3)], dtype=torch.int64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("case", ["default", "r1", "zero_only_s0", "t70_r40"])
def test_cuda_conv_up_emulated(emu, case, layout):
    """conv_up's blocks (32 pixels x 64 channels, 256 threads with real barriers) against the C++ CPU kernel,
    on 9 x 11 pixels (the last pixel tile partial) and 70 channels (two channel chunks, the last partial); base
    and z_rank NCHW, channels_last (what cuDNN gives a channels_last model) or one of each, read in place through
    their strides (the host code passes them without a contiguous copy), y NCHW."""
    kw = {k: v for k, v in CASES[case].items() if k not in ("tokens", "d_in", "d_out")}
    c = random_case(kernel_size=3, d_in=4, d_out=70, height=9, width=11, conv={"padding": (1, 1)}, **kw, seed=37)
    base = torch.nn.functional.conv2d(c.x, c.weight, c.bias, padding=1).contiguous()
    z_rank = torch.nn.functional.conv2d(c.x, c.lora_a, padding=1).contiguous()
    want = torch.ops.mor.conv_up(base, z_rank, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    if layout != "nchw":
        base = base.contiguous(memory_format=torch.channels_last)
        assert not base.is_contiguous()
    if layout == "channels_last":
        z_rank = z_rank.contiguous(memory_format=torch.channels_last)
        assert z_rank.shape[1] == 1 or not z_rank.is_contiguous()  # one rank channel: both layouts are one
    got = torch.full_like(want, float("nan"))
    b, _, hh, ww = base.shape
    d_out, ranks = c.lora_b.shape
    lora_b = c.lora_b.contiguous()
    sb, sz = _pixel_strides(base), _pixel_strides(z_rank)
    emu.emu_conv_up(
        *(ctypes.c_void_p(t.data_ptr()) for t in (base, z_rank)),
        *map(_ptr, (lora_b, c.idx, c.gate, got, sb, sz)),
        b,
        hh * ww,
        d_out,
        ranks,
        c.num_shared,
        c.idx.shape[-1],
        c.scaling,
    )
    assert_parity(got, want, dtype=torch.float32, name="emulated CUDA conv_up")


def test_cuda_split_sum_keeps_split_order(emu):
    """split_sum_kernel sums the backward's split partials in split order: with partials 1e8, -1e8, 1 that
    order gives exactly 1, the reverse (or any other) 0 in float32."""
    partial = torch.tensor([[1e8] * 300, [-1e8] * 300, [1.0] * 300], dtype=torch.float32)
    out = torch.full((300,), float("nan"))
    emu.emu_split_sum(_ptr(partial), _ptr(out), 300, 3)
    assert torch.equal(out, torch.ones(300))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    "rows,n,k,num_zero", [(11, 7, 3, 2), (9, 36, 8, 4), (3, 70, 5, 1), (4, 2, 2, 1), (17, 5, 5, 0)]
)
def test_cuda_route_emulated(emu, rows, n, k, num_zero, renormalize):
    gen = torch.Generator().manual_seed(n * k)
    logits = torch.randn(rows, n, generator=gen) * 2
    logits[0, : n // 2] = 1.0  # ties go to the lower slot
    logits[0, n // 2 :] = 1.0
    idx = torch.full((rows, k), -7, dtype=torch.int32)
    slots = torch.full((rows, k), -7, dtype=torch.int32)
    gate = torch.full((rows, k), float("nan"))
    probs = torch.full((rows, n), float("nan"))
    emu.emu_route(*map(_ptr, (logits, idx, gate, probs, slots)), rows, n, k, n - num_zero, int(renormalize))
    want = torch.ops.mor.route(logits, k, num_zero, renormalize)
    r_idx, r_gate, r_probs = ref.route(logits, k, num_zero, renormalize)
    assert torch.equal(idx, r_idx) and torch.equal(idx, want[0]) and torch.equal(slots, want[3])
    assert_parity(gate, r_gate, dtype=torch.float32, name="emulated CUDA route gate")
    assert_parity(probs, r_probs, dtype=torch.float32, name="emulated CUDA route probs")


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "wmma"])
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_cuda_forward_column_chunks_and_h(emu, routing, tensor_cores):
    """The forward over 1, 2 or 3 output-column chunks (d_out = 130: chunks of 64 or 128 columns, or one) gives
    the same y bit for bit, h written whole by the first chunk's blocks equals the C++ kernel's at the ranks
    that kernel lists (and, under sample routing, is zero where it is), and without store_h y is unchanged."""
    c = random_case(routing=routing, tokens=40, d_in=45, d_out=130, num_shared=3, num_routed=9, num_zero=2,
                    top_k=4, zero_only_unit=True, seed=43).to(torch.float32)  # fmt: skip
    base = torch.randn(2, 40, 130)
    ys = []
    for chunk in (64, 128, 1 << 20):
        y, h = _emu_forward(emu, c, base, tensor_cores=tensor_cores, chunk=chunk)
        ys.append(y)
        want_y, want_h = torch.ops.mor.lora_fwd(c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, base)
        assert_parity(y, want_y, dtype=torch.float32, name="y")
        listed = want_h != 0  # the C++ kernel lists a token's picked ranks; CUDA's token routing lists all R
        torch.testing.assert_close(h[listed], want_h[listed], rtol=1e-6, atol=1e-6)
        if routing == "sample":
            assert torch.equal(h == 0, want_h == 0)
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    y, _ = _emu_forward(emu, c, base, tensor_cores=tensor_cores, store_h=False)
    assert torch.equal(y, ys[0])


def _single_picker_case(emu, routing: str, tensor_cores: bool):
    """A case in which routed rank ``S + 5`` is picked by one unit only (its slot 0), with that unit, the rank
    and ``run(case) -> (y, [dx, dA, dB^T, dgate])`` through the emulated CUDA forward and backward."""
    c = random_case(routing=routing, batch=3, tokens=9, d_in=41, d_out=70, seed=47).to(torch.float32)
    rank = c.num_shared + 5
    c.idx = c.idx.clone()
    c.idx[c.idx == 5] = -1
    picker = (1,) if routing == "sample" else (1, 4)
    c.idx[picker + (0,)] = 5
    b, t, d_in = c.x.shape
    d_out, ranks = c.lora_b.shape
    k, token = c.idx.shape[-1], int(routing == "token")
    base = torch.randn(b, t, d_out)
    dy = torch.randn(b, t, d_out)

    def run(case):
        y, h = _emu_forward(emu, case, base, tensor_cores=tensor_cores)
        grads = [torch.full(s, float("nan")) for s in ((b, t, d_in), (ranks, d_in), (ranks, d_out), c.idx.shape)]
        bt = case.lora_b.t().contiguous()
        emu.emu_lora_bwd(*map(_ptr, (dy, case.x, case.lora_a, bt, case.idx, case.gate, h, *grads)),
                         b, t, d_in, d_out, ranks, case.num_shared, k, case.scaling, token)  # fmt: skip
        return y, grads

    return c, picker, rank, run


def _poison(case, rank: int, where: str | None):
    """NaN in ``lora_a`` (``where = "a"``) or ``lora_b`` (``"b"``) of ``rank``, in place; None: nothing."""
    if where == "a":
        case.lora_a[rank, 3] = float("nan")
    elif where == "b":
        case.lora_b[7, rank] = float("nan")


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "wmma"])
@pytest.mark.parametrize("poison", ["a", "b"])
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_cuda_kernels_non_finite_unpicked_rank_emulated(emu, routing, poison, tensor_cores):
    """MOR_SPEC 2.2 on the CUDA kernels: a routed rank picked by one unit only holds NaN (in lora_a or lora_b):
    every other unit's y, dx and dgate and every other rank's dA/dB equal those of the run with finite values,
    bit for bit; the unit that picks it is not finite. Token routing lists every rank for every token (the
    dense case); the tensor-core forward guards its MMA against the NaN of an unpicked rank."""
    c, picker, rank, run = _single_picker_case(emu, routing, tensor_cores)
    clean_y, clean = run(c)
    bad = c.to(torch.float32)
    _poison(bad, rank, poison)
    y, grads = run(bad)
    others = torch.ones(y.shape[: len(picker)], dtype=torch.bool)
    others[picker] = False
    keep = torch.arange(c.lora_a.shape[0]) != rank
    assert torch.isfinite(y[others]).all() and torch.equal(y[others], clean_y[others])
    assert not torch.isfinite(y[picker]).all()
    assert torch.equal(grads[0][others], clean[0][others])  # dx
    assert torch.equal(grads[3][others], clean[3][others])  # dgate
    assert torch.equal(grads[1][keep], clean[1][keep])  # dA of the other ranks
    assert torch.equal(grads[2][keep], clean[2][keep])  # dB^T of the other ranks


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "wmma"])
@pytest.mark.parametrize("poison", [None, "a", "b"])
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_cuda_kernels_gate_zero_is_a_zero_slot_emulated(emu, routing, poison, tensor_cores):
    """MOR_SPEC 2.2 on the CUDA kernels: a slot that picks a rank with a gate of exactly 0 does not use the
    rank. y, dx, dgate (0 for that slot) and every other rank's dA/dB equal those of the same call with that
    slot a zero slot, bit for bit, also when the rank holds NaN (it is then never read)."""
    c, picker, rank, run = _single_picker_case(emu, routing, tensor_cores)
    c.gate = c.gate.clone()
    c.gate[picker + (0,)] = 0.0
    zero = c.to(torch.float32)
    zero.idx = c.idx.clone()
    zero.idx[picker + (0,)] = -1
    _poison(c, rank, poison)
    want_y, want = run(zero)
    y, grads = run(c)
    keep = torch.arange(c.lora_a.shape[0]) != rank
    assert torch.isfinite(want_y).all() and torch.equal(y, want_y)
    assert torch.equal(grads[0], want[0])  # dx
    assert torch.equal(grads[3], want[3]) and (grads[3][picker + (0,)] == 0).all()  # dgate
    assert torch.equal(grads[1][keep], want[1][keep])  # dA of the other ranks
    assert torch.equal(grads[2][keep], want[2][keep])  # dB^T of the other ranks
