"""Run by tests/train/test_objective.py::test_two_processes_match_one_process, under
``accelerate launch --multi_gpu --num_processes 2`` (or in the test's own process):

    python two_process_driver.py CONFIG OUT_DIR

trains ``max_steps`` of CONFIG and saves what this process holds to ``OUT_DIR/rank<i>.pt``: every
trainable tensor before and after (by group: generator, fake_score, discriminator), the gradients each
optimiser stepped with (after the averaging over processes) and the process count.
"""

import sys
from pathlib import Path

import torch


def run(config: str, out: str) -> dict:
    from mor_model.train import loop
    from mor_model.train.config import load_config

    grads: list[dict[str, torch.Tensor | None]] = []
    average = loop.average_gradients

    def recording(params):  # what each optimiser step sees, after the cross-process average
        average(params)
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])

    loop.average_gradients = recording
    try:
        trainer = loop.Trainer(load_config(config), log=lambda m: None)
        named = {k: list(ps) for k, ps in trainer.param_groups.items()}
        before = {k: [p.detach().clone() for p in ps] for k, ps in named.items()}
        trainer.train()
        after = {k: [p.detach().clone() for p in ps] for k, ps in named.items()}
    finally:
        loop.average_gradients = average
    acc = trainer.accelerator
    result = {"before": before, "after": after, "grads": grads, "world": acc.num_processes}
    torch.save(result, Path(out) / f"rank{acc.process_index}.pt")
    return result


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
