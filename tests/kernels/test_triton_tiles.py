"""The Triton MoR linear kernels' fixed tile tables (mor_kernels/kernels/mor_lora_tiles.py), and every GPU tile
configuration they pick run under the interpreter on ragged sizes, split-K included: forward and every
gradient against the reference (MOR_SPEC section 7), and bitwise repeatable."""

import pytest
import torch
import triton
import triton.language as tl
from test_triton_mor_linear import check_parity
from triton_env import DEVICE, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels.kernels import mor_lora_tiles as tiles
from mor_kernels.testing import random_case

skip_if_triton_imported_too_late()
CUDA = torch.device("cuda")

# (batch, tokens, d_in, d_out, RP) -> the forward's GPU tiles for 16-bit inputs (BLOCK_M, BLOCK_N, SPLIT_K,
# num_warps): the SD 2.1 shapes at batch 1 and 8 (and the ff layers at 64 tokens), sample routing (RP 16) and
# token routing with R = 40 (RP 64).
FWD_TILES = {
    (1, 4096, 320, 320, 16): (128, 64, 1, 4),
    (1, 1024, 640, 640, 16): (64, 64, 1, 4),
    (1, 256, 1280, 1280, 16): (64, 64, 2, 4),  # 80 programs -> 160
    (1, 64, 1280, 1280, 16): (64, 64, 4, 4),  # 20 -> 80: 4 K steps per split at least
    (1, 64, 5120, 1280, 16): (64, 64, 8, 4),  # ff.net.2: 20 -> 160
    (1, 64, 1280, 10240, 16): (64, 64, 1, 4),  # ff.net.0: 160 without a split
    (1, 4096, 320, 320, 64): (64, 128, 1, 4),
    (1, 64, 1280, 1280, 64): (64, 128, 4, 4),
    (8, 4096, 320, 320, 16): (128, 64, 1, 4),
    (8, 1024, 640, 640, 16): (128, 128, 1, 8),
    (8, 256, 1280, 1280, 16): (128, 128, 1, 8),
    (8, 64, 1280, 1280, 16): (64, 64, 1, 4),
    (8, 4096, 320, 320, 64): (128, 128, 1, 8),
}
# the backward's (BLOCK_M, BLOCK_N = d_in tile, SPLIT_K of the d_out loop, num_warps): the forward's rule with
# d_in and d_out exchanged
BWD_TILES = {
    (1, 4096, 320, 320, 16): (128, 64, 1, 4),
    (1, 256, 1280, 1280, 16): (64, 64, 2, 4),
    (1, 64, 1280, 1280, 16): (64, 64, 4, 4),
    (1, 64, 1280, 5120, 16): (64, 64, 8, 4),  # dx of ff.net.2 sums over d_out = 5120
    (1, 64, 10240, 1280, 16): (64, 64, 1, 4),
    (8, 1024, 640, 640, 16): (128, 128, 1, 8),
}


def test_fwd_tile_table():
    """64-wide column tiles where they cost fewer MMA columns (d_out 320) or fill an H100's 132 SMs at batch
    1, 128 otherwise and for RP 64; then a split of the d_in loop while short of 132 programs and each split
    keeps 4 K steps of 64; small tiles, no split for float32 and the interpreter, with the same BLOCK_N (so
    the executed FLOPs depend on the shapes alone)."""
    for (batch, tokens, d_in, d_out, rp), want in FWD_TILES.items():
        for dtype in (torch.float16, torch.bfloat16):
            cfg = tiles.fwd_config(CUDA, dtype, batch, tokens, d_in, d_out, rp)
            got = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["num_warps"])
            assert got == want, (batch, tokens, d_in, d_out, rp)
            assert cfg["BLOCK_K"] == 64 and cfg["num_stages"] == 3
        for device, dtype in ((CUDA, torch.float32), (torch.device("cpu"), torch.bfloat16)):
            small = tiles.fwd_config(device, dtype, batch, tokens, d_in, d_out, rp)
            assert (small["BLOCK_M"], small["BLOCK_K"], small["SPLIT_K"], small["num_stages"]) == (32, 32, 1, 2)
            assert small["BLOCK_N"] == want[1]
        assert tiles.fwd_column_tiles(batch, tokens, d_out, rp) == -(-d_out // want[1])
        bm, bn, split, _ = want
        programs = -(-tokens // bm) * -(-d_out // bn) * batch * split
        steps = d_in // 64
        # fills the GPU, or stops where another split would leave a split fewer than 4 K steps, or at 8
        assert programs >= tiles.NUM_SMS or 2 * split * tiles.MIN_SPLIT_STEPS > steps or split == tiles.MAX_SPLIT_K


def test_bwd_tile_table():
    for (batch, tokens, d_in, d_out, rp), want in BWD_TILES.items():
        cfg = tiles.bwd_config(CUDA, torch.bfloat16, batch, tokens, d_in, d_out, rp)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["num_warps"]) == want, (batch, tokens, d_in)
        small = tiles.bwd_config(torch.device("cpu"), torch.bfloat16, batch, tokens, d_in, d_out, rp)
        assert small["SPLIT_K"] == 1 and small["BLOCK_M"] == 32


GPU_TILES = sorted({v[:3] for v in FWD_TILES.values()} | {v[:3] for v in BWD_TILES.values()})


def _gpu_config(bm, bn, split):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split, num_warps=8 if bm * bn >= 128 * 128 else 4,
                num_stages=3)  # fmt: skip


