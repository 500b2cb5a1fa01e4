"""The data files behind Martlet's model registry and named chat templates.

- `src/martlet/models/registry.json`: model types -> hub ids, template, LoRA targets, quantization, ...
- `src/martlet/templates/templates.json` + `<name>.jinja`: chat templates for tokenizers that ship none.

Templates are rendered the way transformers renders chat templates (an immutable sandboxed jinja
environment with trim_blocks/lstrip_blocks and a `raise_exception` global). Martlet computes loss
masks by rendering a conversation once per assistant turn, so every template must keep the prefix
property checked below.
"""

from __future__ import annotations

import json
import os
import re

import pytest

jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from martlet.models.embedded import gguf_path  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PKG = os.path.join(ROOT, "src", "martlet")
REGISTRY_FILE = os.path.join(PKG, "models", "registry.json")
TEMPLATES_DIR = os.path.join(PKG, "templates")
TEMPLATES_FILE = os.path.join(TEMPLATES_DIR, "templates.json")

BOS, EOS = "<s>", "</s>"
MODEL_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

REQUIRED_TEMPLATES = {"chatml", "qwen", "smollm2", "llama2", "llama3", "mistral", "gemma", "yi", "default", "alpaca",
                      "baichuan", "chatglm3", "deepseek"}
# model types the spec's examples use
REQUIRED_MODEL_TYPES = {"qwen-7b-chat", "qwen1half-7b-chat", "qwen-14b-chat", "qwen-72b-chat", "chatglm3-6b",
                        "baichuan2-13b-chat", "yi-34b-chat", "qwen-14b-chat-int4", "qwen-14b-chat-int8",
                        "qwen1half-72b-chat-int4", "llama2-70b-chat", "qwen2-7b-instruct", "qwen2.5-7b-instruct",
                        "llama2-7b-chat", "llama3-8b-instruct", "mistral-7b-instruct", "mixtral-moe-7b-instruct",
                        "yi-6b-chat", "gemma-2b-instruct", "gemma-7b-instruct", "deepseek-7b-chat",
                        "smollm2-135m-instruct", "qwen2.5-0.5b", "llama2-7b"}
QUANTIZATIONS = {None, "gptq-int4", "gptq-int8", "awq-int4"}
MODEL_FIELDS = {"hf_id", "ms_id", "template", "lora_target_modules", "quantization"}
BASE_MODEL_RE = re.compile(r"chat|instruct")  # a model type without either is a base model
OPTIONAL_MODEL_FIELDS = {"requires"}
TEMPLATE_FIELDS = {"file", "default_system", "eot", "eot_is_eos", "stop_words", "description"}

# HuggingFaceTB/SmolLM2-135M-Instruct, tokenizer_config.json "chat_template" (JSON-decoded: the `\n`
# below are real newlines inside the jinja string literals, exactly as in the hub file and the GGUF).
SMOLLM2_HUB_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM = "You are a terse test assistant."
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "3+3 equals 6."},
    {"role": "user", "content": "Thanks! Say bye."},
    {"role": "assistant", "content": "Goodbye, have a nice day."},
]
CONVERSATIONS = {"no_system": TURNS, "system": [{"role": "system", "content": SYSTEM}, *TURNS]}


# helpers ---------------------------------------------------------------------------------------------
def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate keys: {dupes}")
    return dict(pairs)


def _load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh, object_pairs_hook=_no_duplicate_keys)


REGISTRY = _load(REGISTRY_FILE)
TEMPLATES = _load(TEMPLATES_FILE)
MODELS = REGISTRY["models"]


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception


def template_text(name: str) -> str:
    with open(os.path.join(TEMPLATES_DIR, TEMPLATES[name]["file"]), encoding="utf-8") as fh:
        return fh.read()


def render(source: str, messages, add_generation_prompt: bool = False, **special) -> str:
    special = special or {"bos_token": BOS, "eos_token": EOS}
    return _ENV.from_string(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           **special)


