"""`--push_to_hub` against a fake hub on 127.0.0.1 that speaks the few endpoints huggingface_hub's create_repo
and upload_folder call (repo creation, preupload, commit), since no real hub is reachable here."""

import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import write_jsonl
from martlet.errors import MartletError
from martlet.llm import ExportArguments, export_main


class FakeHub(BaseHTTPRequestHandler):
    repos: dict = {}
    unknown: list = []
    tokens: list = []
    validated: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.unknown.append(("GET", self.path))
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.tokens.append(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        endpoint = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            self.repos.setdefault(repo, {"files": {}, "create": payload, "commits": []})
            return self._reply(200, {"url": f"{endpoint}/{repo}", "name": repo})
        if path == "/api/validate-yaml":  # a README.md (model card) in the upload is checked first
            self.validated.append(json.loads(body)["content"])
            return self._reply(200, {})
        match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
        if not match or match.group(1) not in self.repos:
            self.unknown.append(("POST", self.path))
            return self._reply(404, {"error": "Repository not found"})
        repo = self.repos[match.group(1)]
        if match.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo["commits"].append(item["value"]["summary"])
            elif item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return self._reply(200, {"commitUrl": f"{endpoint}/{match.group(1)}/commit/{'a' * 40}",
                                 "commitOid": "a" * 40})


@pytest.fixture
def hub():
    FakeHub.repos, FakeHub.unknown, FakeHub.tokens, FakeHub.validated = {}, [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_llama):
    from martlet.llm import SftArguments, sft_main

    root = tmp_path_factory.mktemp("push-ckpt")
    data = write_jsonl(root / "d.jsonl", [{"query": "hi", "response": "hello"}] * 4)
    return sft_main(SftArguments(model_id_or_path=tiny_llama, dataset=[data], max_steps=1, batch_size=2,
                                 gradient_accumulation_steps=1, output_dir=str(root / "o"), dataset_test_ratio=0,
                                 report_to=["none"], disable_tqdm=True))["last_model_checkpoint"]


def run_export(endpoint, argv):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "martlet", "export", *argv], env=env, capture_output=True,
                          text=True, timeout=600)


def test_push_a_lora_checkpoint_to_a_private_repo(hub, lora_ckpt):
    endpoint, server = hub
    proc = run_export(endpoint, ["--ckpt_dir", lora_ckpt, "--push_to_hub", "true", "--hub_model_id", "me/tiny-lora",
                                 "--hub_token", "hf_test_token", "--hub_private_repo", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"hub_url: {endpoint}/me/tiny-lora" in proc.stdout
    repo = server.repos["me/tiny-lora"]
    assert repo["create"]["visibility"] == "private"
    files = repo["files"]
    assert files["adapter_model.safetensors"] == open(os.path.join(lora_ckpt, "adapter_model.safetensors"), "rb").read()
    for name in ("adapter_config.json", "tokenizer.json", "sft_args.json", "martlet_run.json", "chat_template.jinja",
                 "README.md"):
        assert name in files, name
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"):
        assert name not in files, name  # training state stays home
    assert set(server.tokens) == {"Bearer hf_test_token"}
    assert set(server.validated) == {files["README.md"].decode()}
    assert server.unknown == []


def test_push_a_gguf_export(hub, lora_ckpt):
    endpoint, server = hub
    proc = run_export(endpoint, ["--ckpt_dir", lora_ckpt, "--quant_bits", "8", "--to_ollama", "true",
                                 "--push_to_hub", "true", "--hub_model_id", "me/tiny-gguf", "--hub_token", "hf_t"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = server.repos["me/tiny-gguf"]["files"]
    assert sorted(files) == ["Modelfile", "export_args.json", "llama-q8_0.gguf"]
    assert files["llama-q8_0.gguf"][:4] == b"GGUF"
    assert server.repos["me/tiny-gguf"]["create"].get("visibility") in (None, "public")
    saved = json.loads(files["export_args.json"])
    assert saved["arguments"]["hub_token"] == "<hidden>"  # the token is not published


def test_push_while_offline_says_so(lora_ckpt, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MartletError, match="HF_HUB_OFFLINE=1 forbids network access"):
        export_main(ExportArguments(ckpt_dir=lora_ckpt, push_to_hub=True, hub_model_id="me/x"))


def test_modelscope_without_the_package_says_what_to_install(lora_ckpt):
    if __import__("importlib").util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed")
    with pytest.raises(MartletError, match="needs the modelscope package"):
        export_main(ExportArguments(ckpt_dir=lora_ckpt, push_to_hub=True, hub_model_id="me/x", hub="modelscope"))
