"""The MoR adapter layer: config, layers, routers, injection into diffusers/PyTorch models, degradation
control and estimator, the balance loss, routing statistics, folding and adapter files (MOR_SPEC 6).

Nothing here is kernel code; every MoR computation goes through ``mor_kernels``. The one-step SR
application built on this layer lives in subpackages that this package does not import:
``mor_model.sr`` (pipeline, tiling, image files), ``mor_model.train``, ``mor_model.eval`` and
``mor_model.cli``. Importing this package does not import diffusers, open_clip, PIL or matplotlib
(they load on first use).

Typical use (MOR_SPEC sections 2-6)::

    report = mor_model.inject_mor(unet, mor_model.MoRConfig())        # OSEDiff targets, 8+32 ranks, 4 zero slots
    estimator = mor_model.DegradationEstimator.from_local("clip_dir")  # frozen open_clip, (B, 7) scores
    with mor_model.degradation(unet, estimator(lq_images)):            # scores reach every router
        eps = unet(latents, t, text).sample
    loss = task_loss + mor_model.balance_loss(unet)                     # degradation-aware balance loss
    mor_model.save_adapter(unet, "out/mor_adapter")                     # safetensors + JSON config
"""

from .adapter_io import load_adapter, save_adapter
from .config import OSEDIFF_UNET_TARGETS, MoRConfig
from .control import clear_routing, degradation, set_degradation
from .estimator import DEFAULT_PROMPT_PAIRS, DegradationEstimator
from .inject import InjectionReport, inject_mor, remove_mor
from .layers import MoRConv2d, MoRLayer, MoRLinear, base_state_dict, mor_layers, trainable_parameters
from .losses import balance_loss, degradation_aware_balance_loss
from .merge import fold_shared_ranks, set_merge
from .router import MoRRouter
from .stats import RoutingStats, routing_stats, save_routing_heatmap

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PROMPT_PAIRS",
    "OSEDIFF_UNET_TARGETS",
    "DegradationEstimator",
    "InjectionReport",
    "MoRConfig",
    "MoRConv2d",
    "MoRLayer",
    "MoRLinear",
    "MoRRouter",
    "RoutingStats",
    "balance_loss",
    "base_state_dict",
    "clear_routing",
    "degradation",
    "degradation_aware_balance_loss",
    "fold_shared_ranks",
    "inject_mor",
    "load_adapter",
    "mor_layers",
    "remove_mor",
    "routing_stats",
    "save_adapter",
    "save_routing_heatmap",
    "set_degradation",
    "set_merge",
    "trainable_parameters",
]
