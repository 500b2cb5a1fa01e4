"""Written files follow the umask (issue #25, item 8): safetensors 0.8 creates its files 0600, so another
user, or a container under another uid, could not read a checkpoint, a merged model, a GGUF or the shared
model cache while the rest of the folder was 0644."""

import os
import stat

import pytest

from helpers import write_jsonl
from martlet.llm import ExportArguments, InferArguments, SftArguments, export_main, merge_lora, sft_main
from martlet.utils import follow_umask

UMASKS = [0o022, 0o027]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask-{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    """relative path -> permission bits, for every file and folder under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def assert_follows(folder, mask, *, must_hold):
    found = modes(folder)
    for name in must_hold:
        assert name in found, (name, sorted(found))
    for name, mode in found.items():
        full = 0o777 if os.path.isdir(os.path.join(folder, name)) else 0o666
        assert mode == full & ~mask, f"{name}: {mode:o}, wanted {full & ~mask:o} (umask {mask:03o})"


def test_follow_umask_sets_files_folders_and_executables(tmp_path, umask):
    (tmp_path / "sub").mkdir(mode=0o700)
    for name, mode in (("weights.safetensors", 0o600), ("sub/config.json", 0o666), ("run.sh", 0o700)):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, mode)
    follow_umask(str(tmp_path))
    assert modes(tmp_path) == {"sub": 0o777 & ~umask, "weights.safetensors": 0o666 & ~umask,
                               "sub/config.json": 0o666 & ~umask, "run.sh": 0o777 & ~umask}


def train(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", [{"query": f"q{i}", "response": f"a{i}"} for i in range(4)])
    return sft_main(SftArguments(model_id_or_path=model, dataset=[data], max_steps=1, batch_size=2,
                                 gradient_accumulation_steps=1, output_dir=str(tmp_path / "out"), dataset_test_ratio=0,
                                 report_to=["none"], dtype="fp32", disable_tqdm=True, **kw))


def test_checkpoints_and_merged_models_follow_the_umask(tmp_path, tiny_llama, umask):
    ckpt = train(tmp_path, tiny_llama)["last_model_checkpoint"]
    assert_follows(ckpt, umask, must_hold=["adapter_model.safetensors", "optimizer.pt", "sft_args.json"])
    merged = export_main(ExportArguments(ckpt_dir=ckpt, merge_lora=True))["merged"]
    assert_follows(merged, umask, must_hold=["model.safetensors", "config.json", "tokenizer.json"])
    merged = merge_lora(InferArguments(ckpt_dir=ckpt), replace_if_exists=True)  # infer --merge_lora, merge-lora
    assert_follows(merged, umask, must_hold=["model.safetensors", "config.json", "tokenizer.json"])


def test_full_checkpoints_follow_the_umask(tmp_path, tiny_llama):
    old = os.umask(0o022)
    try:
        ckpt = train(tmp_path, tiny_llama, sft_type="full", save_only_model=True)["last_model_checkpoint"]
    finally:
        os.umask(old)
    assert_follows(ckpt, 0o022, must_hold=["model.safetensors"])


def test_gguf_follows_the_umask(tmp_path, tiny_llama, umask):
    result = export_main(ExportArguments(model_id_or_path=tiny_llama, gguf_type="f16", to_ollama=True,
                                         output_dir=str(tmp_path / "gguf")))
    assert_follows(result["gguf_dir"], umask, must_hold=[os.path.basename(result["gguf"]), "Modelfile"])


def test_the_model_cache_follows_the_umask(tmp_path, monkeypatch):
    from martlet.models.embedded import cached_gguf_path, embedded_model_dir, gguf_path

    source = gguf_path()  # the downloaded GGUF (make install), found before the cache moves
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path / "cache"))
    os.makedirs(os.path.dirname(cached_gguf_path()))
    os.symlink(source, cached_gguf_path())  # the new cache holds the GGUF, not yet the converted model
    old = os.umask(0o027)
    try:
        folder = embedded_model_dir()  # converts the embedded GGUF into this empty cache
    finally:
        os.umask(old)
    assert folder.startswith(str(tmp_path))
    assert_follows(folder, 0o027, must_hold=["model.safetensors", "config.json", "tokenizer.json"])
