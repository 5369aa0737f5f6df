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

Losses (``losses``; :mod:`mor_model.train.losses`): L2 (1) + LPIPS (2) + the degradation-aware
balance loss (1) by default; ``vsd`` (1) and ``gan`` (0.5) add the paper's full objective
``L_rec + l1 L_VSD + l2 L_GAN + L_balance`` (:mod:`.objective`, :mod:`.vsd`, :mod:`.gan`). Then each
step (each micro-step, the optimisers stepping at the end of the accumulation window) is

1. the generator update: forward, the weighted terms, backward, step of the adapters' optimiser;
2. the fake-score update (``vsd``): psi's diffusion loss on the detached generated latents, its own
   AdamW at ``vsd.learning_rate``;
3. the discriminator update (``gan``): the heads' loss on real and detached generated latents, its
   own AdamW at ``gan.learning_rate``.

One set of frozen UNet weights serves the generator (base + MoR), the pretrained score (base, every
adapter off) and the fake score (base + psi), switched by context managers.

Several processes (``accelerate launch``): data sharded by the sampler, gradients averaged per
optimiser at each step (:mod:`.distributed`, no DDP wrapper), one process writes checkpoints and logs.

Outputs under ``output_dir``:

- ``checkpoints/step-XXXXXXXX/``: ``mor_adapter/`` and ``vae_encoder_adapter/`` (adapter
  safetensors), ``fake_score_lora.safetensors`` (psi) and ``discriminator_heads.safetensors`` when those
  terms are on, the optimiser (one file per optimiser), LR-scheduler and RNG states
  (``accelerate.save_state``) and ``trainer_state.json``; written to a temporary folder and renamed
  when complete, so a crash never leaves a half checkpoint that resume would pick up. The last
  ``keep_checkpoints`` are kept.
