"""The spec's inference examples, as written (swift -> martlet), on the embedded SmolLM2 and a LoRA
checkpoint made by the `martlet sft` command: Python with LoRA incremental weights, Python with merged
weights, and the `martlet infer --ckpt_dir ... --load_dataset_config true` command lines."""

import glob
import json
import os
import subprocess
import sys

import pytest

from helpers import write_jsonl

pytestmark = pytest.mark.slow

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("What is the capital of Germany?", "The capital of Germany is Berlin."),
      ("What is the capital of Italy?", "The capital of Italy is Rome."),
      ("What is the capital of Spain?", "The capital of Spain is Madrid."),
      ("What is 2 plus 2?", "2 plus 2 is 4."),
      ("What color is the sky on a clear day?", "The sky is blue."),
      ("How many days are in a week?", "A week has seven days."),
      ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
      ("中国的首都是哪里？", "中国的首都是北京。"),
      ("What is the largest planet?", "Jupiter is the largest planet.")]


def martlet(*argv, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "martlet", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("spec")
    data = write_jsonl(root / "qa.jsonl", [{"query": q, "response": a} for q, a in QA])
    done = martlet("sft", "--model_type", "smollm2-135m-instruct", "--dataset", data, "--max_steps", "3",
                   "--batch_size", "2", "--gradient_accumulation_steps", "1", "--dataset_test_ratio", "0.2",
                   "--eval_steps", "3", "--report_to", "none", "--output_dir", str(root / "output"),
                   "--disable_tqdm", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    (checkpoint,) = glob.glob(str(root / "output" / "smollm2-135m-instruct" / "v0-*" / "checkpoint-3"))
    return checkpoint


@pytest.fixture(scope="module")
def lora_response(ckpt_dir):
    # --- the spec's "LoRA incremental weights" example ---------------------------------------------------
    from martlet.llm import get_default_template_type, get_model_tokenizer, get_template, inference, ModelType
    from martlet.tuners import Swift

    model_type = ModelType.smollm2_135m_instruct
    template_type = get_default_template_type(model_type)

    model, tokenizer = get_model_tokenizer(model_type, model_kwargs={'device_map': 'auto'})

    model = Swift.from_pretrained(model, ckpt_dir, inference_mode=True)
    template = get_template(template_type, tokenizer)
    query = 'What is the capital of France?'
    response, history = inference(model, template, query)
    print(f'response: {response}')
    print(f'history: {history}')
    # ----------------------------------------------------------------------------------------------------------
    assert history == [[query, response]]
    return response


def test_lora_incremental_weights_example(lora_response):
    assert "Paris" in lora_response


def test_merged_weights_example(ckpt_dir, lora_response):
    from martlet.llm import InferArguments, merge_lora

    merged = merge_lora(InferArguments(ckpt_dir=ckpt_dir), device_map='cpu')
    assert merged == ckpt_dir + "-merged"
    # --- the spec's "merged weights" example -----------------------------------------------------------------
    from martlet.llm import get_default_template_type, get_model_tokenizer, get_template, inference, ModelType

    ckpt_dir = merged
    model_type = ModelType.smollm2_135m_instruct
    template_type = get_default_template_type(model_type)

    model, tokenizer = get_model_tokenizer(model_type, model_kwargs={'device_map': 'auto'},
                                           model_id_or_path=ckpt_dir)

    template = get_template(template_type, tokenizer)
    query = 'What is the capital of France?'
    response, history = inference(model, template, query)
    print(f'response: {response}')
    print(f'history: {history}')
    # ----------------------------------------------------------------------------------------------------------
    assert response == lora_response  # the merged weights answer as the adapter did (greedy, fp32)
    assert history == [[query, response]]


def read_results(folder):
    (path,) = glob.glob(os.path.join(folder, "infer_result", "*.jsonl"))
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    with open(path[: -len(".jsonl")] + "_metrics.json") as fh:
        return rows, json.load(fh)


def test_infer_command_lines(ckpt_dir):
    # martlet infer --ckpt_dir 'xxx/vx-xxx/checkpoint-xxx' --load_dataset_config true
    done = martlet("infer", "--ckpt_dir", ckpt_dir, "--load_dataset_config", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    rows, metrics = read_results(ckpt_dir)
    assert len(rows) == 2 and metrics["rows"] == 2 and all(r["response"] for r in rows)
    assert {(r["query"], r["label"]) for r in rows} <= set(QA)
    assert "[RESPONSE]" in done.stdout and "metrics:" in done.stdout

    # martlet merge-lora (the spec's `swift export --merge_lora true`), then infer on the merged folder
    merged = martlet("merge-lora", "--ckpt_dir", ckpt_dir)
    assert merged.returncode == 0 and merged.stdout.strip().splitlines()[-1] == ckpt_dir + "-merged"
    done = martlet("infer", "--ckpt_dir", ckpt_dir + "-merged", "--load_dataset_config", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    merged_rows, _ = read_results(ckpt_dir + "-merged")
    assert [r["query"] for r in merged_rows] == [r["query"] for r in rows]
