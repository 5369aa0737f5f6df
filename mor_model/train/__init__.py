"""Training of the one-step MoR super-resolution model (``mor-sr train CONFIG``, command line in
:mod:`mor_model.cli.train`): the configuration (:mod:`.config`), the trained network (:mod:`.model`),
the loss terms (:mod:`.losses`), the data (:mod:`.data`, with the Real-ESRGAN degradations of
:mod:`.degradations`), the loop (:mod:`.loop`), its checkpoints (:mod:`.checkpoints`) and log
(:mod:`.log`)."""

from .config import TrainConfig, load_config
from .loop import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config"]
