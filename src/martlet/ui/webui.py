"""`martlet web-ui`: train, watch, chat and export in the browser.

parse -> validate -> build the page -> serve it on 127.0.0.1 (by default) until Ctrl-C. The page holds no
training logic: it turns a form into a `martlet sft|dpo|orpo|grpo ...` command (webui_form), starts that command
as a subprocess and watches its run folder (webui_runs). The jobs live in the server, not in the page: every
tab sees the same runs, and closing a tab (or stopping the server) does not stop a run.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import os
import threading
from typing import Any, Sequence

from martlet.args.base import Arguments, parse_cli
from martlet.args.infer import InferArguments
from martlet.args.serve import WebUIArguments
from martlet.data.sources import dataset_registry
from martlet.dryrun import local_template
from martlet.errors import MartletError
from martlet.infer.load import load_engine
from martlet.models.registry import all_models
from martlet.ui import webui_form as form
from martlet.ui import webui_runs as runs
from martlet.ui.app import serve_page
from martlet.ui.chat import Settings, reply_stream
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")
TICK_S = 1.0  # how often the page reads the runs again
FORM = ("model_id_or_path", "sft_type", "dataset", *form.HYPERPARAMETERS)  # form fields, in command-line order
WATCHED = ("runs", "status", "progress", "curve", "eval_curve", "reward_curve", "log", "checkpoint", "arguments")
_engine: dict[str, Any] = {}  # the checkpoint being chatted with, shared by the tabs: {"path", "engine"}
_engine_lock = threading.Lock()


def chat_engine(checkpoint: str):
    """The inference engine of `checkpoint` (`martlet infer --ckpt_dir`'s), loaded once and kept."""
    with _engine_lock:
        if _engine.get("path") != checkpoint:
            _engine.clear()  # let the previous model go before loading the next
            _engine.update(path=checkpoint, engine=load_engine(InferArguments(ckpt_dir=checkpoint).validate()))
        return _engine["engine"]


# what the page shows (plain functions of the form and the run folders) -----------------------------------
def form_argv(output_dir: str, method: str, extra: str, *values: Any) -> list[str]:
    fields = dict(zip(FORM, values))
    fields["model_id_or_path"] = (fields["model_id_or_path"] or "").strip() or None
    return form.build_argv(method, {**fields, "output_dir": output_dir}, extra)


def show_command(output_dir: str, method: str, extra: str, *values: Any) -> tuple[str, str]:
    try:
        return form.command_line(method, form_argv(output_dir, method, extra, *values)), ""
    except MartletError as exc:
        return "", f"⚠️ {exc}"


def preview(output_dir: str, method: str, extra: str, *values: Any):
    """The first rows of the datasets as training reads them, a note on the ones that cannot be read, and
    the first row as training encodes it with its loss spans marked (HTML)."""
    import pandas as pd

    datasets = dict(zip(FORM, values))["dataset"] or []
    try:
        args = parse_cli(form.COMMANDS[method], form_argv(output_dir, method, extra, *values))
    except MartletError:
        args = None  # the preview still shows what it can; Start reports the error
    rows, notes = [], []
    for spec in datasets:
        try:
            found = form.preview_rows(method, spec, args)
        except MartletError as exc:
            notes.append(f"⚠️ {exc}")
            continue
        if not found:
            notes.append(f"`{spec}` is on the hub: the run downloads it.")
        rows += found[: 5 - len(rows)]
    header, cells = form.preview_table(rows)
    return pd.DataFrame(cells, columns=header), "\n\n".join(notes), mask_html(method, args, rows)


def mask_html(method: str, args: Arguments | None, rows: list[dict[str, Any]]) -> str:
    """The first previewed row as the run's template encodes it, the spans that carry loss in <mark>
    (Template.show: the labels themselves); '' when there is no sft row, a note when the model is not here."""
    if method != "sft" or args is None or not rows:
        return ""
    row = rows[0]
    try:
        template = local_template(args)
        shown = template.show(row["text"] if row.get("text") is not None else row["messages"], style="html")
    except MartletError as exc:
        return f'<div class="webui-mask-note">{html.escape(f"Loss mask not shown: {exc}")}</div>'
    where = html.escape(os.path.basename(row.get("where") or "row 1"))
    return (f'<div class="webui-mask-note">{where} as template <code>{html.escape(template.template_type)}</code> '
            'encodes it; the highlighted text carries loss:</div>'
            '<pre style="white-space:pre-wrap;font-size:12px;margin:4px 0;border:1px solid '
            f'var(--border-color-primary);border-radius:4px;padding:6px">{shown.rstrip()}</pre>')


def status_text(entry: runs.Entry | None, output_dir: str, ckpts: list[str]) -> str:
    if entry is None:
        return "No runs yet."
    job = entry.job
    lines = [f"**{entry.label(output_dir)}**"]
    if job is not None:
        lines.append(f"`{form.command_line(job.command, job.argv)}`")
        lines.append(f"log: `{job.log}`")
    if entry.run_dir:
        lines.append(f"run folder: `{entry.run_dir}`")
    if ckpts:
        lines.append(f"newest checkpoint: `{os.path.basename(ckpts[0])}`")
    if job is not None and job.status() == "stopped" and ckpts:
        lines.append(f"Stopped: {os.path.basename(ckpts[0])} is kept; Resume continues from it.")
    return "\n\n".join(lines)


def progress_html(entry: runs.Entry | None, records: list[dict[str, Any]]) -> str:
    step, total = runs.progress(records)
    words = [f"step {step} / {total}" if total else "waiting for the first logged step"]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if losses:
        words.append(f"loss {losses[-1]:.4f}")
    if evals:
        words.append(f"eval_loss {evals[-1]:.4f}")
    if entry is not None and entry.job is not None:
        words.append(entry.job.status())
    bar = f'<progress value="{step}" max="{total or 1}" style="width:100%;height:16px"></progress>'
    return f'{bar}<div class="webui-progress-text">{html.escape(" · ".join(words))}</div>'


def log_html(text: str) -> str:
    """The log's newest lines in a box that stays scrolled to its end (column-reverse: no script needed)."""
    return ('<div style="max-height:300px;overflow:auto;display:flex;flex-direction:column-reverse;'
            'border:1px solid var(--border-color-primary);border-radius:4px;padding:6px">'
            f'<pre style="margin:0;white-space:pre-wrap;font-size:12px">{html.escape(text)}</pre></div>')


def curve_frame(records: list[dict[str, Any]], series: str):
    import pandas as pd

    points = [(step, value) for step, name, value in runs.curve(records) if name == series]
    return pd.DataFrame(points, columns=["step", series]) if points else None


def reward_frame(records: list[dict[str, Any]]):
    """GRPO's reward curves (one line per reward function, and the total); None for other runs."""
    import pandas as pd

    points = runs.reward_curve(records)
    return pd.DataFrame(points, columns=["step", "reward function", "reward"]) if points else None


def watch(output_dir: str, key: str | None, current_ckpt: str | None, seen: dict | None):
    """Everything the runs panel shows for the selected run; parts unchanged since `seen` are skipped, so
    that a tick does not redraw (or close) what the user is looking at."""
    import gradio as gr

    found = runs.entries(output_dir)
    entry = next((e for e in found if e.key == key), found[0] if found else None)
    run_dir = entry.run_dir if entry else None
    records, ckpts = runs.read_records(run_dir), runs.checkpoints(run_dir)
    saved, _ = runs.run_arguments(run_dir)
    log = runs.tail(entry.job.log if entry and entry.job else None) or "(no log from this page for this run)"
    seen = seen or {}
    same_run = seen.get("key") == (entry.key if entry else None)
    # a checkpoint the user picked stays picked; else the newest one is shown
    picked = same_run and current_ckpt not in (None, seen.get("auto")) and os.path.isdir(current_ckpt)
    keep = current_ckpt if picked else None
    newest = ckpts[0] if ckpts else None
    choices = [(e.label(output_dir), e.key) for e in found]
    values = {
        "runs": gr.update(choices=choices, value=entry.key if entry else None),
        "status": status_text(entry, output_dir, ckpts),
        "progress": progress_html(entry, records),
        "curve": curve_frame(records, "loss"),
        "eval_curve": curve_frame(records, "eval_loss"),
        "reward_curve": reward_frame(records),
        "log": log_html(log),
        "checkpoint": gr.update(choices=ckpts, value=keep or newest),
        "arguments": saved or None,
    }
    marks = {"runs": (tuple(choices), entry.key if entry else None), "curve": (run_dir, len(records)),
             "eval_curve": (run_dir, len(records)), "reward_curve": (run_dir, len(records)), "checkpoint": (run_dir, tuple(ckpts), keep),
             "arguments": (run_dir, bool(saved))}  # the text parts are their own marks
    marks = {k: repr(marks.get(k, values[k])) for k in WATCHED}
    old = seen.get("marks", {})
    shown = [gr.skip() if old.get(k) == marks[k] else values[k] for k in WATCHED]
    return (*shown, {"key": entry.key if entry else None, "marks": marks, "auto": None if keep else newest})


def start(output_dir: str, method: str, extra: str, *values: Any):
    """Validate like the CLI, then start it; (message, selected run)."""
    import gradio as gr

    try:
        argv = form_argv(output_dir, method, extra, *values)
        form.check(method, argv)
    except MartletError as exc:
        return f"⚠️ Not started: {exc}", gr.skip()
    job = runs.start_job(output_dir, method, argv)
    return f"Started job `{job.id}`: `{form.command_line(method, argv)}`", _select(output_dir, job.id)


def _select(output_dir: str, key: str):
    """The run list with `key` selected."""
    import gradio as gr

    return gr.update(choices=[(e.label(output_dir), e.key) for e in runs.entries(output_dir)], value=key)


def stop(output_dir: str, key: str | None) -> str:
    entry = next((e for e in runs.entries(output_dir) if e.key == key), None)
    if entry is None or entry.job is None or not entry.job.stop():
        return "⚠️ This run is not running."
    return "Sent SIGINT: the run finishes its step, saves a checkpoint and stops."


def resume(output_dir: str, key: str | None):
    """The selected run's command again, from its newest checkpoint."""
    import gradio as gr

    entry = next((e for e in runs.entries(output_dir) if e.key == key), None)
    ckpts = runs.checkpoints(entry.run_dir if entry else None)
    if entry is None or not ckpts:
        return "⚠️ This run has no checkpoint to resume from.", gr.skip()
    if entry.job is not None and entry.job.status() == "running":
        return "⚠️ This run is still running: stop it first.", gr.skip()
    if entry.job is not None:
        command, argv = entry.job.command, entry.job.argv
    else:
        saved, run_command = runs.run_arguments(entry.run_dir)
        command, argv = form.saved_command(saved, run_command)
    argv = runs.resume_argv(argv, ckpts[0])
    try:
        form.check(command, argv)
    except MartletError as exc:
        return f"⚠️ Cannot resume: {exc}", gr.skip()
    job = runs.start_job(output_dir, command, argv)
    return f"Resumed as job `{job.id}`: `{form.command_line(command, argv)}`", _select(output_dir, job.id)


def respond(message: str, turns: list, checkpoint: str | None, max_new_tokens: float, temperature: float):
    """Chat with the checkpoint: (box, chat shown, history, note), streamed."""
    import gradio as gr

    if not message or not message.strip():
        yield "", turns, turns, gr.skip()
        return
    if not checkpoint:
        yield message, turns, turns, "⚠️ Pick a checkpoint first."
        return
    shown = turns + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    yield "", shown, turns, f"Loading `{checkpoint}` …"
    try:
        engine = chat_engine(checkpoint)
    except MartletError as exc:
        yield message, turns, turns, f"⚠️ {exc}"
        return
    settings = Settings("", int(max_new_tokens), float(temperature), 1.0)
    for reply in reply_stream(engine, turns, message, settings):
        shown[-1] = {"role": "assistant", "content": reply}
        yield "", shown, turns, f"Chatting with `{checkpoint}`"
    yield "", shown, shown, f"Chatting with `{checkpoint}`"


def export(checkpoint: str | None):
    if not checkpoint:
        yield "⚠️ Pick a checkpoint first."
        return
    yield f"Merging: `{form.command_line('export', ['--ckpt_dir', checkpoint, '--merge_lora', 'true'])}` …"
    done = runs.export_merged(checkpoint)
    if done.returncode == 0 and done.result:
        yield f"Merged model: `{done.result}`\n\nby `{done.command_line}`"
    else:
        last = "\n".join(done.output.strip().splitlines()[-12:])
        yield f"⚠️ Export failed (exit {done.returncode}): `{done.command_line}`\n\n```\n{last}\n```"


# the page -------------------------------------------------------------------------------------------------
def _help(method: str, name: str) -> str:
    field = next(f for f in dataclasses.fields(form.COMMANDS[method]) if f.name == name)
    return field.metadata.get("help", "")


def _dataset_choices(method: str) -> list[str]:
    if method == "grpo":  # prompts with a checked answer (the built-in rewards read `solution`)
        return [name for name, entry in dataset_registry().items() if entry.get("builtin") == "math"]
    return [name for name, entry in dataset_registry().items() if method == "sft" or entry.get("preference")]


def _number(name: str, default: Any):
    """A number field; one whose default is "none" (the CLI then decides) is a text box left empty."""
    import gradio as gr

    if default is None:  # a gr.Number cannot be empty: the page would send 0
        return gr.Textbox("", label=name, info=_help("sft", name), placeholder="default", elem_id=f"webui-{name}")
    return gr.Number(default, label=name, info=_help("sft", name), precision=0 if isinstance(default, int) else None,
                     elem_id=f"webui-{name}")


def _form_section(output_dir: str) -> dict[str, Any]:
    """Model, method, data (with its preview), hyperparameters, the command and Start."""
    import gradio as gr

    base = form.defaults("sft")
    page: dict[str, Any] = {"where": gr.State(output_dir)}
    with gr.Row():
        page["model"] = gr.Dropdown(sorted(all_models()), value=None, allow_custom_value=True, scale=3,
                                    label="Model: a registered type, or type a local folder",
                                    info="Empty: the embedded SmolLM2-135M-Instruct.", elem_id="webui-model")
        page["method"] = gr.Radio(list(form.METHODS), value="sft", label="Method", elem_id="webui-method")
        page["sft_type"] = gr.Radio(["lora", "full"], value=base["sft_type"], label="sft_type",
                                    info=_help("sft", "sft_type"), elem_id="webui-sft-type")
    with gr.Row():
        page["datasets"] = gr.Dropdown(_dataset_choices("sft"), value=[], multiselect=True, allow_custom_value=True,
                                       scale=3, label="Datasets", info=_help("sft", "dataset"),
                                       elem_id="webui-datasets")
        page["upload"] = gr.File(label="Or upload a dataset (.jsonl, .json, .csv)", scale=2, height=120,
                                 file_types=[".jsonl", ".json", ".csv"], elem_id="webui-upload")
    page["table"] = gr.Dataframe(label="First rows, as Martlet reads them", interactive=False, wrap=True,
                                 max_height=260, elem_id="webui-preview")
    page["notes"] = gr.Markdown(elem_id="webui-preview-notes")
    page["mask"] = gr.HTML(elem_id="webui-preview-mask")
    page["numbers"] = []
    with gr.Accordion("Hyperparameters (the CLI's defaults)", open=True):
        for group in (form.HYPERPARAMETERS[:5], form.HYPERPARAMETERS[5:]):
            with gr.Row():
                page["numbers"] += [_number(name, base[name]) for name in group]
        page["extra"] = gr.Textbox(label="More arguments (--name value ...; `martlet sft --help` lists them)",
                                   elem_id="webui-extra")
    start_values = [None, base["sft_type"], [], *(base[name] for name in form.HYPERPARAMETERS)]
    page["command"] = gr.Textbox(show_command(output_dir, "sft", "", *start_values)[0], label="Command",
                                 interactive=False, buttons=["copy"], elem_id="webui-command")
    page["command_note"] = gr.Markdown(elem_id="webui-command-note")
    page["message"] = gr.Markdown(elem_id="webui-message")
    page["start"] = gr.Button("Start", variant="primary", elem_id="webui-start")
    return page


def _runs_section() -> dict[str, Any]:
    """The run list, Stop and Resume, status, progress, the two loss curves, the log and the arguments."""
    import gradio as gr

    page: dict[str, Any] = {}
    gr.Markdown("### Runs")
    with gr.Row():
        page["run"] = gr.Dropdown([], label="Run", allow_custom_value=True, scale=4, elem_id="webui-runs")
        page["stop"] = gr.Button("Stop", scale=1, elem_id="webui-stop")
        page["resume"] = gr.Button("Resume", scale=1, elem_id="webui-resume")
    page["status"] = gr.Markdown(elem_id="webui-status")
    page["progress"] = gr.HTML(elem_id="webui-progress")
    with gr.Row():  # two plots, as the run's own images/: one plot's legend would not grow with the data
        page["curve"] = gr.LinePlot(x="step", y="loss", title="train loss", height=260, elem_id="webui-curve")
        page["eval_curve"] = gr.LinePlot(x="step", y="eval_loss", title="eval loss", height=260,
                                         elem_id="webui-eval-curve")
    page["reward_curve"] = gr.LinePlot(x="step", y="reward", color="reward function", title="rewards (GRPO)",
                                       height=260, elem_id="webui-reward-curve")
    page["log"] = gr.HTML(label="Log (newest lines)", show_label=True, container=True, elem_id="webui-log")
    with gr.Accordion("Arguments of the run (sft_args.json)", open=False):
        page["arguments"] = gr.JSON(elem_id="webui-arguments")
    return page


def _chat_section() -> dict[str, Any]:
    """Chat with a checkpoint, and merge it."""
    import gradio as gr

    page: dict[str, Any] = {}
    gr.Markdown("### Chat with a checkpoint, merge it")
    page["checkpoint"] = gr.Dropdown([], label="Checkpoint (or type a folder)", allow_custom_value=True,
                                     elem_id="webui-checkpoint")
    page["history"] = gr.State([])
    page["chatbot"] = gr.Chatbot(label="Chat", height=300, elem_id="webui-chatbot")
    with gr.Row():
        page["box"] = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="webui-chat-input")
        page["send"] = gr.Button("Send", scale=1, elem_id="webui-send")
        page["max_new"] = gr.Slider(1, 2048, value=256, step=1, label="max_new_tokens", scale=2,
                                    elem_id="webui-max-new")
        page["temperature"] = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)", scale=2,
                                        elem_id="webui-temperature")
    page["chat_note"] = gr.Markdown(elem_id="webui-chat-note")
    page["export"] = gr.Button("Merge LoRA (martlet export --merge_lora true)", elem_id="webui-export")
    page["exported"] = gr.Markdown(elem_id="webui-exported")
    return page


