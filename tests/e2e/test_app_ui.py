"""`martlet app-ui` in a real browser: headless Chromium (Debian's, driven by Playwright) opens the chat page
of a tiny model, sends messages and reads the streamed answers, which equal the engine's; Clear empties it.
A screenshot of the page is saved in the test's tmp dir."""

from __future__ import annotations

import os
import re
import socket
import time
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MARTLET_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX = 120  # long enough that the reply arrives in several pieces

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} "
                                                                       "(apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def letters(text: str) -> str:
    """The text without markup or spacing: the page renders replies as markdown."""
    return re.sub(r"[\W_]+", "", text)


@pytest.fixture(scope="module")
def chat_page(tmp_path_factory, embedded_dir):
    """(URL, reference engine) of `martlet app-ui --model_id_or_path <tiny> --temperature 0` on a free port."""
    from martlet.args.infer import InferArguments
    from martlet.args.serve import AppUIArguments
    from martlet.infer.load import load_engine
    from martlet.ui.app import launch_app_ui
    from tests.integration.test_serve import build_noisy_tiny

    folder = build_noisy_tiny(str(tmp_path_factory.mktemp("ui") / "tiny"), embedded_dir)
    demo = launch_app_ui(AppUIArguments(model_id_or_path=folder, dtype="fp32", temperature=0, max_new_tokens=MAX,
                                        server_port=free_port(), title="Tiny chat"), block=False)
    assert urlparse(demo.local_url).hostname == "127.0.0.1"
    try:
        yield demo.local_url, load_engine(InferArguments(model_id_or_path=folder, dtype="fp32"))
    finally:
        demo.close()


WATCH = """() => {
    window.seen = [];
    const bots = () => document.querySelectorAll('#martlet-chatbot [data-testid="bot"]');
    new MutationObserver(() => { const b = bots(); if (b.length) window.seen.push(b[b.length - 1].innerText); })
        .observe(document.querySelector('#martlet-chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def send(page, text: str, expected: str) -> list[str]:
    """Send `text`; wait until the last answer on the page is `expected`; the answer's texts as it grew."""
    page.locator("#martlet-input textarea").wait_for()
    page.evaluate(WATCH)
    page.locator("#martlet-input textarea").fill(text)
    page.locator("#martlet-send").click()
    bots = page.locator('#martlet-chatbot [data-testid="bot"]')
    deadline = time.monotonic() + 60
    while letters(bots.last.get_attribute("aria-label") or "") != letters(f"bot's message: {expected}"):
        assert time.monotonic() < deadline, f"the page shows {bots.last.get_attribute('aria-label')!r}"
        page.wait_for_timeout(100)  # the label holds the raw text (spacing trimmed); the bubble renders markdown
    sync_api.expect(page.locator("#martlet-input textarea")).to_be_editable()
    assert letters(bots.last.inner_text()) == letters(expected)
    return [t for t in page.evaluate("window.seen") if t.strip()]


def test_chat_page_streams_answers_keeps_turns_and_clears(chat_page, tmp_path):
    from martlet.infer.generation import GenConfig

    url, engine = chat_page
    config = GenConfig(max_new_tokens=MAX, temperature=0)
    first = [{"role": "user", "content": "Hello there"}]
    first_reply = engine.generate([first], config)[0].text
    second = first + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "And then?"}]
    second_reply = engine.generate([second], config)[0].text
    pirate = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there"}]
    pirate_reply = engine.generate([pirate], config)[0].text
    assert len({first_reply, second_reply, pirate_reply}) == 3

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            outside: list[str] = []

            def local_only(route):  # the page must work offline: nothing leaves 127.0.0.1
                if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", local_only)
            page.goto(url)
            grew = send(page, "Hello there", first_reply)
            assert len(set(grew)) >= 2, "the answer arrived in one piece: not streamed"
            assert len(letters(grew[0])) < len(letters(first_reply))
            send(page, "And then?", second_reply)  # the second turn sees the first
            assert page.locator('#martlet-chatbot [data-testid="user"]').count() == 2
            page.screenshot(path=str(tmp_path / "app-ui.png"), full_page=True)

            page.locator("#martlet-clear").click()
            sync_api.expect(page.locator('#martlet-chatbot [data-testid="bot"]')).to_have_count(0)
            page.locator("#martlet-settings").get_by_text("Settings", exact=True).click()
            system = page.locator("#martlet-system textarea")
            for _ in range(5):  # the opening accordion mounts the box and can reset a value typed meanwhile
                system.fill("You are a pirate.")
                system.press("Tab")  # leave the box, so the page has taken the value before the next send
                page.wait_for_timeout(700)
                if system.input_value() == "You are a pirate.":
                    break
            sync_api.expect(system).to_have_value("You are a pirate.")
            send(page, "Hello there", pirate_reply)  # a fresh history, with the system prompt
            assert page.locator('#martlet-chatbot [data-testid="user"]').count() == 1
            page.screenshot(path=str(tmp_path / "app-ui-system.png"), full_page=True)
            assert outside == []
        finally:
            browser.close()
    assert (tmp_path / "app-ui.png").stat().st_size > 10_000
