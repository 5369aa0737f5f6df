"""Run by tests/train/test_objective.py::test_balance_loss_refuses_processes_that_routed_different_layers, once
per process (gloo on the CPU, rendezvous through a file):

    python balance_driver.py RANK WORLD INIT_FILE MODE

MODE ``same``: every process routes both MoR layers of a toy model; ``differ``: process 1 routes only the first.
Then each calls ``global_balance_loss`` and prints ``loss <value>`` or ``error <message>``.
"""

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn


def main(rank: int, world: int, init_file: str, mode: str) -> None:
    from mor_model import MoRLinear, degradation
    from mor_model.config import MoRConfig
    from mor_model.train.losses import global_balance_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    cfg = MoRConfig(num_shared=2, num_routed=4, num_zero=2, top_k=3, backend="reference")
    torch.manual_seed(0)
    model = nn.Sequential(MoRLinear(nn.Linear(4, 4), cfg), MoRLinear(nn.Linear(4, 4), cfg))
    x, scores = torch.randn(3, 2, 4), torch.rand(3, 7)
    with degradation(model, scores):
        if mode == "same" or rank == 0:
            model(x)
        else:
            model[0](x)  # the second layer never routes on this process
    try:
        print(f"loss {float(global_balance_loss(model))}", flush=True)
    except RuntimeError as e:
        print(f"error {e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
