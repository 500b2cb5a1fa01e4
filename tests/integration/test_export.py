"""`martlet export` on tiny models: merging is exact, GGUF files load back through transformers' GGUF reader
with the same logits, the Modelfile fits the template, quantized and refused cases behave."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import write_jsonl
from martlet.errors import MartletError
from martlet.export.gguf_vocab import load_gguf_tokenizer
from martlet.llm import ExportArguments, export_main

QUESTIONS = [f"Question {i}: what is {i} plus {i}?" for i in range(20)]
IDS = torch.tensor([list(range(5, 70))])


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_llama):
    """A 3-step LoRA checkpoint (all linear layers) of the tiny llama."""
    from martlet.llm import SftArguments, sft_main

    root = tmp_path_factory.mktemp("export-ckpt")
    data = write_jsonl(root / "data.jsonl", [{"query": q, "response": f"It is {2 * i}."}
                                             for i, q in enumerate(QUESTIONS)])
    result = sft_main(SftArguments(model_id_or_path=tiny_llama, dataset=[data], max_steps=3, batch_size=2,
                                   gradient_accumulation_steps=1, output_dir=str(root / "out"), dataset_test_ratio=0,
                                   report_to=["none"], lora_target_modules=["ALL"], learning_rate=1e-2, dtype="fp32",
                                   disable_tqdm=True))
    return result["last_model_checkpoint"]


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)


def test_merged_model_gives_base_plus_adapter_logits(lora_ckpt, tiny_llama):
    from transformers import AutoModelForCausalLM

    from martlet.tuners import Swift

    result = export_main(ExportArguments(ckpt_dir=lora_ckpt, merge_lora=True))
    merged = lora_ckpt + "-merged"
    assert result["merged"] == merged
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "sft_args.json", "martlet_run.json"):
        assert os.path.isfile(os.path.join(merged, name)), name
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base_logits = logits(base)
    with_adapter = logits(Swift.from_pretrained(base, lora_ckpt, inference_mode=True))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # no peft, no martlet
    assert (logits(plain) - with_adapter).abs().max() < 1e-4
    assert (base_logits - with_adapter).abs().max() > 1e-3  # the adapter does change the model


def test_spec_command_line_runs_as_written(lora_ckpt):
    # CUDA_VISIBLE_DEVICES=0 swift export --ckpt_dir 'xxx/vx-xxx/checkpoint-xxx' --merge_lora true
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0", HF_HUB_OFFLINE="1")
    for again in ("true", "false"):  # merging, then reusing the merged folder
        proc = subprocess.run([sys.executable, "-m", "martlet", "export", "--ckpt_dir", lora_ckpt, "--merge_lora",
                               "true", "--replace_if_exists", again], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"merged: {lora_ckpt}-merged" in proc.stdout
        naming = [line for line in (proc.stdout + proc.stderr).splitlines() if f"{lora_ckpt}-merged" in line]
        assert len(naming) == 1, naming  # the result path, printed once
    assert os.path.isfile(os.path.join(lora_ckpt + "-merged", "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_f32_gguf_round_trip_through_transformers_is_exact(tmp_path, tiny_models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models[arch]
    path = export_main(ExportArguments(model_id_or_path=src, gguf_type="f32", output_dir=str(tmp_path)))["gguf"]
    assert path == str(tmp_path / f"{arch}-f32.gguf")
    back = load_gguf(path)
    # transformers reads llama.cpp's mistral files as llama models: the same computation
    assert back.config.model_type == {"mistral": "llama"}.get(arch, arch)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert (logits(back) - logits(reference)).abs().max() < 1e-5
    # the tokenizer and chat template come back too, splitting text as llama.cpp does for 'smollm' (Martlet's
    # reader: transformers' own rebuilds a plain byte-level pre-tokenizer for it)
    tokenizer = AutoTokenizer.from_pretrained(src)
    back_tokenizer = load_gguf_tokenizer(path)
    for text in ("Hello, world! <|im_start|>user\nWhat is 2 + 3?<|im_end|>\n 二十。<start_of_turn>",
                 "In 2024, 12345 + 678 = 13023.", "Steps:\n\n1. add  7\n    42"):
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    if arch != "qwen2":  # (transformers' Qwen2Tokenizer, picked from the config, brings Qwen2's own split)
        assert tokenizer.tokenize("x  42") == ["x", "ĠĠ", "4", "2"]  # SmolLM2's split (GPT-2's: 'Ġ', 'Ġ', '4', '2')
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert (back_tokenizer.bos_token, back_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


# What llama.cpp's convert_hf_to_gguf.py writes for these models (beyond the model card's own fields: license,
# organization, languages, ...), with ARCH for the architecture's prefix
LLAMA_CPP_KEYS = {
    "general.architecture", "general.type", "general.name", "general.basename", "general.size_label",
    "general.file_type", "general.quantization_version",
    "ARCH.block_count", "ARCH.context_length", "ARCH.embedding_length", "ARCH.feed_forward_length",
    "ARCH.attention.head_count", "ARCH.attention.head_count_kv", "ARCH.attention.key_length",
    "ARCH.attention.value_length", "ARCH.attention.layer_norm_rms_epsilon", "ARCH.rope.freq_base",
    "ARCH.rope.dimension_count", "ARCH.vocab_size",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"}


@pytest.mark.parametrize("arch,gguf_arch,basename", [("llama", "llama", "llama"), ("qwen2", "qwen2", "qwen2"),
                                                     ("mistral", "llama", "Mistral")])
def test_gguf_metadata_keys_are_llama_cpp_s(tmp_path, tiny_models, arch, gguf_arch, basename):
    import gguf
    from transformers import AutoModelForCausalLM

    path = export_main(ExportArguments(model_id_or_path=tiny_models[arch], gguf_type="f16",
                                       output_dir=str(tmp_path)))["gguf"]
    fields = gguf.GGUFReader(path).fields
    missing = {key.replace("ARCH", gguf_arch) for key in LLAMA_CPP_KEYS} - set(fields)
    assert not missing, sorted(missing)
    config = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert fields[f"{gguf_arch}.attention.key_length"].contents() == head_dim
    assert fields[f"{gguf_arch}.attention.value_length"].contents() == head_dim
    assert fields["general.quantization_version"].contents() == 2
    assert fields["general.basename"].contents() == basename
    count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models[arch]).parameters())
    assert fields["general.size_label"].contents() == gguf.utility.size_label(count, 0, 0, 0)


def simulated(model_dir, gguf_type):
    """The float model with every weight rounded as the GGUF type rounds it (quantize, then dequantize)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from martlet.export.to_gguf import tensor_type

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            qtype = tensor_type(names.get_name(name, try_suffixes=(".weight",)), tuple(param.shape), gguf_type)
            rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
            param.copy_(torch.from_numpy(rounded.reshape(param.shape)))
    return model


