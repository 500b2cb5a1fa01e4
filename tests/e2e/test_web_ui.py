"""`martlet web-ui` in a real browser: headless Chromium (Debian's, driven by Playwright) fills the training form
for a tiny llama and an uploaded dataset, sees the command and starts the real CLI. A second tab watches the
progress bar and the loss curve grow (the first tab is closed: the run goes on), stops the run (a checkpoint is
kept), resumes it in the same folder until it finishes, chats with the last checkpoint and merges it. Bad
settings show the CLI's message and start nothing. A screenshot of each stage goes to $MARTLET_SCREENSHOT_DIR
(default: a tmp folder)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import time
from urllib.parse import urlparse

import pytest

from helpers import write_jsonl

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = os.environ.get("MARTLET_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
TRAINING_S = 90  # seconds a tiny run may take, from its start to its last step

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} "
                                                                       "(apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> str:
    folder = os.environ.get("MARTLET_SCREENSHOT_DIR") or str(tmp_path_factory.mktemp("web-ui-shots"))
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def web_ui(tmp_path):
    """(URL, output folder) of `martlet web-ui --output_dir <tmp>/output` on a free port."""
    from martlet.args.serve import WebUIArguments
    from martlet.ui import webui_runs
    from martlet.ui.webui import launch_web_ui

    output = str(tmp_path / "output")
    demo = launch_web_ui(WebUIArguments(output_dir=output, server_port=free_port()), block=False)
    assert urlparse(demo.local_url).hostname == "127.0.0.1"
    try:
        yield demo.local_url, output
    finally:
        demo.close()
        for job in [j for j in webui_runs.JOBS.values() if j.output_dir == output]:
            if job.process.poll() is None:
                job.process.kill()
                job.process.wait()
            webui_runs.JOBS.pop(job.id)


@pytest.fixture
def data(tmp_path) -> str:
    rows = [{"query": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(24)]
    return write_jsonl(tmp_path / "arith.jsonl", rows)


def open_page(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT)
    outside: list[str] = []

    def local_only(route):  # the page works offline: nothing leaves 127.0.0.1
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", local_only)
    page.outside = outside
    page.goto(url)
    page.locator("#webui-start").wait_for()
    return page


def shoot(page, folder: str, name: str, at: str | None = None) -> None:
    if at:
        page.locator(at).scroll_into_view_if_needed()
    else:
        page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=os.path.join(folder, f"{name}.png"))


def choose(page, elem_id: str, value: str) -> None:
    """Type a value into a dropdown that accepts its own values, and confirm it."""
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Enter")
    box.blur()


def set_number(page, name: str, value) -> None:
    box = page.locator(f"#webui-{name} :is(input[type=number], textarea)")
    box.fill(str(value))
    box.press("Tab")


def fill_form(page, model: str, dataset: str | None = None, upload: str | None = None, **numbers) -> list[str]:
    """Fill the form; the argv of the command the page then shows."""
    command = page.locator("#webui-command textarea")
    choose(page, "webui-model", model)
    expect(command).to_have_value(re.compile(re.escape(f"--model_id_or_path {model}")))
    if dataset:
        choose(page, "webui-datasets", dataset)
        expect(command).to_have_value(re.compile(re.escape(f" {dataset}")))
    if upload:
        page.locator("#webui-upload input[type=file]").set_input_files(upload)
        expect(page.locator("#webui-datasets")).to_contain_text(os.path.basename(upload))
    for name, value in numbers.items():
        set_number(page, name, value)
    for name, value in numbers.items():
        expect(command).to_have_value(re.compile(rf"--{name} {value}\b"))
    return shlex.split(command.input_value())


def progress_text(page) -> str:
    return page.locator("#webui-progress").inner_text()


def wait_for(condition, timeout_s: float, what: str, page=None):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f"; the page shows: {progress_text(page)!r}" if page else "")
        time.sleep(0.2)
    return value


def run_folders(output: str) -> list[str]:
    from martlet.ui.webui_runs import find_runs

    return find_runs(output)


WATCH = """() => {
    window.steps = []; window.curves = [];
    const record = () => {
        const text = document.querySelector('#webui-progress .webui-progress-text');
        if (text) window.steps.push(text.innerText);
        const lines = [...document.querySelectorAll('#webui-curve .mark-line path')].map(p => p.getAttribute('d'));
        if (lines.length) window.curves.push(lines.join(' '));
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                         attributes: true});
}"""


def test_train_watch_stop_resume_chat_and_export(browser, web_ui, tiny_llama, data, shots):
    from martlet.ui import webui_runs

    url, output = web_ui
    page = open_page(browser, url)
    argv = fill_form(page, tiny_llama, upload=data, max_steps=30, logging_steps=1, eval_steps=10)
    kept = argv[argv.index("--dataset") + 1]
    assert kept.startswith(os.path.join(output, "web-ui", "uploads")) and kept.endswith("arith.jsonl")
    assert argv == ["martlet", "sft", "--model_id_or_path", tiny_llama, "--dataset", kept, "--max_steps", "30",
                    "--eval_steps", "10", "--logging_steps", "1", "--output_dir", output]
    preview = page.locator("#webui-preview")
    expect(preview).to_contain_text("What is 0 plus 0?")  # as Martlet's loader reads it: file:line, roles
    expect(preview).to_contain_text("arith.jsonl:1")
    expect(preview).to_contain_text("assistant: 0 plus 0 is 0.")
    shoot(page, shots, "1-settings")

    page.locator("#webui-start").click()
    expect(page.locator("#webui-message")).to_contain_text("Started job", timeout=20_000)
    (first,) = [j for j in webui_runs.JOBS.values() if j.output_dir == output]
    assert first.argv == argv[2:]

    watcher = open_page(browser, url)  # a second tab sees the same run...
    watcher.evaluate(WATCH)
    expect(watcher.locator("#webui-runs input")).to_have_value(re.compile("running"), timeout=20_000)
    page.close()  # ...and closing the first one stops nothing
    wait_for(lambda: webui_runs.progress(webui_runs.read_records(first.find_run_dir()))[0] >= 1, TRAINING_S,
             "a step", watcher)  # read from the run folder, to stop early whatever the page's refresh rate
    watcher.locator("#webui-stop").click()
    expect(watcher.locator("#webui-message")).to_contain_text("Sent SIGINT")
    expect(watcher.locator("#webui-progress")).to_contain_text("stopped", timeout=60_000)
    assert first.process.returncode == 130, "the run ended before the stop reached it"
    (run_dir,) = run_folders(output)
    checkpoint = webui_runs.checkpoints(run_dir)[0]  # saved on the signal
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 1 <= stopped_at < 30
    expect(watcher.locator("#webui-status")).to_contain_text(f"checkpoint-{stopped_at} is kept")
    shoot(watcher, shots, "2-stopped", at="#webui-status")

    watcher.locator("#webui-resume").click()
    expect(watcher.locator("#webui-message")).to_contain_text(f"--resume_from_checkpoint {checkpoint}",
                                                              timeout=20_000)
    second = next(j for j in webui_runs.JOBS.values() if j is not first)
    assert second.argv == first.argv + ["--resume_from_checkpoint", checkpoint]
    expect(watcher.locator("#webui-runs input")).to_have_value(re.compile(r"\(resumed\)"), timeout=20_000)
    wait_for(lambda: "step 30 / 30" in progress_text(watcher), TRAINING_S, "the last step", watcher)
    # after the last step: the final evaluation, the checkpoint and the curves (20 s was too short on a loaded host)
    expect(watcher.locator("#webui-progress")).to_contain_text("finished", timeout=TRAINING_S * 1000)
    assert second.process.returncode == 0 and second.run_dir == run_dir  # the same folder, continued
    assert "resuming" in open(second.log).read() and run_folders(output) == [run_dir]
    logged = [r["step"] for r in webui_runs.read_records(run_dir) if "loss" in r]
    assert logged == list(range(1, 31))  # steps 1..k, then k+1..30: continued, not restarted
    steps = {s.split(" · ")[0] for s in watcher.evaluate("window.steps") if "/ 30" in s}
    assert len(steps) >= 3 and "step 30 / 30" in steps, f"the progress did not move: {steps}"
    curves = [c for c in watcher.evaluate("window.curves") if c and "NaN" not in c]
    assert len(set(curves)) >= 2, "the loss curve was drawn once, not updated"
    last = os.path.join(run_dir, "checkpoint-30")
    expect(watcher.locator("#webui-status")).to_contain_text(run_dir)
    expect(watcher.locator("#webui-log")).to_contain_text(f"last_model_checkpoint: {last}")
    shoot(watcher, shots, "3-finished", at="#webui-curve")

    expect(watcher.locator("#webui-checkpoint input")).to_have_value(last)
    set_number(watcher, "max-new", 12)
    set_number(watcher, "temperature", 1)  # the random model's greedy reply is only newlines
    watcher.locator("#webui-chat-input textarea").fill("What is 2 plus 2?")
    watcher.locator("#webui-send").click()
    bot = watcher.locator('#webui-chatbot [data-testid="bot"]')
    expect(bot).to_have_count(1, timeout=60_000)
    expect(watcher.locator("#webui-chat-note")).to_contain_text("Chatting with", timeout=60_000)
    wait_for(lambda: bot.inner_text().strip(), 10, "a reply")
    shoot(watcher, shots, "4-chat", at="#webui-chatbot")

    watcher.locator("#webui-export").click()
    merged = last + "-merged"
    expect(watcher.locator("#webui-exported")).to_contain_text(f"Merged model: {merged}", timeout=90_000)
    assert os.path.isfile(os.path.join(merged, "config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(merged))
    shoot(watcher, shots, "5-export", at="#webui-exported")
    assert watcher.outside == []


def test_bad_settings_show_the_message_and_start_nothing(browser, web_ui, tiny_llama, data, shots):
    from martlet.ui import webui_runs

    url, output = web_ui
    page = open_page(browser, url)
    start = page.locator("#webui-start")
    message = page.locator("#webui-message")
    fill_form(page, tiny_llama, dataset=data, learning_rate=0)
    start.click()
    expect(message).to_contain_text("Not started: field 'learning_rate': must be greater than 0 (got 0.0).")
    set_number(page, "learning_rate", "")
    fill_form(page, "/no/such/model")
    start.click()
    expect(message).to_contain_text("Not started: /no/such/model: field 'model_id_or_path': model folder not found.")
    shoot(page, shots, "6-invalid", at="#webui-message")
    fill_form(page, tiny_llama, dataset="no-such-set")
    start.click()
    expect(message).to_contain_text("Not started: field 'dataset': unknown dataset 'no-such-set'.")
    assert not [j for j in webui_runs.JOBS.values() if j.output_dir == output]
    assert not os.path.exists(output)  # no run folder, no log: nothing was started
    expect(page.locator("#webui-status")).to_contain_text("No runs yet")
