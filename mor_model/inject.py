"""``inject_mor`` / ``remove_mor``: put MoR adapters on a model's target layers and take them off.

Targets are matched on qualified module names (``MoRConfig.target_modules``): a plain entry matches a
name equal to it or ending with ``"." + entry``; ``"re:<pattern>"`` matches when the regular
expression is found in the name. A layer already wrapped by PEFT (a module with a ``base_layer``)
is matched on the wrapper's name and the MoR adapter goes around the wrapped ``base_layer``, so
PEFT's own adapter keeps working on top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .config import MoRConfig
from .layers import MoRConv2d, MoRLayer, MoRLinear, conv_unsupported_reason, mor_layers, trainable_parameters


@dataclass
class InjectionReport:
    """What :func:`inject_mor` did: ``replaced`` names and ``skipped`` ``{name: reason}``."""

    config: MoRConfig
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"MoR adapters on {len(self.replaced)} layers; {len(self.skipped)} matching modules skipped"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def match_target(name: str, patterns) -> str | None:
    """The first pattern of ``patterns`` that selects the module name ``name`` (None if none does)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return pattern
        elif name == pattern or name.endswith("." + pattern):
            return pattern
    return None


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _skip_reason(layer: nn.Module, config: MoRConfig) -> str | None:
    if isinstance(layer, nn.Conv2d):
        why = conv_unsupported_reason(layer)
        if why is None and config.routing == "token":
            why = "routing='token' is not supported for Conv2d (per-pixel routing is not implemented)"
        return why
    if isinstance(layer, nn.Linear):
        return None
    return f"{type(layer).__name__} is not an nn.Linear or nn.Conv2d"


def _clear_routing_hook(module: nn.Module, args) -> None:
    """Forward pre-hook of an injected model: every forward starts with no stored routing, so after it
    the routers hold exactly that forward's (a layer the forward skipped has none, and
    :func:`~mor_model.balance_loss` leaves it out rather than reusing a freed graph)."""
    for router in module.__dict__.get("_mor_routers", ()):
        router.clear_state()


def _track_routers(module: nn.Module) -> None:
    """(Re)registers :func:`_clear_routing_hook` on ``module`` for its current MoR layers."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _clear_routing_hook:
            del module._forward_pre_hooks[key]
    routers = [layer.router for layer in mor_layers(module).values()]
    module.__dict__["_mor_routers"] = routers  # plain attribute (deepcopy maps it to the copy's routers)
    if routers:
        module.register_forward_pre_hook(_clear_routing_hook)


def inject_mor(module: nn.Module, config: MoRConfig | None = None, *, freeze_base: bool = True) -> InjectionReport:
    """Replaces the target layers of ``module`` in place by MoR layers.

    Args:
        module: any ``nn.Module`` (e.g. a diffusers ``UNet2DConditionModel``).
        config: the adapter settings (default ``MoRConfig()``: OSEDiff's UNet targets).
        freeze_base: freeze every parameter of ``module`` that is not a MoR adapter or router (as PEFT
            does), so ``[p for p in module.parameters() if p.requires_grad]`` is what trains. With False
            only the replaced layers' base weights are frozen. :func:`remove_mor` unfreezes what this froze.

    Returns:
        An :class:`InjectionReport` listing the replaced names and every matching module that was
        skipped, with the reason (unsupported conv, not a Linear/Conv2d, already adapted...).

    Raises:
        ValueError: when no module name matches ``config.target_modules`` at all.
    """
    config = MoRConfig() if config is None else config
    if not isinstance(config, MoRConfig):
        raise TypeError(f"config must be a MoRConfig, got {type(config).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    report = InjectionReport(config)
    existing = list(mor_layers(module))
    peft_wrappers: list[str] = []
    todo = []
    for name, mod in module.named_modules():
        if any(name.startswith(p + ".") or (p == "" and name) for p in existing):
            continue  # inside an existing MoR layer
        if any(name.startswith(w + ".") and not name.startswith(w + ".base_layer") for w in peft_wrappers):
            continue  # PEFT's own parts of a wrapper (lora_A, lora_B, dropout...): not targets
        is_leaf = isinstance(mod, (nn.Linear, nn.Conv2d, MoRLayer))
        if not isinstance(mod, MoRLayer) and isinstance(getattr(mod, "base_layer", None), nn.Module):
            peft_wrappers.append(name)
        peft_base = name == "base_layer" or name.endswith(".base_layer")
        logical = _split(name)[0] if (is_leaf and peft_base) else name
        if not match_target(logical, config.target_modules):
            continue
        if isinstance(mod, MoRLayer):
            report.skipped[name] = "already has a MoR adapter (remove_mor first to re-inject)"
        elif not is_leaf and isinstance(getattr(mod, "base_layer", None), nn.Module):
            continue  # a PEFT wrapper: its base_layer is handled as the leaf
        elif name == "":
            report.skipped["<root>"] = "the root module cannot be replaced in place; wrap it with MoRLinear/MoRConv2d"
        elif (why := _skip_reason(mod, config)) is not None:
            if is_leaf or not mod._modules:  # containers merely matching a pattern are not reported
                report.skipped[name] = why
        else:
            todo.append((name, mod))
    if not todo and not report.skipped:
        raise ValueError(f"no module name matches target_modules {list(config.target_modules)}")
    for name, base in todo:
        parent_name, child = _split(name)
        parent = module.get_submodule(parent_name)
        wrapper = MoRLinear(base, config) if isinstance(base, nn.Linear) else MoRConv2d(base, config)
        wrapper._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        base.requires_grad_(False)
        setattr(parent, child, wrapper)
        report.replaced.append(name)
    if freeze_base:
        adapters = {id(p) for p in trainable_parameters(module).values()}
        frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in adapters]
        for p in frozen:
            p.requires_grad_(False)
        module.__dict__.setdefault("_mor_frozen", []).extend(frozen)  # not a submodule/parameter attribute
    _track_routers(module)
    return report


def remove_mor(module: nn.Module) -> list[str]:
    """Puts back the original layer objects (with their ``requires_grad`` flags, and unfreezes what
    :func:`inject_mor` froze on ``module``); returns the names."""
    removed = []
    for name, layer in mor_layers(module).items():
        if name == "":
            raise ValueError("the root module is a MoR layer; use its .base_layer instead")
        base = layer.base_layer
        for n, p in base.named_parameters():
            p.requires_grad_(getattr(layer, "_base_requires_grad", {}).get(n, p.requires_grad))
        parent_name, child = _split(name)
        setattr(module.get_submodule(parent_name), child, base)
        removed.append(name)
    for p in module.__dict__.pop("_mor_frozen", []):
        p.requires_grad_(True)
    _track_routers(module)
    return removed
