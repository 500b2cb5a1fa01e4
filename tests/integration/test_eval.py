"""`martlet eval` end to end: a LoRA checkpoint of a tiny llama trained on self-cognition, evaluated beside its
base model (the adapter switched off) on a built-in math suite and on self-cognition names from the checkpoint."""

import json
import os

import pytest

from martlet import cli
from martlet.infer.engine import TransformersEngine


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_llama):
    from martlet.llm import SftArguments, sft_main

    root = tmp_path_factory.mktemp("eval-ckpt")
    result = sft_main(SftArguments(model_id_or_path=tiny_llama, dataset=["self-cognition#8"], max_steps=2,
                                   batch_size=2, gradient_accumulation_steps=1, output_dir=str(root / "out"),
                                   dataset_test_ratio=0, report_to=["none"], dtype="fp32", disable_tqdm=True,
                                   model_name=["小燕", "Swallow"], model_author=["燕社", "Nest"]))
    return result["last_model_checkpoint"]


def test_eval_base_and_tuned_writes_json_png_and_a_table(lora_ckpt, tmp_path, capsys, monkeypatch):
    calls = []
    generate = TransformersEngine.generate

    def counting(self, prompts, config=None, **kwargs):
        calls.append((len(prompts), config.do_sample, kwargs.get("adapter")))
        return generate(self, prompts, config, **kwargs)

    monkeypatch.setattr(TransformersEngine, "generate", counting)
    out = tmp_path / "results"
    code = cli.main(["eval", "--ckpt_dir", lora_ckpt, "--eval_base", "true", "--eval_dataset", "math-easy-en",
                     "self-cognition", "--eval_limit", "6", "--max_new_tokens", "6", "--max_batch_size", "4",
                     "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("suite"))
    assert header.split() == ["suite", "base", "tuned"]
    for suite in ("math-easy-en", "self-cognition"):
        row = next(line for line in lines if line.startswith(suite)).split()
        assert len([cell for cell in row if cell.endswith("/6)")]) == 2, row

    json_file = next(p for p in os.listdir(out) if p.endswith(".json"))
    data = json.loads((out / json_file).read_text(encoding="utf-8"))
    assert list(data["models"]) == ["base", "tuned"]
    for name in ("base", "tuned"):
        for suite in ("math-easy-en", "self-cognition"):
            score = data["models"][name][suite]
            assert score["total"] == 6 and 0 <= score["correct"] <= 6
            assert score["accuracy"] == pytest.approx(score["correct"] / 6)
            assert f"{score['accuracy']:.3f} ({score['correct']}/6)" in printed
    # the names graded come from the checkpoint's saved arguments: Chinese questions the Chinese name
    expected = {record["expected"] for record in data["details"]["tuned"]["self-cognition"]}
    assert expected <= {"小燕", "Swallow", "燕社", "Nest"} and "Swallow" in expected and "燕社" in expected
    assert data["sources"]["tuned"] == os.path.abspath(lora_ckpt)
    png = (out / json_file.replace(".json", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # batched greedy generation: 2 suites x 6 questions in batches of 4 (4 + 2) per model, base with no adapter
    assert [size for size, _, _ in calls] == [4, 2, 4, 2] * 2
    assert {sample for _, sample, _ in calls} == {False}
    assert [adapter for _, _, adapter in calls][:4] == [None] * 4
