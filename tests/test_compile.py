"""The public ops trace with torch.compile(fullgraph=True): validation and dispatch add no graph break."""

import pytest
import torch

import mor_kernels
from mor_kernels.testing import random_case


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mor_linear_compiles_fullgraph(backend):
    c = random_case(routing="token", seed=31)

    def fn(x, w, b, a, bb, i, g):
        return mor_kernels.mor_linear(x, w, b, a, bb, i, g, c.num_shared, c.scaling, backend=backend)

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=1e-5, atol=1e-5)


def test_mor_conv2d_and_route_compile_fullgraph():
    c = random_case(kernel_size=3, d_in=4, d_out=5, seed=32)
    logits = torch.randn(c.x.shape[0], 8)

    def fn(x, w, b, a, bb, logits):
        idx, gate, _ = mor_kernels.route(logits, 3, 2, backend="reference")
        return mor_kernels.mor_conv2d(x, w, b, a, bb, idx, gate, c.num_shared, c.scaling, 1, 1, 1, backend="reference")

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, logits)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=1e-5, atol=1e-5)
