"""Helpers shared by the training tests (fixtures are in conftest.py)."""

import json


def write_config(path, tiny, hr_dir, **overrides):
    """A training config on the tiny model (32 px crops, bicubic LR, L2 + balance) with ``overrides``
    (a dict value is merged into the section of that name)."""
    cfg = {
        "model": str(tiny),
        "output_dir": "run",
        "data": {"hr": [str(hr_dir)], "crop_size": 32, "degradation": "bicubic", "num_workers": 0},
        "batch_size": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "losses": {"l2": 1.0, "balance": 1.0},
        "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return path


def read_log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
