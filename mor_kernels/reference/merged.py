"""Per-sample merged inference: fold each sample's active ranks into the base weight, then run one base
GEMM/conv per sample (issue 13, item 1).

With sample routing the ranks of a sample are known before the layer runs, so

    W_b = W0 + scaling * B[:, act_b] diag(g_b) A[act_b]          (a conv: the 1x1 x kxk composition)

gives the layer's exact output in one base-sized GEMM per sample: a ``bmm`` (Linear) or a grouped conv
with ``groups = B`` (Conv2d) when the samples' ranks differ, the plain ``F.linear``/``F.conv2d`` when
there is one sample or every sample routes alike. Building ``W_b`` reads and writes a weight-sized
tensor, so it pays off when the layer has many tokens per weight; :func:`mor_kernels.dispatch.merge_plan`
decides per call. The pieces are in :mod:`.factors`. Inference only: the public ops never take this
path when a gradient is needed. Masked slots are exact zeros in ``A`` and ``B`` (:mod:`.rank_lists`),
so an unpicked rank never reaches ``W_b``, non-finite values included.
"""

from __future__ import annotations

from .factors import cast, merge_weights, merged_conv2d, merged_linear, rank_factors
from .mor_lora import compute_dtype


def mor_linear_merged(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, *, upcast=True):
    """``mor_linear`` (sample routing) through per-sample merged weights; same signature and result."""
    ct = compute_dtype(x.dtype, upcast)
    merged = merge_weights(weight, rank_factors(lora_a, lora_b, idx, gate, num_shared, scaling, ct))
    return cast(merged_linear(x, merged, bias), x.dtype)


def mor_conv2d_merged(
    x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride=1, padding=0, dilation=1, *, upcast=True
):
    """``mor_conv2d`` through per-sample merged weights; same signature and result."""
    ct = compute_dtype(x.dtype, upcast)
    merged = merge_weights(weight, rank_factors(lora_a, lora_b, idx, gate, num_shared, scaling, ct))
    return cast(merged_conv2d(x, merged, bias, stride, padding, dilation), x.dtype)
