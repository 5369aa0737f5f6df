"""The public ops trace with torch.compile(fullgraph=True): validation and dispatch add no graph break."""

import pytest
import torch

import mor_kernels
from mor_kernels import _extension, dispatch
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


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lin = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.conv(x).flatten(2).transpose(1, 2))


_SECOND = "cpp" if _extension.has_kernel("lora_fwd", "CPU") else "reference"


@pytest.mark.parametrize("backends", [("auto", "auto"), ("reference", _SECOND)], ids=["auto", "mixed"])
def test_a_mor_model_compiles_fullgraph_and_routes_each_image(backends, monkeypatch):
    """A MoR model (degradation routing) under torch.compile(fullgraph=True): no graph break (the CPU lean path's
    plan lookup once imported a backend inside the trace, and a backend imported during the trace was missing
    from dispatch's table as dynamo saw it: KeyError), the eager output for every image, and no recompilation
    when the next image sets new scores."""
    import mor_model

    monkeypatch.setattr(dispatch, "_LOADED", dispatch._Loaded())  # as in a fresh process: imports in the trace
    torch.manual_seed(0)
    model = _TwoLayers()
    cfg = mor_model.MoRConfig(target_modules=("conv", "lin"), num_shared=2, num_routed=4, num_zero=1, top_k=2,
                              backend=backends[0])  # fmt: skip
    mor_model.inject_mor(model, cfg)
    model.lin.set_backend(backends[1])
    for layer in mor_model.mor_layers(model).values():
        torch.nn.init.normal_(layer.lora_b, std=0.1)
    x = torch.randn(2, 4, 5, 5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outputs = []
    for i in range(3):
        scores = torch.rand(2, cfg.num_degradation_dims, generator=torch.Generator().manual_seed(i))
        with torch.no_grad(), mor_model.degradation(model, scores):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(x)
            want = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])  # new scores, new routing: the graph reads the scores
