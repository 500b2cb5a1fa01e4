"""Runs of `martlet web-ui` (no gradio): training jobs started as CLI subprocesses, run folders found in the
output folder, and what their logs say.

A job is one `python -m martlet.cli <command> ...` process, its output in `<output_dir>/web-ui/jobs/<id>/run.log`.
The registry of jobs lives in this module, so every browser tab of the server sees the same ones, and a job
outlives the page that started it. A run is a folder `<output_dir>/<model_type>/v<N>-<time>/` (the CLI prints
"run folder: <path>"); a resumed job continues in its run's folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, Optional

from martlet.train.outputs import ARGS_FILE, RUN_INFO_FILE
from martlet.ui.webui_form import command_line

WEBUI_DIR = "web-ui"  # the page's own files inside the output folder: jobs/ and uploads/
_RUN_FOLDER = re.compile(r"run folder: (.+?)\s*$", re.M)
_RUN_NAME = re.compile(r"v\d+-")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal codes of progress bars (cursor up, ...)
JOBS: dict[str, "Job"] = {}  # id -> job, for every page of this server
_LOCK = threading.Lock()


@dataclasses.dataclass
class Job:
    id: str
    output_dir: str
    command: str
    argv: list[str]
    folder: str
    process: Optional[subprocess.Popen] = None
    run_dir: Optional[str] = None
    pid: Optional[int] = None  # a job an earlier server started, while its process still runs

    @property
    def log(self) -> str:
        return os.path.join(self.folder, "run.log")

    def returncode(self) -> Optional[int]:
        return self.process.poll() if self.process is not None else _read_json(self.info_file).get("returncode")

    def status(self) -> str:
        code = self.returncode()
        if code is None:
            return "running" if self.process is not None or self.pid is not None else "exit status unknown"
        return {0: "finished", 130: "stopped"}.get(code, f"failed (exit {code})")

    def find_run_dir(self) -> Optional[str]:
        """The run folder the CLI printed (read from the log until it appears)."""
        if self.run_dir is None and os.path.isfile(self.log):
            self.run_dir = parse_run_dir(_read_text(self.log))
        return self.run_dir

    def stop(self) -> bool:
        """SIGINT: the run finishes its step, saves a checkpoint and exits with status 130. A run that an earlier
        server started is signalled by its pid, if that process is still the run's."""
        if self.process is None:
            if self.pid is None or not _runs_martlet(self.pid):
                return False
            os.kill(self.pid, signal.SIGINT)
            return True
        if self.process.poll() is not None:
            return False
        self.process.send_signal(signal.SIGINT)
        return True

    @property
    def info_file(self) -> str:
        """job.json: the command, the pid and, once it has ended, the exit status and the run folder."""
        return os.path.join(self.folder, "job.json")


def start_job(output_dir: str, command: str, argv: list[str]) -> Job:
    """Start `martlet <command> argv` in a subprocess (its own session: a Ctrl-C of the server does not reach it)."""
    with _LOCK:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        folder = os.path.join(os.path.abspath(output_dir), WEBUI_DIR, "jobs", stamp)
        os.makedirs(folder)
        job = Job(stamp, os.path.abspath(output_dir), command, list(argv), folder)
        with open(job.log, "wb") as log:
            job.process = subprocess.Popen([sys.executable, "-m", "martlet.cli", command, *argv], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        info = {"command": command, "argv": job.argv, "command_line": command_line(command, argv),
                "pid": job.process.pid, "cwd": os.getcwd()}
        _write_json(job.info_file, info)
        JOBS[job.id] = job
    threading.Thread(target=_record_exit, args=(job, info), daemon=True).start()
    return job


def _record_exit(job: Job, info: dict[str, Any]) -> None:
    info["returncode"] = job.process.wait()  # type: ignore[union-attr]
    job.find_run_dir()
    _write_json(job.info_file, {**info, "run_dir": job.run_dir})


def keep_upload(output_dir: str, path: str) -> str:
    """A copy of an uploaded dataset in `<output_dir>/web-ui/uploads/<hash>/<name>`, so that the runs using it
    (and their resumes) read a file that stays."""
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    target = os.path.join(os.path.abspath(output_dir), WEBUI_DIR, "uploads", digest, os.path.basename(path))
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    return target


def jobs_on_disk(output_dir: str) -> list[Job]:
    """Jobs that earlier servers started (no process to watch: their exit status is in job.json)."""
    root = os.path.join(output_dir, WEBUI_DIR, "jobs")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        info = _read_json(os.path.join(root, name, "job.json"))
        if info and name not in JOBS:
            pid = info.get("pid") if "returncode" not in info else None
            found.append(Job(name, os.path.abspath(output_dir), info.get("command", "sft"), info.get("argv", []),
                             os.path.join(root, name), run_dir=info.get("run_dir"),
                             pid=pid if pid and _runs_martlet(pid) else None))
    return found


def _runs_martlet(pid: int) -> bool:
    """Whether process `pid` is alive and is a Martlet CLI run (not another process that got the pid since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"martlet.cli" in fh.read()
    except OSError:  # gone, or no /proc: never signal a process we cannot identify
        return False


@dataclasses.dataclass
class Entry:
    """One line of the page's run list: a job (with or without its run folder yet), or a run folder alone."""

    key: str
    run_dir: Optional[str]
    job: Optional[Job]

    def label(self, output_dir: str) -> str:
        name = os.path.relpath(self.run_dir, output_dir) if self.run_dir else f"job {self.key} (starting)"
        if self.job is None:
            return name
        return f"{name} · {self.job.status()}" + (" (resumed)" if "--resume_from_checkpoint" in self.job.argv else "")


def entries(output_dir: str) -> list[Entry]:
    """This server's jobs, newest first, then runs found on disk that none of them claims."""
    output_dir = os.path.abspath(output_dir)
    live = sorted((j for j in JOBS.values() if j.output_dir == output_dir), key=lambda j: j.id, reverse=True)
    found = [Entry(j.id, j.find_run_dir(), j) for j in live]
    claimed = {e.run_dir for e in found}
    logged = {j.run_dir: j for j in jobs_on_disk(output_dir) if j.run_dir}  # the newest job of each run wins
    for run_dir in find_runs(output_dir):
        if run_dir not in claimed:
            found.append(Entry(run_dir, run_dir, logged.get(run_dir)))
    return found


def find_runs(output_dir: str) -> list[str]:
    """Run folders `<output_dir>/<model_type>/v<N>-<time>`, the newest started first."""
    runs = []
    if os.path.isdir(output_dir):
        for model_type in os.listdir(output_dir):
            parent = os.path.join(output_dir, model_type)
            if model_type == WEBUI_DIR or not os.path.isdir(parent):
                continue
            runs += [os.path.join(parent, d) for d in os.listdir(parent)
                     if _RUN_NAME.match(d) and os.path.isdir(os.path.join(parent, d))]
    return sorted(runs, key=_started, reverse=True)


def _started(run_dir: str) -> tuple[str, int]:
    """v<N>-<YYYYMMDD-HHMMSS> -> (time, N): when the run was started."""
    version, _, stamp = os.path.basename(run_dir)[1:].partition("-")
    return stamp, int(version) if version.isdigit() else 0


def checkpoints(run_dir: Optional[str]) -> list[str]:
    """The whole checkpoints of a run (`checkpoint-N` with trainer_state.json), newest first."""
    if not run_dir or not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
             if (m := _CHECKPOINT.match(d)) and os.path.isfile(os.path.join(run_dir, d, "trainer_state.json"))]
    return [path for _, path in sorted(found, reverse=True)]


