"""RewardEngine: statuses, per-item and batch deadlines by killing workers, errors, adversarial math
inputs (Math-Verify#65 style), threads, asyncio, cleanup. Fast: small timeouts, one shared engine."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import os
import threading
import time

import pytest

import rlkit_rewards
from rlkit_rewards import RewardEngine

# Deadlines measured in wall-clock seconds: CI runs these alone, after the parallel pass (marker `serial`).
pytestmark = pytest.mark.serial

ITEM_TIMEOUT = 2.0


# ---- rewards used by the tests (top level: workers import them by reference) ------------------------
def sleepy_reward(prompts, completions, **kw):
    out = []
    for c in completions:
        if "SLEEP" in c:
            while True:
                time.sleep(100)
        out.append(1.0)
    return out


def raising_reward(prompts, completions, **kw):
    if any("RAISE" in c for c in completions):
        raise RuntimeError("boom")
    return [0.5 for _ in completions]


def dying_reward(prompts, completions, **kw):
    if any("DIE" in c for c in completions):
        os._exit(3)
    return [1.0 for _ in completions]


def ids_reward(prompts, completions, completion_ids=None, **kw):
    return [float(len(ids)) for ids in completion_ids]


async def async_reward(prompts, completions, **kw):
    await asyncio.sleep(0)
    return [2.0 for _ in completions]


@pytest.fixture(scope="module")
def engine():
    eng = RewardEngine(num_workers=2, item_timeout=ITEM_TIMEOUT, batch_timeout=30.0)
    eng.score([rlkit_rewards.get("math_accuracy")], ["q"], ["\\boxed{1}"], columns={"answer": ["1"]})  # warm
    yield eng
    eng.close()


def _acc():
    return rlkit_rewards.get("math_accuracy")


# ---- tests -----------------------------------------------------------------------------------------
def test_registry_get_attaches_spec():
    f = rlkit_rewards.get("math_accuracy", rel_tol=1e-3)
    assert f.__rlkit_spec__ == ("math_accuracy", {"rel_tol": 1e-3})


def test_math_batch_statuses(engine):
    completions = ["so \\boxed{4}", "\\boxed{5}", "I don't know", "#### 1,000", "\\boxed{\\frac{1}{2}}", "\\boxed{7}"]
    golds = ["4", "4", "4", "1000", "0.5", None]
    scores, statuses = engine.score([_acc()], ["q"] * 6, completions, columns={"answer": golds})
    assert [s[0] for s in scores[:5]] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert math.isnan(scores[5][0])  # no gold -> None -> NaN
    assert statuses[:5] == ["ok", "wrong", "unparseable", "ok", "ok"]
    assert statuses[5] == "wrong"  # first score not applicable is not "ok"


def test_multiple_funcs_ids_and_async(engine):
    scores, statuses = engine.score([_acc(), ids_reward, async_reward], ["q", "q"], ["\\boxed{2}", "\\boxed{3}"],
                                    completion_ids=[[1, 2, 3], [4]], columns={"answer": ["2", "2"]})
    assert scores == [[1.0, 3.0, 2.0], [0.0, 1.0, 2.0]]
    assert statuses == ["ok", "wrong"]


def test_stuck_item_times_out_and_pool_recovers(engine):
    killed = engine.stats["workers_killed"]
    t0 = time.monotonic()
    scores, statuses = engine.score([sleepy_reward], ["q"] * 3, ["\\boxed{1}", "SLEEP \\boxed{1}", "\\boxed{2}"])
    elapsed = time.monotonic() - t0
    assert statuses == ["ok", "timeout", "ok"]
    assert scores == [[1.0], [0.0], [1.0]]
    assert engine.last_item_seconds[1] < ITEM_TIMEOUT + 1.0
    assert elapsed < ITEM_TIMEOUT + 1.0, elapsed
    assert engine.stats["workers_killed"] == killed + 1
    # the next batch works (replacement worker)
    scores, statuses = engine.score([sleepy_reward], ["q"] * 4, ["\\boxed{1}"] * 4)
    assert statuses == ["ok"] * 4


def test_raising_reward_is_error_other_scores_kept(engine):
    scores, statuses = engine.score([_acc(), raising_reward], ["q", "q"], ["\\boxed{1}", "RAISE \\boxed{1}"],
                                    columns={"answer": ["1", "1"]})
    assert statuses == ["ok", "error"]
    assert scores == [[1.0, 0.5], [1.0, 0.0]]


def test_dead_worker_is_error_and_replaced(engine):
    scores, statuses = engine.score([dying_reward], ["q"] * 3, ["a", "DIE", "b"])
    assert statuses[1] == "error" and scores[1] == [0.0]
    assert scores[0] == [1.0] and scores[2] == [1.0]
    assert engine.score([dying_reward], ["q"], ["c"])[1] == ["ok"]


def test_adversarial_math_inputs_meet_deadline(engine, tmp_path):
    marker = f"/tmp/pwned_{os.getpid()}_{time.time_ns()}"
    adversarial = [
        "\\boxed{5^{5^{5^{5}}}}",
        "\\boxed{9^{9^{9^{9^{9}}}}}",
        "x" * 10**6,
        "\\boxed{" + "x+" * 10**5 + "1} " + "(" * 10**5,
        "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
        "{" * 5000 + "\\boxed{" * 100,
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"The answer is __import__('os').system('touch {marker}')",
        f"#### eval(\"__import__('os').system('touch {marker}')\")",
        f"<answer>exec(\"open('{marker}', 'w')\")</answer>",
    ]
    t0 = time.monotonic()
    scores, statuses = engine.score([_acc()], ["q"] * len(adversarial), adversarial,
                                    columns={"answer": ["3"] * len(adversarial)})
    elapsed = time.monotonic() - t0
    assert all(s == [0.0] for s in scores), list(zip(scores, statuses))
    assert set(statuses) <= {"wrong", "unparseable", "timeout"}
    assert all(t < ITEM_TIMEOUT + 1.0 for t in engine.last_item_seconds), engine.last_item_seconds
    # worst case: every item times out, two workers, plus replacement start-ups
    assert elapsed < len(adversarial) / 2 * (ITEM_TIMEOUT + 2.0), elapsed
    assert not os.path.exists(marker)
    # and each one alone returns within its deadline + 1 s
    for text in adversarial[:2]:
        t0 = time.monotonic()
        _, st = engine.score([_acc()], ["q"], [text], columns={"answer": ["3"]})
        assert engine.last_item_seconds[0] < ITEM_TIMEOUT + 1.0
    assert not os.path.exists(marker)


def test_huge_number_is_not_equal_to_gold(engine):
    # a million-digit number overflows to inf, which must not "equal" the gold under a relative tolerance
    huge = "\\boxed{" + "1" * 10**6 + "}"
    scores, _ = engine.score([_acc()], ["q"], [huge], columns={"answer": ["3"]})
    assert scores == [[0.0]]
    assert _acc()(prompts=["q"], completions=[huge], answer=["3"]) == [0.0]


# ---- adversarial inputs (nesting, power towers, megabyte strings, code payloads) ----------------------
MB = 10**6
NORMAL = (["so \\boxed{4}", "\\boxed{\\frac{1}{2}}", "I give up", "#### 1,000"], ["4", "0.5", "4", "1000"],
          ["ok", "ok", "unparseable", "ok"])


def _assert_pool_usable(eng):
    """A normal batch right after the adversarial one scores correctly and quickly."""
    comps, golds, expected = NORMAL
    t0 = time.monotonic()
    scores, statuses = eng.score([_acc()], ["q"] * len(comps), comps, columns={"answer": golds})
    assert statuses == expected and [s[0] for s in scores] == [1.0, 1.0, 0.0, 1.0]
    assert time.monotonic() - t0 < 15.0  # includes restarting killed workers


def test_adversarial_nesting_towers_and_megabyte_strings_meet_item_deadline(engine):
    """Each item is cut at its deadline (or finishes sooner) and scores 0; new families beyond
    test_adversarial_math_inputs_meet_deadline: brace/sqrt nesting, the 2-tower, a tower that cancels,
    megabyte answers in <answer> tags and "the answer is" lines (math-verify works on them for seconds), and a
    megabyte run of spaces after "The answer is x" (the answer-extraction regex backtracks quadratically)."""
    items = [
        "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",  # deep brace nesting (balanced, so it is extracted)
        "\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "}",
        "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
        "\\boxed{10^{10^{10}} - 10^{10^{10}} + 3}",  # equals the gold only if someone evaluates it
        "<answer>" + "1+" * (MB // 2) + "1</answer>",
        "The answer is " + "x" * MB,
        "The answer is x" + " " * MB + "y",  # quadratic in rlkit_rewards.text's "answer is" pattern: hours in-process
    ]
    t0 = time.monotonic()
    scores, statuses = engine.score([_acc()], ["q"] * len(items), items, columns={"answer": ["3"] * len(items)})
    elapsed = time.monotonic() - t0
    assert all(s == [0.0] for s in scores), list(zip(scores, statuses))
    assert set(statuses) <= {"wrong", "unparseable", "timeout"}, statuses
    assert all(t < ITEM_TIMEOUT + 1.0 for t in engine.last_item_seconds), engine.last_item_seconds
    assert elapsed < 30.0 + 1.0  # the engine's batch deadline
    _assert_pool_usable(engine)


def test_adversarial_batch_meets_batch_deadline_and_pool_recovers():
    """A batch of expensive inputs returns within batch deadline + 1 s, all scored 0, and the same pool then
    scores normally. ``math_accuracy`` now rejects most of these math inputs cheaply (answers far costlier
    than their gold), so two items that never finish (``SLEEP``) make sure the batch deadline and the kills
    are exercised too."""
    items = [
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{\\frac{1}{7} + 0 \\cdot 7^{7^{7^{7}}}}",  # hangs trl's accuracy_reward (str() outside timeouts)
        "\\boxed{(10^{10})!}",
        "\\boxed{" + "\\left(" * 2000 + "1" + "\\right)" * 2000 + "}",
        "\\boxed{" + "[" * 5000 + "1" + "]" * 5000 + "}",
        "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
        "Counting gives $\\boxed{" + "7" * MB + "}$",
        "#### " + "9" * MB,
        "\\boxed{9^9^9^9}",
        "{" * MB + " so \\boxed{",
        "Let me reconsider. " * (MB // 19),
        "SLEEP \\boxed{3}",
        "SLEEP again \\boxed{3}",
    ]
    batch_timeout = 3.0
    with RewardEngine(num_workers=2, item_timeout=ITEM_TIMEOUT, batch_timeout=batch_timeout) as eng:
        eng.score([_acc()], ["q"], ["\\boxed{1}"], columns={"answer": ["1"]})  # start the pool off the clock
        t0 = time.monotonic()
        scores, statuses = eng.score([_acc(), sleepy_reward], ["q"] * len(items), items,
                                     columns={"answer": ["3"] * len(items)})
        elapsed = time.monotonic() - t0
        assert elapsed < batch_timeout + 1.0, elapsed
        math_items = [i for i, c in enumerate(items) if "SLEEP" not in c]
        assert all(scores[i][0] == 0.0 for i in math_items), list(zip(scores, statuses))
        assert {statuses[i] for i in math_items} <= {"wrong", "unparseable", "timeout"}, statuses
        assert statuses[-2:] == ["timeout", "timeout"] and scores[-2:] == [[0.0, 0.0], [0.0, 0.0]]
        assert eng.stats["workers_killed"] >= 2
        assert not any(w.task is not None for w in eng._workers)  # nothing left running
        eng.batch_timeout = 30.0  # replacement workers start inside the next call; don't race that
        _assert_pool_usable(eng)


CODE_PAYLOADS = [
    "\\boxed{__import__('os').system('touch {m}')}",
    "\\boxed{Symbol('x').__class__.__init__.__globals__['__builtins__']['__import__']('os').system('touch {m}')}",
    "\\boxed{sympify(\"__import__('os').system('touch {m}')\")}",
    "\\boxed{S(\"exec(open('{m}', 'w'))\")}",
    "\\boxed{\\text{(lambda: __import__('subprocess').call(['touch', '{m}']))()}}",
    "\\boxed{eval(compile(\"open('{m}','w')\", 'x', 'exec'))}",
    "<answer>getattr(__builtins__, 'exec')(\"open('{m}', 'w')\")</answer>",
    "Final answer: __import__('os').system('touch {m}')",
    "\\boxed{1} and then \\boxed{().__class__.__base__.__subclasses__()}",
    "$\\boxed{\\mathrm{exec}(\\text{open('{m}','w')})}$",
]


def test_code_payloads_never_execute(engine, tmp_path):
    """Answers (and golds) that would run code if anything evaluated them: nothing runs, in the workers or in
    a direct in-process call, everything scores 0, and every item meets its deadline."""
    marker = tmp_path / "PWNED"
    comps = [p.replace("{m}", str(marker)) for p in CODE_PAYLOADS]
    t0 = time.monotonic()
    scores, statuses = engine.score([_acc()], ["q"] * len(comps), comps, columns={"answer": ["3"] * len(comps)})
    assert time.monotonic() - t0 < 30.0 + 1.0
    assert all(t < ITEM_TIMEOUT + 1.0 for t in engine.last_item_seconds)
    assert all(s == [0.0] for s in scores), list(zip(scores, statuses))
    assert set(statuses) <= {"wrong", "unparseable", "timeout"}
    # the payload as the gold answer (a poisoned dataset row), against a matching and a plain completion
    golds = [c for c in comps if "\\boxed{" in c][:4]
    scores, statuses = engine.score([_acc()], ["q"] * 8, golds + ["\\boxed{3}"] * 4,
                                    columns={"answer": golds + golds})
    assert all(t < ITEM_TIMEOUT + 1.0 for t in engine.last_item_seconds)
    assert [s[0] for s in scores[4:]] == [0.0] * 4
    # directly, in this process (how an unpicklable reward or plain TRL would run them)
    assert _acc()(prompts=["q"] * len(comps), completions=comps, answer=["3"] * len(comps)) == [0.0] * len(comps)
    assert not marker.exists() and list(tmp_path.iterdir()) == []
    _assert_pool_usable(engine)


def test_batch_deadline():
    with RewardEngine(num_workers=1, item_timeout=30.0, batch_timeout=2.5, preload=False) as eng:
        t0 = time.monotonic()
        scores, statuses = eng.score([sleepy_reward], ["q"] * 3, ["SLEEP", "a", "b"])
        assert time.monotonic() - t0 < 2.5 + 1.0
        assert statuses == ["timeout"] * 3 and scores == [[0.0]] * 3
        assert eng.score([sleepy_reward], ["q"], ["a"])[1] == ["ok"]  # usable after the batch deadline


def test_score_from_thread(engine):
    out = {}

    def run():
        out["r"] = engine.score([_acc()], ["q", "q"], ["\\boxed{2}", "\\boxed{3}"], columns={"answer": ["2", "2"]})

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out["r"] == ([[1.0], [0.0]], ["ok", "wrong"])


def test_score_inside_asyncio(engine):
    async def main():
        direct = engine.score([_acc(), sleepy_reward], ["q", "q"], ["\\boxed{2}", "SLEEP"],
                              columns={"answer": ["2", "2"]})
        threaded = await asyncio.to_thread(engine.score, [_acc()], ["q"], ["\\boxed{2}"], None, {"answer": ["2"]})
        return direct, threaded

    direct, threaded = asyncio.run(main())
    assert direct[1] == ["ok", "timeout"]
    assert threaded == ([[1.0]], ["ok"])


def test_unpicklable_runs_in_process_with_warning(engine, caplog):
    local = lambda prompts, completions, **kw: [0.25 for _ in completions]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="rlkit_rewards.engine"):
        scores, statuses = engine.score([_acc(), local], ["q", "q"], ["\\boxed{1}", "\\boxed{2}"],
                                        columns={"answer": ["1", "1"]})
        engine.score([local], ["q"], ["x"])
    assert scores == [[1.0, 0.25], [0.0, 0.25]] and statuses == ["ok", "wrong"]
    assert sum("not picklable" in r.message for r in caplog.records) == 1


def test_wrap_is_trl_drop_in(engine):
    wrapped = engine.wrap(_acc())
    assert wrapped(prompts=["q"] * 3, completions=["\\boxed{1}", "\\boxed{2}", "\\boxed{1}"],
                   completion_ids=[[1], [2], [3]], answer=["1", "1", None], trainer_state=object()) == [1.0, 0.0, None]


def test_conversational_completions(engine):
    comps = [[{"role": "assistant", "content": "\\boxed{6}"}], [{"role": "assistant", "content": "hmm"}]]
    scores, statuses = engine.score([_acc()], ["q", "q"], comps, columns={"answer": ["6", "6"]})
    assert statuses == ["ok", "unparseable"]


def test_close_leaves_no_children():
    before = {p.pid for p in mp.active_children()}
    eng = RewardEngine(num_workers=2, item_timeout=ITEM_TIMEOUT, preload=False)
    eng.score([sleepy_reward], ["q"] * 3, ["a", "SLEEP", "b"])
    pids = {w.proc.pid for w in eng._workers}
    assert pids and not (pids & before)
    eng.close()
    alive = {p.pid for p in mp.active_children()}
    assert not (pids & alive)
    for pid in pids:  # reaped, not zombies
        assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(RuntimeError):
        eng.score([sleepy_reward], ["q"], ["a"])


def test_package_import_has_no_torch():
    import subprocess
    import sys

    code = "import sys, rlkit_rewards; from rlkit_rewards import RewardEngine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
