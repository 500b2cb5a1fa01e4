"""A real DPO checkpoint is evaluated on its own data (issue #25, item 4): `martlet infer --ckpt_dir <dpo ckpt>
--load_dataset_config true` answers the prompts the run held out and scores them against the chosen replies."""

import json
import os

from helpers import write_jsonl
from martlet import cli
from martlet.data.preprocess import split_train_val
from martlet.llm import RLHFArguments, rlhf_main

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": f"{a} plus {b} is {a + b + 1}."} for a in range(1, 5) for b in range(1, 4)]


def test_cli_infer_evaluates_a_dpo_checkpoint_on_its_held_out_pairs(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)  # prompt/chosen/rejected: no SFT row format
    result = rlhf_main(RLHFArguments(
        model_id_or_path=tiny_llama, dataset=[data], output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2,
        gradient_accumulation_steps=1, dataset_test_ratio=0.25, eval_steps=1, lora_target_modules=["ALL"],
        report_to=["none"], disable_tqdm=True, dtype="fp32", rlhf_type="dpo"))
    ckpt = result["last_model_checkpoint"]
    with open(os.path.join(ckpt, "martlet_run.json")) as fh:
        assert json.load(fh)["data"]["val"]["rows"] == 3

    code = cli.main(["infer", "--ckpt_dir", ckpt, "--load_dataset_config", "true", "--max_new_tokens", "4",
                     "--dtype", "fp32", "--verbose", "false", "--result_dir", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    (name,) = [f for f in os.listdir(tmp_path / "r") if f.endswith(".jsonl")]
    with open(tmp_path / "r" / name, encoding="utf-8") as fh:
        results = [json.loads(line) for line in fh]
    held_out = [PAIRS[i] for i in split_train_val(list(range(len(PAIRS))), 0.25, 42)[1]]
    assert [(r["query"], r["label"]) for r in results] == [(p["prompt"], p["chosen"]) for p in held_out]
    assert all(isinstance(r["response"], str) for r in results)
    with open(tmp_path / "r" / (name[:-len(".jsonl")] + "_metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["rows"] == metrics["labelled"] == 3 and "rouge-l" in metrics
