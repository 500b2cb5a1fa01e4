"""The memory allocator a training command runs with (`martlet.launch.allocator_library`, `preload_allocator`):
which library is chosen, and the command run again in the same process with it preloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from martlet.errors import MartletError
from martlet.launch import SYSTEM_MALLOC, allocator_in_use, allocator_library, allocator_report

TCMALLOC = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "tcmalloc": "libtcmalloc.so.4"}


def choose(command: str = "sft", found: dict[str, str] | None = None, **environ: str) -> str | None:
    return allocator_library(command, environ, find=(TCMALLOC if found is None else found).get, architecture="x86")


def test_training_commands_take_tcmalloc_where_the_system_has_it():
    for command in ("sft", "pt", "rlhf", "dpo", "orpo", "grpo"):
        assert choose(command) == "libtcmalloc_minimal.so.4"
    assert choose(found={"tcmalloc": "libtcmalloc.so.4"}) == "libtcmalloc.so.4"  # the full one, without the minimal
    assert choose(found={}) is None  # none installed: glibc's malloc, nothing run again
    assert allocator_library("sft", {}, find=TCMALLOC.get, architecture="arm") is None  # unmeasured there


def test_other_commands_and_the_users_choices_are_left_alone():
    for command in ("infer", "deploy", "export", "eval", "web-ui"):
        assert choose(command) is None
    assert choose(MARTLET_MALLOC="system") is None
    assert choose(LD_PRELOAD="/usr/lib/libjemalloc.so.2") is None  # the user preloads an allocator of their own
    assert choose(LD_PRELOAD="libtcmalloc_minimal.so.4") is None  # in place already: no second run
    assert choose(LD_PRELOAD="/opt/libfoo.so") == "libtcmalloc_minimal.so.4"  # another library: kept beside it


def test_a_library_named_by_its_path(tmp_path):
    library = tmp_path / "libmymalloc.so"
    library.write_bytes(b"")
    assert choose(MARTLET_MALLOC=str(library)) == str(library)
    assert allocator_library("sft", {"MARTLET_MALLOC": str(library)}, architecture="arm") == str(library)
    assert choose(MARTLET_MALLOC=str(library), LD_PRELOAD=str(library)) is None
    with pytest.raises(MartletError) as error:
        choose(MARTLET_MALLOC=str(tmp_path / "missing.so"))
    assert "MARTLET_MALLOC" in str(error.value) and "missing.so" in str(error.value)


def _library(tmp_path, name: str) -> str:
    """A shared library whose constructor writes its process id to $MARTLET_TEST_MARKER when loaded."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler to build a library to preload (the choice itself: the tests above)")
    source = tmp_path / "marker.c"
    source.write_text(textwrap.dedent("""
        #include <stdio.h>
        #include <stdlib.h>
        #include <unistd.h>
        __attribute__((constructor)) static void loaded(void) {
          const char* path = getenv("MARTLET_TEST_MARKER");
          FILE* f = path ? fopen(path, "a") : NULL;
          FILE* cmdline = fopen("/proc/self/cmdline", "rb");
          char line[4096] = {0};
          size_t n = cmdline ? fread(line, 1, sizeof line - 1, cmdline) : 0;
          if (cmdline) fclose(cmdline);
          for (size_t i = 0; i < n; i++) if (line[i] == 0) line[i] = ' ';
          if (f) { fprintf(f, "%d %s\\n", (int)getpid(), line); fclose(f); }
        }
    """))
    library = tmp_path / name
    subprocess.run([compiler, "-shared", "-fPIC", "-x", "c", str(source), "-o", str(library)], check=True)
    return str(library)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_the_command_runs_again_in_the_same_process_with_the_library_preloaded(tmp_path):
    library = _library(tmp_path, "libmarker.so")
    marker = tmp_path / "marker.txt"
    env = {**os.environ, "MARTLET_TEST_MARKER": str(marker), "MARTLET_MALLOC": library}
    env.pop("LD_PRELOAD", None)
    command = [sys.executable, "-X", "utf8", "-m", "martlet.cli", "sft", "--no_such_argument", "1"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 2 and "no_such_argument" in out + err  # the same command, the same arguments
    lines = marker.read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] == str(child.pid)  # loaded once, in the very process started
    assert lines[0].split()[1:] == command  # the interpreter's options too
    marker.unlink()
    off = subprocess.run(command, env={**env, "MARTLET_MALLOC": "system"}, capture_output=True, text=True, timeout=300)
    assert off.returncode == 2 and not marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")