@pytest.fixture(scope="module")
def gguf_exports(tmp_path_factory, tiny_llama) -> dict[str, str]:
    """gguf_type -> the tiny llama exported in that type (each written once for the tests below)."""
    out = str(tmp_path_factory.mktemp("gguf-exports"))
    return {gguf_type: export_main(ExportArguments(model_id_or_path=tiny_llama, gguf_type=gguf_type,
                                                   output_dir=out))["gguf"] for gguf_type in ("f16", "q8_0", "q4_0")}


def test_quantized_gguf_is_exactly_the_rounded_model(gguf_exports, tiny_llama):
    """Nothing but the chosen rounding separates the GGUF from the float model; it stays close to it."""
    from transformers import AutoModelForCausalLM

    reference = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    for gguf_type, atol in {"f16": 2e-3, "q8_0": 5e-2, "q4_0": 0.5}.items():
        got = logits(load_gguf(gguf_exports[gguf_type]))
        assert (got - logits(simulated(tiny_llama, gguf_type))).abs().max() < 1e-5, gguf_type
        diff = (got - reference).abs().max().item()
        agree = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        assert diff <= atol and agree >= (0.9 if gguf_type == "q4_0" else 1.0), (gguf_type, diff, agree)


def test_gguf_metadata_and_sizes(gguf_exports):
    import gguf

    sizes = {}
    for gguf_type, path in gguf_exports.items():
        sizes[gguf_type] = os.path.getsize(path)
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if name != "tokenizer.ggml.tokens" and name != "tokenizer.ggml.merges"
                  and name != "tokenizer.ggml.token_type"}
        assert fields["general.architecture"] == "llama"
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == "smollm"  # what llama.cpp's converter writes for SmolLM2
        assert fields["llama.attention.head_count_kv"] == 2
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == gguf_type.upper()
        assert types["token_embd.weight"] == ("Q8_0" if gguf_type == "q4_0" else gguf_type.upper())
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_quantizing_a_lora_checkpoint_merges_it_and_writes_a_modelfile(lora_ckpt):
    result = export_main(ExportArguments(ckpt_dir=lora_ckpt, quant_bits=8, to_ollama=True))
    assert result["merged"] == lora_ckpt + "-merged"
    assert result["gguf"] == os.path.join(lora_ckpt + "-gguf", "llama-q8_0.gguf")
    text = open(result["modelfile"]).read()
    assert "FROM ./llama-q8_0.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            '<|im_start|>assistant\n{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"""'
            ) in text
    # the tokenizer's ChatML template carries SmolLM's default system prompt
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    saved = json.load(open(os.path.join(lora_ckpt + "-gguf", "export_args.json")))
    assert saved["arguments"]["quant_bits"] == 8 and "transformers" in saved["versions"]


