"""The exported GGUF in llama.cpp itself, where it is installed (llama-cpp-python, or a `llama-cli` binary):
llama.cpp splits text as transformers does ('smollm': digits one by one), gives text back without GPT-2's space
clean-up ('Hello , world !' stays as written), and the embedded model answers as it does in transformers.
Neither is installed on Martlet's CI machines (llama-cpp-python compiles from source; Debian has no llama.cpp):
the tests then skip and say why."""

import importlib.util
import shutil
import subprocess

import pytest

from martlet.llm import ExportArguments, export_main

HAS_PYTHON_BINDING = importlib.util.find_spec("llama_cpp") is not None
LLAMA_CLI = shutil.which("llama-cli")
needs_binding = pytest.mark.skipif(not HAS_PYTHON_BINDING, reason="llama-cpp-python is not installed")
needs_llama_cpp = pytest.mark.skipif(not HAS_PYTHON_BINDING and LLAMA_CLI is None,
                                     reason="neither llama-cpp-python nor a llama-cli binary is installed")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def embedded_gguf(tmp_path_factory, embedded_dir) -> str:
    out = tmp_path_factory.mktemp("llama-cpp")
    return export_main(ExportArguments(model_id_or_path=embedded_dir, gguf_type="q8_0", output_dir=str(out)))["gguf"]


def _llama(path: str):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=512, verbose=False, seed=0)


@needs_binding
def test_llama_cpp_splits_and_detokenizes_as_transformers_does(embedded_gguf, tokenizer):
    llama = _llama(embedded_gguf)
    for text in ("In 2024, 12345 + 678 = 13023.", "Steps:\n\n1. add  7\n    42", "Hello , world !"):
        ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert llama.detokenize(ids).decode("utf-8") == text  # no clean-up of the spaces before punctuation


@needs_llama_cpp
def test_llama_cpp_answers_as_transformers_does(embedded_gguf, tokenizer):
    """Greedy, the embedded model answers the question the same in llama.cpp (q8_0) as in transformers."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    if HAS_PYTHON_BINDING:
        reply = _llama(embedded_gguf)(prompt, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    else:
        proc = subprocess.run([LLAMA_CLI, "-m", embedded_gguf, "-p", prompt, "-n", "16", "--temp", "0",
                               "-no-cnv", "--no-display-prompt"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reply = proc.stdout
    assert "The capital of France is Paris." in reply
