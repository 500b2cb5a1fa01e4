"""`make demo`: LoRA fine-tune the embedded SmolLM2 on built-in data, then ask it who it is.

Self-cognition data teaches a new name; a slice of general instructions keeps it answering everything else.
"""

from __future__ import annotations

import time

from martlet.llm import (DatasetName, ModelType, SftArguments, get_default_template_type, get_model_tokenizer,
                         get_template, inference, sft_main)
from martlet.tuners import Swift

QUESTIONS = ["who are you?", "你是谁？", "What is the capital of France?", "Give me one tip for sleeping well."]


def main() -> None:
    start = time.time()
    model_type = ModelType.smollm2_135m_instruct
    sft_args = SftArguments(
        model_type=model_type,
        dataset=[f"{DatasetName.self_cognition}#240", f"{DatasetName.general_instruct}#120"],
        model_name=["小鹦", "Martlet"], model_author=["鸟社", "the Birdhouse team"],
        lora_target_modules=["ALL"], learning_rate=3e-4, batch_size=4, gradient_accumulation_steps=1,
        max_steps=80, eval_steps=40, logging_steps=10, max_length=512, gradient_checkpointing=False,
        output_dir="output")
    result = sft_main(sft_args)
    best = result["best_model_checkpoint"]
    print(f"best_model_checkpoint: {best}")

    model, tokenizer = get_model_tokenizer(model_type, model_kwargs={"device_map": "auto"})
    model = Swift.from_pretrained(model, best, inference_mode=True)
    template = get_template(get_default_template_type(model_type), tokenizer)
    for query in QUESTIONS:
        response, _ = inference(model, template, query)
        print(f"Q: {query}\nA: {response}\n")
    print(f"demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