def test_system_prompt_of_training_goes_into_the_modelfile(tmp_path, tiny_models):
    from martlet.llm import SftArguments, sft_main

    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "hi", "response": "hello"}] * 4)
    ckpt = sft_main(SftArguments(model_id_or_path=tiny_models["qwen2"], dataset=[data], max_steps=1, batch_size=2,
                                 gradient_accumulation_steps=1, output_dir=str(tmp_path / "o"), dataset_test_ratio=0,
                                 report_to=["none"], system="You are Martlet.", disable_tqdm=True)
                    )["last_model_checkpoint"]
    result = export_main(ExportArguments(ckpt_dir=ckpt, to_ollama=True))
    text = open(result["modelfile"]).read()
    assert result["gguf"].endswith("qwen2-f16.gguf")
    assert 'SYSTEM """You are Martlet."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ .System }}" in text  # the qwen template translates


def _copy_ckpt(src, dst, **sft_args):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "sft_args.json")
    values = json.load(open(path))
    values.update(sft_args)
    json.dump(values, open(path, "w"))
    return str(dst)


def test_merging_a_qlora_adapter_is_refused(tmp_path, lora_ckpt):
    ckpt = _copy_ckpt(lora_ckpt, tmp_path / "checkpoint-3", quantization_bit=4)
    with pytest.raises(MartletError) as err:
        export_main(ExportArguments(ckpt_dir=ckpt, merge_lora=True))
    assert "4-bit bitsandbytes" in str(err.value) and "loses precision" in str(err.value)
    assert not os.path.exists(ckpt + "-merged")


