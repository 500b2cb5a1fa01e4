"""The arguments of `martlet export`: what to export (a checkpoint or a model), merging, quantization
(GGUF for llama.cpp/Ollama, bitsandbytes, GPTQ, AWQ), the Ollama Modelfile and the hub upload."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from martlet.args.base import Route, arg, check_ranges
from martlet.args.infer import one_adapter
from martlet.args.model import ModelArguments
from martlet.errors import MartletError

QUANT_METHODS = ("gguf", "bnb", "gptq", "awq")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


@dataclass
class ExportArguments(ModelArguments):
    """Merge a LoRA checkpoint, quantize it (GGUF, bnb, GPTQ, AWQ), write an Ollama Modelfile, push it to a hub."""

    ROUTES: ClassVar[dict[str, Route]] = {"adapters": one_adapter}

    ckpt_dir: Optional[str] = arg(None, "A checkpoint of `martlet sft` (LoRA or full). Without it, --model_id_or_path "
                                        "(default: the embedded SmolLM2) is exported.", aliases=("adapters",))
    merge_lora: bool = arg(False, "Merge the LoRA checkpoint into its base model: writes <ckpt_dir>-merged (a plain "
                                  "transformers model). Quantizing a LoRA checkpoint merges it first anyway.",
                           aliases=("merge_lora_and_save",))
    merge_device_map: str = arg("cpu", "Where the merge runs: cpu, or auto to use the GPU.")
    replace_if_exists: bool = arg(False, "Merge again even when <ckpt_dir>-merged exists.")
    max_shard_size: str = arg("5GB", "Largest safetensors file of a merged or quantized model; bigger models are "
                                     "split into several files.")

    quant_bits: int = arg(0, "Quantize to this many bits: 0 (no), 4 or 8. With gguf: 8 -> q8_0, 4 -> q4_0.",
                          choices=(0, 4, 8))
    quant_method: Optional[str] = arg(None, "gguf (llama.cpp/Ollama file, any CPU), bnb (bitsandbytes weights), "
                                            "gptq or awq (calibrated, need a CUDA GPU and the gptqmodel package). "
                                            "Default: gguf.", choices=QUANT_METHODS)
    gguf_type: Optional[str] = arg(None, "GGUF weight type: f32, f16, bf16, q8_0 or q4_0. Default: from --quant_bits "
                                         "(8 -> q8_0, 4 -> q4_0, 0 -> f16). Giving it exports a GGUF.",
                                   choices=GGUF_TYPES, aliases=("gguf_outtype",))
    dataset: List[str] = arg([], "GPTQ/AWQ calibration data: dataset names or files, as for `martlet sft` "
                                 "(default: the checkpoint's training data).", aliases=("datasets",))
    quant_n_samples: int = arg(256, "GPTQ/AWQ: calibration rows.", bounds="[1, inf)")
    quant_seqlen: int = arg(2048, "GPTQ/AWQ: longest calibration row in tokens.", bounds="[1, inf)")
    quant_group_size: int = arg(128, "GPTQ/AWQ: weights sharing one scale (-1: one per output row).",
                                bounds="[1, inf)", unset=(-1,))
    quant_batch_size: int = arg(1, "GPTQ/AWQ: calibration rows run together.", bounds="[1, inf)")

    to_ollama: bool = arg(False, "Also write an Ollama Modelfile (template, stop tokens, system prompt) beside the "
                                 "GGUF; exports a GGUF (f16 unless --quant_bits/--gguf_type say otherwise).")
    template_type: str = arg("AUTO", "Chat template written into the GGUF and the Modelfile. AUTO: the one training "
                                     "used (the checkpoint's tokenizer), else the model's.", aliases=("template",))
    system: Optional[str] = arg(None, "System prompt for the Modelfile. Default: the one training used, else the "
                                      "template's default.")
    output_dir: Optional[str] = arg(None, "Where a quantized export goes. Default: beside the source, "
                                          "<source>-gguf, <source>-bnb-int4, <source>-gptq-int4, ...")

    push_to_hub: bool = arg(False, "Upload the result (the export, else the merged model, else the checkpoint) to "
                                   "a hub repository.")
    hub_model_id: Optional[str] = arg(None, "The repository to upload to, e.g. user/my-model.")
    hub_private_repo: bool = arg(False, "Create the repository as private.")
    hub: str = arg("AUTO", "huggingface, or modelscope (needs the modelscope package). AUTO: modelscope when "
                           "USE_MODELSCOPE_HUB=1, else huggingface.", choices=("AUTO", "huggingface", "modelscope"))
    commit_message: str = arg("Upload model exported by Martlet", "Commit message of the upload.")

    # values derived from the arguments (never written back into them)
    def effective_quant_method(self) -> Optional[str]:
        if self.quant_method:
            return self.quant_method
        if self.quant_bits or self.gguf_type or self.to_ollama:
            return "gguf"
        return None

    def effective_gguf_type(self) -> str:
        if self.gguf_type:
            return self.gguf_type
        return {8: "q8_0", 4: "q4_0"}.get(self.quant_bits, "f16")

    def effective_hub(self) -> str:
        if self.hub != "AUTO":
            return self.hub
        return "modelscope" if os.environ.get("USE_MODELSCOPE_HUB") == "1" else "huggingface"

    def validate(self) -> "ExportArguments":
        """Check the arguments together; raises MartletError naming the field. Changes nothing."""
        check_ranges(self)
        method = self.effective_quant_method()
        if self.ckpt_dir and not os.path.isdir(os.path.expanduser(self.ckpt_dir)):
            raise MartletError("checkpoint folder not found.", file=self.ckpt_dir, field="ckpt_dir")
        if self.merge_lora and not self.ckpt_dir:
            raise MartletError("needs --ckpt_dir (a LoRA checkpoint of `martlet sft`).", field="merge_lora")
        if method in ("bnb", "gptq", "awq") and not self.quant_bits:
            raise MartletError(f"--quant_method {method} needs --quant_bits 4 or 8.", field="quant_bits")
        if method == "awq" and self.quant_bits != 4:
            raise MartletError("AWQ quantizes to 4 bits only.", field="quant_bits")
        if self.gguf_type and method != "gguf":
            raise MartletError(f"is for --quant_method gguf, not {method}.", field="gguf_type")
        if self.gguf_type and self.quant_bits and {"q8_0": 8, "q4_0": 4}.get(self.gguf_type) != self.quant_bits:
            raise MartletError(f"--gguf_type {self.gguf_type} contradicts --quant_bits {self.quant_bits}.",
                               field="gguf_type", hint="Give one of them.")
        if self.to_ollama and method != "gguf":
            raise MartletError(f"Ollama imports a GGUF file, not a {method} model.", field="to_ollama",
                               hint="Use --quant_method gguf (the default) with --to_ollama true.")
        if self.push_to_hub and not self.hub_model_id:
            raise MartletError("needs --hub_model_id (the repository to upload to, e.g. user/my-model).",
                               field="push_to_hub")
        if not (method or self.merge_lora or self.push_to_hub):
            raise MartletError("nothing to do.", hint="Pass --merge_lora true, --quant_bits 4|8, --gguf_type, "
                                                      "--to_ollama true or --push_to_hub true.")
        if self.quantization_bit and (self.merge_lora or method):
            raise MartletError("exporting from a bitsandbytes-quantized base model is refused: merging or "
                               "re-quantizing 4/8-bit weights loses precision.", field="quantization_bit",
                               hint="Leave --quantization_bit out: export works from the full-precision weights.")
        return self