@pytest.mark.parametrize("config", GPU_TILES, ids=[f"{m}x{n}s{s}" for m, n, s in GPU_TILES])
@pytest.mark.parametrize("routing,dtype", [("sample", torch.float16), ("token", torch.bfloat16)])
def test_gpu_tile_configs(routing, dtype, config, monkeypatch):
    """Every tensor-core tile of the forward's and the backward's tables, as on a GPU with 16-bit inputs, run
    here under the interpreter on ragged sizes: T = 130 (the last token block partial), d_in = 41 and d_out =
    150 (the last column tile partial); with a split, d_in = d_out = 300: five K steps of 64 over the splits,
    so 2 and 4 splits give every split one step or more, while 8 splits leave three of them empty (zero
    partials, still counted in: the arrival count must reach 8)."""
    from mor_kernels.kernels import mor_lora, mor_lora_bwd

    seen = []

    def forced(kind):
        def config_(device, dtype_, *shape):
            seen.append((kind, dtype_))
            return _gpu_config(*config)

        return config_

    monkeypatch.setattr(mor_lora, "fwd_config", forced("fwd"))
    monkeypatch.setattr(mor_lora_bwd, "bwd_config", forced("bwd"))
    d = 300 if config[2] > 1 else None
    check_parity(random_case(routing=routing, tokens=130, d_in=d or 41, d_out=d or 150, seed=16), dtype)
    assert sorted(seen) == [("bwd", dtype), ("fwd", dtype)]  # one forward launch, one backward


@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_is_bitwise_repeatable(routing, split, monkeypatch):
    """Forward and backward with their K loops split (2 or 3 splits of 16-wide steps, d_in 100 and d_out 90
    ragged): the partials are summed in split order by whichever split finishes last, so two runs give the
    same bits; and the results meet the reference."""
    from mor_kernels.kernels import mor_lora, mor_lora_bwd

    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, SPLIT_K=split, num_warps=4, num_stages=2)
    monkeypatch.setattr(mor_lora, "fwd_config", lambda *a: dict(cfg))
    monkeypatch.setattr(mor_lora_bwd, "bwd_config", lambda *a: dict(cfg))
    c = random_case(routing=routing, batch=2, tokens=70, d_in=100, d_out=90, seed=17)

    def run():
        t = c.to(torch.float32, device=DEVICE, requires_grad=True)
        args = (t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.idx, t.gate, 2, 0.75)
        y = mor_kernels.mor_linear(*args, backend="triton")
        dy = torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)
        return (y, *torch.autograd.grad(y, [t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.gate], dy))

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    check_parity(c, torch.float32)