def _wire_form(p: dict[str, Any]) -> None:
    """The command follows the form, the preview follows the data; Start starts."""
    import gradio as gr

    inputs = [p["where"], p["method"], p["extra"], p["model"], p["sft_type"], p["datasets"], *p["numbers"]]
    fields = [p["model"], p["method"], p["sft_type"], p["datasets"], p["extra"], *p["numbers"]]
    gr.on([f.change for f in fields], show_command, inputs, [p["command"], p["command_note"]], show_progress="hidden")
    gr.on([p["datasets"].change, p["method"].change], preview, inputs, [p["table"], p["notes"], p["mask"]],
          show_progress="hidden")
    p["method"].change(lambda m, d: gr.update(choices=_dataset_choices(m), value=d), [p["method"], p["datasets"]],
                       p["datasets"])
    p["upload"].upload(lambda where_, path, d: (gr.update(value=[*d, runs.keep_upload(where_, path)]), None),
                       [p["where"], p["upload"], p["datasets"]], [p["datasets"], p["upload"]])
    p["start"].click(start, inputs, [p["message"], p["run"]])


def _wire_runs_and_chat(demo: Any, p: dict[str, Any]) -> None:
    """Stop, Resume, the tick that watches the runs, the chat and the export."""
    import gradio as gr

    p["stop"].click(stop, [p["where"], p["run"]], p["message"])
    p["resume"].click(resume, [p["where"], p["run"]], [p["message"], p["run"]])
    outputs = [p[name] for name in ("run", "status", "progress", "curve", "eval_curve", "reward_curve", "log",
                                    "checkpoint", "arguments", "seen")]  # WATCHED, then what was seen
    gr.on([demo.load, p["run"].change, p["timer"].tick], watch, [p["where"], p["run"], p["checkpoint"], p["seen"]],
          outputs, show_progress="hidden")
    chat_in = [p["box"], p["history"], p["checkpoint"], p["max_new"], p["temperature"]]
    chat_out = [p["box"], p["chatbot"], p["history"], p["chat_note"]]
    chat_events = [trigger(respond, chat_in, chat_out, concurrency_limit=1, concurrency_id="chat")
                   for trigger in (p["box"].submit, p["send"].click)]
    p["checkpoint"].input(lambda: ([], [], ""), None, [p["chatbot"], p["history"], p["chat_note"]],
                          cancels=chat_events)
    p["export"].click(export, p["checkpoint"], p["exported"], concurrency_limit=1)


