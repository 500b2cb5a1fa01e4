"""Where a training process puts its weights on GPUs: one GPU, model parallel, or model parallel x DDP.

The real multi-GPU runs are in scripts/gpu_check.sh; here the decisions are checked with the GPU count faked."""

import os

import pytest
import torch

from martlet.args import SftArguments, parse_cli
from martlet.train.model_setup import model_parallel_gpus, placement


@pytest.mark.parametrize("count, world, expected", [
    (4, 2, {0: [0, 2], 1: [1, 3]}),            # two groups of two: local rank r starts on cuda:r
    (8, 2, {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}),
    (6, 3, {0: [0, 3], 1: [1, 4], 2: [2, 5]}),
    (2, 2, {0: [0], 1: [1]}),                  # plain DDP
    (3, 2, {0: [0], 1: [1]}),                  # uneven: one GPU each
    (1, 1, {0: [0]}),
])
def test_gpu_groups(count, world, expected):
    groups = {rank: model_parallel_gpus(count, rank, world) for rank in range(world)}
    assert groups == expected
    used = [g for gpus in groups.values() for g in gpus]
    assert len(used) == len(set(used))  # no GPU is shared by two processes


@pytest.fixture
def gpus(monkeypatch):
    def fake(count):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 * 2**30, (80 + i) * 2**30))
    monkeypatch.delenv("ACCELERATE_BYPASS_DEVICE_MAP", raising=False)
    return fake


def _torchrun(monkeypatch, local_rank, local_world):
    for key, value in dict(LOCAL_RANK=local_rank, RANK=local_rank, LOCAL_WORLD_SIZE=local_world,
                           WORLD_SIZE=local_world).items():
        monkeypatch.setenv(key, str(value))


def test_one_process(gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = parse_cli(SftArguments, [])
    assert placement(args, "cpu", False) == {}
    gpus(1)
    assert placement(args, "cuda", False) == {}
    assert placement(args, "cuda", True) == {"device_map": "auto"}
    gpus(4)
    assert placement(args, "cuda", False) == {"device_map": "auto"}  # the *_mp scripts


def test_model_parallel_groups_under_ddp(gpus, monkeypatch):
    gpus(4)
    _torchrun(monkeypatch, 1, 2)
    placed = placement(parse_cli(SftArguments, []), "cuda", False)
    assert placed == {"device_map": "auto", "max_memory": {1: 81 * 2**30, 3: 83 * 2**30}}
    assert os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] == "true"  # accelerate wraps it in DDP(device_ids=None)


def test_one_gpu_per_process_when_groups_cannot_be_used(gpus, monkeypatch):
    _torchrun(monkeypatch, 1, 2)
    gpus(2)
    assert placement(parse_cli(SftArguments, []), "cuda", False) == {}  # plain DDP: the Trainer places it
    assert placement(parse_cli(SftArguments, []), "cuda", True) == {"device_map": {"": 1}}
    gpus(4)  # quantized weights and ZeRO keep one GPU per process
    assert placement(parse_cli(SftArguments, []), "cuda", True) == {"device_map": {"": 1}}
    zero2 = parse_cli(SftArguments, ["--deepspeed", "default-zero2"])
    assert placement(zero2, "cuda", False) == {}
    assert "ACCELERATE_BYPASS_DEVICE_MAP" not in os.environ
