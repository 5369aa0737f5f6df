"""Training checkpoints and the one-run-per-``output_dir`` rule.

``output_dir/checkpoints/step-XXXXXXXX/`` holds the adapters, the optimiser, LR-scheduler and RNG states
(``accelerate.save_state``) and ``trainer_state.json``; it is written to a temporary folder and renamed
when complete, so a crash never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .log import LAYERS_NAME, LOG_NAME

__all__ = [
    "OutputDirInUse",
    "checkpoint_dirs",
    "conflicting_outputs",
    "delete_outputs",
    "refusal",
    "latest_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.json"


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


def refusal(cfg: TrainConfig, conflicts: list[Path]) -> str:
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


def delete_outputs(paths: list[Path]) -> None:
    """Deletes the files and folders of an earlier run (``overwrite``)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def save_checkpoint(acc, output_dir: Path, step: int, cfg: TrainConfig) -> Path:
    """Writes ``output_dir/checkpoints/step-N`` through ``acc.save_state`` (every process takes part; the
    main process writes ``trainer_state.json``, renames the folder into place and prunes old checkpoints)."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "time": time.time(), "config": cfg.to_dict()}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if cfg.keep_checkpoints:
            for old in checkpoint_dirs(output_dir)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final