- ``final/``: the adapters of the last step (``mor_adapter/``, ``vae_encoder_adapter/``).
- ``train_log.jsonl``: one JSON object per logged step (every loss term unweighted, ``loss`` the
  generator's weighted total, ``fake_score`` and ``discriminator`` losses with the heads' mean logits
  ``d_real``/``d_fake``, each optimiser's lr and grad norm, severity, peak memory, mean active ranks,
  per-layer active ranks every ``layer_stats_every`` steps; the layer names are in
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
from .distributed import average_gradients, broadcast_parameters
from .log import TrainLog, peak_memory_mb
from .model import OneStepSR, build_model

__all__ = ["Trainer", "build_loss_terms"]

#: config keys that set the shapes of trained tensors a checkpoint holds -> whether the key matters for a config
SHAPE_KEYS = {
    "vsd.lora_rank": lambda cfg: cfg.losses.get("vsd", 0) > 0,
    "gan.head_channels": lambda cfg: cfg.losses.get("gan", 0) > 0,
    "vae_adapter": lambda cfg: True,
    "vae_lora_rank": lambda cfg: cfg.vae_adapter == "lora",
}
FAKE_SCORE_FILE = "fake_score_lora.safetensors"
HEADS_FILE = "discriminator_heads.safetensors"


def build_loss_terms(cfg: TrainConfig, log=print, objective=None) -> list:
    """The weighted loss terms of the config, in its order (an LPIPS term only when its weights are
    available; ``vsd``/``gan`` from ``objective``, an :class:`~mor_model.train.objective.Objective`)."""
    from .losses import LossTerm, LPIPSLoss, LPIPSWeightsError, balance_term, build_lpips, l2_loss

    extra = objective.generator_terms() if objective is not None else {}
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
        elif name in ("vsd", "gan"):
            if name not in extra:
                raise ValueError(f"losses.{name} needs the training objective's {name} part (pass objective=)")
            terms.append(extra[name])
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


def check_launcher_precision(cfg: TrainConfig) -> None:
    """``accelerate launch --mixed_precision X`` (or an accelerate config file) passes X on as
    ``ACCELERATE_MIXED_PRECISION``, and the training config's ``mixed_precision`` would silently override it: a
    launcher asking for a precision ("bf16", "fp16", "fp8") that the config does not have is refused. "no" is
    accelerate launch's default whatever the user meant, so it never conflicts; the config decides then."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launcher and launcher != "no" and launcher != cfg.mixed_precision:
        raise ValueError(
            f"accelerate launch (or its config file) asks for mixed precision {launcher!r} "
            f"(ACCELERATE_MIXED_PRECISION) but the training config has mixed_precision {cfg.mixed_precision!r}, "
            f"which would silently win: set mixed_precision to {launcher!r} in the config (or --mixed-precision "
            f"{launcher}), or launch with --mixed_precision {cfg.mixed_precision}"
        )


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    check_launcher_precision(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # several processes on a machine without a GPU: accelerate runs them on the CPU (gloo) only when told
    cpu = cfg.cpu or (launched > 1 and not torch.cuda.is_available())
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cpu
    )
    if launched > 1 and acc.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE) but accelerate set up {acc.num_processes}: each "
            "would train alone and write the same files; check the accelerate launch options"
        )
    return acc


class Trainer:
    """Runs the training described by a :class:`TrainConfig` (see the module docstring).

    Args:
        cfg: the validated configuration.
        log: ``log(message)`` for progress messages (default: print on the main process).
        extra_terms: more :class:`~mor_model.train.losses.LossTerm` entries added to the configured ones
            (a term's ``module`` is moved to the device; its gradients reach the generator's parameters).
    """

    def __init__(self, cfg: TrainConfig, *, log=None, extra_terms=None):
        from accelerate.utils import set_seed

        from .objective import Objective

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = acc = _accelerator(cfg)
        self._log = log or (lambda msg: acc.print(msg))
        self.log = TrainLog(self.out, acc.is_main_process)
        set_seed(cfg.seed)
        if cfg.resume is not None:  # a checkpoint of other terms is refused now, before the model loads
            path = latest_checkpoint(self.out) if cfg.resume == "latest" else Path(cfg.resume)
            if path is not None and (path / STATE_NAME).is_file():
                self._check_resumable(path)
        self.model, self.params = build_model(cfg, log=self._log)
        needs_objective = cfg.losses.get("vsd", 0) > 0 or cfg.losses.get("gan", 0) > 0
        self.objective = Objective(cfg, self.model) if needs_objective else None
        self.terms = build_loss_terms(cfg, log=self._log, objective=self.objective) + list(extra_terms or [])
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"loss terms need distinct names and at least one term, got {names}")
        self.model.to(acc.device)
        for term in self.terms:
            if term.module is not None:
                term.module.to(acc.device)
        # the groups: name -> (parameters, learning rate); each gets its own AdamW and LR schedule
        groups = {"generator": (list(self.params.values()), cfg.learning_rate)}
        if self.objective is not None:
            self.objective.to(acc.device)
            if self.objective.psi is not None:
                groups["fake_score"] = (list(self.objective.psi.parameters()), cfg.vsd.learning_rate)
            if self.objective.heads is not None:
                groups["discriminator"] = (list(self.objective.heads.parameters()), cfg.gan.learning_rate)
            self._log(self._objective_summary())
        self.param_groups = {k: params for k, (params, _) in groups.items()}
        broadcast_parameters([p for params in self.param_groups.values() for p in params])
        optimizers = {
            k: torch.optim.AdamW(
                params,
                lr=cfg.learning_rate if lr is None else lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay,
            )
            for k, (params, lr) in groups.items()
        }
        self.lr_schedulers = {
            k: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg)) for k, opt in optimizers.items()
        }
        self.lr_scheduler = self.lr_schedulers["generator"]
        self.progress = _Progress()
        self.micro_step = 0  # micro-steps done: the data sampler's position, and the samples' noise ids
        # the model is not prepared: no DDP wrapper (see .distributed); autocast comes from acc.autocast()
        prepared = acc.prepare(*optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)  # one object comes back bare
        self.optimizers = dict(zip(optimizers, prepared, strict=True))
        self.optimizer = self.optimizers["generator"]
        # the LR schedulers are stepped once per optimiser step by us (not prepared: accelerate would step
        # them once per process), and checkpointed with the step counter
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_for_checkpointing(self.progress)
        for k, sched in self.lr_schedulers.items():
            if k != "generator":
                acc.register_for_checkpointing(sched)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    def _objective_summary(self) -> str:
        obj, cfg = self.objective, self.cfg
        parts = []
        if obj.psi is not None:
            n = sum(p.numel() for p in obj.psi.parameters())
            parts.append(
                f"VSD: fake-score LoRA rank {cfg.vsd.lora_rank} on {len(obj.psi.names)} UNet layers ({n} parameters), "
                f"t in [{cfg.vsd.t_min}, {cfg.vsd.t_max}), guidance {cfg.vsd.guidance_scale}"
            )
        if obj.heads is not None:
            n = sum(p.numel() for p in obj.heads.parameters())
            parts.append(
                f"GAN: {len(obj.heads.heads)} heads on the frozen UNet's down/mid features ({n} parameters), "
                f"{cfg.gan.loss} loss, t in [{cfg.gan.t_min}, {cfg.gan.t_max})"
            )
        return "; ".join(parts) + "; one frozen UNet shared by the generator, both scores and the discriminator"

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def core(self) -> OneStepSR:
        return self.model

    def save_adapters(self, path: Path) -> None:
        from ..adapter_io import save_adapter

        save_adapter(self.core.unet, path / ADAPTER_DIR)
        if "vae" in self.core.routed:
            save_adapter(self.core.vae, path / VAE_ADAPTER_DIR)

    def _objective_state(self) -> dict[str, dict[str, torch.Tensor]]:
        obj, out = self.objective, {}
        if obj is not None and obj.psi is not None:
            out[FAKE_SCORE_FILE] = obj.psi.named_state()
        if obj is not None and obj.heads is not None:
            out[HEADS_FILE] = dict(obj.heads.state_dict())
        return out

    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            self.save_adapters(Path(output_dir))
            for name, state in self._objective_state().items():
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(Path(output_dir) / name))
        weights.clear()  # the frozen base model is not written into checkpoints

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file

        from ..adapter_io import load_adapter

        load_adapter(self.core.unet, Path(input_dir) / ADAPTER_DIR)
        if "vae" in self.core.routed:
            load_adapter(self.core.vae, Path(input_dir) / VAE_ADAPTER_DIR)
        obj = self.objective
        if obj is not None and obj.psi is not None:
            obj.psi.load_named_state(load_file(str(Path(input_dir) / FAKE_SCORE_FILE)))
        if obj is not None and obj.heads is not None:
            obj.heads.load_state_dict(load_file(str(Path(input_dir) / HEADS_FILE)))
        models.clear()

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.out, self.progress.step, self.cfg)

    def _check_resumable(self, path: Path) -> None:
        """The checkpoint must hold the same optimisers (the same VSD/GAN terms on) and the same shapes of what
        they train (the keys in :data:`SHAPE_KEYS`) as this run: else accelerate's load_state would fail
        half-way with a raw shape error."""
        saved_cfg = json.loads((path / STATE_NAME).read_text()).get("config", {})
        saved = saved_cfg.get("losses", {})
        now_cfg = self.cfg.to_dict()
        for name, what in (("vsd", "fake-score LoRA"), ("gan", "discriminator heads")):
            was, now = saved.get(name, 0) > 0, self.cfg.losses.get(name, 0) > 0
            if was != now:
                raise ValueError(
                    f"checkpoint {path} was written with losses.{name} {'on' if was else 'off'} and this run has it "
                    f"{'on' if now else 'off'}: the {what} and its optimiser would not match; keep the losses or "
                    "start a new run"
                )
        changed = []
        for key, applies in SHAPE_KEYS.items():
            if not applies(self.cfg):
                continue
            section, _, field = key.rpartition(".")
            was = (saved_cfg.get(section, {}) if section else saved_cfg).get(field)
            now = (now_cfg[section] if section else now_cfg)[field]
            if was is not None and was != now:
                changed.append(f"{key} {was!r} -> {now!r}")
        if changed:
            raise ValueError(
                f"checkpoint {path} does not fit this run: {', '.join(changed)} changes the shapes of what it "
                "trains; keep the checkpoint's values to resume, or start a new run"
            )

    def resume(self, where: str) -> bool:
        """Loads ``where`` (``"latest"`` or a checkpoint dir); False when ``"latest"`` finds none."""
        path = latest_checkpoint(self.out) if where == "latest" else Path(where)
        if path is None:
            self._log(f"resume: no checkpoint in {self.out / 'checkpoints'}, starting from step 0")
            return False
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_NAME})")
        self._check_resumable(path)
        self.accelerator.load_state(str(path))
        self.micro_step = self.progress.step * self.cfg.gradient_accumulation_steps
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
            start_micro_step=self.micro_step,
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

    def sample_ids(self, batch: int) -> list[int]:
        """The global sample indices of this process's batch at the current micro-step (the ones
        :class:`~mor_model.train.data.StepBatchSampler` hands out there)."""
        acc = self.accelerator
        first = (self.micro_step * acc.num_processes + acc.process_index) * batch
        return list(range(first, first + batch))

    # -- the loop --------------------------------------------------------------------------------
    def _optimizer_step(self, name: str) -> float | None:
        """At the end of an accumulation window: average the group's gradients over the processes, clip,
        step; otherwise nothing (the accelerate optimiser skips). Returns the gradient norm when clipped."""
        acc, params, optimizer = self.accelerator, self.param_groups[name], self.optimizers[name]
        norm = None
        if acc.sync_gradients:
            average_gradients(params)
            if self.cfg.max_grad_norm is not None:
                acc.unscale_gradients(optimizer=optimizer)
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(
        self, lq: torch.Tensor, hr: torch.Tensor, ids: list[int] | None = None
    ) -> tuple[dict[str, float], dict[str, float | None]]:
        """One micro-step on a batch (``lq``, ``hr`` in ``[0, 1]`` on the device; ``ids`` the samples'
        global indices, default :meth:`sample_ids`): the generator update, then the fake score's, then the
        discriminator's, each stepping its optimiser when the accumulation window is complete. Returns the
        unweighted loss values (plus ``loss``, the generator's weighted total, ``severity``, and the
        fake-score / discriminator losses) and the gradient norms by group (None unless clipped this
        micro-step). Does not advance the step counter or the LR schedules."""
        from .fake_score import fake_score_mode
        from .losses import LossInputs, compute_losses

        acc, obj = self.accelerator, self.objective
        ids = self.sample_ids(lq.shape[0]) if ids is None else list(ids)
        self.micro_step += 1
        with acc.accumulate():
            with acc.autocast():
                pred, scores, latent = self.model(lq, return_latent=True)
            extras = {"latent": latent, "ids": ids}
            inputs = LossInputs(pred=pred, hr=hr * 2 - 1, lq=lq, scores=scores, model=self.model, extras=extras)
            with acc.autocast():
                loss, values = compute_losses(self.terms, inputs)
            acc.backward(loss)
            norms = {"grad_norm": self._optimizer_step("generator")}
            values = {**values, "loss": float(loss.detach()), "severity": float(scores.mean())}
            del inputs, extras, loss, pred
            latent = latent.detach()
            if obj is not None and obj.psi is not None:
                # the backward inside the mode: under gradient checkpointing it recomputes UNet blocks
                with fake_score_mode(self.model.unet, obj.psi):
                    with acc.autocast():
                        fake_loss = obj.fake_score_loss(latent, ids)
                    acc.backward(fake_loss)
                values["fake_score"] = float(fake_loss.detach())
                norms["grad_norm_fake_score"] = self._optimizer_step("fake_score")
            if obj is not None and obj.heads is not None:
                with acc.autocast():
                    d_loss, logits = obj.discriminator_loss(latent, hr, ids)
                acc.backward(d_loss)
                values.update(discriminator=float(d_loss.detach()), **logits)
                norms["grad_norm_discriminator"] = self._optimizer_step("discriminator")
        return values, norms

    def _step_schedules(self) -> None:
        """After an optimiser step: each LR schedule moves on unless its own optimiser skipped the step (fp16: a
        loss-scale overflow in that group's gradients), as one run of that group alone would."""
        for name, sched in self.lr_schedulers.items():
            if not self.optimizers[name].step_was_skipped:
                sched.step()

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
        self.micro_step = self.progress.step * cfg.gradient_accumulation_steps
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
        shown = [t.name for t in self.terms] + ["fake_score", "discriminator"]
        for lq, hr in self.dataloader():
            lq = lq.to(acc.device, non_blocking=True)
            hr = hr.to(acc.device, non_blocking=True)
            values, norms = self.train_step(lq, hr)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            micro += 1
            if not acc.sync_gradients:
                continue
            lrs = {k: opt.param_groups[0]["lr"] for k, opt in self.optimizers.items()}  # the rates this step used
            self._step_schedules()
            self.progress.step += 1
            step = self.progress.step
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                means = torch.tensor([sums[k] / micro for k in sorted(sums)], device=acc.device)
                means = acc.reduce(means, reduction="mean")
                last = {"step": step, **{k: float(v) for k, v in zip(sorted(sums), means.tolist(), strict=True)}}
                last["lr"] = lrs.pop("generator")
                last.update({f"lr_{k}": v for k, v in lrs.items()})
                last.update({k: v for k, v in norms.items() if v is not None})
                with_layers = bool(cfg.layer_stats_every) and step % cfg.layer_stats_every == 0
                last.update(self.log.routing_record(self.core.unet, with_layers))
                last["time_s"] = round(time.time() - start, 3)
                last["peak_memory_mb"] = round(peak_memory_mb(acc.device)[0], 1)
                self.log.write(last)
                terms = " ".join(f"{name} {last[name]:.4g}" for name in shown if name in last)
                self._log(
                    f"step {step}/{cfg.max_steps} loss {last['loss']:.4g} ({terms}) lr {last['lr']:.3g} "
                    f"active ranks {last['active_ranks_mean']:.2f} [{last['time_s']:.0f} s]"
                )
            sums, micro = {}, 0
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                self.save_checkpoint()
            if step >= cfg.max_steps:
                break
        peak, kind = peak_memory_mb(acc.device)
        self._log(f"peak memory: {peak:.0f} MiB ({kind}, process {acc.process_index} of {acc.num_processes})")
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
