"""The argument reference is generated from the dataclasses: it must be regenerated when a field changes."""

import os

import pytest

from martlet.docgen import render

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_argument_reference_is_current(lang):
    with open(os.path.join(DOCS, lang, "arguments.md"), encoding="utf-8") as fh:
        assert fh.read() == render(lang), "run: python -m martlet.docgen"


def test_reference_lists_every_sft_field():
    import dataclasses

    from martlet.args import SftArguments

    text = render("en")
    for f in dataclasses.fields(SftArguments):
        assert f"`--{f.name}`" in text


def test_every_page_exists_in_english_and_chinese():
    en = sorted(f for f in os.listdir(os.path.join(DOCS, "en")) if f.endswith(".md"))
    zh = sorted(f for f in os.listdir(os.path.join(DOCS, "zh")) if f.endswith(".md"))
    assert en == zh
    for page in ("quickstart.md", "sft.md", "rlhf.md", "infer.md", "export.md", "deploy.md", "app-ui.md",
                 "web-ui.md", "datasets.md", "arguments.md", "from-ms-swift.md", "distributed.md",
                 "performance.md"):
        assert page in en, page


def test_relative_links_point_at_files_that_exist():
    import re

    root = os.path.dirname(DOCS)
    pages = [os.path.join(root, "README.md"), os.path.join(root, "README_zh.md"), os.path.join(root, "examples", "README.md")]
    pages += [os.path.join(DOCS, lang, f) for lang in ("en", "zh") for f in os.listdir(os.path.join(DOCS, lang))]
    for page in pages:
        with open(page, encoding="utf-8") as fh:
            text = fh.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(path), f"{os.path.relpath(page, root)} links to missing {target}"
