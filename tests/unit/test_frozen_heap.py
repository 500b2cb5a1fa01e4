"""The collector's full passes kept off what a command loaded (`utils.frozen_heap`, `utils.collector_paused`): objects
frozen for the run's time stay alive through collections and are collected once it ends; nested runs leave the end
to the outermost; objects frozen by someone else are left alone; the CLI imports a command with the collector off and
runs it frozen."""

from __future__ import annotations

import gc
import sys
import textwrap
import weakref

import pytest

from martlet import cli
from martlet.utils import collector_paused, frozen_heap


class Node:
    pass


def cycle() -> tuple[Node, weakref.ref]:
    """An object that only the collector can free (it refers to itself), and a weak reference to it."""
    node = Node()
    node.me = node
    return node, weakref.ref(node)


@pytest.fixture(autouse=True)
def nothing_frozen():
    assert gc.get_freeze_count() == 0
    yield
    leftover = gc.get_freeze_count()
    gc.unfreeze()
    assert leftover == 0


def test_what_is_frozen_survives_collections_and_is_collected_after_the_run():
    with frozen_heap() as freeze:
        assert gc.get_freeze_count() > 0  # what was there before the run
        node, frozen = cycle()
        before = gc.get_freeze_count()
        freeze()  # the run's model and data, once loaded
        assert gc.get_freeze_count() > before
        del node
        gc.collect()
        assert frozen() is not None  # frozen: the full pass did not scan it
        young, young_ref = cycle()  # made after the last freeze: collected as usual
        del young
        gc.collect()
        assert young_ref() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert frozen() is None  # back with the collector: nothing left uncollectable


def test_a_nested_run_freezes_more_and_leaves_the_end_to_the_outermost():
    with frozen_heap():
        with frozen_heap() as inner:
            node, frozen = cycle()
            inner()
            del node
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert frozen() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert frozen() is None


def test_objects_frozen_by_someone_else_are_left_alone():
    gc.freeze()
    theirs = gc.get_freeze_count()
    try:
        with frozen_heap() as freeze:
            node, ref = cycle()
            freeze()  # nothing: not ours to freeze into
            del node
            gc.collect()
            assert ref() is None
            assert gc.get_freeze_count() == theirs
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()


def test_collector_paused_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_cli_imports_a_command_without_the_collector_and_runs_it_frozen(tmp_path, monkeypatch):
    (tmp_path / "fake_command.py").write_text(textwrap.dedent("""
        import gc
        SEEN = {"import": gc.isenabled()}

        def main(argv):
            SEEN["run"] = (gc.isenabled(), gc.get_freeze_count(), list(argv))
            return 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command:main", None, "a test command", None))
    assert cli.main(["fake", "--x", "1"]) == 0
    seen = sys.modules["fake_command"].SEEN
    assert seen["import"] is False  # imported with the collector off
    enabled, frozen, argv = seen["run"]
    assert enabled and frozen > 0 and argv == ["--x", "1"]
    assert gc.get_freeze_count() == 0  # given back


def test_a_training_run_freezes_what_it_loaded_before_training_and_gives_it_back(tiny_llama, tmp_path, monkeypatch):
    from martlet.llm import sft_main
    from martlet.train import pipeline

    counts = {}
    for name, key in (("prepare_run", "start"), ("train_and_report", "train")):
        original = getattr(pipeline, name)

        def recorded(*args, _original=original, _key=key, **kwargs):
            counts[_key] = gc.get_freeze_count()
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, recorded)
    result = sft_main(["--model_id_or_path", tiny_llama, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                       "--batch_size", "2", "--dataset", "self-cognition#8", "--model_name", "M",
                       "--model_author", "B"])
    assert result["global_step"] == 1
    assert 0 < counts["start"] < counts["train"]  # the libraries from the start; the model, data, trainer too
    assert gc.get_freeze_count() == 0