def expected_eot(name: str) -> str:
    entry = TEMPLATES[name]
    return EOS if entry["eot_is_eos"] else entry["eot"]


# registry.json ---------------------------------------------------------------------------------------
def test_registry_shape():
    assert set(REGISTRY) == {"models", "aliases"}
    assert isinstance(MODELS, dict) and isinstance(REGISTRY["aliases"], dict)
    assert 80 <= len(MODELS) <= 150, len(MODELS)


def test_required_model_types_present():
    assert REQUIRED_MODEL_TYPES <= set(MODELS), sorted(REQUIRED_MODEL_TYPES - set(MODELS))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_model_entry(model_type):
    entry = MODELS[model_type]
    assert MODEL_TYPE_RE.match(model_type), model_type
    assert MODEL_FIELDS <= set(entry) <= MODEL_FIELDS | OPTIONAL_MODEL_FIELDS, set(entry) ^ MODEL_FIELDS
    assert isinstance(entry["hf_id"], str) and HUB_ID_RE.match(entry["hf_id"]), entry["hf_id"]
    assert entry["ms_id"] is None or (isinstance(entry["ms_id"], str) and HUB_ID_RE.match(entry["ms_id"]))
    assert entry["template"] in TEMPLATES, entry["template"]
    targets = entry["lora_target_modules"]
    assert isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    assert "ALL" not in targets and "all" not in targets  # ALL means every linear layer; it is not a default
    assert len(set(targets)) == len(targets)
    assert entry["quantization"] in QUANTIZATIONS
    assert isinstance(entry.get("requires", []), list)
    assert all(isinstance(r, str) and r for r in entry.get("requires", []))
    if not BASE_MODEL_RE.search(model_type):  # a base model has no chat format of its own
        assert entry["template"] == "default"


def test_model_types_unique_in_every_spelling():
    # ModelType.qwen2_5_7b_instruct spells '.' and '-' as '_': that spelling must be unambiguous too
    spelled = [m.replace(".", "_").replace("-", "_") for m in MODELS]
    assert len(set(spelled)) == len(spelled)
    assert len({m.lower() for m in MODELS}) == len(MODELS)


def test_hub_ids_unique():
    hf = [e["hf_id"].lower() for e in MODELS.values()]
    assert len(set(hf)) == len(hf), sorted({h for h in hf if hf.count(h) > 1})
    ms = [e["ms_id"].lower() for e in MODELS.values() if e["ms_id"]]
    assert len(set(ms)) == len(ms), sorted({m for m in ms if ms.count(m) > 1})


def test_aliases_point_to_models():
    for alias, target in REGISTRY["aliases"].items():
        assert target in MODELS, (alias, target)
        assert alias not in MODELS, alias
        assert alias and alias == alias.strip()


def test_quantized_entries_look_quantized():
    for model_type, entry in MODELS.items():
        quant = entry["quantization"]
        if quant is None:
            assert not re.search(r"-(int4|int8|awq)$", model_type), model_type
        else:
            assert re.search(r"-(int4|int8|awq)$", model_type), model_type
            assert re.search(r"(?i)(int4|int8|awq|4bits|8bits)", entry["hf_id"]), entry["hf_id"]


