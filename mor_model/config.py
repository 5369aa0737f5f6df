"""``MoRConfig``: the hyper-parameters of a set of MoR adapters (MOR_SPEC sections 5 and 6)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

#: OSEDiff's UNet LoRA targets (MOR_SPEC section 5). A plain entry matches a module whose qualified
#: name equals it or ends with ``"." + entry`` (PEFT's rule); an entry ``"re:<pattern>"`` matches when
#: the regular expression is found anywhere in the name, so ``"re:conv"`` is "every layer whose name
#: contains conv" (conv1, conv2, conv_shortcut, conv_in, conv_out and the sampler convs).
OSEDIFF_UNET_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "re:conv",
)

ROUTING_LEVELS = ("sample", "token")
ROUTER_INPUTS = ("degradation", "token", "token+degradation")
BACKENDS = ("auto", "reference", "triton", "cuda", "cpp")


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"MoRConfig.{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"MoRConfig.{name} must be >= {low}, got {value}")
    return int(value)


def _choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"MoRConfig.{name} must be one of {choices}, got {value!r}")
    return value


@dataclass
class MoRConfig:
    """Mixture-of-Ranks adapter settings; validated on construction.

    Attributes:
        num_shared: ``S``, always-on ranks (ranks ``0..S-1``).
        num_routed: ``E``, routed ranks (ranks ``S..S+E-1``).
        num_zero: ``Z``, zero-expert slots (router slots ``E..E+Z-1``).
        top_k: ``k``, slots each routing unit selects, ``1 <= k <= E + Z``.
        alpha: LoRA alpha; ``scaling = alpha / (S + k)``; None means ``alpha = S + k`` (scaling 1).
        routing: ``"sample"`` (one routing decision per sample) or ``"token"`` (per token; Linear
            layers only).
        router_input: ``"degradation"`` (``Linear(D -> E+Z)`` on the degradation scores),
            ``"token"`` (``Linear(d_in -> E+Z)`` on the layer input; with sample routing the tokens
            of a sample are averaged first) or ``"token+degradation"`` (the sum of both).
        target_modules: module-name patterns to adapt (see :data:`OSEDIFF_UNET_TARGETS`).
        balance_alpha: ``alpha_bal`` of the balance loss (MOR_SPEC section 4).
        num_degradation_dims: ``D``, the length of the degradation score vector.
        renormalize: renormalise the selected gates (zero slots included) to sum to 1.
        backend: the ``mor_kernels`` backend (``"auto"``, ``"reference"``, ``"triton"``,
            ``"cuda"``, ``"cpp"``).
    """

    num_shared: int = 8
    num_routed: int = 32
    num_zero: int = 4
    top_k: int = 8
    alpha: float | None = None
    routing: str = "sample"
    router_input: str = "degradation"
    target_modules: tuple[str, ...] = field(default_factory=lambda: OSEDIFF_UNET_TARGETS)
    balance_alpha: float = 0.01
    num_degradation_dims: int = 7
    renormalize: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.num_shared = _int("num_shared", self.num_shared, 0)
        self.num_routed = _int("num_routed", self.num_routed, 1)
        self.num_zero = _int("num_zero", self.num_zero, 0)
        self.top_k = _int("top_k", self.top_k, 1)
        if self.top_k > self.num_slots:
            raise ValueError(f"MoRConfig.top_k must be <= num_routed + num_zero = {self.num_slots}, got {self.top_k}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
                raise TypeError(f"MoRConfig.alpha must be a real number or None, got {type(self.alpha).__name__}")
            if not math.isfinite(self.alpha):
                raise ValueError(f"MoRConfig.alpha must be finite, got {self.alpha}")
            self.alpha = float(self.alpha)
        _choice("routing", self.routing, ROUTING_LEVELS)
        _choice("router_input", self.router_input, ROUTER_INPUTS)
        if self.routing == "token" and not self.uses_token_input:
            raise ValueError(
                "MoRConfig.routing='token' needs a per-token router input: router_input must be 'token' or "
                "'token+degradation' (a degradation-only router gives every token of a sample the same logits)"
            )
        if isinstance(self.target_modules, str):
            raise TypeError("MoRConfig.target_modules must be a list of names, not a single string")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"MoRConfig.target_modules must be non-empty strings, got {self.target_modules!r}")
        for pattern in self.target_modules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"MoRConfig.target_modules: bad regular expression {pattern!r}: {err}") from None
        if isinstance(self.balance_alpha, bool) or not isinstance(self.balance_alpha, numbers.Real):
            raise TypeError(f"MoRConfig.balance_alpha must be a real number, got {type(self.balance_alpha).__name__}")
        if not (math.isfinite(self.balance_alpha) and self.balance_alpha >= 0):
            raise ValueError(f"MoRConfig.balance_alpha must be a finite number >= 0, got {self.balance_alpha}")
        self.balance_alpha = float(self.balance_alpha)
        self.num_degradation_dims = _int("num_degradation_dims", self.num_degradation_dims, 1)
        if not isinstance(self.renormalize, bool):
            raise TypeError(f"MoRConfig.renormalize must be a bool, got {type(self.renormalize).__name__}")
        _choice("backend", self.backend, BACKENDS)

    @property
    def num_slots(self) -> int:
        """``E + Z``, the router's output size."""
        return self.num_routed + self.num_zero

    @property
    def num_ranks(self) -> int:
        """``R = S + E``, the rank of ``lora_a``/``lora_b``."""
        return self.num_shared + self.num_routed

    @property
    def scaling(self) -> float:
        """``alpha / (S + k)`` (1.0 when ``alpha`` is None)."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (self.num_shared + self.top_k)

    @property
    def uses_degradation(self) -> bool:
        return "degradation" in self.router_input

    @property
    def uses_token_input(self) -> bool:
        return "token" in self.router_input

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``target_modules`` as a list)."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MoRConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"MoRConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoRConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def diff(self, other: MoRConfig) -> dict[str, tuple]:
        """Fields whose values differ, as ``{name: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
