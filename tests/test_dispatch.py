"""Backend selection: what "auto" picks, and the reasons it gives for not picking a faster backend."""

import pytest
import torch
from naive import naive_lora

import mor_kernels
from mor_kernels import dispatch
from mor_kernels.testing import assert_parity, random_case


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_auto_on_cpu_runs_an_available_backend_and_explains_the_rest():
    choice = dispatch.resolve("mor_linear", "auto", torch.device("cpu"))
    blas = dispatch.unavailable_reason("blas", "mor_linear", torch.device("cpu")) is None
    assert choice.backend == ("blas" if blas else "reference")  # the measured order (DECISIONS)
    text = mor_kernels.explain_backend("cpu")
    assert f"backend '{choice.backend}'" in text
    skipped = dict(choice.skipped)
    assert set(skipped) == {"cpp", "triton"} | (set() if blas else {"blas"}) and all(skipped.values())
    assert "not 'triton'" in text and "not 'cpp'" in text


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = dispatch.unavailable_reason("triton", "route", torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET" in why
    with pytest.raises(dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
        mor_kernels.route(torch.zeros(2, 4), 1, 1, backend="triton")


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cuda' cannot run.*CUDA tensors"):
        mor_kernels.route(torch.zeros(2, 4), 1, 1, backend="cuda")


def test_reference_is_always_available_and_auto_falls_back_for_other_devices():
    assert "reference" in mor_kernels.available_backends("cpu")
    assert dispatch.resolve("route", "auto", torch.device("meta")).backend == "reference"


def test_unknown_op_and_backend_are_rejected():
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.resolve("mor_gemm", "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve("route", "cudnn", torch.device("cpu"))


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_auto_gives_the_spec_result_on_cpu(routing):
    """Whatever "auto" picks on this machine, forward and gradients match the independent loops of
    tests/naive.py (written from MOR_SPEC 2.1-2.2, sharing no code with any backend) in float64."""
    case = random_case(routing=routing, seed=11)
    test = case.to(torch.float32, requires_grad=True)
    oracle = case.to(torch.float64, requires_grad=True)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "gate"]

    def args(c):
        return (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)

    auto = mor_kernels.mor_linear(*args(test))
    want = torch.nn.functional.linear(oracle.x, oracle.weight, oracle.bias) + naive_lora(
        oracle.x, oracle.lora_a, oracle.lora_b, oracle.idx, oracle.gate, oracle.num_shared, oracle.scaling
    )
    assert_parity(auto, want, dtype=torch.float32, name="auto forward")
    dy = torch.randn(auto.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(auto, [getattr(test, n) for n in names], dy.float())
    ref = torch.autograd.grad(want, [getattr(oracle, n) for n in names], dy)
    for name, g, w in zip(names, got, ref, strict=True):
        assert_parity(g, w, dtype=torch.float32, name=f"auto d{name}")


def test_auto_on_a_gpu_warns_when_only_the_reference_can_run(monkeypatch):
    """The slow path on CUDA is never silent (e.g. triton failed to import and the extension is not built)."""

    def fake(name, op, device, dtype=torch.float32, *, auto=False):
        return None if name == "reference" else f"{name} is broken here"

    monkeypatch.setattr(dispatch, "unavailable_reason", fake)
    with pytest.warns(UserWarning, match=r"running the reference path(.|\n)*not 'triton': triton is broken here"):
        assert dispatch.resolve("mor_linear", "auto", torch.device("cuda")).backend == "reference"


def test_auto_cites_the_measured_decision_and_the_merge_rule():
    """'auto' picks from a table of measured decisions per device type and dtype, and explain says which
    measurement, which backends it left out and why, and when a call runs merged weights."""
    choice = dispatch.resolve("mor_conv2d", "auto", torch.device("cpu"), torch.bfloat16)
    blas = dispatch.unavailable_reason("blas", "mor_conv2d", torch.device("cpu"), torch.bfloat16) is None
    assert choice.backend == ("blas" if blas else "reference")
    assert choice.measured == dispatch.decision("cpu", torch.bfloat16).measured
    text = choice.explain()
    assert "measured: benchmarks/bench_mor_lora.py" in text
    assert "not 'cpp'" in text and "twin" in text  # kept for tests, not offered as a speed path
    assert "merged inference: sample routing, no gradient needed, and rho" in text
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert dispatch.decision("cpu", dtype).order == ("blas", "reference")
    assert dispatch.decision("cuda", torch.bfloat16).order[0] == "triton"
    assert "not measured" in dispatch.decision("cuda", torch.bfloat16).measured  # said, not hidden
    assert "not by 'auto' on cuda" in dispatch.merge_rule("cuda")


def test_cpp_still_runs_when_asked_for():
    if "cpp" not in mor_kernels.available_backends("cpu"):
        pytest.skip(f"cpp backend unavailable: {dispatch.unavailable_reason('cpp', 'mor_linear', torch.device('cpu'))}")
    case = random_case(seed=12)
    args = (
        case.x,
        case.weight,
        case.bias,
        case.lora_a,
        case.lora_b,
        case.idx,
        case.gate,
        case.num_shared,
        case.scaling,
    )
    assert dispatch.resolve("mor_linear", "cpp", torch.device("cpu")).backend == "cpp"
    torch.testing.assert_close(
        mor_kernels.mor_linear(*args, backend="cpp"), mor_kernels.mor_linear(*args, backend="reference"),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
