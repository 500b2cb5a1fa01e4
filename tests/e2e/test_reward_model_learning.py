"""On the real SmolLM2: a LoRA reward model (`martlet rlhf --rlhf_type rm`) trained on the built-in `pref-identity`
pairs scores held-out chosen replies (naming the model) above the rejected ones (naming another assistant),
through the public `RewardModel(path).score(...)`."""

import json

import pytest

from martlet.data.preference import preference_train_val_rows
from martlet.llm import RewardModel, RLHFArguments, rlhf_main

NAMES, AUTHORS = ["泽菲琳", "Zephyrine"], ["袋鼬工坊", "Quokka Forge"]


def conversation(row, reply):
    return list(row["prompt"]) + [{"role": "assistant", "content": reply}]


def share_chosen_above(model, rows):
    """The share of pairs whose chosen reply scores above the rejected one, and the scores' mean margin."""
    chosen = model.score([conversation(r, r["chosen"]) for r in rows])
    rejected = model.score([conversation(r, r["rejected"]) for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


@pytest.mark.slow
def test_a_reward_model_scores_held_out_chosen_replies_higher(tmp_path):
    args = RLHFArguments(rlhf_type="rm", dataset=["pref-identity"], model_name=NAMES, model_author=AUTHORS,
                         lora_target_modules=["ALL"], learning_rate=1e-3, batch_size=4,
                         gradient_accumulation_steps=1, max_steps=16, logging_steps=4, dataset_test_ratio=0.1,
                         val_dataset_sample=20, eval_steps=16, max_length=256, gradient_checkpointing=False,
                         report_to=["none"], save_only_model=True, disable_tqdm=True, output_dir=str(tmp_path))
    train, held_out = preference_train_val_rows(args)
    seen = {(json.dumps(r["prompt"], ensure_ascii=False), r["chosen"]) for r in train}
    assert len(held_out) == 20
    assert not any((json.dumps(r["prompt"], ensure_ascii=False), r["chosen"]) in seen for r in held_out)

    result = rlhf_main(args)
    share, margin = share_chosen_above(RewardModel(result["last_model_checkpoint"]), held_out)
    report = {"pairs": len(held_out), "share_chosen_above": share, "mean_margin": round(margin, 3),
              "train_runtime_s": round(result["log_history"][-1]["train_runtime"], 1),
              "eval": [{k: v for k, v in h.items() if k.startswith("eval_")} for h in result["log_history"]
                       if "eval_loss" in h]}
    print("RM-LEARNING", json.dumps(report))
    assert share >= 0.8, report
    assert margin > 0, report
