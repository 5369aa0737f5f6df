"""Training of the one-step MoR super-resolution model (``mor-sr train CONFIG``), with ``accelerate``.

The trained model is the pipeline of :mod:`mor_model.sr.pipeline`, run differentiably:

    LQ -> bicubic x scale -> VAE encoder (+ LoRA) -> latent mode * scaling factor
       -> UNet at t = 999 with MoR adapters routed on the CLIP degradation scores of the LQ
       -> x0 from the prediction -> VAE decoder (frozen) -> prediction in [-1, 1]

Trainable: the UNet's MoR adapters and routers, and the VAE-encoder adapter: by default a plain
rank-``vae_lora_rank`` LoRA on the encoder's convs/attention projections and ``quant_conv``,
stored as a MoR adapter whose ranks are all always on (``num_shared = rank - 1``, one routed rank,
no zero slot, top-1: the single routed slot always gets gate 1), so the pipeline loads it from
``vae_encoder_adapter/`` like any other adapter. Everything else is frozen and in eval mode.

Losses (:mod:`mor_model.train.losses`): L2 (1) + LPIPS (2) + the degradation-aware balance loss (1).

Outputs under ``output_dir``:

- ``checkpoints/step-XXXXXXXX/``: ``mor_adapter/`` and ``vae_encoder_adapter/`` (adapter
  safetensors), the optimiser, LR-scheduler and RNG states (``accelerate.save_state``) and
  ``trainer_state.json``; written to a temporary folder and renamed when complete, so a crash never
  leaves a half checkpoint that resume would pick up. The last ``keep_checkpoints`` are kept.
- ``final/``: the adapters of the last step (``mor_adapter/``, ``vae_encoder_adapter/``).
- ``train_log.jsonl``: one JSON object per logged step (losses, lr, grad norm, severity, mean
  active ranks, per-layer active ranks every ``layer_stats_every`` steps; the layer names are in
  ``routing_layers.json``).

Resume: ``resume: latest`` (or ``--resume``) continues from the newest complete checkpoint: weights,
optimiser, scheduler, step counter and the data position are restored, so the run continues as if
never interrupted.

One run per ``output_dir``: a fresh start (no resume) in an ``output_dir`` that already holds
checkpoints, a log or ``final/`` of an earlier run is refused, and so is resuming from an older
checkpoint of that folder while later ones exist (the new steps would be mixed with the old run's:
pruning keeps the highest step numbers, and a later ``--resume`` would pick the stale run). With
``overwrite: true`` (``--overwrite``) the conflicting files are deleted first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..sr.loading import ADAPTER_DIR, VAE_ADAPTER_DIR
from .checkpoints import (
    STATE_NAME,
    OutputDirInUse,
    conflicting_outputs,
    delete_outputs,
    latest_checkpoint,
    refusal,
    save_checkpoint,
)
from .config import TrainConfig
from .log import TrainLog
from .model import OneStepSR, build_model

__all__ = ["Trainer", "build_loss_terms"]


def build_loss_terms(cfg: TrainConfig, log=print) -> list:
    """The weighted loss terms of the config (an LPIPS term only when its weights are available)."""
    from .losses import LossTerm, LPIPSLoss, LPIPSWeightsError, balance_term, build_lpips, l2_loss

    terms = []
    for name, weight in cfg.losses.items():
        if weight == 0:
            continue
        if name == "l2":
            terms.append(LossTerm("l2", weight, l2_loss))
        elif name == "balance":
            # a routed VAE-encoder adapter ("mor") is balanced too; the plain LoRA has nothing to balance
            terms.append(LossTerm("balance", weight, balance_term(None if cfg.vae_adapter == "mor" else "unet")))
        elif name == "lpips":
            try:
                net = build_lpips(cfg.lpips.net, cfg.lpips.backbone_weights, cfg.lpips.linear_weights)
            except LPIPSWeightsError as e:
                if not cfg.lpips.allow_missing:
                    raise
                log(f"WARNING: training WITHOUT the LPIPS loss (lpips.allow_missing is true): {e}")
                continue
            module = LPIPSLoss(net)
            terms.append(LossTerm("lpips", weight, module, module))
    return terms


def _lr_lambda(cfg: TrainConfig):
    warm, total, kind = cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule

    def factor(step: int) -> float:
        if kind != "constant" and warm and step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


class _Progress:
    """The step counter, checkpointed with the accelerate state."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