@triton.jit
def _arrive_in_order_kernel(parts_ptr, order_ptr, ws_acc_ptr, ws_aux_ptr, lock_ptr, acc_ptr, aux_ptr, reducer_ptr,
                            SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            AUX: tl.constexpr):  # fmt: skip
    """Program ``(i, tile)`` plays split ``order[tile, i]`` of ``tile``: its partials are ``parts[tile, s]``
    (``BLOCK_M x (BLOCK_N + AUX)``); it arrives through ``_split_arrive`` and, if last, reduces with
    ``_split_sum`` and writes the sums and its split id. The interpreter runs the programs in order of ``i``, so
    ``order`` is the arrival order."""
    from mor_kernels.kernels.mor_lora import _split_arrive, _split_sum

    pid = tl.program_id(0)
    tile = tl.program_id(1).to(tl.int64)
    s = tl.load(order_ptr + tile * SPLIT_K + pid).to(tl.int64)
    i = tl.arange(0, BLOCK_M)[:, None]
    width = BLOCK_N + AUX
    row = parts_ptr + ((tile * SPLIT_K + s) * BLOCK_M + i) * width
    acc = tl.load(row + tl.arange(0, BLOCK_N)[None, :])
    aux = tl.load(row + BLOCK_N + tl.arange(0, AUX)[None, :])
    if _split_arrive(acc, aux, ws_acc_ptr, ws_aux_ptr, lock_ptr, tile, s, SPLIT_K, True, BLOCK_M, BLOCK_N, AUX):
        acc, aux = _split_sum(ws_acc_ptr, ws_aux_ptr, lock_ptr, tile, SPLIT_K, True, BLOCK_M, BLOCK_N, AUX)
        out = (tile * BLOCK_M + i) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(acc_ptr + out, acc)
        tl.store(aux_ptr + (tile * BLOCK_M + i) * AUX + tl.arange(0, AUX)[None, :], aux)
        tl.store(reducer_ptr + tile, s.to(tl.int32))


@pytest.mark.parametrize("split", [3, 4, 8])
def test_split_sum_is_in_split_order_whatever_the_arrival_order(split):
    """The split-K reduction driven with the splits arriving in reversed and in shuffled order (on a GPU they
    arrive in any order; the interpreter alone would always make the last program the reducer): the split that
    arrives last reduces, its sums equal the partials added in split order bit for bit (the partials span 24
    binary orders of magnitude, so the arrival order would give other bits), and every count is back to zero."""
    from mor_kernels.kernels.mor_lora import split_workspace

    tiles, bm, bn, aux = 2, 16, 16, 16
    gen = torch.Generator().manual_seed(19)
    scale = torch.pow(2.0, torch.randint(-12, 12, (tiles, split, bm, bn + aux), generator=gen).float())
    parts = (torch.randn(tiles, split, bm, bn + aux, generator=gen) * scale).to(DEVICE)
    want = parts[:, 0].clone()
    for s in range(1, split):
        want = want + parts[:, s]  # float32, in split order
    orders = {
        "reversed": torch.arange(split - 1, -1, -1).repeat(tiles, 1),
        "shuffled": torch.stack([torch.randperm(split, generator=gen) for _ in range(tiles)]),
    }
    for name, order in orders.items():
        arrival = parts[torch.arange(tiles)[:, None], order.to(DEVICE)]
        in_arrival_order = arrival[:, 0].clone()
        for s in range(1, split):
            in_arrival_order = in_arrival_order + arrival[:, s]
        assert not torch.equal(in_arrival_order, want), "the data cannot tell the two orders apart"
        ws, lock = split_workspace(torch.device(DEVICE), tiles * split * bm * (bn + aux), tiles)
        ws_acc, ws_aux = ws[: tiles * split * bm * bn], ws[tiles * split * bm * bn :]
        acc = torch.full((tiles, bm, bn), float("nan"), device=DEVICE)
        aux_out = torch.full((tiles, bm, aux), float("nan"), device=DEVICE)
        reducer = torch.full((tiles,), -1, dtype=torch.int32, device=DEVICE)
        order32 = order.to(torch.int32).contiguous().to(DEVICE)
        _arrive_in_order_kernel[(split, tiles)](parts.contiguous(), order32, ws_acc, ws_aux, lock, acc, aux_out,
                                                reducer, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, AUX=aux)  # fmt: skip
        if DEVICE == "cpu":  # the interpreter runs the programs in order: the last one listed arrives last
            assert reducer.tolist() == order[:, -1].tolist(), name
        assert torch.equal(acc, want[..., :bn]) and torch.equal(aux_out, want[..., bn:]), name
        assert not lock[:tiles].any(), f"{name}: the arrival counts were not reset to zero"


@triton.jit
def _part_rows_kernel(out_ptr, b, m, n_m, width, RP: tl.constexpr):
    from mor_kernels.kernels.mor_lora_bwd import _part_rows

    tl.store(out_ptr + tl.arange(0, RP), _part_rows(b, m, n_m, RP, width))


