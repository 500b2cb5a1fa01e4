"""The embedded model's conversion is versioned: a cache converted by an older Martlet (a marker without this
version) is converted again, and the folder it replaces is never seen half-deleted."""

import json
import os

from martlet.models import embedded


def _cache_with(monkeypatch, tmp_path, marker):
    """MARTLET_CACHE in tmp_path holding an embedded model folder whose marker is `marker` (None: no marker),
    and a fake conversion that writes 'new' weights and the current marker; returns (target, conversions)."""
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda: "unused.gguf")
    target = os.path.join(str(tmp_path), "models", embedded.EMBEDDED_MODEL_TYPE)
    os.makedirs(target)
    with open(os.path.join(target, "model.safetensors"), "w") as fh:
        fh.write("old")
    if marker is not None:
        with open(os.path.join(target, "martlet_converted.json"), "w") as fh:
            json.dump(marker, fh)
    conversions = []

    def convert(src, out_dir):
        conversions.append(src)
        with open(os.path.join(out_dir, "model.safetensors"), "w") as fh:
            fh.write("new")
        with open(os.path.join(out_dir, "martlet_converted.json"), "w") as fh:
            json.dump({"source": src, "conversion": embedded.CONVERSION}, fh)

    monkeypatch.setattr(embedded, "_convert", convert)
    return target, conversions


def _weights(target):
    with open(os.path.join(target, "model.safetensors")) as fh:
        return fh.read()


def test_a_cache_of_an_older_conversion_is_converted_again(monkeypatch, tmp_path):
    old_marker = {"source": "x.gguf", "model_type": embedded.EMBEDDED_MODEL_TYPE}  # what version 1 wrote
    target, conversions = _cache_with(monkeypatch, tmp_path, old_marker)
    assert embedded.embedded_model_dir() == target
    assert conversions == ["unused.gguf"] and _weights(target) == "new"
    assert os.listdir(os.path.dirname(target)) == [embedded.EMBEDDED_MODEL_TYPE]  # the old copy is gone
    assert embedded.embedded_model_dir() == target and len(conversions) == 1  # now whole: not converted again


def test_a_cache_of_this_conversion_is_kept(monkeypatch, tmp_path):
    target, conversions = _cache_with(monkeypatch, tmp_path, {"conversion": embedded.CONVERSION})
    assert embedded.embedded_model_dir() == target
    assert conversions == [] and _weights(target) == "old"


def test_an_unreadable_marker_is_not_whole(monkeypatch, tmp_path):
    target, conversions = _cache_with(monkeypatch, tmp_path, None)
    with open(os.path.join(target, "martlet_converted.json"), "w") as fh:
        fh.write("{half")
    assert embedded.embedded_model_dir() == target
    assert conversions == ["unused.gguf"] and _weights(target) == "new"
