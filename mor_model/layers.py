"""MoR adapter layers wrapping a frozen ``nn.Linear`` / ``nn.Conv2d`` (MOR_SPEC section 2).

The frozen module is kept, untouched, as ``base_layer`` (PEFT's layout), so removing the adapter
restores the very same module object. Its parameters therefore appear as ``<name>.base_layer.weight``
in the injected model's state dict; a pre-load hook maps the original keys (``<name>.weight``)
there, so a base-model state dict still loads into an injected model
(``model.load_state_dict(sd, strict=False)`` then reports only the adapter keys as missing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import mor_kernels

from .config import MoRConfig
from .inference import needs_grad
from .router import MoRRouter


def _map_base_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``<prefix>weight`` / ``<prefix>bias`` (the unwrapped layer's keys) -> ``<prefix>base_layer.*``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if "." not in rest and not rest.startswith(("lora_", "router")):
            new = prefix + "base_layer." + rest
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)


class MoRLayer(nn.Module):
    """Common part of :class:`MoRLinear` and :class:`MoRConv2d`: ``lora_a``, ``lora_b``, ``router``."""

    base_layer: nn.Module

    def __init__(self, base_layer: nn.Module, config: MoRConfig, a_shape: tuple[int, ...], d_out: int, d_in: int):
        super().__init__()
        if not isinstance(config, MoRConfig):
            raise TypeError(f"config must be a MoRConfig, got {type(config).__name__}")
        self.base_layer = base_layer
        self.config = config
        self.num_shared = config.num_shared
        self.scaling = config.scaling
        w = base_layer.weight
        # float32 adapters whatever the base dtype (as PEFT keeps them): a half-precision base model still
        # trains its adapters in float32; _operands casts them to the compute dtype
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_a = nn.Parameter(torch.empty(config.num_ranks, *a_shape, device=w.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(d_out, config.num_ranks, device=w.device, dtype=dtype))
        # PEFT's LoRA init: A Kaiming-uniform with a = sqrt(5) (nn.Linear's default), B zero, so the
        # adapted layer starts as the base layer.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.router = MoRRouter(config, d_in, token_routing_allowed=isinstance(self, MoRLinear))
        self.router.to(device=w.device)
        self._register_load_state_dict_pre_hook(_map_base_keys, with_module=True)
        #: inference with sample routing: "auto" (per-sample merged weights where mor_kernels' measured cost
        #: model says they are faster), "always" or "never"; set for a whole model with mor_model.set_merge
        self.merge = "auto"
        self.last_path = ""  # what the last forward ran and why (see explain)
        self._image_state = None  # mor_model.inference.ImageState, set by set_degradation

    # Code that reads ``layer.weight`` / ``layer.bias`` (e.g. for the dtype) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_backend(self, backend: str) -> None:
        """Runs this layer (and its router) on ``backend`` from now on."""
        self.config = MoRConfig.from_dict({**self.config.to_dict(), "backend": backend})
        self.router.backend = self.config.backend

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters (adapter and router), by name relative to this layer."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def explain(self) -> str:
        """What the last forward ran (merged weights, prepared low-rank path, or a backend's op) and why."""
        return self.last_path or "no forward yet"

    def _base_operands(self, x: torch.Tensor):
        """``x, weight, bias`` in one compute dtype: the autocast dtype inside ``torch.autocast`` (as
        nn.Linear/Conv2d would run), else ``x.dtype`` (the base weights must then match ``x``, as for the
        plain layer)."""
        base = self._modules["base_layer"]
        params = base._parameters  # the dict itself: nn.Module attribute lookups cost ~0.3 us each, per call
        weight, bias = params.get("weight"), params.get("bias")
        if weight is None:  # not a plain parameter (a parametrization...): the attributes
            weight, bias = base.weight, base.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dt = torch.get_autocast_dtype(device)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        return x, weight, bias

    def _operands(self, x: torch.Tensor):
        """``x, weight, bias, lora_a, lora_b`` in one compute dtype (see :meth:`_base_operands`)."""
        x, weight, bias = self._base_operands(x)
        return x, weight, bias, self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)

    def _prepared(self, x: torch.Tensor, conv: dict | None) -> torch.Tensor | None:
        """The output through the per-image state (``mor_model.inference``), or None when it does not apply
        (``last_path`` then says why)."""
        state = self._image_state
        why = "no per-image state (scores not set through mor_model.set_degradation)"
        if state is not None and needs_grad(self, x):  # before the casts below: training never pays for them
            why = state.why_not(self, x)
        elif state is not None:
            xc, weight, bias = self._base_operands(x)  # the compute dtype (autocast's) picks the entry
            entry = state.lookup(self, xc)
            if entry is not None:
                return state.forward(self, entry, xc, weight, bias, conv)
            why = state.why_not(self, x)
        self.last_path = f"per call (backend {self.config.backend!r}, merge={self.merge!r}): {why}"
        return None


