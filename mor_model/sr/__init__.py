"""The one-step super-resolution application built on the adapter layer: the pipeline
(:class:`MoRSRPipeline`, :mod:`.pipeline`), how a model directory is loaded (:mod:`.loading`), tiling of
large images (:mod:`.tiling`) and its memory plan (:mod:`.tile_plan`), x0 from the UNet's prediction
(:mod:`.x0`), colour correction (:mod:`.color_fix`) and image files (:mod:`.image_io`)."""

from .pipeline import MoRSRPipeline

__all__ = ["MoRSRPipeline"]
