"""`accelerate launch --num_processes 2 -m mor_model upscale ...` on this CPU (gloo): the outputs are the same
files, bitwise, as a one-process run; one summary; the exit code agreed; a restarted run finishes the rest;
the split is by pixel count and gives every image to exactly one process (mor_model.cli.shard).

Runtime on the 2-core CPU box: about a minute (three runs of the CLI, two of them with two processes).
"""

import os
import socket
import subprocess
import sys

import pytest
from cli_helpers import digest_tree, save_photo

from mor_model.cli.shard import Team, shard_by_pixels


def test_shards_balance_pixels_and_cover_every_image_once():
    pixels = [64 * 64, 16 * 16, 8 * 8, 32 * 32, 48 * 16, 8 * 8, 0, 40 * 40]
    shards = shard_by_pixels(pixels, 2)
    assert sorted(i for s in shards for i in s) == list(range(len(pixels)))  # each image exactly once
    assert all(s == sorted(s) for s in shards)  # input order kept inside a shard
    loads = [sum(pixels[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(pixels)  # the greedy bound
    # by hand: 4096 | 1600, 1024, 768, 256, 64, 64, 0 (3776): the big one alone, by file count it would be 4 + 4
    assert shards == [[0], [1, 2, 3, 4, 5, 6, 7]] and loads == [4096, 3776], (shards, loads)
    assert shard_by_pixels(pixels, 3) == shard_by_pixels(list(pixels), 3)  # every process computes the same
    assert shard_by_pixels([], 4) == [[], [], [], []]
    assert shard_by_pixels(pixels, 1) == [list(range(len(pixels)))]
    with pytest.raises(ValueError, match="parts"):
        shard_by_pixels(pixels, 0)


def test_one_process_team_talks_to_nobody(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    team = Team.from_env()
    assert (team.rank, team.size, team.is_main) == (0, 1, True)
    assert team.share({"a": 1}) == {"a": 1} and team.sum([3, 4]) == [3, 4] and team.worst(1) == 1
    assert team.device(None) == (None, None) and team.device("cuda:1") == ("cuda:1", None)
    two = Team(rank=1, size=2, local_rank=1)
    assert two.device("cpu") == ("cpu", None)
    assert "each process takes its own GPU" in two.device("cuda:0")[1]


def test_the_main_process_is_rank_0_also_once_the_group_is_gone(monkeypatch):
    """Team.leave destroys the process group before mor-sr prints its closing line: is_main_process then reads
    the launcher's RANK, so that line is still printed once per team (not by every process)."""
    from mor_model.cli.shard import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()  # no launcher: one process
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    Team().leave()  # a one-process team has no group to leave


def test_each_process_takes_its_gpu_as_the_current_device(monkeypatch):
    """Triton launches on the current CUDA device: Team.device makes cuda:LOCAL_RANK current (faked CUDA)."""
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert Team(rank=1, size=2, local_rank=1).device(None) == ("cuda:1", None)
    assert current == [1]
    device, problem = Team(rank=3, size=4, local_rank=3).device(None)  # 4 processes on 2 GPUs
    assert device is None and "local rank 3 but there are only 2 CUDA devices" in problem
    assert current == [1]


# rank 1 of two processes has a device problem of its own (as with --num_processes 8 on 4 GPUs)
_RANK_1_PROBLEM = """
import sys
from mor_model.cli import main, shard

real = shard.Team.device

def device(self, asked):
    if self.rank == 1:
        return None, "process 1 has local rank 1 but there are only 1 CUDA devices (injected)"
    return real(self, asked)

shard.Team.device = device
sys.exit(main(sys.argv[1:]))
"""


def test_a_device_problem_of_one_process_is_reported_and_stops_all(tmp_path):
    """The main process prints the other process's problem (once), every process exits with 2, and nothing is
    planned (the missing model would be the main process's next complaint)."""
    photo = save_photo(tmp_path / "a.png")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE="2")  # fmt: skip
    argv = ["upscale", str(photo), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_1_PROBLEM, *argv],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        (_, err0), (_, err1) = (p.communicate(timeout=300) for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], err0 + err1
    assert err0.count("only 1 CUDA devices (injected)") == 1, err0
    assert "injected" not in err1, err1  # only the main process prints
    assert "no-model" not in err0 and "done in" not in err0, err0  # stopped before planning
    assert not (tmp_path / "out").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upscale(args, processes):
    # one thread per process in both runs: torch's CPU kernels may sum in another order with another thread
    # count (torchrun gives each of N processes one thread), which is not what this test is about
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "mor_model", "upscale"]
    else:  # --multi_gpu makes accelerate start N processes with torchrun's launcher on a machine without GPUs
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "-m", "mor_model", "upscale"]  # fmt: skip
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "in"
    for i, size in enumerate([(40, 24), (16, 16), (8, 8), (24, 24), (12, 20), (8, 16)]):
        save_photo(d / f"p{i}.png", size=size, seed=i)
    save_photo(d / "sub" / "q.jpg", size=(20, 12), seed=9)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    return d


def test_two_processes_write_the_same_files_as_one(tiny_model_dir, photos, tmp_path):
    pytest.importorskip("accelerate", reason="the [train] extra (accelerate) is not installed")
    common = [photos, tmp_path / "missing.png", "-r", "--model", tiny_model_dir, "--tile", "0"]
    one = upscale([*common, "-o", tmp_path / "one"], 1)
    assert one.returncode == 1, one.stderr  # the broken file fails, the rest is written
    two = upscale([*common, "-o", tmp_path / "two"], 2)
    assert two.returncode == 1, two.stderr
    assert "7 written to" in two.stderr and "by 2 processes" in two.stderr and "2 failed" in two.stderr, two.stderr
    assert "2 failed" in one.stderr, one.stderr  # the broken file and the missing one, counted once each
    assert two.stderr.count("written to") == 1  # one summary, from the main process
    assert two.stderr.count("done in") == 1 and one.stderr.count("done in") == 1, two.stderr
    assert two.stderr.count("broken.png") == 1  # the failure is reported by the process that had it

    a, b = digest_tree(tmp_path / "one"), digest_tree(tmp_path / "two")
    assert len(a) == 7
    assert {p.relative_to(tmp_path / "one"): h for p, h in a.items()} == {
        p.relative_to(tmp_path / "two"): h for p, h in b.items()
    }  # same names, bitwise the same bytes, no temporary files left

    # an interrupted run: some outputs are missing (atomic writes leave whole files or none) and a killed
    # process left its hidden temporary file; the restart writes exactly the missing ones
    for name in ("p0.png", "p3.png", "sub/q.png"):
        (tmp_path / "two" / name).unlink()
    (tmp_path / "two" / ".p0.12345.deadbeef.tmp.png").write_bytes(b"half")
    again = upscale([*common, "-o", tmp_path / "two"], 2)
    assert again.returncode == 1, again.stderr
    assert "3 written to" in again.stderr and "4 skipped" in again.stderr, again.stderr
    b = digest_tree(tmp_path / "two")
    b.pop(tmp_path / "two" / ".p0.12345.deadbeef.tmp.png")
    assert {p.relative_to(tmp_path / "one"): h for p, h in a.items()} == {
        p.relative_to(tmp_path / "two"): h for p, h in b.items()
    }

    # every process returns 2 (torchrun, under accelerate, turns any failed process into its own exit code 1)
    usage = upscale([*common, "-o", tmp_path / "three", "--device", "cuda:0"], 2)
    assert usage.returncode != 0 and "each process takes its own GPU" in usage.stderr, usage.stderr
    assert "exitcode: 2" in usage.stderr and "exitcode: 1" not in usage.stderr
    assert usage.stderr.count("each process takes its own GPU") == 1
