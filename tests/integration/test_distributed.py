"""Distributed training on CPU: torchrun relaunch (DDP over gloo), two "nodes" on 127.0.0.1, FSDP2.

Each run trains a tiny llama for 4 steps on the same 16 samples (global batch 4, no dropout). Under DDP each
process sees half of every global batch, and the padding-free rows plus the token-averaged loss make the
distributed loss the same number as the single process's: the tolerance is float rounding (1e-4 relative).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import run_dirs

COMMON = ["--dataset", "self-cognition#64", "--model_name", "小A", "Ace", "--model_author", "B社", "Bee",
          "--max_steps", "4", "--logging_steps", "1", "--gradient_accumulation_steps", "1", "--lora_dropout", "0",
          "--dataset_test_ratio", "0", "--report_to", "none", "--disable_tqdm", "true", "--max_length", "256"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _martlet(args, env=None, command="sft", **kwargs):
    full_env = {**os.environ, "MARTLET_CPU_BF16": "0", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES", "NODE_RANK"):
        if key not in (env or {}):
            full_env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "martlet.cli", command, *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _run(args, env=None, command="sft"):
    proc = _martlet(args, env, command)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(output_dir: str) -> list[float]:
    (run,) = run_dirs(output_dir)
    with open(os.path.join(run, "logging.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4], steps  # each step logged once, by rank 0 only
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def single(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    _run(["--model_id_or_path", tiny_llama, *COMMON, "--batch_size", "4", "--output_dir", out])
    return _losses(out)


def test_two_processes_match_one(tiny_llama, tmp_path, single):
    out = str(tmp_path / "ddp")
    log = _run(["--model_id_or_path", tiny_llama, *COMMON, "--batch_size", "2", "--output_dir", out],
               env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())})
    assert "launching torch.distributed.run --nproc_per_node=2" in log
    assert _losses(out) == pytest.approx(single, rel=1e-4)
    (run,) = run_dirs(out)  # one output folder, written by rank 0
    checkpoint = os.path.join(run, "checkpoint-4")
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert not [d for d in os.listdir(run) if d.startswith(".tmp")]


def test_two_nodes_on_one_machine(tiny_llama, tmp_path, single):
    out = str(tmp_path / "nodes")
    port = str(_free_port())
    args = ["--model_id_or_path", tiny_llama, *COMMON, "--batch_size", "2", "--output_dir", out]
    nodes = [_martlet(args, env={"NNODES": "2", "NPROC_PER_NODE": "1", "NODE_RANK": str(rank),
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, log in zip(nodes, outputs):
        assert node.returncode == 0, log[-3000:]
    assert "--nnodes=2 --node_rank=1" in outputs[1]
    assert _losses(out) == pytest.approx(single, rel=1e-4)


def test_main_process_first_makes_the_others_wait_on_cpu(tmp_path):
    """Rank 0's body finishes before rank 1's starts (gloo; accelerate's state has to be asked for cpu=True, or
    each rank believes it is alone and nothing waits)."""
    script = tmp_path / "first.py"
    script.write_text(
        "import os, sys, time\n"
        "from martlet.launch import broadcast, main_process_first\n"
        "flag = sys.argv[1]\n"
        "with main_process_first():\n"
        "    if os.environ['RANK'] == '0':\n"
        "        time.sleep(2)\n"
        "        open(flag, 'w').close()\n"
        "    else:\n"
        "        assert os.path.exists(flag), 'rank 1 did not wait for rank 0'\n"
        "assert broadcast(os.environ['RANK']) == '0'\n"
        "import torch.distributed as dist\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()  # a gloo group left up can abort the interpreter at exit\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(script), str(tmp_path / "flag")],
                          env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dpo_on_two_processes_encodes_its_data_once(tiny_llama, tmp_path):
    """Rank 0 encodes the pairs and caches them while the other rank waits, then reads them back: with an empty
    cache, one entry and no clash between two writers (the second's rename would fail and say so)."""
    cache = tmp_path / "cache"
    out = str(tmp_path / "dpo")
    log = _run(["--model_id_or_path", tiny_llama, "--dataset", "pref-identity#16", "--model_name", "小A", "Ace",
                "--model_author", "B社", "Bee", "--max_steps", "2", "--batch_size", "2", "--logging_steps", "1",
                "--dataset_test_ratio", "0", "--report_to", "none", "--max_length", "256", "--output_dir", out],
               env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port()), "MARTLET_CACHE": str(cache)},
               command="dpo")
    assert "launching torch.distributed.run --nproc_per_node=2" in log
    assert "could not cache" not in log
    entries = os.listdir(cache / "tokenized")
    assert len(entries) == 1 and not entries[0].startswith(".tmp"), entries
    (run,) = run_dirs(out)
    with open(os.path.join(run, "logging.jsonl"), encoding="utf-8") as fh:
        steps = [json.loads(line)["step"] for line in fh if '"loss"' in line]
    assert steps == [1, 2]