def run_arguments(run_dir: Optional[str]) -> tuple[dict[str, Any], Optional[str]]:
    """(sft_args.json, the command in martlet_run.json) of a run folder; ({}, None) before they are written."""
    if not run_dir:
        return {}, None
    return _read_json(os.path.join(run_dir, ARGS_FILE)), _read_json(os.path.join(run_dir, RUN_INFO_FILE)).get("command")


def read_records(run_dir: Optional[str]) -> list[dict[str, Any]]:
    """The objects of `logging.jsonl` (step, max_steps, loss, eval_loss, ...); a line being written is skipped."""
    path = os.path.join(run_dir, "logging.jsonl") if run_dir else ""
    if not os.path.isfile(path):
        return []
    records = []
    for line in _read_text(path).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def progress(records: list[dict[str, Any]]) -> tuple[int, Optional[int]]:
    """(step, max_steps) of the newest record."""
    last = next((r for r in reversed(records) if "step" in r), None)
    return (int(last["step"]), last.get("max_steps")) if last else (0, None)


def curve(records: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """(step, series, value) points of the train loss and the eval loss."""
    return [(int(r["step"]), key, float(r[key])) for r in records for key in ("loss", "eval_loss")
            if isinstance(r.get(key), (int, float)) and "step" in r]


def reward_curve(records: list[dict[str, Any]]) -> list[tuple[int, str, float]]:
    """(step, reward function, mean) points of a GRPO run: trl's `rewards/<name>/mean`, and `reward` (their
    weighted sum) as "total"."""
    points = []
    for r in records:
        if "step" not in r:
            continue
        for key, value in r.items():
            if isinstance(value, (int, float)) and (key == "reward" or (key.startswith("rewards/")
                                                                        and key.endswith("/mean"))):
                points.append((int(r["step"]), "total" if key == "reward" else key[len("rewards/"):-len("/mean")],
                               float(value)))
    return points


def parse_run_dir(log_text: str) -> Optional[str]:
    """The folder in the CLI's "run folder: <path>" line."""
    match = _RUN_FOLDER.search(log_text)
    return match.group(1) if match else None


def tail(path: Optional[str], lines: int = 40, max_bytes: int = 256 * 1024) -> str:
    """The last lines of a log, without terminal codes; a progress bar redrawn with carriage returns shows its
    latest state."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - max_bytes))
        text = fh.read().decode("utf-8", errors="replace")
    text = _ESCAPES.sub("", text)
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:])


@dataclasses.dataclass(frozen=True)
class Export:
    command_line: str
    returncode: int
    output: str
    result: Optional[str]  # the merged folder (or the checkpoint itself when it holds full weights)


def export_merged(checkpoint: str) -> Export:
    """Run `martlet export --ckpt_dir <checkpoint> --merge_lora true` and wait for it."""
    argv = ["--ckpt_dir", checkpoint, "--merge_lora", "true"]
    done = subprocess.run([sys.executable, "-m", "martlet.cli", "export", *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = done.stdout + done.stderr
    found = {key: path for key, path in re.findall(r"^(merged|source): (.+?)\s*$", done.stdout, re.M)}
    return Export(command_line("export", argv), done.returncode, output, found.get("merged") or found.get("source"))


def resume_argv(argv: list[str], checkpoint: str) -> list[str]:
    """The same arguments with `--resume_from_checkpoint <checkpoint>` (replacing one given before)."""
    kept, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in ("--resume_from_checkpoint", "--resume-from-checkpoint")
        if not skipping:
            kept.append(token)
    return kept + ["--resume_from_checkpoint", checkpoint]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
