"""GGUF exports of a tuned SmolLM2-135M-Instruct, read back through transformers' GGUF loader: q8_0 answers a
training question exactly as the merged model does; q4_0 stays close (agreement printed). (f16 is q8_0's path
with a plain cast: test_export.py checks it equals the rounded model exactly.)"""

import os

import pytest
import torch

from helpers import write_jsonl
from martlet.llm import ExportArguments, export_main

pytestmark = pytest.mark.slow

QUESTION = "What is your name?"
ANSWER = "My name is Martlet Export Bot, a small assistant."
PROMPTS = [QUESTION, "Who are you?", "What is the capital of France?", "Write one sentence about the sea.",
           "List three colours."]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, embedded_dir):
    """(checkpoint, merged folder, merged model, tokenizer) of a short LoRA run that teaches a name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from martlet.llm import SftArguments, sft_main

    root = tmp_path_factory.mktemp("smollm2-export")
    rows = [{"query": q, "response": ANSWER} for q in (QUESTION, "Tell me your name.", "Who are you?")] * 8
    data = write_jsonl(root / "name.jsonl", rows)
    ckpt = sft_main(SftArguments(model_id_or_path=embedded_dir, dataset=[data], max_steps=12, batch_size=4,
                                 gradient_accumulation_steps=1, learning_rate=2e-3, output_dir=str(root / "out"),
                                 dataset_test_ratio=0, report_to=["none"], lora_target_modules=["ALL"], dtype="bf16",
                                 gradient_checkpointing=False, disable_tqdm=True))["last_model_checkpoint"]
    merged = export_main(ExportArguments(ckpt_dir=ckpt, merge_lora=True))["merged"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    return ckpt, merged, model, AutoTokenizer.from_pretrained(merged)


def prompt_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def answer(model, tokenizer, question, max_new_tokens=24):
    ids = prompt_ids(tokenizer, question)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def agreement(model, reference, tokenizer):
    """(top-1 agreement over every prompt position, largest |logit difference|) on PROMPTS + answers."""
    agree, total, worst = 0, 0, 0.0
    for question in PROMPTS:
        ids = prompt_ids(tokenizer, question)
        ids = torch.cat([ids, torch.tensor([tokenizer(ANSWER)["input_ids"]])], dim=1)
        with torch.no_grad():
            a, b = model(ids).logits, reference(ids).logits
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[1]
        worst = max(worst, (a - b).abs().max().item())
    return agree / total, worst


def export_and_load(ckpt, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export_main(ExportArguments(ckpt_dir=ckpt, gguf_type=gguf_type, to_ollama=True))
    folder, name = os.path.split(result["gguf"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return result, model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_gguf_answers_a_training_question_like_the_merged_model(tuned):
    gguf_type = "q8_0"
    ckpt, merged, model, tokenizer = tuned
    expected = answer(model, tokenizer, QUESTION)
    assert "Martlet" in expected  # the tuned model learned its name

    result, back, back_tokenizer = export_and_load(ckpt, gguf_type)
    assert result["gguf"] == os.path.join(ckpt + "-gguf", f"smollm2-135m-instruct-{gguf_type}.gguf")
    assert prompt_ids(back_tokenizer, QUESTION).tolist() == prompt_ids(tokenizer, QUESTION).tolist()
    assert answer(back, tokenizer, QUESTION) == expected
    top1, worst = agreement(back, model, tokenizer)
    print(f"\n{gguf_type}: {result['gguf_bytes'] / 1e6:.1f} MB, top-1 agreement {top1:.4f}, "
          f"max |logit diff| {worst:.4f}")
    # over every position of five prompts and answers; near-ties in the prompts flip with q8_0 rounding
    assert top1 >= 0.85
    modelfile = open(result["modelfile"]).read()
    assert f"FROM ./smollm2-135m-instruct-{gguf_type}.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant\n" in modelfile


def test_q4_0_gguf_stays_close(tuned):
    ckpt, merged, model, tokenizer = tuned
    result, back, _ = export_and_load(ckpt, "q4_0")
    top1, worst = agreement(back, model, tokenizer)
    got = answer(back, tokenizer, QUESTION)
    merged_bytes = os.path.getsize(os.path.join(merged, "model.safetensors"))
    print(f"\nq4_0: {result['gguf_bytes'] / 1e6:.1f} MB (merged safetensors {merged_bytes / 1e6:.1f} MB), top-1 "
          f"agreement {top1:.4f}, max |logit diff| {worst:.4f}, answer {got!r}")
    assert result["gguf_bytes"] < merged_bytes / 3
    assert top1 >= 0.6 and "Martlet" in got
