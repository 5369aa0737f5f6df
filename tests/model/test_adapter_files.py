"""Issue 15, items 5, 6, 7, 11 and 17: damaged and inconsistent adapter files fail with the file and the key
named, before anything is allocated, and leave the model exactly as it was; checksums; every config field
that changes the output must match."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import struct
import subprocess
import sys
import warnings

import pytest
import torch
from mor_tiny import small_config
from torch import nn

from mor_model import MoRConfig, inject_mor, load_adapter, mor_layers, save_adapter
from mor_model.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

pytest.importorskip("safetensors", reason="safetensors is not installed")


class Small(nn.Module):
    """Linear and conv targets of OSEDiff's patterns (to_q, to_k, *conv*) plus an untouched layer."""

    def __init__(self, d: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(d, 5)
        self.to_k = nn.Linear(d, 5)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Linear(5, 5)


def _randomize(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in mor_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture
def saved(tmp_path):
    model = Small()
    inject_mor(model, small_config())
    _randomize(model)
    return save_adapter(model, tmp_path / "adapter")


def snapshot(model: nn.Module):
    """Everything a failed load must leave alone: parameters and buffers (values), module types,
    requires_grad flags, backends of the MoR layers and routers."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: (layer.config.backend, layer.router.backend) for n, layer in mor_layers(model).items()},
    )


def assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def _edit_json(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)  # edits meta in place
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _rewrite_tensors(path, fn):
    """Rewrites the safetensors file with fn(tensors) and updates the JSON's checksum to match."""
    from safetensors.torch import load_file, save_file

    tensors = fn(load_file(str(path / WEIGHTS_NAME)))
    save_file(tensors, str(path / WEIGHTS_NAME))
    digest = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    _edit_json(path, lambda m: m.update(weights_sha256=digest))


def _cut(path):
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _corrupt_header(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[8:24] = b"\xff" * 16
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _huge_header_length(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _flip_data_byte(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x01
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _config(key, value):
    return lambda p: _edit_json(p, lambda m: m["config"].__setitem__(key, value))


def _drop_config(key):
    return lambda p: _edit_json(p, lambda m: m["config"].pop(key))


DAMAGE = {  # name: (damage(path), message fragments: the file and the key or reason)
    "cut weights": (_cut, [WEIGHTS_NAME, "cut"]),
    "corrupt header": (_corrupt_header, [WEIGHTS_NAME, "corrupt header"]),
    "header length beyond the file": (_huge_header_length, [WEIGHTS_NAME, "header but holds"]),
    "flipped data byte": (_flip_data_byte, [WEIGHTS_NAME, "damaged", "weights_sha256"]),
    "int64 tensor": (
        lambda p: _rewrite_tensors(p, lambda t: {**t, "to_q.lora_a": t["to_q.lora_a"].long()}),
        [WEIGHTS_NAME, "must be floats", "to_q.lora_a (I64)"],
    ),
    "bool tensor": (
        lambda p: _rewrite_tensors(p, lambda t: {**t, "to_k.lora_b": t["to_k.lora_b"] > 0}),
        [WEIGHTS_NAME, "must be floats", "to_k.lora_b (BOOL)"],
    ),
    "missing tensor": (
        lambda p: _rewrite_tensors(p, lambda t: {k: v for k, v in t.items() if k != "conv1.lora_b"}),
        [WEIGHTS_NAME, "'conv1.lora_b' is missing"],
    ),
    "JSON lacks targets": (lambda p: _edit_json(p, lambda m: m.pop("targets")), [CONFIG_NAME, "'targets'"]),
    "JSON lacks config": (lambda p: _edit_json(p, lambda m: m.pop("config")), [CONFIG_NAME, "'config'"]),
    "JSON is a list": (
        lambda p: (p / CONFIG_NAME).write_text(f"[{(p / CONFIG_NAME).read_text()}]"),
        [CONFIG_NAME, "JSON object, got a list"],
    ),
    "not JSON": (lambda p: (p / CONFIG_NAME).write_bytes(b"{not json\xff"), [CONFIG_NAME, "not valid JSON"]),
    "missing top_k": (_drop_config("top_k"), [CONFIG_NAME, "'top_k'"]),
    "nan alpha": (_config("alpha", float("nan")), [CONFIG_NAME, "alpha must be finite"]),
    "inf balance_alpha": (_config("balance_alpha", float("inf")), [CONFIG_NAME, "balance_alpha"]),
    "bad top_k type": (_config("top_k", "3"), [CONFIG_NAME, "top_k must be an int"]),
    "num_routed 3,000,000": (_config("num_routed", 3_000_000), [CONFIG_NAME, "config.num_shared + config.num_routed"]),
    "num_shared 10**9": (_config("num_shared", 10**9), [CONFIG_NAME, "config.num_shared + config.num_routed"]),
    "num_zero changed": (_config("num_zero", 3), [CONFIG_NAME, "config.num_routed + config.num_zero"]),
    "bad target shape": (
        lambda p: _edit_json(p, lambda m: m["targets"]["to_q"].__setitem__("base_weight_shape", [5, 7])),
        [WEIGHTS_NAME, "'to_q.lora_a' has shape (6, 6), the JSON's config and targets give (6, 7)"],
    ),
    "bad target type": (
        lambda p: _edit_json(p, lambda m: m["targets"]["to_q"].__setitem__("type", "MoREmbedding")),
        [CONFIG_NAME, "targets['to_q'].type"],
    ),
}


@pytest.mark.parametrize("injected", [False, True], ids=["plain model", "injected model"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_failed_load_leaves_the_model_as_it_was(saved, damage, injected):
    fn, fragments = DAMAGE[damage]
    fn(saved)
    model = Small()
    if injected:
        inject_mor(model, small_config(backend="auto"))
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError)) as e:
        load_adapter(model, saved, backend="reference")  # the backend must not be switched either
    for fragment in fragments:
        assert fragment in str(e.value), (damage, str(e.value))
    assert isinstance(e.value, AdapterFileError)
    assert_same(snapshot(model), before)


@pytest.mark.parametrize("injected", [False, True], ids=["plain model", "injected model"])
def test_bad_backend_and_model_mismatch_change_nothing(saved, injected):
    model = Small()
    if injected:
        inject_mor(model, small_config(backend="auto"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_adapter(model, saved, backend="bogus")
    assert_same(snapshot(model), before)
    other = Small(d=7)  # every target has another input size than the file's
    if injected:
        inject_mor(other, small_config(backend="auto"))
    before = snapshot(other)
    with pytest.raises(ValueError, match="does not match this model"):
        load_adapter(other, saved, backend="reference")
    assert_same(snapshot(other), before)


def test_checksums_round_trip_and_old_files_warn(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((saved / WEIGHTS_NAME).read_bytes()).hexdigest()
    model = Small()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with a checksum loads without a warning
        load_adapter(model, saved)
    _edit_json(saved, lambda m: m.pop("weights_sha256"))  # an adapter written before checksums
    with pytest.warns(UserWarning, match="no weights_sha256.*not verified"):
        load_adapter(Small(), saved)
    assert not [p.name for p in saved.iterdir() if p.name.startswith(".")]  # no temporary files


def test_tiny_model_adapters_carry_checksums(tmp_path):
    pytest.importorskip("diffusers", reason="the [model] extra is not installed")
    pytest.importorskip("open_clip", reason="the [model] extra is not installed")
    from mor_model.testing import tiny_model

    path = tiny_model(tmp_path / "tiny")
    for name in ("mor_adapter", "vae_encoder_adapter"):
        meta = json.loads((path / name / CONFIG_NAME).read_text())
        assert meta["weights_sha256"] == hashlib.sha256((path / name / WEIGHTS_NAME).read_bytes()).hexdigest()


_LOAD_UNDER_CAP = """
import resource, sys
import torch
from torch import nn
from mor_model import load_adapter
from mor_model.adapter_io import AdapterFileError
size = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
model = nn.Sequential()
model.add_module('to_q', nn.Linear(200, 200))
try:
    load_adapter(model, sys.argv[1])
except AdapterFileError as e:
    print('REFUSED', e)
except MemoryError as e:
    print('MEMORY', e)
"""


@pytest.mark.parametrize("key, value", [("num_routed", 3_000_000), ("num_shared", 10**9)])
def test_huge_declared_ranks_fail_without_allocating(tmp_path, key, value):
    """Under an address-space cap of 512 MiB above its size after imports, a process loads an adapter whose
    JSON claims 3,000,000 routed (2.4 GB of lora_a here) or 10**9 shared ranks: it fails from the header,
    naming the file and the keys, and never reaches the allocator."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status (Linux)")
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(200, 200))
    inject_mor(model, small_config())
    path = save_adapter(model, tmp_path / "a")
    _config(key, value)(path)
    r = subprocess.run([sys.executable, "-c", _LOAD_UNDER_CAP, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr
    assert str(path / CONFIG_NAME) in r.stdout and "config.num_shared + config.num_routed" in r.stdout


def _variant(field: dataclasses.Field):
    """A config that differs from small_config() in ``field`` (and what it needs to be valid)."""
    variants = {
        "num_shared": {"num_shared": 3},
        "num_routed": {"num_routed": 5},
        "num_zero": {"num_zero": 1},
        "top_k": {"top_k": 2},
        "alpha": {"alpha": 7.0},
        "routing": {"routing": "token", "router_input": "token", "target_modules": ("to_q", "to_k")},
        "router_input": {"router_input": "token+degradation"},
        "target_modules": {"target_modules": ("to_q", "re:conv")},
        "balance_alpha": {"balance_alpha": 0.5},
        "num_degradation_dims": {"num_degradation_dims": 5},
        "renormalize": {"renormalize": False},
    }
    return variants[field.name]


def test_every_config_field_but_the_backend_must_match(tmp_path):
    """Loading into an injected model whose config differs in any field that changes what the adapter
    computes (alpha and renormalize included, not only top_k) is an error naming the field."""
    from mor_model.adapter_io import RUNTIME_FIELDS

    assert RUNTIME_FIELDS == ("backend",)
    fields = [f for f in dataclasses.fields(MoRConfig) if f.name not in RUNTIME_FIELDS]
    for field in fields:
        change = _variant(field)  # a KeyError here: a new MoRConfig field needs a case in this test
        saved_model = Small()
        inject_mor(saved_model, small_config())
        _randomize(saved_model)
        path = save_adapter(saved_model, tmp_path / field.name)
        model = Small()
        inject_mor(model, small_config(**change))
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf"config differs \(.*{field.name}: model .* vs file ") as e:
            load_adapter(model, path)
        assert str(path) in str(e.value)
        assert_same(snapshot(model), before)


def test_a_good_load_is_exact_and_switches_the_backend(saved):
    reference = Small()
    load_adapter(reference, saved)
    model = Small()
    inject_mor(model, small_config(backend="auto"))
    load_adapter(model, saved, backend="reference")
    assert all(layer.config.backend == "reference" for layer in mor_layers(model).values())
    for name, layer in mor_layers(model).items():
        for pname, p in layer.adapter_parameters().items():
            assert torch.equal(p, mor_layers(reference)[name].adapter_parameters()[pname])
    copy.deepcopy(model)  # still a well-formed module