def test_known_entries():
    qwen7 = MODELS["qwen-7b-chat"]
    assert (qwen7["hf_id"], qwen7["ms_id"]) == ("Qwen/Qwen-7B-Chat", "qwen/Qwen-7B-Chat")
    assert qwen7["lora_target_modules"] == ["c_attn"]
    assert MODELS["qwen-14b-chat-int4"]["quantization"] == "gptq-int4"
    assert MODELS["qwen-14b-chat-int8"]["quantization"] == "gptq-int8"
    assert MODELS["qwen1half-72b-chat-int4"]["hf_id"] == "Qwen/Qwen1.5-72B-Chat-GPTQ-Int4"
    assert MODELS["llama2-70b-chat"]["template"] == "llama2"
    assert MODELS["chatglm3-6b"]["lora_target_modules"] == ["query_key_value"]
    assert MODELS["baichuan2-13b-chat"]["lora_target_modules"] == ["W_pack"]
    assert MODELS["qwen2.5-0.5b"]["template"] == "default"
    assert MODELS["llama2-7b"]["template"] == "default"
    smol = MODELS["smollm2-135m-instruct"]
    assert smol["hf_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smol["template"] == "smollm2"
    assert smol["lora_target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert smol["quantization"] is None


# templates.json --------------------------------------------------------------------------------------
def test_templates_json():
    assert REQUIRED_TEMPLATES <= set(TEMPLATES), sorted(REQUIRED_TEMPLATES - set(TEMPLATES))
    for name, entry in TEMPLATES.items():
        assert set(entry) == TEMPLATE_FIELDS, (name, set(entry) ^ TEMPLATE_FIELDS)
        assert entry["file"] == f"{name}.jinja"
        assert os.path.isfile(os.path.join(TEMPLATES_DIR, entry["file"])), entry["file"]
        assert entry["default_system"] is None or (isinstance(entry["default_system"], str) and entry["default_system"])
        assert isinstance(entry["eot_is_eos"], bool)
        # eot is null only where it is the tokenizer's eos_token (whatever that is)
        assert (isinstance(entry["eot"], str) and entry["eot"]) or (entry["eot"] is None and entry["eot_is_eos"])
        assert isinstance(entry["stop_words"], list) and all(isinstance(s, str) and s for s in entry["stop_words"])
        assert isinstance(entry["description"], str) and entry["description"]


def test_every_template_file_is_listed():
    files = {f for f in os.listdir(TEMPLATES_DIR) if f.endswith(".jinja")}
    assert files == {e["file"] for e in TEMPLATES.values()}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_template_renders_turns_with_eot(name, conv):
    messages = CONVERSATIONS[conv]
    out = render(template_text(name), messages)
    eot = expected_eot(name)
    pos = 0
    for message in messages:
        assert message["content"] in out[pos:], (name, message["content"], out)
        pos = out.index(message["content"], pos) + len(message["content"])
        if message["role"] == "assistant":
            assert out[pos:].lstrip(" \n").startswith(eot), (name, out[pos:pos + 40])
    if conv == "system":
        assert SYSTEM in out
    default_system = TEMPLATES[name]["default_system"]
    if default_system:
        assert out.count(default_system) == (0 if conv == "system" else 1), (name, out)
    assert "None" not in out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_template_prefix_property(name, conv):
    """render(messages[:i], add_generation_prompt=True) is a prefix of render(messages[:i+1]) for every
    assistant turn i, and earlier renderings never change as the conversation grows."""
    source, messages, eot = template_text(name), CONVERSATIONS[conv], expected_eot(name)
    full = render(source, messages)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(source, messages[:i], add_generation_prompt=True)
        upto = render(source, messages[: i + 1])
        assert upto.startswith(prompt), (name, i, prompt, upto)
        assert full.startswith(upto), (name, i)
        reply = upto[len(prompt):]
        assert message["content"] in reply and eot in reply, (name, i, reply)
        # the reply holds the content and its end-of-turn marker, not the next turn's header
        assert reply.index(message["content"]) < reply.rindex(eot)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_without_bos_token(name):
    """Tokenizers without a bos token (Qwen, ...) leave `bos_token` undefined in transformers."""
    out = render(template_text(name), CONVERSATIONS["system"], add_generation_prompt=False, eos_token=EOS)
    assert "None" not in out and "Undefined" not in out
    assert not out.startswith(BOS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_same_in_transformers(name):
    """transformers' own renderer (what tokenizer.apply_chat_template uses) gives the same text."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(utils, "render_jinja_template"):
        pytest.skip("this transformers has no render_jinja_template")
    source = template_text(name)
    for messages in CONVERSATIONS.values():
        for gen in (False, True):
            msgs = messages[:-1] if gen else messages
            rendered, _ = utils.render_jinja_template(conversations=[msgs], chat_template=source,
                                                      add_generation_prompt=gen, bos_token=BOS, eos_token=EOS)
            assert rendered[0] == render(source, msgs, add_generation_prompt=gen)


SYS1 = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]
NOSYS1 = SYS1[1:]
HAND_WRITTEN = {
    ("smollm2", "nosys"): "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                          "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    ("smollm2", "sys"): "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello!<|im_end|>\n",
    ("chatml", "nosys"): "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    ("yi", "sys"): "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>\n",
    ("qwen", "nosys"): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                       "<|im_start|>assistant\nHello!<|im_end|>\n",
    ("llama2", "sys"): "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Hello! </s>",
    ("llama2", "nosys"): "<s>[INST] Hi [/INST] Hello! </s>",
    ("llama3", "sys"): "<s><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    ("mistral", "sys"): "<s> [INST] SYS\n\nHi [/INST] Hello!</s>",
    ("mistral", "nosys"): "<s> [INST] Hi [/INST] Hello!</s>",
    ("gemma", "sys"): "<s><start_of_turn>user\nSYS\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ("gemma", "nosys"): "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ("default", "sys"): "<s>### System:\nSYS\n\n### User:\nHi\n\n### Assistant:\nHello!</s>\n\n",
    ("alpaca", "nosys"): "<s>Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n",
    ("baichuan", "sys"): "SYS<reserved_106>Hi<reserved_107>Hello!</s>",
    ("chatglm3", "sys"): "[gMASK]sop<|system|>\n SYS<|user|>\n Hi<|assistant|>\n Hello!</s>",
    ("deepseek", "sys"): "<s>SYS\n\nUser: Hi\n\nAssistant: Hello!</s>",
    ("deepseek", "nosys"): "<s>User: Hi\n\nAssistant: Hello!</s>",
}


@pytest.mark.parametrize("name,conv", sorted(HAND_WRITTEN))
def test_hand_written_renderings(name, conv):
    messages = SYS1 if conv == "sys" else NOSYS1
    assert render(template_text(name), messages) == HAND_WRITTEN[name, conv]


def test_generation_prompts():
    prompts = {"smollm2": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "gemma": "<start_of_turn>model\n", "llama2": " [/INST]", "mistral": " [/INST]",
               "chatglm3": "<|assistant|>", "deepseek": "Assistant:", "default": "### Assistant:\n",
               "alpaca": "### Response:\n", "baichuan": "<reserved_107>"}
    for name, suffix in prompts.items():
        assert render(template_text(name), SYS1[:2], add_generation_prompt=True).endswith(suffix), name


# SmolLM2: byte-identical to the hub -------------------------------------------------------------------
def test_smollm2_template_is_the_hub_template():
    assert template_text("smollm2") == SMOLLM2_HUB_TEMPLATE
    assert TEMPLATES["smollm2"]["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert TEMPLATES["smollm2"]["eot"] == "<|im_end|>"


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_smollm2_renders_like_the_hub_template(conv):
    for i in range(len(CONVERSATIONS[conv]) + 1):
        for gen in (False, True):
            msgs = CONVERSATIONS[conv][:i]
            assert render(template_text("smollm2"), msgs, gen) == render(SMOLLM2_HUB_TEMPLATE, msgs, gen)


def test_smollm2_template_matches_embedded_gguf():
    path = gguf_path()  # `make install` downloads it (martlet download-embedded)
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    stored = field.contents() if hasattr(field, "contents") else bytes(field.parts[field.data[0]]).decode("utf-8")
    assert stored == SMOLLM2_HUB_TEMPLATE
    assert template_text("smollm2") == stored