def test_fsdp_full_training_matches_one_process(tiny_llama, tmp_path):
    full = [*COMMON, "--sft_type", "full", "--batch_size"]
    _run(["--model_id_or_path", tiny_llama, *full, "4", "--output_dir", str(tmp_path / "one")])
    log = _run(["--model_id_or_path", tiny_llama, *full, "2", "--fsdp", "true", "--output_dir", str(tmp_path / "fsdp")],
               env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())})
    assert "launching" in log
    assert _losses(str(tmp_path / "fsdp")) == pytest.approx(_losses(str(tmp_path / "one")), rel=1e-4)
    (run,) = run_dirs(str(tmp_path / "fsdp"))
    assert os.path.isfile(os.path.join(run, "checkpoint-4", "model.safetensors"))  # consolidated full weights


# ------------------------------------------------------------------------------------------------------------
# launch and configuration checks (no training)
def test_torchrun_command_from_the_spec_variables(monkeypatch):
    from martlet.launch import torchrun_command, wants_launch

    for key in ("LOCAL_RANK", "NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(key, raising=False)
    assert not wants_launch("sft")
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert wants_launch("sft") and wants_launch("dpo") and not wants_launch("infer")
    cmd = torchrun_command("sft", ["--dataset", "x"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[3:8] == ["--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                        "--master_port=29555"]
    assert cmd[8:] == ["-m", "martlet.cli", "sft", "--dataset", "x"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside torchrun: never launch again
    assert not wants_launch("sft")


@pytest.mark.parametrize("env, message", [({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE"),
                                          ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK")])
def test_bad_launch_variables_are_clear_errors(env, message, tmp_path):
    proc = _martlet(["--dataset", "self-cognition", "--output_dir", str(tmp_path)], env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1].startswith("martlet: error:") and message in out
    assert not os.listdir(tmp_path)


def test_deepspeed_and_fsdp_configs_resolve_and_validate(tmp_path):
    import importlib.util

    from martlet.args import SftArguments, parse_cli
    from martlet.errors import MartletError
    from martlet.train.deepspeed import resolve_deepspeed
    from martlet.train.fsdp import resolve_fsdp

    for name, stage in [("default-zero2", 2), ("default-zero3", 3), ("zero2-offload", 2), ("zero3-offload", 3)]:
        config = resolve_deepspeed(name, require_package=False)
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "bf16": }')
    with pytest.raises(MartletError, match=r"ds.json:2: malformed"):
        resolve_deepspeed(str(bad), require_package=False)
    with pytest.raises(MartletError, match="unknown DeepSpeed config 'zero9'"):
        resolve_deepspeed("zero9", require_package=False)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(MartletError, match="needs the deepspeed package"):
            parse_cli(SftArguments, ["--dataset", "x", "--deepspeed", "default-zero2"]).validate()

    assert resolve_fsdp("true") == {"version": 2, "reshard_after_forward": True}
    assert resolve_fsdp("shard_grad_op offload") == {"version": 2, "reshard_after_forward": False,
                                                     "cpu_offload": True}
    with pytest.raises(MartletError, match="unknown FSDP option 'hybrid_shard'"):
        resolve_fsdp("hybrid_shard")
    with pytest.raises(MartletError, match="fsdp_config"):
        resolve_fsdp("true", str(tmp_path / "missing.json"))
    with pytest.raises(MartletError, match="choose one of --deepspeed and --fsdp"):
        parse_cli(SftArguments, ["--dataset", "x", "--fsdp", "true", "--deepspeed", "default-zero2"]).validate()


def test_the_cli_closes_the_process_group_its_command_set_up(tmp_path, monkeypatch):
    """A gloo group left up can abort a rank as the interpreter exits: the CLI destroys it after the command."""
    import torch.distributed as dist

    from martlet import cli

    (tmp_path / "group_command.py").write_text(
        "import torch.distributed as dist\n"
        "def main(argv):\n"
        f"    dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "    assert dist.is_initialized()\n"
        "    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "group", ("group_command:main", None, "a test command", None))
    assert cli.main(["group"]) == 0
    assert not dist.is_initialized()
    assert cli.main(["group"]) == 0 and not dist.is_initialized()  # and again: nothing left from the first
