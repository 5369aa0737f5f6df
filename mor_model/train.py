"""Training of the one-step MoR super-resolution model (``mor-sr train CONFIG``), with ``accelerate``.

The trained model is the pipeline of :mod:`mor_model.pipeline`, run differentiably:

    LQ -> bicubic x scale -> VAE encoder (+ LoRA) -> latent mode * scaling factor
       -> UNet at t = 999 with MoR adapters routed on the CLIP degradation scores of the LQ
       -> x0 from the prediction -> VAE decoder (frozen) -> prediction in [-1, 1]

Trainable: the UNet's MoR adapters and routers, and the VAE-encoder adapter: by default a plain
rank-``vae_lora_rank`` LoRA on the encoder's convs/attention projections and ``quant_conv``,
stored as a MoR adapter whose ranks are all always on (``num_shared = rank - 1``, one routed rank,
no zero slot, top-1: the single routed slot always gets gate 1), so the pipeline loads it from
``vae_encoder_adapter/`` like any other adapter. Everything else is frozen and in eval mode.

Losses (:mod:`mor_model.train_losses`): L2 (1) + LPIPS (2) + the degradation-aware balance loss (1).

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

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .pipeline import ADAPTER_DIR, CLIP_DIR, VAE_ADAPTER_DIR
from .train_config import TrainConfig, load_config
from .x0 import clip_x0, x0_from_prediction

__all__ = ["OneStepSR", "OutputDirInUse", "Trainer", "build_model", "conflicting_outputs", "latest_checkpoint", "main"]

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"
LAYERS_NAME = "routing_layers.json"
#: the VAE-encoder modules a plain LoRA adapts (OSEDiff: encoder convs, attention projections, quant_conv)
VAE_LORA_TARGETS = (r"re:^encoder\..*(conv(1|2|_in|_out|_shortcut)?|to_q|to_k|to_v|to_out\.0)$", "quant_conv")


class OneStepSR(nn.Module):
    """The differentiable one-step SR forward (same maths as :class:`mor_model.pipeline.MoRSRPipeline`
    with ``tile=0``, ``color_fix="none"``, no clamping of the returned prediction's gradient path
    beyond the ``[-1, 1]`` clamp).

    ``forward(lq (B, 3, h, w) in [0, 1]) -> (pred (B, 3, scale h, scale w) in [-1, 1], scores (B, D))``.
    ``scale h`` must be a multiple of the VAE factor times the UNet factor (no padding in training).
    """

    def __init__(
        self,
        unet,
        vae,
        estimator,
        prompt_embeds,
        alphas_cumprod,
        prediction_type,
        *,
        scale,
        timestep=999,
        scheduler_config=None,
    ):
        super().__init__()
        from .layers import mor_layers

        self.unet, self.vae, self.estimator = unet, vae, estimator
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float(), persistent=False)
        abar = float(alphas_cumprod[timestep])
        self.alpha_bar = abar
        self.sqrt_abar, self.sqrt_one_minus_abar = math.sqrt(abar), math.sqrt(1 - abar)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
        self.prediction_type, self.scale, self.timestep = prediction_type, scale, int(timestep)
        self.scheduler_config = scheduler_config  # its clip_sample / thresholding apply to x0, as in the pipeline
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.routed = [name for name in ("unet", "vae") if mor_layers(getattr(self, name))]

    def train(self, mode: bool = True):
        """Only the adapters train; the frozen networks stay in eval mode (no dropout anywhere)."""
        super().train(mode)
        for m in (self.unet, self.vae, self.estimator):
            m.eval()
        return self

    def forward(self, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .control import set_degradation

        b, _, h, w = lq.shape
        size = (h * self.scale, w * self.scale)
        if size[0] % (self.vae_factor * self.unet_factor) or size[1] % (self.vae_factor * self.unet_factor):
            raise ValueError(
                f"the upscaled size {size} must be a multiple of {self.vae_factor * self.unet_factor} "
                "(VAE factor x UNet factor): choose data.crop_size accordingly"
            )
        with torch.no_grad():
            scores = self.estimator(lq.float())
        for name in self.routed:
            set_degradation(getattr(self, name), scores)
        up = F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        z = (self.vae.encode(up * 2 - 1).latent_dist.mode() - shift) * cfg.scaling_factor
        t = torch.full((b,), self.timestep, device=z.device, dtype=torch.long)
        pred = self.unet(z, t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1)).sample.float()
        z = z.float()
        x0 = x0_from_prediction(pred, z, self.alpha_bar, self.prediction_type)
        if self.scheduler_config is not None:
            x0 = clip_x0(x0, self.scheduler_config)
        out = self.vae.decode(x0 / cfg.scaling_factor + shift).sample
        return out.float().clamp(-1, 1), scores


def _plain_lora_config(rank: int, backend: str):
    from .config import MoRConfig

    # all ranks always on: rank - 1 shared + 1 routed rank, no zero slot, top-1 (gate 1 after renormalising)
    return MoRConfig(
        num_shared=rank - 1, num_routed=1, num_zero=0, top_k=1, target_modules=VAE_LORA_TARGETS, backend=backend
    )


def build_model(cfg: TrainConfig, log=print) -> tuple[OneStepSR, dict[str, nn.Parameter]]:
    """Loads the base model, puts on the adapters, freezes the rest; returns the model and its trainable
    parameters by name (``unet.*`` and ``vae.*``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .adapter_io import load_adapter
    from .config import MoRConfig
    from .estimator import DegradationEstimator
    from .inject import inject_mor
    from .layers import trainable_parameters

    model_dir = Path(cfg.model)
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (model_dir / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"model {model_dir} is not a model directory: missing {missing} (diffusers layout)")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    unet.requires_grad_(False)
    vae.requires_grad_(False)

    if cfg.adapter is not None:
        load_adapter(unet, cfg.adapter, backend=cfg.backend)
        log(f"UNet MoR adapter: loaded from {cfg.adapter}")
    elif cfg.mor is not None:
        report = inject_mor(unet, MoRConfig.from_dict({**cfg.mor, "backend": cfg.backend}))
        log(f"UNet MoR adapter: new, from the config's 'mor' section; {report}")
    elif (model_dir / ADAPTER_DIR).is_dir():
        load_adapter(unet, model_dir / ADAPTER_DIR, backend=cfg.backend)
        log(f"UNet MoR adapter: loaded from {model_dir / ADAPTER_DIR}")
    else:
        report = inject_mor(unet, MoRConfig(backend=cfg.backend))
        log(f"UNet MoR adapter: new, MoRConfig defaults; {report}")

    vae_params: dict[str, nn.Parameter] = {}
    if cfg.vae_adapter == "lora":
        report = inject_mor(vae, _plain_lora_config(cfg.vae_lora_rank, cfg.backend))
        vae_params = {k: p for k, p in trainable_parameters(vae).items() if k.endswith(("lora_a", "lora_b"))}
        log(f"VAE encoder: plain LoRA rank {cfg.vae_lora_rank} on {len(report.replaced)} layers")
    elif cfg.vae_adapter == "mor":
        path = model_dir / VAE_ADAPTER_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"vae_adapter 'mor' trains {path}, which does not exist")
        load_adapter(vae, path, backend=cfg.backend)
        vae_params = trainable_parameters(vae)
        log(f"VAE encoder: MoR adapter loaded from {path}")

    clip_dir = Path(cfg.clip) if cfg.clip is not None else model_dir / CLIP_DIR
    if not clip_dir.is_dir():
        raise FileNotFoundError(f"degradation CLIP {clip_dir} not found (set 'clip' to a DegradationEstimator dir)")
    estimator = DegradationEstimator.from_local(clip_dir)

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
    with torch.no_grad():
        ids = tokenizer(
            [cfg.prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeds = text_encoder(ids)[0]
    del text_encoder

    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = OneStepSR(
        unet,
        vae,
        estimator,
        embeds,
        scheduler.alphas_cumprod,
        scheduler.config.prediction_type,
        scale=cfg.data.scale,
        timestep=cfg.timestep,
        scheduler_config=scheduler.config,
    )
    multiple = model.vae_factor * model.unet_factor
    if cfg.data.crop_size % multiple:
        raise ValueError(
            f"data.crop_size ({cfg.data.crop_size}) must be a multiple of {multiple} for this model "
            f"(VAE factor {model.vae_factor} x UNet factor {model.unet_factor})"
        )
    model.requires_grad_(False)
    params = {f"unet.{k}": p for k, p in trainable_parameters(unet).items()}
    params.update({f"vae.{k}": p for k, p in vae_params.items()})
    for p in params.values():
        p.requires_grad_(True)
    return model, params


def build_loss_terms(cfg: TrainConfig, log=print) -> list:
    """The weighted loss terms of the config (an LPIPS term only when its weights are available)."""
    from .train_losses import LossTerm, LPIPSLoss, LPIPSWeightsError, balance_term, build_lpips, l2_loss

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


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``checkpoints/step-N`` with a ``trainer_state.json``), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        name = d.name
        if d.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
            if (d / STATE_NAME).is_file():
                found.append((int(name[len(CHECKPOINT_PREFIX) :]), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :])


class OutputDirInUse(ValueError):
    """``output_dir`` holds files of another run that this one would be mixed with (see ``overwrite``)."""


def conflicting_outputs(cfg: TrainConfig) -> list[Path]:
    """The files of ``cfg.output_dir`` that a run with this config would mix with its own.

    ``resume: latest``: none (the run continues the newest checkpoint). Resuming from a checkpoint of
    ``output_dir``: the checkpoints after it (another continuation of that run). A fresh start, or a
    resume from a checkpoint elsewhere: every checkpoint, the log, ``routing_layers.json`` and ``final/``.
    """
    out = Path(cfg.output_dir)
    if cfg.resume == "latest":
        return []
    ckpts = checkpoint_dirs(out)
    if cfg.resume is not None:
        start = Path(cfg.resume).resolve()
        mine = [d for d in ckpts if d.resolve() == start]
        if mine:
            return [d for d in ckpts if _step_of(d) > _step_of(mine[0])]
    return ckpts + [p for p in (out / LOG_NAME, out / LAYERS_NAME, out / "final") if p.exists()]


def _refusal(cfg: TrainConfig, conflicts: list[Path]) -> str:
    names = ", ".join(str(p.relative_to(cfg.output_dir)) for p in conflicts[:4]) + (
        " ..." if len(conflicts) > 4 else ""
    )
    if cfg.resume is not None and cfg.resume != "latest" and all(p.parent.name == "checkpoints" for p in conflicts):
        return (
            f"resuming from {cfg.resume}, but {cfg.output_dir} has later checkpoints ({names}) that the new steps "
            "would be mixed with: pass --overwrite to delete them, or --resume to continue from the latest"
        )
    return (
        f"output_dir {cfg.output_dir} already holds an earlier run ({names}): pass --resume to continue it, "
        "--overwrite (config: overwrite: true) to delete it and start again, or choose another --output-dir"
    )


class Trainer:
    """Runs the training described by a :class:`TrainConfig` (see the module docstring).

    Args:
        cfg: the validated configuration.
        log: ``log(message)`` for progress messages (default: print on the main process).
        extra_terms: more :class:`~mor_model.train_losses.LossTerm` entries added to the configured ones
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
        from .adapter_io import save_adapter

        save_adapter(self.core.unet, path / ADAPTER_DIR)
        if "vae" in self.core.routed:
            save_adapter(self.core.vae, path / VAE_ADAPTER_DIR)

    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.save_adapters(Path(output_dir))
        weights.clear()  # the frozen base model is not written into checkpoints

    def _load_hook(self, models, input_dir):
        from .adapter_io import load_adapter

        load_adapter(self.core.unet, Path(input_dir) / ADAPTER_DIR)
        if "vae" in self.core.routed:
            load_adapter(self.core.vae, Path(input_dir) / VAE_ADAPTER_DIR)
        models.clear()

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        step = self.progress.step
        final = self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "time": time.time(), "config": self.cfg.to_dict()}
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.cfg.keep_checkpoints:
                for old in checkpoint_dirs(self.out)[: -self.cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

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
        from .dataset import SRDataset, StepBatchSampler

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

    # -- logging -----------------------------------------------------------------------------------
    def _write_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self, after_step: int) -> None:
        """Drops log records of steps after the resumed checkpoint (they will be run again)."""
        path = self.out / LOG_NAME
        if not self.accelerator.is_main_process or not path.is_file():
            return
        keep = [
            line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def _routing_record(self, with_layers: bool) -> dict:
        from .stats import routing_stats

        stats = routing_stats(self.core.unet)
        per_layer = stats.active_ranks.mean(dim=1)  # (L,)
        rec = {"active_ranks_mean": float(per_layer.mean())}
        if with_layers:
            names_file = self.out / LAYERS_NAME
            if self.accelerator.is_main_process and not names_file.exists():
                names_file.write_text(json.dumps(stats.layers) + "\n")
            rec["active_ranks_per_layer"] = [round(float(v), 4) for v in per_layer]
        return rec

    # -- the loop --------------------------------------------------------------------------------
    def train_step(self, lq: torch.Tensor, hr: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        """One micro-step on a batch (``lq``, ``hr`` in ``[0, 1]`` on the device): forward, losses, backward,
        and (when the accumulation window is complete) clipping and the optimiser step. Returns the
        unweighted loss values (plus ``loss``, the weighted total, and ``severity``) and the gradient norm
        (None unless clipped this micro-step). Does not advance the step counter or the LR schedule."""
        from .train_losses import LossInputs, compute_losses

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
            raise OutputDirInUse(_refusal(cfg, conflicts))
        acc.wait_for_everyone()  # every process has looked before the main one deletes
        if acc.is_main_process:
            for p in conflicts:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            if conflicts:
                self._log(f"overwrite: deleted {len(conflicts)} files/folders of an earlier run in {self.out}")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.resume is not None:
            self.resume(cfg.resume)
        self._truncate_log(self.progress.step)
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
                last.update(self._routing_record(with_layers))
                last["time_s"] = round(time.time() - start, 3)
                self._write_log(last)
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


# -- command line ----------------------------------------------------------------------------------
CONFIG_HELP = """\
CONFIG (JSON; YAML with PyYAML; relative paths are relative to the file). Required keys: model,
output_dir, data.hr. Example with every default spelled out:

  {"model": "sd21-base",              # diffusers dir: unet/ vae/ text_encoder/ tokenizer/ scheduler/
   "output_dir": "runs/mor-x4",
   "data": {"hr": ["LSDIR/HR", "ffhq10k.txt"], "crop_size": 512, "scale": 4, "flip": true,
            "degradation": "realesrgan", "degradation_options": {}, "num_workers": 4},
   "adapter": null,                   # start from this MoR adapter dir (default: model/mor_adapter if present)
   "mor": null,                       # or: MoRConfig fields of a fresh UNet adapter, e.g. {"num_shared": 8}
   "clip": null,                      # degradation CLIP dir (default: model/degradation_clip)
   "vae_adapter": "lora", "vae_lora_rank": 4,    # "lora" | "mor" (model/vae_encoder_adapter) | "none"
   "prompt": "", "timestep": 999, "backend": "auto",
   "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 25000,
   "learning_rate": 5e-5, "lr_schedule": "constant", "warmup_steps": 0,   # constant | warmup | cosine
   "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.01,
   "max_grad_norm": 1.0, "mixed_precision": "no", "gradient_checkpointing": false, "seed": 0,
   "losses": {"l2": 1.0, "lpips": 2.0, "balance": 1.0},
   "lpips": {"net": "vgg", "backbone_weights": null,    # a local torchvision vgg16/alexnet file,
             "linear_weights": null, "allow_missing": false},  # e.g. "weights/vgg16-397923af.pth"
   "checkpoint_every": 500, "keep_checkpoints": 3, "log_every": 1, "layer_stats_every": 1,
   "resume": null, "overwrite": false, "cpu": false}

Outputs: output_dir/checkpoints/step-N/ (adapters + optimizer/scheduler/RNG state), output_dir/final/
(mor_adapter/, vae_encoder_adapter/: `mor-sr upscale --model MODEL --adapter output_dir/final/mor_adapter
--vae-adapter output_dir/final/vae_encoder_adapter`), output_dir/train_log.jsonl (one JSON line per step).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mor-sr train",
        description="Train the MoR adapters (UNet) and the VAE-encoder LoRA of the one-step SR model. "
        "Launch on several GPUs with `accelerate launch -m mor_model train CONFIG`.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", help="training config (.json, or .yaml/.yml with PyYAML)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--max-steps", type=int, help="override max_steps (optimiser steps)")
    p.add_argument("--batch-size", type=int, help="override batch_size (per process)")
    p.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate", help="override learning_rate")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="override mixed_precision")
    p.add_argument(
        "--resume",
        action="store_const",
        const="latest",
        help="resume from the newest complete checkpoint in output_dir/checkpoints (a fresh start if there is none)",
    )
    p.add_argument("--resume-from", metavar="CHECKPOINT_DIR", help="resume from this checkpoint directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start although output_dir holds an earlier run: its checkpoints, log and final/ are deleted "
        "(with --resume-from: only the checkpoints after the one resumed); without it such a start is refused",
    )
    p.add_argument("--cpu", action="store_true", default=None, help="train on the CPU")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.crop_size=256 --set losses.lpips=0 (VALUE is JSON or a string)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """``mor-sr train CONFIG [overrides]``; returns the exit code (0 ok, 2 bad config or missing files)."""
    args = build_parser().parse_args(argv)
    overrides = {
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "mixed_precision": args.mixed_precision,
        "cpu": args.cpu,
        "output_dir": os.path.abspath(args.output_dir) if args.output_dir else None,
        "resume": os.path.abspath(args.resume_from) if args.resume_from else args.resume,
        "overwrite": args.overwrite,
    }
    try:
        cfg = load_config(args.config, overrides=overrides, sets=args.set)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"mor-sr train: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    conflicts = conflicting_outputs(cfg)
    if conflicts and not cfg.overwrite:  # before the (slow) model loading
        print(f"mor-sr train: error: {_refusal(cfg, conflicts)}", file=sys.stderr)
        return 2
    from .train_losses import LPIPSWeightsError

    try:
        trainer = Trainer(cfg)
    except (LPIPSWeightsError, FileNotFoundError, ValueError) as e:
        print(f"mor-sr train: error: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*upsample_bicubic2d.*")
        try:
            trainer.train()
        except OutputDirInUse as e:
            print(f"mor-sr train: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
