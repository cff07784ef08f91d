"""Shared fixtures for the rlkit test suite.

Everything here runs on CPU with no network: tiny Llama models are built from a config with the
character-level tokenizer, and the real benchmark files come from ``$RLKIT_DATA_DIR`` or
``../shared/data`` beside the repository (tests that need them skip cleanly when absent).

Constants and helpers that are not fixtures are imported by the test modules: ``from conftest import
TINY_SHAPE, subprocess_env, result_fields`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# No downloads in tests: fail fast instead of waiting on network timeouts (CI may override).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("gsm8k_train.jsonl", "gsm8k_test.jsonl", "math500_test.jsonl", "aime24_test.jsonl",
              "amc23_test.jsonl")

TINY_SHAPE: dict[str, int] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
"""The tiny Llama shape of most CPU tests (head_dim 16, 2 query heads per KV head): a recipe's ``model.tiny``
section as it is, or ``TinyModelSpec(**TINY_SHAPE)``. Not to be changed in place: a variant is
``dict(TINY_SHAPE, num_hidden_layers=4)``."""

SUBPROCESS_ENV: dict[str, str] = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""What the scripts the tests start (benches, ``python -m rlkit``) get on top of this process's environment."""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a script a test starts: this process's, :data:`SUBPROCESS_ENV` (offline, no
    tokenizer threads), then ``extra``."""
    return {**os.environ, **SUBPROCESS_ENV, **extra}


def result_fields(stdout: str) -> dict[str, str]:
    """The ``key=value`` figures of a bench's output, whose last non-blank line must be its ``RESULT`` line."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "bench printed nothing"
    last = lines[-1]
    assert last.startswith("RESULT "), f"last line is not a RESULT line: {last!r}"
    return dict(re.findall(r"(\w+)=(\S+)", last))


def _data_dir() -> Path:
    env = os.environ.get("RLKIT_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def _fail_on_own_deprecations(item):
    """Run a test phase collecting the deprecation warnings that rlkit's code or the test itself caused
    (``rlkit.compat.record_own_deprecations``); fail it when there is one, unless it is marked
    ``allow_deprecated`` (a test that calls an old name on purpose)."""
    from rlkit.compat import record_own_deprecations

    with record_own_deprecations() as caught:
        result = yield
    if caught and item.get_closest_marker("allow_deprecated") is None:
        pytest.fail("a deprecated dependency API was called from rlkit or the test (use rlkit.compat so both "
                    "names work):\n" + "\n".join(dict.fromkeys(caught)), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _fail_on_own_deprecations(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _fail_on_own_deprecations(item))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each: the full quickstart) run only when asked for, with ``-m long`` (or any
    ``-m`` expression naming it) or ``RLKIT_LONG_TESTS=1``; otherwise they are reported as skipped, not dropped."""
    if "long" in (config.getoption("markexpr") or "") or os.environ.get("RLKIT_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long test (minutes): run with `pytest -m long` or RLKIT_LONG_TESTS=1")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with the real benchmark jsonl files; skips the test when it is absent."""
    d = _data_dir()
    if not d.is_dir():
        pytest.skip(f"shared benchmark data not found at {d} (set RLKIT_DATA_DIR)")
    return d


@pytest.fixture
def data_file(data_dir):
    """``data_file("gsm8k_test.jsonl")`` -> its path, skipping when that one file is missing."""

    def get(name: str) -> Path:
        p = data_dir / name
        if not p.is_file():
            pytest.skip(f"{p} not found")
        return p

    return get


@pytest.fixture(scope="session")
def char_tokenizer():
    from rlkit.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_spec():
    """:data:`TINY_SHAPE` as a ``TinyModelSpec`` (hidden 64, 2 layers): keeps CPU tests to seconds."""
    from rlkit.recipe import TinyModelSpec

    return TinyModelSpec(**TINY_SHAPE)


@pytest.fixture
def tiny_model(tiny_spec, char_tokenizer):
    """A fresh randomly initialised tiny model (seed 0) and the char tokenizer."""
    from rlkit.models import build_tiny_model

    return build_tiny_model(tiny_spec, char_tokenizer, seed=0), char_tokenizer


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(rows, name="rows.jsonl")`` -> path of a jsonl file under tmp_path."""
    import json

    def write(rows: list[dict], name: str = "rows.jsonl") -> Path:
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    return write
