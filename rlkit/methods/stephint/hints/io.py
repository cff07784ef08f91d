"""StepHint hints files: jsonl rows (``write_hints`` / ``read_hints``), repair of a half-written last line and the
``<out>.meta.json`` settings file that ``rlkit hints build`` resumes against. See ``docs/methods/stephint.md``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .config import HintError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Files


def write_hints(path, rows: list[dict], append: bool = False) -> None:
    """Write ``rows`` as jsonl (``append``: add to the end of an existing file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


_REQUIRED = ("question", "reference", "steps", "hints")


def read_hints(path) -> list[dict]:
    """Rows of a hints jsonl file. A half-written last line (an interrupted build) is skipped with a warning;
    any other bad line, or a row missing ``question``/``reference``/``steps``/``hints``, is an error."""
    p = Path(path)
    if not p.is_file():
        raise HintError(f"hints file {str(p)!r} not found")
    text = p.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: an interrupted write
                log.warning("%s: ignoring the half-written last line", p)
                continue
            raise HintError(f"{p}: line {i + 1} is not valid JSON ({e})") from None
        missing = [k for k in _REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise HintError(f"{p}: line {i + 1} is not a hints row (missing {', '.join(missing)})")
        rows.append(row)
    return rows


def _repair_tail(p: Path) -> None:
    """Drop a half-written last line so that appending continues a valid jsonl file."""
    if not p.is_file() or p.stat().st_size == 0:
        return
    data = p.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        p.write_bytes(data + b"\n")
    except ValueError:
        log.warning("%s: dropping a half-written last line", p)
        print(f"rlkit hints: dropping a half-written last line of {p}", file=sys.stderr)
        p.write_bytes(data[:cut])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")
