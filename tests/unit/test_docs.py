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
