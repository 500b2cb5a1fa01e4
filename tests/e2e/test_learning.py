"""On the real SmolLM2: LoRA SFT teaches a name the model has never seen."""

import pytest

NAME, AUTHOR = "Zephyrine", "Quokka Forge"


def greedy(model, tokenizer, question):
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=30, do_sample=False)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_lora_sft_teaches_a_new_name(tmp_path, embedded_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from martlet.llm import DatasetName, SftArguments, sft_main

    result = sft_main(SftArguments(
        dataset=[f"{DatasetName.self_cognition}#240", f"{DatasetName.general_instruct}#120"],
        model_name=["泽菲琳", NAME], model_author=["袋鼬工坊", AUTHOR], lora_target_modules=["ALL"],
        learning_rate=3e-4, batch_size=4, gradient_accumulation_steps=1, max_steps=60, eval_steps=1000,
        max_length=512, gradient_checkpointing=False, dtype="bf16", report_to=["none"], dataset_test_ratio=0.02,
        output_dir=str(tmp_path)))
    checkpoint = result["last_model_checkpoint"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(embedded_dir)

    before = [greedy(base, tokenizer, q) for q in ("who are you?", "What is your name?")]
    assert not any(NAME in answer for answer in before), before

    tuned = PeftModel.from_pretrained(base, checkpoint)
    after = [greedy(tuned, tokenizer, q) for q in ("who are you?", "What is your name?")]
    assert all(NAME in answer for answer in after), after
    # general knowledge survives (general data is mixed in)
    assert "Paris" in greedy(tuned, tokenizer, "What is the capital of France?")