class Trainer:
    """Runs the training described by a :class:`TrainConfig` (see the module docstring).

    Args:
        cfg: the validated configuration.
        log: ``log(message)`` for progress messages (default: print on the main process).
        extra_terms: more :class:`~mor_model.train.losses.LossTerm` entries added to the configured ones
            (the place for GAN/VSD terms; a term's ``module`` is moved to the device; a term that trains
            parameters of its own, such as a discriminator, steps its own optimiser inside ``fn``).
    """

    def __init__(self, cfg: TrainConfig, *, log=None, extra_terms=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=cfg.cpu,
        )
        self._log = log or (lambda msg: self.accelerator.print(msg))
        self.log = TrainLog(self.out, self.accelerator.is_main_process)
        set_seed(cfg.seed)
        self.model, self.params = build_model(cfg, log=self._log)
        self.terms = build_loss_terms(cfg, log=self._log) + list(extra_terms or [])
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"loss terms need distinct names and at least one term, got {names}")
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.progress = _Progress()
        acc = self.accelerator
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        for term in self.terms:
            if term.module is not None:
                term.module.to(acc.device)
        # the LR scheduler is stepped once per optimiser step by us (not prepared: accelerate would step
        # it once per process), and checkpointed with the step counter
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_for_checkpointing(self.progress)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def core(self) -> OneStepSR:
        return self.accelerator.unwrap_model(self.model)

    def save_adapters(self, path: Path) -> None:
        from ..adapter_io import save_adapter

        save_adapter(self.core.unet, path / ADAPTER_DIR)
        if "vae" in self.core.routed:
            save_adapter(self.core.vae, path / VAE_ADAPTER_DIR)

    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.save_adapters(Path(output_dir))
        weights.clear()  # the frozen base model is not written into checkpoints

    def _load_hook(self, models, input_dir):
        from ..adapter_io import load_adapter

        load_adapter(self.core.unet, Path(input_dir) / ADAPTER_DIR)
        if "vae" in self.core.routed:
            load_adapter(self.core.vae, Path(input_dir) / VAE_ADAPTER_DIR)
        models.clear()

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.out, self.progress.step, self.cfg)

    def resume(self, where: str) -> bool:
        """Loads ``where`` (``"latest"`` or a checkpoint dir); False when ``"latest"`` finds none."""
        path = latest_checkpoint(self.out) if where == "latest" else Path(where)
        if path is None:
            self._log(f"resume: no checkpoint in {self.out / 'checkpoints'}, starting from step 0")
            return False
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_NAME})")
        self.accelerator.load_state(str(path))
        self._log(f"resumed from {path} at step {self.progress.step}")
        return True

    # -- data ------------------------------------------------------------------------------------
    def dataloader(self):
        from .data import SRDataset, StepBatchSampler

        d = self.cfg.data
        dataset = SRDataset(
            d.hr,
            crop_size=d.crop_size,
            scale=d.scale,
            flip=d.flip,
            degradation=d.degradation,
            degradation_options=d.degradation_options or None,
            seed=self.cfg.seed,
        )
        acc = self.accelerator
        sampler = StepBatchSampler(
            self.cfg.batch_size,
            start_micro_step=self.progress.step * self.cfg.gradient_accumulation_steps,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=d.num_workers,
            pin_memory=acc.device.type == "cuda",
            persistent_workers=d.num_workers > 0,
        )

    # -- the loop --------------------------------------------------------------------------------
    def train_step(self, lq: torch.Tensor, hr: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        """One micro-step on a batch (``lq``, ``hr`` in ``[0, 1]`` on the device): forward, losses, backward,
        and (when the accumulation window is complete) clipping and the optimiser step. Returns the
        unweighted loss values (plus ``loss``, the weighted total, and ``severity``) and the gradient norm
        (None unless clipped this micro-step). Does not advance the step counter or the LR schedule."""
        from .losses import LossInputs, compute_losses

        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            pred, scores = self.model(lq)
            inputs = LossInputs(pred=pred, hr=hr * 2 - 1, lq=lq, scores=scores, model=self.model)
            with acc.autocast():
                loss, values = compute_losses(self.terms, inputs)
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and cfg.max_grad_norm is not None:
                grad_norm = acc.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {**values, "loss": float(loss.detach()), "severity": float(scores.mean())}, grad_norm

    def train(self) -> dict:
        """Runs to ``max_steps``; returns the last log record."""
        cfg, acc = self.cfg, self.accelerator
        conflicts = conflicting_outputs(cfg)
        if conflicts and not cfg.overwrite:
            raise OutputDirInUse(refusal(cfg, conflicts))
        acc.wait_for_everyone()  # every process has looked before the main one deletes
        if acc.is_main_process:
            delete_outputs(conflicts)
            if conflicts:
                self._log(f"overwrite: deleted {len(conflicts)} files/folders of an earlier run in {self.out}")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.resume is not None:
            self.resume(cfg.resume)
        self.log.truncate(self.progress.step)
        last: dict = {"step": self.progress.step}
        if self.progress.step >= cfg.max_steps:
            self._log(f"already at step {self.progress.step} >= max_steps {cfg.max_steps}: nothing to do")
            self._export()
            return last
        self.model.train()
        sums: dict[str, float] = {}
        micro = 0
        start = time.time()
        for lq, hr in self.dataloader():
            lq = lq.to(acc.device, non_blocking=True)
            hr = hr.to(acc.device, non_blocking=True)
            values, grad_norm = self.train_step(lq, hr)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            micro += 1
            if not acc.sync_gradients:
                continue
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            if not acc.optimizer_step_was_skipped:
                self.lr_scheduler.step()
            self.progress.step += 1
            step = self.progress.step
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                means = torch.tensor([sums[k] / micro for k in sorted(sums)], device=acc.device)
                means = acc.reduce(means, reduction="mean")
                last = {"step": step, **{k: float(v) for k, v in zip(sorted(sums), means.tolist(), strict=True)}}
                last["lr"] = lr
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                with_layers = bool(cfg.layer_stats_every) and step % cfg.layer_stats_every == 0
                last.update(self.log.routing_record(self.core.unet, with_layers))
                last["time_s"] = round(time.time() - start, 3)
                self.log.write(last)
                terms = " ".join(f"{t.name} {last[t.name]:.4g}" for t in self.terms if t.name in last)
                self._log(
                    f"step {step}/{cfg.max_steps} loss {last['loss']:.4g} ({terms}) lr {lr:.3g} "
                    f"active ranks {last['active_ranks_mean']:.2f} [{last['time_s']:.0f} s]"
                )
            sums, micro = {}, 0
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                self.save_checkpoint()
            if step >= cfg.max_steps:
                break
        self._export()
        return last

    def _export(self) -> None:
        if self.accelerator.is_main_process:
            final = self.out / "final"
            tmp = self.out / "final.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            self.save_adapters(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._log(f"adapters of step {self.progress.step} written to {final}")
        self.accelerator.wait_for_everyone()