def test_merging_onto_a_gptq_base_is_refused(tmp_path, lora_ckpt, tiny_llama):
    base = tmp_path / "gptq-base"
    shutil.copytree(tiny_llama, base)
    config = json.load(open(base / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(base / "config.json", "w"))
    with pytest.raises(MartletError) as err:
        export_main(ExportArguments(ckpt_dir=lora_ckpt, merge_lora=True, model_id_or_path=str(base)))
    assert "gptq-quantized" in str(err.value) and "loses precision" in str(err.value)


def test_quantizing_a_quantized_model_is_refused(tmp_path, tiny_llama):
    model = tmp_path / "awq-model"
    shutil.copytree(tiny_llama, model)
    config = json.load(open(model / "config.json"))
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    json.dump(config, open(model / "config.json", "w"))
    with pytest.raises(MartletError, match="already awq-quantized"):
        export_main(ExportArguments(model_id_or_path=str(model), quant_bits=4, output_dir=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("argv, expect", [
    (["--quant_method", "gptq", "--quant_bits", "4"], "needs a CUDA GPU"),
    (["--quant_method", "awq", "--quant_bits", "4"], "needs a CUDA GPU"),
    (["--quant_method", "awq", "--quant_bits", "8"], "AWQ quantizes to 4 bits only"),
    (["--quant_method", "bnb"], "needs --quant_bits 4 or 8"),
    (["--quant_method", "bnb", "--quant_bits", "4", "--to_ollama", "true"], "Ollama imports a GGUF file"),
    (["--gguf_type", "q4_0", "--quant_bits", "8"], "contradicts --quant_bits 8"),
    (["--push_to_hub", "true"], "needs --hub_model_id"),
    ([], "nothing to do"),
    (["--quantization_bit", "4", "--merge_lora", "true", "--ckpt_dir", "."], "bitsandbytes-quantized base"),
    (["--gguf_tpye", "q4_0"], "Did you mean: gguf_type"),
])
def test_refused_arguments_say_why(capsys, tiny_llama, argv, expect):
    from martlet.cli import main

    if torch.cuda.is_available() and expect == "needs a CUDA GPU":
        pytest.skip("this machine has a GPU")
    code = main(["export", "--model_id_or_path", tiny_llama, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and "Traceback" not in err, err
    assert err.startswith("martlet: error:") and len(err.splitlines()) == 1


def test_bnb_without_bitsandbytes_says_what_to_install(monkeypatch, tmp_path, tiny_llama):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MartletError, match="needs the bitsandbytes package"):
        export_main(ExportArguments(model_id_or_path=tiny_llama, quant_method="bnb", quant_bits=4,
                                    output_dir=str(tmp_path / "q")))
    assert not os.path.exists(tmp_path / "q")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_export_loads_back_quantized(tmp_path, tiny_llama, bits):
    """The quantized folder's logits equal those of the original model with bitsandbytes' own quantize ->
    dequantize applied to each decoder Linear (in fp32): within the compute dtype's rounding, and far from the
    model with those weights zeroed (whose argmax is the input token 95% of the time, as is the real one's)."""
    import bitsandbytes.functional as bnb_f
    from transformers import AutoModelForCausalLM

    out = export_main(ExportArguments(model_id_or_path=tiny_llama, quant_method="bnb", quant_bits=bits,
                                      output_dir=str(tmp_path / "q")))["quantized"]
    config = json.load(open(os.path.join(out, "config.json")))
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == f"Linear{bits}bit" + ("" if bits == 4 else "Lt")

    def decoder_linears_replaced(how):
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        linears = [m for m in reference.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7 * reference.config.num_hidden_layers
        with torch.no_grad():
            for linear in linears:
                linear.weight.copy_(how(linear.weight))
        return logits(reference)

    def dequantized(weight):
        if bits == 8:  # LLM.int8: int8 rows scaled by their absolute maximum
            scale = weight.abs().amax(dim=1, keepdim=True)
            return torch.round(weight * 127 / scale) * scale / 127
        packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type=quant["bnb_4bit_quant_type"],
                                            compress_statistics=quant["bnb_4bit_use_double_quant"])
        return bnb_f.dequantize_4bit(packed, state).float()

    reference = decoder_linears_replaced(dequantized)
    skipped = decoder_linears_replaced(torch.zeros_like)
    got = logits(model).float()
    decoder = (reference - skipped).norm()  # what the decoder layers add to the logits
    error = (got - reference).norm()
    assert error < 0.05 * decoder, (error, decoder)  # 0.005 (4-bit), 0.009 (8-bit) here; zeroed: ~1


def sentencepiece_style_model(folder):
    """A tiny untied llama with a Llama-2-like tokenizer: BPE with byte fallback, '▁' for spaces, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    texts = ["Hello world, this is a tiny tokenizer.", "The quick brown fox jumps over the lazy dog.",
             "Numbers 123 and symbols !? are fine."] * 20
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = sentencepiece_style_model(str(tmp_path / "spm"))
    path = export_main(ExportArguments(model_id_or_path=str(tmp_path / "spm"), gguf_type="f32",
                                       output_dir=str(tmp_path / "out")))["gguf"]
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [3, 3, 3, 6] and types.count(6) == 256  # control tokens, then the 256 byte tokens
    assert "output.weight" in {t.name for t in reader.tensors}  # untied output layer
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file=os.path.basename(path))
    for text in ("Hello world, the fox!", "Ünï 123 ☃ new words"):
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "spm"), dtype=torch.float32)
    assert (logits(load_gguf(path), IDS[:, :40]) - logits(reference, IDS[:, :40])).abs().max() < 1e-5