class MoRLinear(MoRLayer):
    """``y = base(x) + scaling * B (g * (A x))`` with ``g`` from the router; any ``(B, *tokens, d_in)``."""

    def __init__(self, base_layer: nn.Linear, config: MoRConfig):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoRLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, config, (base_layer.in_features,), base_layer.out_features, base_layer.in_features)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"MoRLinear expects x of shape (B, *tokens, {self.in_features}) with a batch dimension")
        y = self._prepared(x, None)
        if y is not None:
            return y
        idx, gate = self.router(x)
        x, weight, bias, a, b = self._operands(x)
        return mor_kernels.mor_linear(
            x,
            weight,
            bias,
            a,
            b,
            idx,
            gate,
            self.num_shared,
            self.scaling,
            backend=self.config.backend,
            check_indices=False,  # idx comes from mor_kernels.route: no device sync per layer
            merge=self.merge,
        )


class MoRConv2d(MoRLayer):
    """MoR convolution (sample routing): ``conv(x, W0) + b + scaling * B (g * conv(x, A))``."""

    def __init__(self, base_layer: nn.Conv2d, config: MoRConfig):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"MoRConv2d wraps an nn.Conv2d, got {type(base_layer).__name__}")
        why = conv_unsupported_reason(base_layer)
        if why is not None:
            raise ValueError(f"cannot wrap this Conv2d: {why}")
        c_out, c_in, kh, kw = base_layer.weight.shape
        super().__init__(base_layer, config, (c_in, kh, kw), c_out, c_in)
        self.in_channels, self.out_channels = c_in, c_out
        self.padding = numeric_padding(base_layer)
        self._conv = {
            "stride": tuple(base_layer.stride),
            "padding": self.padding,
            "dilation": tuple(base_layer.dilation),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"MoRConv2d expects x of shape (B, {self.in_channels}, H, W)")
        y = self._prepared(x, self._conv)
        if y is not None:
            return y
        idx, gate = self.router(x, channels_last=False)
        x, weight, bias, a, b = self._operands(x)
        base = self.base_layer
        return mor_kernels.mor_conv2d(
            x,
            weight,
            bias,
            a,
            b,
            idx,
            gate,
            self.num_shared,
            self.scaling,
            base.stride,
            self.padding,
            base.dilation,
            backend=self.config.backend,
            check_indices=False,  # idx comes from mor_kernels.route: no device sync per layer
            merge=self.merge,
        )


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv.padding`` as a pair of ints: ``"valid"`` is 0; ``"same"`` is the symmetric padding that keeps
    the size (None when ``"same"`` needs uneven padding, i.e. an even ``dilation * (k - 1)``)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)


def conv_unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot get a MoR adapter (None when it can)."""
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 is supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if numeric_padding(conv) is None:
        return f"padding={conv.padding!r} with kernel {conv.kernel_size} needs uneven padding (not supported)"
    return None


def mor_layers(module: nn.Module) -> dict[str, MoRLayer]:
    """Every MoR layer under ``module`` (``module`` itself included), by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MoRLayer)}


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the adapters and with the original layer keys
    (``<name>.base_layer.weight`` -> ``<name>.weight``): what the model saves as without MoR."""
    layers = {f"{n}." if n else "" for n in mor_layers(module)}
    out = {}
    for key, value in module.state_dict().items():
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        elif key.startswith(prefix + "base_layer."):
            out[prefix + key[len(prefix) + len("base_layer.") :]] = value
    return out


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter and router parameters of every MoR layer under ``module``, by qualified name.

    Base weights are never included, whatever their ``requires_grad``.
    """
    out = {}
    for name, layer in mor_layers(module).items():
        prefix = f"{name}." if name else ""
        out.update({prefix + n: p for n, p in layer.adapter_parameters().items()})
    return out
