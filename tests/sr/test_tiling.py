"""Tiled processing: agreement with untiled results, weight normalisation, seams, odd sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from mor_model.sr.tiling import choose_tile_size, tile_starts, tile_weight, tiled_apply


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weight", ["gaussian", "cosine", "uniform"])
@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (20, 90)])
def test_pointwise_fn_matches_untiled(weight, hw):
    x = _rand((2, 3) + hw)
    conv = torch.nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        ref = conv(x)
        out = tiled_apply(conv, x, tile_size=16, overlap=6, weight=weight)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_small_receptive_field_interior_matches():
    # a 3x3 conv sees 1 pixel past a tile edge; away from the image border the tiled result differs
    # only where a tile boundary cuts the receptive field, and cosine weights over an 8-px overlap
    # give those pixels little weight. A convolution with zero-padding inside each tile is
    # compared with the untiled one: the difference is bounded and zero on one-tile inputs.
    x = _rand((1, 2, 48, 48), 1)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate")
    with torch.no_grad():
        ref = conv(x)
        one = tiled_apply(conv, x, tile_size=64, overlap=8)
        many = tiled_apply(conv, x, tile_size=24, overlap=8, weight="cosine")
    torch.testing.assert_close(one, ref, atol=1e-6, rtol=1e-6)
    err = (many - ref).abs()
    assert err.max() < 0.25 * ref.abs().max()
    # tiles start at 0, 12, 24 (evenly spread): rows/cols 0..11 are covered by the first tile only and
    # their receptive field stays inside it, so they are exact
    torch.testing.assert_close(many[..., :12, :12], ref[..., :12, :12], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(many, ref, atol=1e-5)  # and the cut lines do change something


@pytest.mark.parametrize("scale", [4, 8, 0.125, 0.5])
def test_scaled_tiles_vae_style(scale):
    # "decoder": nearest upsampling then a pointwise map; "encoder": average pooling (exact on tiles
    # aligned to the pooling grid, which `multiple` guarantees)
    if scale >= 1:
        s = int(scale)

        def fn(t):
            return F.interpolate(t, scale_factor=s, mode="nearest") * 2.0 + 1.0

        x, multiple, tile, overlap = _rand((1, 4, 19, 27), 2), 1, 8, 3
    else:
        k = int(round(1 / scale))

        def fn(t):
            return F.avg_pool2d(t, k)

        x, multiple, tile, overlap = _rand((2, 3, 8 * 9, 8 * 13), 3), 8, 32, 16
    ref = fn(x)
    out = tiled_apply(fn, x, tile_size=tile, overlap=overlap, scale=scale, multiple=multiple)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_gives_exact_output_size_for_odd_input():
    # fn only accepts multiples of 8 (like a UNet with 3 downsamplings): the input is padded, the
    # output cropped back to the exact size, and pointwise results are unchanged
    x = _rand((1, 3, 35, 41), 4)
    seen = []

    def fn(t):
        assert t.shape[-2] % 8 == 0 and t.shape[-1] % 8 == 0
        seen.append(tuple(t.shape[-2:]))
        return torch.tanh(t)

    out = tiled_apply(fn, x, tile_size=16, overlap=8, multiple=8)
    assert out.shape == x.shape and all(s == (16, 16) for s in seen)
    torch.testing.assert_close(out, torch.tanh(x))
    # one tile larger than the image: padded to (40, 48), cropped back
    seen.clear()
    out = tiled_apply(fn, x, tile_size=64, overlap=8, multiple=8)
    assert seen == [(40, 48)] and out.shape == x.shape
    torch.testing.assert_close(out, torch.tanh(x))
    # a downscaling fn on a non-multiple size: ceil(35 / 8) = 5 rows, ceil(41 / 8) = 6 columns, the
    # last ones from the replicate-padded input
    out = tiled_apply(lambda t: F.avg_pool2d(t, 8), x, tile_size=16, overlap=8, scale=0.125, multiple=8)
    padded = F.pad(x, (0, 7, 0, 5), mode="replicate")
    torch.testing.assert_close(out, F.avg_pool2d(padded, 8))
    # a decoder-style fn on an odd latent size: exactly 8x
    z = _rand((1, 4, 13, 7), 5)
    out = tiled_apply(lambda t: F.interpolate(t, scale_factor=8), z, tile_size=8, overlap=4, scale=8)
    torch.testing.assert_close(out, F.interpolate(z, scale_factor=8))


def test_one_tile_and_tile_larger_than_image():
    x = _rand((1, 3, 10, 12), 5)
    calls = []

    def fn(t):
        calls.append(t.shape)
        return t * 3

    out = tiled_apply(fn, x, tile_size=64, overlap=16)
    assert len(calls) == 1 and calls[0] == x.shape
    torch.testing.assert_close(out, x * 3)


def test_tile_starts_cover_and_overlap():
    for length, tile, overlap, m in [
        (100, 32, 8, 1),
        (96, 32, 16, 8),
        (33, 32, 8, 1),
        (257, 64, 32, 1),
        (64, 64, 8, 1),
    ]:
        starts = tile_starts(length, tile, overlap, m)
        assert starts[0] == 0 and starts[-1] == max(0, length - tile)
        assert all(s % m == 0 for s in starts)
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            assert 0 < b - a <= tile - overlap
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()


def test_weights_normalise_to_one():
    # blending a constant gives the constant; the weight sum over all tiles is positive everywhere
    x = torch.ones(1, 1, 70, 45)
    for weight in ("gaussian", "cosine", "uniform"):
        out = tiled_apply(lambda t: t, x, tile_size=20, overlap=8, weight=weight)
        torch.testing.assert_close(out, x)
    w = tile_weight(16, 16, kind="gaussian")
    assert w.shape == (16, 16) and (w > 0).all() and w[8, 8] > w[0, 0]
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.T)


def test_cosine_ramps_are_a_partition_of_unity():
    # two tiles overlapping by exactly `overlap`: the weights sum to exactly 1 in the overlap
    w1 = tile_weight(1, 24, kind="cosine", overlap=(0, 8), neighbours=(False, False, False, True))[0]
    w2 = tile_weight(1, 24, kind="cosine", overlap=(0, 8), neighbours=(False, False, True, False))[0]
    total = torch.zeros(40)
    total[:24] += w1
    total[16:] += w2
    torch.testing.assert_close(total, torch.ones(40))


def test_smooth_function_gives_smooth_result():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 90), indexing="ij")
    x = torch.sin(3 * yy + 2 * xx).view(1, 1, 90, 90)
    for weight in ("gaussian", "cosine"):
        out = tiled_apply(lambda t: t.exp(), x, tile_size=32, overlap=8, weight=weight)
        torch.testing.assert_close(out, x.exp())
        d2 = (out[..., :, 2:] - 2 * out[..., :, 1:-1] + out[..., :, :-2]).abs().max()
        assert d2 < 2 * (x.exp()[..., :, 2:] - 2 * x.exp()[..., :, 1:-1] + x.exp()[..., :, :-2]).abs().max()


@pytest.mark.parametrize("weight,max_step", [("cosine", 0.2), ("gaussian", 0.4)])
def test_no_seams_with_tile_dependent_function(weight, max_step):
    # a function whose output depends on the tile (a per-tile offset, like a model's tile-level colour
    # drift): a hard seam jumps by the offset difference at once; smooth blending spreads it out
    offset = 0.05
    x = torch.zeros(1, 1, 100, 100)

    def run(w):
        counter = iter(range(1000))
        return tiled_apply(lambda t: t + offset * (next(counter) % 2), x, tile_size=48, overlap=16, weight=w)

    def max_step_of(out):
        return max((out[..., 1:, :] - out[..., :-1, :]).abs().max(), (out[..., :, 1:] - out[..., :, :-1]).abs().max())

    assert max_step_of(run(weight)) < max_step * offset
    # plain averaging jumps by half the offset where a second tile starts
    assert max_step_of(run("uniform")) >= 0.45 * offset


def test_dtype_progress_and_no_mutation():
    x = _rand((1, 2, 40, 40), 6).half()
    x0 = x.clone()
    seen = []
    out = tiled_apply(lambda t: t.float() * 2, x, tile_size=16, overlap=4, progress=lambda d, n: seen.append((d, n)))
    assert out.dtype == torch.float32
    assert seen[-1][0] == seen[-1][1] == len(seen) == 9
    torch.testing.assert_close(out, x.float() * 2)
    assert torch.equal(x, x0)


def test_bad_arguments():
    x = _rand((1, 2, 40, 40))
    with pytest.raises(ValueError, match="larger than overlap"):
        tiled_apply(lambda t: t, x, tile_size=16, overlap=16)
    with pytest.raises(ValueError, match="multiple"):
        tiled_apply(lambda t: t, x, tile_size=20, overlap=4, multiple=8)
    with pytest.raises(ValueError, match="not an integer"):
        tiled_apply(lambda t: t, x, tile_size=16, overlap=8, scale=0.125, multiple=4)
    with pytest.raises(ValueError, match="expected"):
        tiled_apply(lambda t: t[..., :-1], x, tile_size=16, overlap=8)
    with pytest.raises(ValueError, match="weight"):
        tiled_apply(lambda t: t, x, tile_size=16, overlap=8, weight="hann")
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        tiled_apply(lambda t: t, x[0], tile_size=16, overlap=8)


def test_choose_tile_size_cpu_budget():
    t = choose_tile_size(4.0, device="cpu", cpu_budget_bytes=4 * 100 * 100, multiple=8, min_tile=16)
    assert t == 96
    assert choose_tile_size(1e12, device="cpu", multiple=8, min_tile=32) == 32
    assert choose_tile_size(1e-6, device="cpu", multiple=8, max_tile=1000) == 1000 // 8 * 8
    with pytest.raises(ValueError):
        choose_tile_size(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to query free memory")
def test_choose_tile_size_cuda():
    free, _ = torch.cuda.mem_get_info()
    t = choose_tile_size(1024.0, device="cuda", multiple=8, max_tile=1 << 20)
    assert t * t * 1024 <= 0.6 * free and (t + 8) ** 2 * 1024 > 0.6 * free * 0.95


def test_out_device_cpu():
    x = _rand((1, 2, 40, 40), 7)
    out = tiled_apply(lambda t: t * 2, x, tile_size=16, overlap=4, out_device="cpu")
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, x * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiles_with_cpu_accumulation():
    x = _rand((1, 4, 50, 70), 8).cuda()
    out = tiled_apply(lambda t: F.interpolate(t, scale_factor=8), x, tile_size=16, overlap=8, scale=8, out_device="cpu")
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=8).cpu())


def test_choose_tile_size_attention_and_fake_free_memory():
    # peak a n^2 + q n^4 <= 0.6 * free; the largest multiple of 8 that fits, and not the next one
    a, q, free = 1000.0, 2.0, 10 << 30
    n = choose_tile_size(a, bytes_per_pixel_sq=q, free_bytes=free, multiple=8, min_tile=8, max_tile=1 << 20)
    cost = lambda k: a * k**2 + q * k**4  # noqa: E731
    assert cost(n) <= 0.6 * free < cost(n + 8)
    linear = choose_tile_size(a, free_bytes=free, multiple=8, min_tile=8, max_tile=1 << 20)
    assert linear > 2 * n  # ignoring attention would pick a far larger tile
    assert choose_tile_size(a, bytes_per_pixel_sq=q, free_bytes=0, multiple=8, min_tile=16) == 16
    with pytest.raises(ValueError, match="free_bytes"):
        choose_tile_size(a, free_bytes=-1)
    with pytest.raises(ValueError, match="bytes_per_pixel_sq"):
        choose_tile_size(a, bytes_per_pixel_sq=-1.0)


# SD 2.1-base configs (the parts the memory model reads): no weights are needed
SD21_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "attention_head_dim": [5, 10, 20, 20],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
}
SD21_VAE = {"block_out_channels": [128, 256, 512, 512]}


def test_auto_tile_sizes_sd21_from_fake_free_memory():
    from mor_model.sr.tile_plan import auto_tile_sizes, tile_costs

    def sizes(gib, dtype=torch.float16, batch=1):
        return auto_tile_sizes(SD21_UNET, SD21_VAE, dtype, device="cuda", batch=batch, free_bytes=gib << 30)

    # an H200's free memory: the caps of the SR repositories (a linear-only model picked ~424 latent px here)
    assert sizes(139) == {"unet": 96, "encoder": 1024, "decoder": 224}
    # a 24 GB card: the decoder's one-head mid-block attention over 512 channels limits its tile
    mid = sizes(20)
    assert mid["unet"] == 96 and mid["encoder"] == 1024 and 128 <= mid["decoder"] < 224
    costs = tile_costs(SD21_UNET, SD21_VAE, torch.float16)
    a, q = costs["decoder"]
    n = mid["decoder"]
    assert a * n**2 + q * n**4 <= 0.6 * (20 << 30) < a * (n + 1) ** 2 + q * (n + 1) ** 4
    assert q * n**4 > 0.2 * a * n**2  # attention is a good part of the modelled peak there
    assert n < choose_tile_size(a, free_bytes=20 << 30, multiple=1, min_tile=1, max_tile=1024)  # linear only
    # less memory, fp32 or a batch: never larger tiles
    for smaller in (sizes(8), sizes(20, torch.float32), sizes(20, batch=4)):
        assert all(smaller[k] <= mid[k] for k in mid)
    assert sizes(8)["unet"] < 96
    # the UNet's highest-resolution attention (5 heads at the latent size) and the VAE's one head
    assert costs["unet"][1] == 2 * 5 * 2 and costs["encoder"][1] == 2 * 2 / 8**4


def _norm_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
        torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 3, 1),
    ).eval()  # fmt: skip


def test_groupnorm_stats_make_tiles_consistent():
    from mor_model.sr.tiling import GroupNormStats

    net = _norm_net()
    x = _rand((2, 3, 40, 56), 3) + torch.linspace(-2, 2, 56)  # content that differs from tile to tile
    with torch.no_grad():
        ref = net(x)
        stats = GroupNormStats(net)
        with stats.recording():
            torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)  # recording normalises as usual
        assert [len(v) for v in stats.stats.values()] == [1, 1]
        # 1x1 convs + GroupNorm are pointwise once the statistics are the whole image's: tiles give exactly
        # the untiled result; with each tile's own statistics they do not
        per_tile = tiled_apply(net, x, tile_size=16, overlap=8)
        with stats.applying():
            shared = tiled_apply(lambda t: (stats.restart(), net(t))[1], x, tile_size=16, overlap=8)
        torch.testing.assert_close(shared, ref, atol=1e-5, rtol=1e-5)
        assert (per_tile - ref).abs().max() > 0.1
        # the patch is gone afterwards, and misuse is reported
        assert all("forward" not in vars(m) for m in stats.norms)
        with stats.applying(), pytest.raises(RuntimeError, match="restart"):
            net(x)
            net(x)
        with stats.applying(), pytest.raises(ValueError, match="batch size"):
            net(x[:1])


def test_subsample_to_keeps_the_value_distribution():
    from mor_model.sr.tiling import subsample_to

    checker = ((torch.arange(64)[:, None] + torch.arange(96)[None]) % 2).float()[None, None].expand(1, 2, 64, 96)
    small = subsample_to(checker, 24 * 24, multiple=4)
    assert small.shape[-2:] == (16, 28) and small.shape[-2] * small.shape[-1] <= 24 * 24
    assert set(small.unique().tolist()) <= {0.0, 1.0} and small.std() > 0.4  # area averaging would give 0.5 flat
    x = torch.rand(1, 3, 8, 8)
    assert subsample_to(x, 64) is x and subsample_to(x, 1, multiple=4).shape[-2:] == (4, 4)


@pytest.mark.parametrize(
    "hw, tile, overlap, scale, multiple",
    [
        ((37, 53), 16, 6, 1, 1),  # uneven sizes, ordinary overlaps
        ((100, 41), 96, 32, 1, 8),  # two tiles overlapping by far more than half a tile
        ((162, 70), 96, 32, 1, 2),  # three tiles over one pixel (stride 33 < tile / 2)
        ((45, 29), 8, 6, 8, 1),  # decoder-style upscaling, overlap close to the tile
        ((83, 61), 32, 8, 0.125, 8),  # encoder-style downscaling
    ],
)
def test_weights_tiled_apply_uses_are_a_partition_of_unity(hw, tile, overlap, scale, multiple, monkeypatch):
    """The weights tiled_apply multiplies each tile by (recorded from its calls, placed where it placed the
    tile) sum to 1 on every output pixel, are small at inner tile edges and are 1 where one tile covers."""
    from mor_model.sr import tiling

    used = []
    real = tiling.TileLayout.weight

    def recording(self, t):
        w = real(self, t)
        used.append((t.oy, t.ox, w.double()))
        return w

    monkeypatch.setattr(tiling.TileLayout, "weight", recording)
    x = _rand((1, 2, *hw), 5)
    s = scale if scale >= 1 else 1

    def fn(t):
        if scale >= 1:
            return F.interpolate(t, scale_factor=s, mode="nearest")
        return F.avg_pool2d(t, int(round(1 / scale)))

    out = tiled_apply(fn, x, tile_size=tile, overlap=overlap, scale=scale, multiple=multiple)
    assert len(used) > 1
    hp, wp = -(-hw[0] // multiple) * multiple, -(-hw[1] // multiple) * multiple
    total = torch.zeros(int(hp * scale), int(wp * scale), dtype=torch.float64)
    cover = torch.zeros_like(total)
    for oy, ox, w in used:
        total[oy : oy + w.shape[0], ox : ox + w.shape[1]] += w
        cover[oy : oy + w.shape[0], ox : ox + w.shape[1]] += 1
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    assert out.shape[-2:] == (math.ceil(hw[0] * scale), math.ceil(hw[1] * scale))
    # at an inner edge (a neighbour beyond it) a tile counts at most as much as that neighbour: the ramp's
    # first step, 0.5 - 0.5 cos(pi / (2 L)) for a transition over L pixels (0.5 only for L = 1)
    for oy, ox, w in used:
        if oy > 0:
            assert w[0].max() <= 0.5 + 1e-12
        if ox > 0:
            assert w[:, 0].max() <= 0.5 + 1e-12
        alone = cover[oy : oy + w.shape[0], ox : ox + w.shape[1]] == 1
        assert torch.equal(w[alone], torch.ones_like(w[alone]))


def test_axis_weights_share_pixels_between_two_tiles_at_most():
    from mor_model.sr.tiling import axis_weights

    starts = tile_starts(162, 96, 32, 2)
    assert len(starts) == 3 and starts[2] < starts[0] + 96  # three tiles overlap somewhere
    weights = axis_weights(starts, 96)
    grid = torch.zeros(3, 162, dtype=torch.float64)
    for i, (s, w) in enumerate(zip(starts, weights, strict=True)):
        grid[i, s : s + 96] = w
    torch.testing.assert_close(grid.sum(0), torch.ones(162, dtype=torch.float64), atol=1e-12, rtol=0)
    assert int(((grid > 0).sum(0)).max()) == 2