def test_backward_partial_offsets_do_not_wrap_at_2_to_the_31():
    """The backward reduction's offsets into ``part (B, n_m, RP, d_in + d_out)`` (``_part_rows``), computed from
    int32 indices as its loop over samples gives them, at a size where ``((b n_m + m) RP + p) width`` passes
    2^31: batch 128 at 4096 tokens (32 blocks of 128), token routing (RP 64), ff.net.0's d_in + d_out = 11520,
    12 GB of float32 partials; the exact int64 offsets, not the wrapped int32 ones."""
    b, m, n_m, rp, width = 127, 31, 32, 64, 11520
    out = torch.zeros(rp, dtype=torch.int64, device=DEVICE)
    _part_rows_kernel[(1,)](out, b, m, n_m, width, RP=rp)
    want = [((b * n_m + m) * rp + p) * width for p in range(rp)]
    assert want[-1] > 2**31
    assert out.tolist() == want


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device, not the interpreter")
@pytest.mark.parametrize("tokens", [64, 256])
def test_gpu_split_k_sd_shapes_are_bitwise_repeatable(tokens):
    """On a GPU, where the splits of a tile finish in any order: the SD shapes the table splits at batch 1
    (1280 channels at 64 and 256 tokens, bf16) give the same bits run after run, forward and backward, and
    meet the reference."""
    cfg = tiles.fwd_config(CUDA, torch.bfloat16, 1, tokens, 1280, 1280, 16)
    assert cfg["SPLIT_K"] > 1
    c = random_case(batch=1, tokens=tokens, d_in=1280, d_out=1280, num_shared=8, num_routed=32, num_zero=4, top_k=8,
                    seed=18)  # fmt: skip

    def run():
        t = c.to(torch.bfloat16, device="cuda", requires_grad=True)
        y = mor_kernels.mor_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.idx, t.gate, 8, 1.0, backend="triton")
        dy = torch.linspace(-1, 1, y.numel(), device="cuda").reshape(y.shape).to(y.dtype)
        return (y, *torch.autograd.grad(y, [t.x, t.lora_a, t.lora_b, t.gate], dy))

    first = run()
    for _ in range(3):
        for a, b in zip(first, run(), strict=True):
            assert torch.equal(a, b)
    check_parity(c, torch.bfloat16)


@pytest.mark.parametrize("current", [0, 1])
def test_launchers_guard_the_device_only_when_it_is_not_current(current, monkeypatch):
    """``on_tensor_device``: a launch on a tensor of another GPU than the current one runs under that GPU's device
    guard (Triton launches on the current device); on the current GPU, or on the CPU, no guard is entered (a few
    us of host time per launch). CUDA replaced by fakes: the logic runs on any machine."""
    import contextlib
    from types import SimpleNamespace

    from mor_kernels.kernels import mor_lora

    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", guard)
    calls = []
    launch = mor_lora.on_tensor_device(lambda t, x: calls.append((t, x, list(entered))) or x)
    on_gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    assert launch(on_gpu1, 7) == 7
    assert calls[-1][2] == ([] if current == 1 else [torch.device("cuda", 1)])  # the guard held during the launch
    entered.clear()
    assert launch(torch.zeros(1), 8) == 8 and entered == []  # CPU: never


@pytest.mark.parametrize("current", [0, 1])
def test_capture_check_guards_the_device_only_when_it_is_not_current(current, monkeypatch):
    """``capturing`` (asked by every split-K launch for its workspace): it reads the capture state of the tensor's
    GPU, entering that GPU's device guard only when another GPU is current (the launchers have made the tensor's
    GPU current already, so a launch enters none). CUDA replaced by fakes."""
    import contextlib

    from mor_kernels.kernels import mor_lora

    state = {"current": current, "capturing": {0: False, 1: True}}
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        before, state["current"] = state["current"], device.index
        yield
        state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"][state["current"]])
    assert mor_lora.capturing(torch.device("cuda", 1)) is True  # GPU 1's state, whichever GPU is current
    assert entered == ([] if current == 1 else [torch.device("cuda", 1)])
    entered.clear()
    assert mor_lora.capturing(torch.device("cuda", 0)) is False
    assert entered == ([] if current == 0 else [torch.device("cuda", 0)])
    assert mor_lora.capturing(torch.device("cpu")) is False
