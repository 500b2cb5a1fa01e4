"""The spec's SFT command lines and Python example, as written (a local model, built-in data)."""

import os
import subprocess
import sys

import pytest

from helpers import run_dirs, write_jsonl


def test_cli_line_with_own_dataset(tmp_path, tiny_llama):
    # CUDA_VISIBLE_DEVICES=0 swift sft --model_id_or_path qwen/Qwen-7B-Chat --dataset chatml.jsonl --output_dir output
    rows = [{"messages": [{"role": "system", "content": "You are helpful."},
                          {"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(40)]
    write_jsonl(tmp_path / "chatml.jsonl", rows)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "martlet", "sft", "--model_id_or_path", tiny_llama,
                           "--dataset", "chatml.jsonl", "--output_dir", "output"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = run_dirs(str(tmp_path / "output"))
    # 40 rows, 1% held out (at least one) -> 39 rows, batch 1 x 16 accumulation -> 3 steps
    assert os.path.isdir(os.path.join(run, "checkpoint-3"))
    assert f"best_model_checkpoint: {run}/checkpoint-3" in proc.stdout


@pytest.mark.slow
def test_python_example(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch

    from martlet.llm import DatasetName, SftArguments, sft_main

    sft_args = SftArguments(
        model_id_or_path=tiny_llama,
        dataset=[f'{DatasetName.math_word_problems}#2000'],
        output_dir='output')
    result = sft_main(sft_args)
    best_model_checkpoint = result['best_model_checkpoint']
    print(f'best_model_checkpoint: {best_model_checkpoint}')
    torch.cuda.empty_cache()

    assert os.path.isdir(best_model_checkpoint)
    assert best_model_checkpoint.startswith(str(tmp_path / "output" / "llama"))
    assert result["global_step"] == 124  # 2000 rows - 20 held out = 1980, / (1 x 16) per step
    evals = [h["eval_loss"] for h in result["log_history"] if "eval_loss" in h]
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 50, 100 and the last, 124