def test_the_allocator_in_use_is_read_from_the_process(tmp_path):
    if not os.environ.get("LD_PRELOAD"):  # (this test process, as pytest runs it)
        assert allocator_in_use() == SYSTEM_MALLOC
    library = _library(tmp_path, "libjemalloc_stand_in.so")
    probe = "from martlet.launch import allocator_in_use; print(allocator_in_use())"
    env = {k: v for k, v in os.environ.items() if k != "MARTLET_TEST_MARKER"}
    shown = subprocess.run([sys.executable, "-c", probe], env={**env, "LD_PRELOAD": library},
                           capture_output=True, text=True, timeout=120, check=True)
    assert shown.stdout.strip() == "libjemalloc_stand_in.so"


def test_a_call_from_python_code_never_replaces_its_process(tmp_path, monkeypatch):
    from martlet import cli

    library = tmp_path / "libmymalloc.so"
    library.write_bytes(b"")
    monkeypatch.setenv("MARTLET_MALLOC", str(library))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    assert cli.main(["sft", "--no_such_argument", "1"]) == 2  # `martlet.cli.main([...])` inside a notebook, a test
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["martlet", "sft", "--no_such_argument", "1"])
    cli.main()  # the program itself: run again (execve stands in here, so it goes on to the argument error)
    assert calls and calls[0][2]["LD_PRELOAD"] == str(library)
    assert calls[0][:2] == (sys.executable, [sys.executable, "-m", "martlet.cli", "sft", "--no_such_argument", "1"])


@pytest.mark.parametrize("started, again", [
    (["/venv/bin/python", "/venv/bin/martlet", "sft", "--x", "1"], ["/venv/bin/martlet", "sft", "--x", "1"]),
    (["python3", "-X", "dev", "-W", "error", "-m", "martlet.cli", "sft"], ["-X", "dev", "-W", "error", "-m",
                                                                          "martlet.cli", "sft"]),
    (["python3", "-", "sft"], ["-m", "martlet.cli", "sft"]),  # read from stdin: not again
    (["python3", "wrapper.py", "--config", "a.yaml"], ["-m", "martlet.cli", "sft"]),  # sys.argv set by the wrapper
])
def test_the_command_runs_again_as_it_was_started(monkeypatch, started, again):
    from martlet.launch import command_line

    monkeypatch.setattr(sys, "orig_argv", started)
    tail = ["sft", "--x", "1"] if "--x" in started else ["sft"]
    assert command_line(tail[0], tail[1:]) == [sys.executable, *again]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator's hint is for Linux, where `auto` "
                    "preloads tcmalloc")
def test_the_log_says_which_allocator_runs_and_how_to_have_tcmalloc():
    def report(command="sft", architecture="x86", **kwargs):
        return allocator_report(command, architecture=architecture, **kwargs)

    assert report(used="libtcmalloc_minimal.so.4.5.10") == "memory allocator: libtcmalloc_minimal.so.4.5.10"
    missing = report(used=SYSTEM_MALLOC, environ={}, find=lambda name: None)
    assert missing.startswith(f"memory allocator: {SYSTEM_MALLOC} (") and "apt install libtcmalloc-minimal4" in missing
    installed = report(used=SYSTEM_MALLOC, environ={}, find=TCMALLOC.get)  # sft_main from Python code
    assert "tcmalloc is installed" in installed and "LD_PRELOAD=" in installed
    chosen = report(used=SYSTEM_MALLOC, environ={"MARTLET_MALLOC": "system"}, find=TCMALLOC.get)
    assert chosen == f"memory allocator: {SYSTEM_MALLOC} (MARTLET_MALLOC)"
    assert report("infer", used=SYSTEM_MALLOC, find=TCMALLOC.get) == f"memory allocator: {SYSTEM_MALLOC}"
    assert report(used=SYSTEM_MALLOC, environ={}, find=TCMALLOC.get, architecture="arm") == (
        f"memory allocator: {SYSTEM_MALLOC}")  # `auto` takes none on ARM: nothing to suggest
