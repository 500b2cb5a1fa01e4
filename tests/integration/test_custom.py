"""Registration without editing Martlet: a dataset from JSON with a column mapping, a dataset and a chat
template from a Python file, each trained with `martlet sft` and evaluated with `martlet infer`."""

from __future__ import annotations

import csv
import json
import os
import textwrap

import pytest

from martlet.errors import MartletError
from martlet.llm import infer_main, sft_main

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def _train(tiny_llama, tmp_path, *extra):
    return sft_main(["--model_id_or_path", tiny_llama, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                     "--batch_size", "2", "--dataset_test_ratio", "0.25", "--eval_steps", "2", *extra])


def _evaluate(ckpt):
    """`martlet infer --ckpt_dir CKPT --load_dataset_config true`: the run's own held-out rows."""
    result = infer_main(["--ckpt_dir", ckpt, "--load_dataset_config", "true", "--max_new_tokens", "4"])
    assert result["metrics"] and os.path.isfile(result["result_path"])
    return result


def test_json_registered_dataset_with_a_column_mapping_trains_and_infers(tmp_path, tiny_llama):
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        writer.writerows([[f"What is {i} + 1?", f"{i + 1}."] for i in range(8)])
    info = tmp_path / "my_datasets.json"
    info.write_text(json.dumps({"my-qa": {"dataset_path": str(tmp_path / "qa.csv"),
                                          "columns": {"question": "query", "answer": "response"}}}))
    result = _train(tiny_llama, tmp_path, "--custom_dataset_info", str(info), "--dataset", "my-qa")
    assert result["dataset_info"]["train"]["rows"] == 6 and result["dataset_info"]["val"]["rows"] == 2
    rows = _evaluate(result["last_model_checkpoint"])["result"]
    assert len(rows) == 2 and all(r["query"].startswith("What is") for r in rows)


def test_python_registered_dataset_and_template_train_and_infer(tmp_path, tiny_llama):
    register = tmp_path / "my_register.py"
    register.write_text(textwrap.dedent(f"""
        from martlet.llm import register_dataset, register_template

        register_dataset("colours", rows=[{{"query": f"Colour {{i}}?", "response": "Blue."}} for i in range(8)],
                         exist_ok=True)
        register_template("plain-chat", {TEMPLATE!r}, eot="<|im_end|>", exist_ok=True)
    """))
    result = _train(tiny_llama, tmp_path, "--custom_register_path", str(register), "--dataset", "colours",
                    "--template_type", "plain-chat")
    ckpt = result["last_model_checkpoint"]
    with open(os.path.join(ckpt, "chat_template.jinja"), encoding="utf-8") as fh:
        assert fh.read().strip() == TEMPLATE.strip()  # the checkpoint carries the registered template
    rows = _evaluate(ckpt)["result"]
    assert len(rows) == 2 and all(r["query"].startswith("Colour") for r in rows)


def test_registered_template_labels_only_the_assistant_turns(tiny_llama):
    from martlet.llm import register_template
    from martlet.models.loader import load_tokenizer
    from martlet.templates import get_template

    register_template("plain-chat", TEMPLATE, eot="<|im_end|>", exist_ok=True)
    template = get_template("plain-chat", load_tokenizer(tiny_llama), None, 512)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    enc = template.encode(messages)
    labelled = template.tokenizer.decode([t for t in enc.labels if t != -100])
    assert labelled == "Hello there.<|im_end|>Goodbye.<|im_end|>"


@pytest.mark.parametrize("content, words", [
    ("raise ValueError('no such column')\n", ["my_register.py:1", "ValueError: no such column"]),
    ("from martlet.llm import register_dataset\nregister_dataset('x')\n", ["my_register.py", "needs a path"]),
])
def test_a_bad_registration_file_names_itself(tmp_path, tiny_llama, content, words):
    register = tmp_path / "my_register.py"
    register.write_text(content)
    with pytest.raises(MartletError) as err:
        _train(tiny_llama, tmp_path, "--custom_register_path", str(register), "--dataset", "x")
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "out").exists()