def build_web_ui(output_dir: str):
    """The gradio Blocks of the training page (not launched)."""
    import gradio as gr

    with gr.Blocks(title="Martlet web UI", analytics_enabled=False) as demo:
        gr.Markdown(f"## Martlet: train, watch, chat, export\nRuns go to `{os.path.abspath(output_dir)}`.")
        page = _form_section(output_dir)
        page.update(_runs_section())
        page.update(_chat_section())
        page["seen"] = gr.State({})
        page["timer"] = gr.Timer(TICK_S)
        _wire_form(page)
        _wire_runs_and_chat(demo, page)
    return demo


def launch_web_ui(args: WebUIArguments | Sequence[str] | None = None, *, block: bool = True):
    """Serve the training page; returns the launched gradio app (at once when block=False)."""
    setup_logging()
    args = (args if isinstance(args, WebUIArguments) else parse_cli(WebUIArguments, args)).validate()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MartletError("the web UI needs gradio.", hint="pip install 'martlet[ui]'") from None
    demo = build_web_ui(args.output_dir)
    demo.queue(default_concurrency_limit=8)  # ticks of several tabs, a start, a chat and an export together
    where = os.path.abspath(args.output_dir).replace("%", "%%")
    return serve_page(demo, args.server_name, args.server_port, block=block,
                      message=f"training page at %s; runs go to {where} (Ctrl-C stops the page, not the runs)")


def main(argv: Sequence[str] | None = None) -> int:
    launch_web_ui(argv, block=True)
    return 0
