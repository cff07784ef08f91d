"""``rlkit quickstart``: the offline demo. Runs ``recipes/quickstart.yaml`` (tiny model, SFT, then
GRPO on the synthetic arithmetic task) and prints held-out accuracy before and after RL."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .pipeline import run_recipe
from .recipe import load_recipe

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def run_quickstart(output_dir: str = "runs/quickstart", overrides: list[str] | None = None, fresh: bool = False) -> dict:
    if fresh and Path(output_dir).exists():
        shutil.rmtree(output_dir)
    t0 = time.time()
    recipe = load_recipe(QUICKSTART, [f"output_dir={output_dir}", *(overrides or [])])
    results = {r["stage"]: r for r in run_recipe(recipe)}
    wall = time.time() - t0
    sft, rl = results.get("sft", {}), results.get("grpo", {})
    before = (rl.get("before") or sft.get("after") or {}).get("pass@1")
    after = (rl.get("after") or {}).get("pass@1")
    print("\n=== rlkit quickstart ===")
    if sft.get("after"):
        print(f"held-out accuracy after SFT      : {sft['after']['pass@1']:.3f}")
    if before is not None:
        print(f"held-out accuracy before RL      : {before:.3f}")
    if after is not None:
        print(f"held-out accuracy after GRPO     : {after:.3f}  ({after - before:+.3f} from RL)")
    if rl.get("plot"):
        print(f"plot                             : {rl['plot']}")
    print(f"wall time                        : {wall:.0f} s")
    return {"before_rl": before, "after_rl": after, "wall_seconds": wall, "results": results}
