"""Shared fixtures: tiny models built from a config (random weights, the SmolLM2 tokenizer), no network."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models train faster in fp32: bf16 autocast only pays off on real matrix sizes. Tests that want
# bf16 on the real model ask for it with --dtype bf16.
os.environ.setdefault("MARTLET_CPU_BF16", "0")
sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: the cores are shared out among the workers (and the processes their tests start), so N
    # training tests never fight over the same cores with spinning thread pools
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(_threads))

from helpers import ARCH_TEMPLATES, build_tiny_model  # noqa: E402


@pytest.fixture
def caplog(caplog):
    """Martlet's logger does not propagate to the root (its lines go to stdout, once): give it caplog's handler,
    so a test sees them whatever ran before it."""
    import logging

    logger = logging.getLogger("martlet")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from martlet.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from martlet.models.loader import load_tokenizer

    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_dir) -> dict[str, str]:
    """arch -> folder of a tiny random model of that architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, str(root / arch), embedded_dir) for arch in ARCH_TEMPLATES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]
