"""The dependency lock: `requirements/lock.txt` lists every package of the test environment with its version.

    python scripts/lock.py check VENV        exit 1 unless VENV holds exactly the locked packages and versions
    python scripts/lock.py diff VENV         print what VENV has that differs from the lock (the newest-versions
                                             check's report), exit 0
    python scripts/lock.py write VENV        write VENV's packages as the new lock

`make install` installs with `pip install -c requirements/lock.txt` and then runs `check`; `make lock` runs the
whole suite on the newest releases (`make test-latest`) and only then `write`s them. Martlet itself is never in
the lock, and torch is written without its local label (`2.13.0`, which pip matches to the CPU wheel on disk).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
HEADER = """\
# Every package of Martlet's test environment with its version: `make install` installs exactly these
# (pip install -c), then checks the environment against this file. Regenerate with `make lock`, which writes it
# only after the whole suite passed on the newest releases that pyproject.toml allows (docs/en/dependencies.md).
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(venv: str) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as pip spells it, version without a local label), Martlet excluded."""
    python = Path(venv) / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable",
                          "--disable-pip-version-check"], check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        name, _, version = line.partition("==")
        if version and canonical(name) != "martlet":
            found[canonical(name)] = (name, version.split("+")[0])
    return found


def locked(path: Path = LOCK) -> dict[str, tuple[str, str]]:
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {line!r}")
        found[canonical(name)] = (name.strip(), version.strip())
    return found


def differences(have: dict, want: dict) -> list[str]:
    rows = []
    for key in sorted(have.keys() | want.keys()):
        if key not in want:
            rows.append(f"  + {have[key][0]}=={have[key][1]}  (not in the lock)")
        elif key not in have:
            rows.append(f"  - {want[key][0]}=={want[key][1]}  (locked, not installed)")
        elif have[key][1] != want[key][1]:
            rows.append(f"  ~ {want[key][0]}: locked {want[key][1]}, installed {have[key][1]}")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "diff", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    command, venv = argv
    have = installed(venv)
    if command == "write":
        LOCK.parent.mkdir(exist_ok=True)
        LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in
                                         sorted(have.values(), key=lambda item: canonical(item[0]))))
        print(f"wrote {LOCK} ({len(have)} packages)")
        return 0
    rows = differences(have, locked())
    if command == "diff":
        print(f"{venv} against {LOCK.name}: " + (f"{len(rows)} differ" if rows else "the same versions"))
        print("\n".join(rows))
        return 0
    if rows:
        print(f"{venv} does not hold the locked versions ({LOCK}):\n" + "\n".join(rows), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
