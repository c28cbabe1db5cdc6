"""`make upgrade-check`: lora_lab on the newest release of every dependency, on purpose.

Not part of CI. It builds `.venv-latest` from pyproject.toml's dependencies with our upper
bounds lifted (so the release that would break us is the one tried), prints every package whose
version differs from requirements.lock, runs the test suite there and prints what failed.
Exit status: 0 when the tests pass on the newest set, 1 when they do not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-latest"
PY = VENV / "bin" / "python"


def unbounded(spec: str) -> str:
    """``transformers>=4.45,<5.24`` -> ``transformers>=4.45``: lower bounds and exact pins stay."""
    name, _, rest = spec.partition(";")
    match = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)", name)
    pkg, clauses = match.group(1), [c.strip() for c in match.group(2).split(",") if c.strip()]
    kept = [c for c in clauses if not c.startswith(("<", "!=", "~="))]
    return pkg + ",".join(kept) + (f";{rest}" if rest else "")


def pins(lines) -> dict:
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [unbounded(s) for s in project["dependencies"] + project["optional-dependencies"]["test"]]
    if VENV.exists():
        shutil.rmtree(VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print("resolving the newest releases (upper bounds lifted):", ", ".join(wanted), flush=True)
    install = subprocess.run([str(PY), "-m", "pip", "install", "--quiet", "--upgrade", *wanted])
    if install.returncode != 0:
        print("upgrade check: the newest releases cannot be installed together (pip's reason is above)")
        return 1
    subprocess.run([str(PY), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], check=True)
    locked = pins((ROOT / "requirements.lock").read_text().splitlines())
    latest = pins(subprocess.run([str(PY), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.splitlines())
    changed = [(k, locked.get(k, "-"), v) for k, v in sorted(latest.items()) if locked.get(k) != v and k != "lora-lab"]
    print(f"\n{len(changed)} packages differ from requirements.lock:")
    for name, old, new in changed:
        print(f"  {name:28s} {old:>14s} -> {new}")
    print("\nrunning the tests on the newest set ...", flush=True)
    test = subprocess.run([str(PY), "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = test.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    print("\n".join(failed) if failed else "")
    print(f"upgrade check: {lines[-1] if lines else 'pytest printed nothing'}")
    if test.returncode == 0:
        print("the newest set passes: `make lock` can take it (and the upper bounds can move)")
    else:
        print("the newest set breaks the tests above: keep the lock; see each failure with "
              ".venv-latest/bin/python -m pytest -x <test>")
    return 0 if test.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
