"""On the real SmolLM2 with LoRA: a few dozen DPO or ORPO steps on the built-in `pref-identity` pairs teach the
model to prefer the replies naming it over those naming another assistant, on held-out pairs."""

import json
import os

import pytest

NAMES, AUTHORS = ["泽菲琳", "Zephyrine"], ["袋鼬工坊", "Quokka Forge"]


def reply_logps(model, template, rows, disable_adapter=False):
    """Summed log-probs of the chosen and the rejected reply of each row (one forward pass per reply)."""
    import contextlib

    import torch

    from martlet.data.preference import encode_preference

    sums = []
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with torch.no_grad(), context:
        for row in rows:
            enc = encode_preference(row, template)
            pair = []
            for key in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([enc["prompt_ids"] + enc[key]])
                logits = model(input_ids=ids).logits[0, len(enc["prompt_ids"]) - 1:-1].float()
                pair.append(logits.log_softmax(-1).gather(1, ids[0, len(enc["prompt_ids"]):, None]).sum().item())
            sums.append(pair)
    return sums


@pytest.mark.slow
# ORPO's preference term is weaker (per-token log odds), and its steps are cheaper (no reference pass)
@pytest.mark.parametrize("kind,lr,batch_size,steps", [("dpo", 3e-4, 2, 16), ("orpo", 5e-4, 2, 20)])
def test_preference_training_prefers_the_chosen_replies(tmp_path, embedded_dir, kind, lr, batch_size, steps):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from martlet.data.preference import preference_train_val_rows
    from martlet.llm import RLHFArguments, rlhf_main
    from martlet.templates import get_template

    args = RLHFArguments(rlhf_type=kind, dataset=["pref-identity"], model_name=NAMES, model_author=AUTHORS,
                         lora_target_modules=["ALL"], learning_rate=lr, batch_size=batch_size,
                         gradient_accumulation_steps=1, max_steps=steps, eval_steps=steps // 2, logging_steps=2, dataset_test_ratio=0.1, val_dataset_sample=12,
                         max_length=256, gradient_checkpointing=False, dtype="bf16", report_to=["none"],
                         save_only_model=True, disable_tqdm=True, output_dir=str(tmp_path))
    result = rlhf_main(args)
    evals = [h for h in result["log_history"] if "eval_rewards/accuracies" in h]
    train_margins = [h["rewards/margins"] for h in result["log_history"] if "rewards/margins" in h]

    # how often the model prefers the chosen reply (higher likelihood) on the held-out pairs, before and after
    _, held_out = preference_train_val_rows(args)
    checkpoint = result["last_model_checkpoint"]
    template = get_template("AUTO", AutoTokenizer.from_pretrained(checkpoint))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_dir), checkpoint).eval()
    base = reply_logps(model, template, held_out, disable_adapter=True)
    tuned = reply_logps(model, template, held_out)
    rate = {name: sum(c > r for c, r in sums) / len(sums) for name, sums in (("base", base), ("tuned", tuned))}
    margin = {name: sum(c - r for c, r in sums) / len(sums) for name, sums in (("base", base), ("tuned", tuned))}
    report = {"kind": kind, "pairs": len(held_out), "prefers_chosen": rate, "mean_logp_margin": margin,
              "eval": [{k: round(v, 3) for k, v in h.items() if k.startswith("eval_rewards")} for h in evals],
              "train_margins": [round(m, 3) for m in train_margins],
              "train_runtime_s": round(result["log_history"][-1]["train_runtime"], 1)}
    print("RLHF-LEARNING", json.dumps(report))
    with open(os.path.join(os.path.dirname(checkpoint), "learning_report.json"), "w") as fh:
        json.dump(report, fh)

    # the logged held-out metrics: reward accuracy well above chance, margins growing
    assert [h["step"] for h in evals] == [steps // 2, steps] and len(held_out) == 12
    assert evals[-1]["eval_rewards/accuracies"] >= 0.8, report
    assert evals[-1]["eval_rewards/margins"] > 0, report
    assert sum(train_margins[-3:]) / 3 > max(0.0, train_margins[0]), report
    # the tuned model prefers the chosen replies more often than the base model did, and by more
    assert rate["tuned"] >= 0.75 and rate["tuned"] >= rate["base"] + 0.25, report
    assert margin["tuned"] > margin["base"], report
