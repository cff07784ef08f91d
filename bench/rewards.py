"""Reward scoring: rlkit's ``RewardEngine`` against ``trl.rewards.accuracy_reward`` on the same completions.

Completions are built deterministically (``--seed``) from the shared GSM8K test and MATH-500 golds and
wrapped in chain-of-thought text (the dataset's own worked solution, calculator annotations and boxes
removed): *right* (the boxed gold, about a third of them in an equivalent surface form: ``\\$18``,
``1,234``, ``18.00``, ``\\dfrac``, ``a/b``, ``\\left( .. \\right)``, respaced), *wrong* (a near-miss number,
a changed digit, another problem's gold), *unparseable* (reasoning cut off or left unfinished, no final
answer line; some MATH solutions state the answer in prose, "The answer is $X.$", and both verifiers may
read that) and 2% *adversarial* (deep brace / parenthesis / ``\\frac`` nesting, power towers such as
``10^{10^{10^{10}}}`` and ``9^9^9^9``, ``(10^{10})!``, 1 MB strings, and answers that would run code if
anything evaluated them, e.g. ``__import__('os').system('touch MARKER')``). Completions come in groups of
8 per problem, as ``GRPOTrainer`` lays out a batch (``--group``).

Both sides get the same inputs, batch by batch (``--batch-size``, 64 as in a GRPO step): conversational
completions ``[{"role": "assistant", "content": ...}]`` (the format ``accuracy_reward`` requires), the
question as the prompt, and one gold column ``solution`` (TRL's column name; the rlkit reward is
``rlkit_rewards.get("math_accuracy", gold_column="solution")``). The gold is written in math delimiters
(``$18$``, ``$\\frac{14}{3}$``): TRL runs math-verify's default ``parse`` on it, which finds nothing (reward
None) in 51 of the 500 bare MATH-500 answers and misreads others (``\\frac{14}{3}`` alone), but parses all
500 in delimiters.

- rlkit: ``RewardEngine(num_workers=2, item_timeout=5, batch_timeout=60)``; each batch is one
  ``engine.score`` call timed in this process (so inter-process traffic, kills and worker replacement
  are charged). The pool start (first ``score`` on a 2-item batch: spawn, imports, math-verify warm-up)
  is timed separately and reported both ways (``speedup`` without it, ``speedup_cold`` with it).
- TRL: ``accuracy_reward(prompts=..., completions=..., solution=..., log_extra=...)`` called as
  ``GRPOTrainer`` calls it, on the main thread (so math-verify's SIGALRM timeouts, 10 s parse and 5 s
  verify, are active) of a helper process; only the call itself is timed, inside that process.
  ``accuracy_reward`` can hang for good: it calls ``str()`` on the parsed answer outside any timeout, and
  sympy's printer evaluates ``0 \\cdot 7^{7^{7^{7}}}`` numerically. The helper is therefore given a cap
  per batch (``--trl-cap`` s plus ``--trl-cap-adv`` s per adversarial item in the batch, more than TRL's
  own timeouts allow); a batch past it is killed, charged the cap (a lower bound: TRL would not
  have returned) and flagged, and its items are re-scored in a fresh helper (not timed: the normal items
  together, each adversarial item alone) to get their verdicts; an item that passes its cap again is
  reported as ``hung``.

Sides alternate ABBA per batch. Reported: total wall of each side, ``speedup`` = TRL / rlkit (also on
the batches where TRL finished, and on adversarial-free batches), the worst batch time of each side,
the verdict agreement on the non-adversarial items (right / wrong / none, TRL's None being its own
verdict), every disagreement with gold, both extracted answers, both verdicts and a category with a
one-line explanation, the status and time of every adversarial item on both sides, and checks that no
rlkit batch exceeded its batch deadline + 1 s, no item its item deadline + 1 s, no adversarial item
scored, and no marker file was created.

    python bench/rewards.py                  # 2,000 completions (40 adversarial), batch 64
    python bench/rewards.py --quick          # under 3 minutes on 2 cores: 384 completions (8 adversarial)
    python bench/rewards.py --smoke          # seconds: 64 completions (1 adversarial), for the tests
    python bench/rewards.py --out rewards_bench.json   # also write every item and disagreement as JSON
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import add_out, bench_parser, data_dir, preset_of, print_result  # noqa: E402

PRESETS = {
    #        completions  batch
    "smoke": (64, 32),
    "quick": (384, 64),
    "full": (2000, 64),
}
ADV_FRACTION = 0.02
KIND_SHARES = (("right", 0.45), ("wrong", 0.35), ("unparseable", 0.20))  # of the non-adversarial items


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _strip_boxes(text: str) -> str:
    """``\\boxed{X}`` -> ``X`` (balanced braces), so the reasoning carries no final answer of its own."""
    out, i = [], 0
    while True:
        j = text.find("\\boxed", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        k = text.find("{", j)
        if k < 0:
            out.append(text[i:])
            return "".join(out)
        depth, end = 0, None
        for e in range(k, len(text)):
            if text[e] == "{":
                depth += 1
            elif text[e] == "}":
                depth -= 1
                if depth == 0:
                    end = e
                    break
        if end is None:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        out.append(text[k + 1:end])
        i = end + 1


def load_problems(data_dir: Path) -> dict[str, list[dict]]:
    gsm, mth = [], []
    with open(data_dir / "gsm8k_test.jsonl") as f:
        for line in f:
            r = json.loads(line)
            steps, gold = r["answer"].rsplit("####", 1)
            steps = re.sub(r"<<[^>]*>>", "", steps).strip()
            gsm.append({"question": r["question"], "gold": gold.strip().replace(",", ""), "reasoning": steps})
    with open(data_dir / "math500_test.jsonl") as f:
        for line in f:
            r = json.loads(line)
            mth.append({"question": r["problem"], "gold": r["answer"].strip(),
                        "reasoning": _strip_boxes(r["solution"]).strip()})
    return {"gsm8k": gsm, "math500": mth}


# --------------------------------------------------------------------------------------------------
# completions
# --------------------------------------------------------------------------------------------------
OPENERS = ["Let's think step by step.\n\n", "To solve this problem, let me work through it carefully.\n\n",
           "<think>\nOkay, let me work through this.\n", "", "We need to find the answer.\n\n"]
FINALS = ["Therefore, the final answer is $\\boxed{%s}$.", "So the answer is \\boxed{%s}.",
          "**Final Answer**\n\\[\n\\boxed{%s}\n\\]", "The final answer is $\\boxed{%s}$. I hope it is correct.",
          "Putting it all together, we get $\\boxed{%s}$."]
UNFINISHED = ["Hmm, wait. Let me reconsider the second step, something does not add up here.",
              "I am not sure how to finish this; I would need to check the problem statement again.",
              "This is getting complicated. Let me try a different approach from the start."]
_INT = re.compile(r"-?\d+")
_FRAC = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


def _right_form(source: str, gold: str, question: str, rng: random.Random) -> tuple[str, str]:
    """The gold itself (about two thirds) or an equivalent surface form of it; returns (variant, text)."""
    if rng.random() < 0.65:
        return "plain", gold
    forms = []
    if _INT.fullmatch(gold):
        if abs(int(gold)) >= 1000:
            forms.append(("thousands", f"{int(gold):,}"))
        forms.append(("decimal", gold + ".00" if source == "gsm8k" else gold + ".0"))
        if source == "gsm8k" and "$" in question:
            forms.append(("dollar", "\\$" + gold))
    if "\\frac" in gold:
        forms.append(("dfrac", gold.replace("\\frac", "\\dfrac")))
    m = _FRAC.fullmatch(gold)
    if m:
        forms.append(("slash", f"{m.group(1)}{m.group(2)}/{m.group(3)}"))
    if gold.startswith("\\left(") or (gold.startswith("(") and gold.endswith(")") and "\\left" not in gold):
        inner = gold[1:-1] if gold.startswith("(") else gold
        if gold.startswith("("):
            forms.append(("left_right", "\\left(" + inner + "\\right)"))
    if " " in gold:
        forms.append(("respaced", gold.replace(" ", "")))
    elif "," in gold:
        forms.append(("respaced", gold.replace(",", ", ")))
    if not forms:
        return "plain", gold
    return rng.choice(forms)


def _wrong_form(source: str, gold: str, pool: list[dict], rng: random.Random) -> tuple[str, str]:
    if _INT.fullmatch(gold):
        g = int(gold)
        for _ in range(10):
            w = rng.choice([g + rng.choice([-10, -2, -1, 1, 2, 10]), g * 2, g // 2, g + 100])
            if w != g:
                return "near_miss", str(w)
    if rng.random() < 0.5 and re.search(r"\d", gold):
        idx = [i for i, c in enumerate(gold) if c.isdigit()]
        i = rng.choice(idx)
        d = str((int(gold[i]) + rng.randint(1, 8)) % 10)
        if not (d == "0" and (i == 0 or not gold[i - 1].isdigit()) and i + 1 < len(gold) and gold[i + 1].isdigit()):
            return "digit_changed", gold[:i] + d + gold[i + 1:]
    for _ in range(50):
        other = rng.choice(pool)["gold"]
        if other.replace(" ", "") != gold.replace(" ", ""):
            return "other_gold", other
    return "near_miss", gold + "+1"


def _cot(p: dict, opener: str) -> str:
    return opener + p["reasoning"]


def _close_think(opener: str) -> str:
    return "\n</think>\n\n" if opener.startswith("<think>") else "\n\n"


def adversarial_kinds(marker_dir: str) -> list[tuple[str, str]]:
    """(kind, completion text) in the order they are cycled through: cheap and expensive ones mixed, so a
    short run still meets several families. ``marker_dir``: where a code payload would create a file."""
    mk = lambda name: os.path.join(marker_dir, name)  # noqa: E731
    mb = 10**6
    return [
        ("code_import", f"Let me compute it directly. \\boxed{{__import__('os').system('touch {mk('import')}')}}"),
        ("tower_10", "The value is astronomically large: $\\boxed{10^{10^{10^{10}}}}$."),
        ("zero_times_tower", "Simplifying, the answer is $\\boxed{\\frac{1}{7} + 0 \\cdot 7^{7^{7^{7}}}}$."),
        ("mb_filler", "Let me reconsider. " * (mb // 19) + "I could not finish."),
        ("nest_brace", "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}"),
        ("code_eval", f"So the answer is \\boxed{{eval(\"__import__('os').system('touch {mk('eval')}')\")}}. "
                      f"The answer is exec(\"open('{mk('exec')}', 'w')\")."),
        ("tower_9_flat", "Hence $\\boxed{9^9^9^9}$."),
        ("mb_digits", "Counting carefully gives $\\boxed{" + "7" * mb + "}$."),
        ("mb_spaces", "The answer is x" + " " * mb + "y"),  # quadratic in rlkit_rewards.text's "answer is" regex
        ("code_sympify", "\\boxed{Symbol('x').__class__.__init__.__globals__['__builtins__']['__import__']"
                         f"('os').system('touch {mk('sympify')}')}}"),
        ("tower_9", "We get $\\boxed{9^{9^{9^{9}}}}$."),
        ("nest_paren", "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}"),
        ("factorial", "The count is $\\boxed{(10^{10})!}$."),
        ("tower_5", "So $\\boxed{5^{5^{5^{5}}}}$ (Math-Verify#65)."),
        ("nest_frac", "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}"),
        ("mb_braces", "{" * mb + " so the answer is \\boxed{"),
        ("code_lambda", f"<answer>\\text{{(lambda: __import__('subprocess').call(['touch', '{mk('lambda')}']))()}}"
                        "</answer>"),
    ]


def build_items(problems: dict[str, list[dict]], n: int, seed: int, marker_dir: str, group: int = 8,
                adv_fraction: float = ADV_FRACTION) -> list[dict]:
    """``n`` completions in groups of ``group`` per problem (GRPO's generations per prompt), seeded."""
    rng = random.Random(seed)
    n_adv = max(1, round(adv_fraction * n)) if n >= 20 and adv_fraction > 0 else 0
    rest = n - n_adv
    counts = [int(rest * share) for _, share in KIND_SHARES]
    counts[0] += rest - sum(counts)
    kinds = ["adversarial"] * n_adv + [k for (k, _), c in zip(KIND_SHARES, counts) for _ in range(c)]
    rng.shuffle(kinds)
    adv = adversarial_kinds(marker_dir)
    items, adv_seen = [], 0
    for idx, kind in enumerate(kinds):
        if idx % group == 0:
            source = "gsm8k" if rng.random() < 0.55 else "math500"
            p = rng.choice(problems[source])
        opener = rng.choice(OPENERS)
        item = {"idx": idx, "source": source, "kind": kind, "question": p["question"], "gold": p["gold"]}
        if kind == "adversarial":
            item["variant"], item["text"] = adv[adv_seen % len(adv)]
            adv_seen += 1
        elif kind == "right":
            item["variant"], ans = _right_form(source, p["gold"], p["question"], rng)
            item["text"] = _cot(p, opener) + _close_think(opener) + rng.choice(FINALS) % ans
            item["answer_written"] = ans
        elif kind == "wrong":
            item["variant"], ans = _wrong_form(source, p["gold"], problems[source], rng)
            item["text"] = _cot(p, opener) + _close_think(opener) + rng.choice(FINALS) % ans
            item["answer_written"] = ans
        else:
            cot = _cot(p, opener)
            if rng.random() < 0.6:  # cut off by the generation length limit
                item["variant"] = "truncated"
                item["text"] = cot[: max(20, int(len(cot) * rng.uniform(0.3, 0.8)))]
            else:
                item["variant"] = "unfinished"
                item["text"] = cot + "\n\n" + rng.choice(UNFINISHED)
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------------
# TRL side: a helper process running accuracy_reward on its main thread
# --------------------------------------------------------------------------------------------------
def _trl_helper(conn) -> None:
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its warnings quote 1 MB inputs
    from trl.rewards import accuracy_reward

    accuracy_reward([[{"role": "assistant", "content": "\\boxed{1}"}]], ["$1$"])  # warm-up
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        prompts, completions, golds = msg
        extra: dict[str, list] = {}
        c0, t0 = time.process_time(), time.perf_counter()
        rewards = accuracy_reward(prompts=prompts, completions=completions, solution=golds,
                                  log_extra=lambda name, values: extra.__setitem__(name, values))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        answers = [str(a)[:200] for a in extra.get("answer_parsed", [""] * len(completions))]
        conn.send((rewards, answers, dt, cpu))


class TRLSide:
    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None
        self.restarts = 0
        self.crashes = 0

    def start(self) -> float:
        t0 = time.perf_counter()
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_trl_helper, args=(child,), daemon=True, name="trl-reward-helper")
        self.proc.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(120) or self.conn.recv()[0] != "ready":
            raise RuntimeError("TRL helper did not start")
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
            self.conn.close()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (OSError, ValueError):
                pass
            self.kill()

    def run(self, prompts, completions, golds, cap: float):
        """``(rewards, answers, seconds, cpu_seconds)``, or None when the call passed ``cap`` seconds (helper killed
        and restarted)."""
        self.conn.send((prompts, completions, golds))
        if self.conn.poll(cap):
            try:
                return self.conn.recv()
            except (EOFError, OSError):  # the helper died (memory, a crash in C code): like a hang, flagged
                self.crashes += 1
        self.kill()
        self.restarts += 1
        self.start()
        return None


def _rescore_hung(trl: TRLSide, chunk: list[dict], cap: float, cap_adv: float) -> None:
    """Verdicts for the items of a batch TRL did not finish: the normal items together, each adversarial
    item alone; a group that passes its cap again is split into single items; a single item that passes
    its cap is ``hung``."""

    def run(group: list[dict], limit: float) -> None:
        res = trl.run([it["prompt"] for it in group], [it["completion"] for it in group],
                      [it["solution"] for it in group], limit)
        if res is not None:
            for it, r, ans in zip(group, res[0], res[1]):
                it["trl_reward"], it["trl_answer"] = r, ans
        elif len(group) == 1:
            group[0]["trl_reward"], group[0]["trl_answer"] = "hung", f"[hung > {limit:.0f} s]"
        else:
            for it in group:
                run([it], limit)

    normal = [it for it in chunk if it["kind"] != "adversarial"]
    if normal:
        run(normal, cap)
    for it in chunk:
        if it["kind"] == "adversarial":
            run([it], cap_adv)


class _EngineCPU:
    """CPU seconds the engine's processes spend during one ``score`` call: this process, the live workers
    (``/proc``) and the workers reaped during the call (``RUSAGE_CHILDREN``; the TRL helper is not reaped
    while the engine scores)."""

    def __init__(self, engine):
        import resource

        self._resource, self.engine = resource, engine
        self.t0 = time.process_time()
        self.children0 = self._children()
        self.live0 = self._live()

    def _children(self) -> float:
        r = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def _live(self) -> dict[int, float]:
        out = {}
        for w in list(self.engine._workers):
            try:
                with open(f"/proc/{w.proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[w.proc.pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, AttributeError):
                pass
        return out

    def spent(self) -> float:
        live1 = self._live()
        return (time.process_time() - self.t0 + self._children() - self.children0
                + sum(live1.values()) - sum(self.live0.values()))


# --------------------------------------------------------------------------------------------------
# verdicts and disagreements
# --------------------------------------------------------------------------------------------------
def rlkit_verdict(score: float, status: str) -> str:
    if status in ("timeout", "error"):
        return status
    if math.isnan(score):
        return "none"
    return "right" if score > 0 else "wrong"


def trl_verdict(reward) -> str:
    if reward == "hung":
        return "hung"
    if reward is None:
        return "none"
    return "right" if reward > 0 else "wrong"


EXPLAIN = {
    "trl_gold_none": "TRL's default parse of the gold found nothing, so accuracy_reward returned None (row skipped)",
    "trl_no_extraction": "TRL extracted no answer: its LaTeX-only extraction (boxed first, no un-anchored fallback) "
                         "could not parse the boxed content, so it scored 0",
    "trl_strict_latex": "TRL parsed the answer but math-verify judged it unequal: TRL turns off malformed-operator "
                        "repair (\\frac43, \\sqrt2 shorthand) and only normalises units, rlkit normalises first",
    "trl_period_in_math": "the answer is stated in prose with the sentence period inside the math ('the answer is "
                          "$X.$'): rlkit strips the period, TRL keeps it, cannot parse 'X.' as LaTeX and scores 0",
    "trl_thousands": "math-verify reads a thousands separator ('1,234') as a tuple/list, so TRL scores a right "
                     "answer 0; rlkit treats it as one number",
    "trl_unanchored": "no final answer in the completion; TRL still picked a math expression from the text "
                      "(an intermediate result) that equals the gold",
    "rlkit_false_negative": "rlkit scored an equivalent answer 0 (verdict bug candidate in rlkit_rewards.math)",
    "rlkit_false_positive": "rlkit scored a non-equivalent answer 1 (verdict bug candidate in rlkit_rewards.math)",
    "trl_false_positive": "TRL scored a non-equivalent answer 1",
    "constructed_equal": "the constructed 'wrong' answer is mathematically equal to the gold; rlkit is right",
    "rlkit_timeout": "rlkit's item deadline fired on a non-adversarial item",
    "rlkit_error": "the rlkit reward raised on a non-adversarial item",
    "trl_hung": "TRL never returned on this item",
    "other": "not classified automatically; see the row",
}


def categorize(item: dict, rv: str, tv: str, trl_answer: str) -> str:
    if tv == "none":
        return "trl_gold_none"
    if rv in ("timeout", "error"):
        return f"rlkit_{rv}"
    if tv == "hung":
        return "trl_hung"
    kind, variant = item["kind"], item["variant"]
    if rv == "right" and tv == "wrong":
        if kind == "wrong":
            return "rlkit_false_positive"
        if variant == "thousands":
            return "trl_thousands"
        if trl_answer.startswith("[unparseable]"):
            return "trl_no_extraction"
        if re.search(r"\.'\]$", trl_answer):
            return "trl_period_in_math"
        return "trl_strict_latex"
    if rv == "wrong" and tv == "right":
        if kind == "unparseable":
            return "trl_unanchored"
        if kind == "right":
            return "rlkit_false_negative"
        return "trl_false_positive"
    return "other"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def _short(s, n: int = 70) -> str:
    s = "None" if s is None else str(s)
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 15] + f"...({len(s)} chars)"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, quick="384 completions, under 3 minutes on 2 cores",
                     smoke="64 completions, seconds, for the test suite")
    p.add_argument("--n", type=int, help="completions (default: 2000 full, 384 quick, 64 smoke)")
    p.add_argument("--batch-size", type=int, help="completions per scoring call (default 64; smoke 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", type=int, default=8, help="completions per problem (GRPO generations per prompt)")
    p.add_argument("--adv-fraction", type=float, default=ADV_FRACTION,
                   help="share of adversarial completions (default 0.02; 0 measures normal scoring alone)")
    p.add_argument("--workers", type=int, default=2, help="rlkit engine worker processes")
    p.add_argument("--item-timeout", type=float, default=5.0, help="rlkit engine per-item deadline (s)")
    p.add_argument("--batch-timeout", type=float, default=60.0, help="rlkit engine per-batch deadline (s)")
    p.add_argument("--trl-cap", type=float, default=15.0, help="TRL helper: seconds per batch before it counts "
                                                               "as hung, plus --trl-cap-adv per adversarial item")
    p.add_argument("--trl-cap-adv", type=float, default=15.0,
                   help="default 15: TRL's own timeouts allow one item 10 s of parsing and 5 s of verify")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with gsm8k_test.jsonl and math500_test.jsonl")
    add_out(p, "write every item, disagreement and figure to this JSON file", type=Path)
    p.add_argument("--verbose", action="store_true", help="keep the workers' stderr (math-verify warnings quote "
                                                          "the 1 MB inputs); by default it goes to a temp file")
    a = p.parse_args(argv)
    preset = preset_of(a)
    n, batch = PRESETS[preset]
    n, batch = a.n or n, a.batch_size or batch
    data = a.data_dir or data_dir()
    if not (data / "gsm8k_test.jsonl").is_file() or not (data / "math500_test.jsonl").is_file():
        p.error(f"gsm8k_test.jsonl / math500_test.jsonl not found in {data} (--data-dir or RLKIT_DATA_DIR)")

    stderr_log = None
    saved_err = None
    if not a.verbose:  # children inherit fd 2: math-verify's timeout warnings echo whole 1 MB inputs
        sys.stderr.flush()
        stderr_log = tempfile.NamedTemporaryFile(prefix="rlkit_rewards_bench_", suffix=".stderr", delete=False)
        saved_err = os.dup(2)
        os.dup2(stderr_log.fileno(), 2)
    try:
        return _run(a, preset, n, batch, data, stderr_log)
    finally:
        if saved_err is not None:
            sys.stderr.flush()
            os.dup2(saved_err, 2)
            os.close(saved_err)


def _run(a, preset: str, n: int, batch: int, data_dir: Path, stderr_log) -> int:
    import rlkit_rewards
    from rlkit_rewards import RewardEngine
    from rlkit_rewards.text import completion_text, extract_answer

    logging.getLogger("rlkit_rewards.engine").setLevel(logging.ERROR)  # one warning per kill otherwise
    t_start = time.perf_counter()
    marker_dir = tempfile.mkdtemp(prefix="rlkit_bench_marker_")
    items = build_items(load_problems(data_dir), n, a.seed, marker_dir, a.group, a.adv_fraction)
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    kinds = Counter(it["kind"] for it in items)
    print(f"rewards [{preset}]: {len(items)} completions ({kinds['right']} right, {kinds['wrong']} wrong, "
          f"{kinds['unparseable']} unparseable, {kinds['adversarial']} adversarial; seed {a.seed}) in "
          f"{len(batches)} batches of {batch} ({a.group} completions per problem); rlkit RewardEngine({a.workers} "
          f"workers, item_timeout {a.item_timeout:g} s, batch_timeout {a.batch_timeout:g} s) vs "
          f"trl.rewards.accuracy_reward; "
          f"{os.cpu_count()} CPUs", flush=True)
    load0 = os.getloadavg()[0]
    print(f"load average before: {load0:.2f}" + (" (other processes compete for the cores: absolute times are "
                                                  "inflated; sides alternate ABBA so the ratio is less affected)"
                                                  if load0 > 0.5 else ""), flush=True)

    for it in items:
        it["completion"] = [{"role": "assistant", "content": it["text"]}]
        it["prompt"] = [{"role": "user", "content": it["question"]}]
        it["solution"] = f"${it['gold']}$"

    trl = TRLSide()
    trl_start_s = trl.start()
    reward = rlkit_rewards.get("math_accuracy", gold_column="solution")
    engine = RewardEngine(num_workers=a.workers, item_timeout=a.item_timeout, batch_timeout=a.batch_timeout)
    t0 = time.perf_counter()
    engine.score([reward], ["q", "q"], ["\\boxed{1}", "\\boxed{\\frac{1}{2}}"], columns={"solution": ["$1$", "$0.5$"]})
    pool_start_s = time.perf_counter() - t0
    print(f"rlkit pool start (spawn {a.workers} workers, imports, math-verify warm-up, first 2-item batch): "
          f"{pool_start_s:.2f} s", flush=True)
    print(f"trl helper start (imports, one warm-up call; not charged to TRL): {trl_start_s:.2f} s", flush=True)
    killed0 = engine.stats["workers_killed"]

    rl_times, trl_times, trl_hung, rl_cpu, trl_cpu = [], [], [], [], []
    rerun_s = 0.0
    try:
        for b, chunk in enumerate(batches):
            prompts = [it["prompt"] for it in chunk]
            completions = [it["completion"] for it in chunk]
            golds = [it["solution"] for it in chunk]
            n_adv = sum(it["kind"] == "adversarial" for it in chunk)
            cap = a.trl_cap + a.trl_cap_adv * n_adv
            order = ("rlkit", "trl") if b % 4 in (0, 3) else ("trl", "rlkit")
            line = {}
            for side in order:
                if side == "rlkit":
                    cpu = _EngineCPU(engine)
                    t = time.perf_counter()
                    scores, statuses = engine.score([reward], prompts, completions, columns={"solution": golds})
                    dt = time.perf_counter() - t
                    rl_times.append(dt)
                    rl_cpu.append(cpu.spent())
                    for it, s, st, secs in zip(chunk, scores, statuses, engine.last_item_seconds):
                        it["rlkit_score"], it["rlkit_status"], it["rlkit_item_s"] = s[0], st, secs
                    line["rlkit"] = f"rlkit {dt:6.2f} s"
                else:
                    res = trl.run(prompts, completions, golds, cap)
                    if res is not None:
                        rewards, answers, dt, cpu = res
                        trl_times.append(dt)
                        trl_cpu.append(cpu)
                        trl_hung.append(False)
                        for it, r, ans in zip(chunk, rewards, answers):
                            it["trl_reward"], it["trl_answer"] = r, ans
                        line["trl"] = f"trl {dt:6.2f} s"
                    else:
                        trl_times.append(cap)
                        trl_hung.append(True)
                        line["trl"] = f"trl >= {cap:.0f} s (HUNG: killed at the cap)"
                        t = time.perf_counter()
                        _rescore_hung(trl, chunk, a.trl_cap, a.trl_cap_adv)  # verdicts, not timed
                        rerun_s += time.perf_counter() - t
            adv = [it["variant"] for it in chunk if it["kind"] == "adversarial"]
            print(f"batch {b + 1}/{len(batches)} ({len(chunk)} items, {n_adv} adversarial{': ' if adv else ''}"
                  f"{','.join(adv)}): {line['rlkit']}, {line['trl']}", flush=True)
    finally:
        killed = engine.stats["workers_killed"] - killed0
        engine.close()
        trl.close()

    # ---- figures ---------------------------------------------------------------------------------------
    rl_total, trl_total = sum(rl_times), sum(trl_times)
    speedup = trl_total / rl_total
    speedup_cold = trl_total / (rl_total + pool_start_s)
    fin = [i for i, h in enumerate(trl_hung) if not h]
    speedup_fin = sum(trl_times[i] for i in fin) / sum(rl_times[i] for i in fin) if fin else float("nan")
    clean = [i for i, chunk in enumerate(batches) if not any(it["kind"] == "adversarial" for it in chunk)]
    speedup_clean = sum(trl_times[i] for i in clean) / sum(rl_times[i] for i in clean) if clean else float("nan")
    worst_rl, worst_trl = max(rl_times), max(trl_times)

    for it in items:
        it["rlkit_verdict"] = rlkit_verdict(it["rlkit_score"], it["rlkit_status"])
        it["trl_verdict"] = trl_verdict(it["trl_reward"])
        if it["kind"] == "adversarial":  # not needed, and this process has no deadline to protect it
            it["rlkit_answer"] = "-"
            continue
        ans = extract_answer(completion_text(it["completion"]))
        it["rlkit_answer"] = None if ans is None else ans[:200]
    normal = [it for it in items if it["kind"] != "adversarial"]
    agree = [it for it in normal if it["rlkit_verdict"] == it["trl_verdict"]]
    agreement = len(agree) / len(normal) if normal else float("nan")
    disagreements = []
    for it in normal:
        if it["rlkit_verdict"] != it["trl_verdict"]:
            cat = categorize(it, it["rlkit_verdict"], it["trl_verdict"], it["trl_answer"])
            disagreements.append({"idx": it["idx"], "source": it["source"], "kind": it["kind"],
                                  "variant": it["variant"], "gold": it["gold"], "rlkit_answer": it["rlkit_answer"],
                                  "trl_answer": it["trl_answer"],
                                  "rlkit": f"{it['rlkit_verdict']} ({it['rlkit_status']})",
                                  "trl": it["trl_verdict"], "category": cat, "explanation": EXPLAIN[cat]})

    adv_items = [it for it in items if it["kind"] == "adversarial"]
    markers = sorted(os.listdir(marker_dir))
    shutil.rmtree(marker_dir, ignore_errors=True)
    batch_ok = all(t <= a.batch_timeout + 1.0 for t in rl_times)
    item_ok = all(not (it["rlkit_item_s"] > a.item_timeout + 1.0) for it in items)
    adv_scored_rl = sum(it["rlkit_score"] > 0 for it in adv_items)
    adv_scored_trl = sum(it["trl_reward"] not in (0.0, None, "hung") for it in adv_items)

    print(f"rlkit total wall: {rl_total:.2f} s without pool start, {rl_total + pool_start_s:.2f} s with it "
          f"(pool start {pool_start_s:.2f} s); workers killed {killed}")
    hung_note = f", {sum(trl_hung)} batch(es) HUNG and charged the cap" if any(trl_hung) else ""
    print(f"trl total wall: {trl_total:.2f} s (accuracy_reward calls only{hung_note})")
    print(f"speedup trl/rlkit: {speedup:.2f}x without pool start, {speedup_cold:.2f}x with it "
          f"(target >= 2: {'ok' if speedup >= 2 else 'BELOW'})")
    print(f"speedup on the {len(fin)} batches TRL finished: {speedup_fin:.2f}x; on the {len(clean)} "
          f"adversarial-free batches: {speedup_clean:.2f}x")
    print(f"worst batch: rlkit {worst_rl:.2f} s (batch deadline {a.batch_timeout:g} s + 1 s: "
          f"{'ok' if batch_ok else 'EXCEEDED'}), trl {worst_trl:.2f} s"
          f"{' (a hung batch, charged the cap)' if any(trl_hung) else ''}")
    print(f"scoring CPU seconds (all processes of a side; less sensitive to other load): rlkit "
          f"{sum(rl_cpu):.2f} s (parent + workers, incl. replacement start-ups), trl {sum(trl_cpu):.2f} s "
          f"(on the {len(trl_cpu)} finished batches)")
    print(f"median batch: rlkit {sorted(rl_times)[len(rl_times) // 2]:.3f} s, "
          f"trl {sorted(trl_times)[len(trl_times) // 2]:.3f} s")
    if rerun_s:
        print(f"re-scoring the hung TRL batches for their verdicts (not timed): {rerun_s:.1f} s; TRL helper "
              f"restarts {trl.restarts} ({trl.crashes} after the helper died)")
    rl_st = Counter(it["rlkit_status"] for it in normal)
    print(f"rlkit statuses (non-adversarial): {dict(sorted(rl_st.items()))}")
    print(f"trl verdicts (non-adversarial): {dict(sorted(Counter(it['trl_verdict'] for it in normal).items()))}")
    print(f"agreement on {len(normal)} non-adversarial items: {agreement * 100:.2f}% ({len(disagreements)} "
          f"disagreements; target >= 99%: {'ok' if agreement >= 0.99 else 'BELOW'})")
    by_cat = Counter(d["category"] for d in disagreements)
    for cat, c in by_cat.most_common():
        print(f"  {c:4d} x {cat}: {EXPLAIN[cat]}")
    for d in disagreements:
        print(f"  disagreement #{d['idx']} [{d['source']} {d['kind']}/{d['variant']}] gold {_short(d['gold'], 40)!s} | "
              f"rlkit extracted {_short(d['rlkit_answer'], 40)} -> {d['rlkit']} | trl parsed "
              f"{_short(d['trl_answer'], 50)} -> {d['trl']} | {d['category']}")
    print(f"adversarial items ({len(adv_items)}): rlkit statuses "
          f"{dict(sorted(Counter(it['rlkit_status'] for it in adv_items).items()))}, trl verdicts "
          f"{dict(sorted(Counter(it['trl_verdict'] for it in adv_items).items()))}")
    for it in adv_items:
        print(f"  adversarial #{it['idx']} {it['variant']:<16} rlkit {it['rlkit_status']:<11} "
              f"{it['rlkit_item_s']:5.2f} s score {it['rlkit_score']:g} | trl {it['trl_verdict']:<5} "
              f"parsed {_short(it['trl_answer'], 50)}")
    print(f"checks: rlkit batches within deadline + 1 s: {'ok' if batch_ok else 'FAILED'}; items within item "
          f"deadline + 1 s: {'ok' if item_ok else 'FAILED'}; adversarial items scored > 0: rlkit {adv_scored_rl}, "
          f"trl {adv_scored_trl}; "
          f"code executed (marker files): {len(markers)}{' ' + str(markers) if markers else ''}")
    if stderr_log is not None:
        size = os.path.getsize(stderr_log.name)
        if size:
            print(f"workers' stderr ({size} bytes of math-verify warnings and the like): {stderr_log.name}")
        else:
            os.unlink(stderr_log.name)
    print(f"load average after: {os.getloadavg()[0]:.2f}; bench wall time: {time.perf_counter() - t_start:.0f} s")

    if a.out:
        payload = {
            "preset": preset, "n": len(items), "batch_size": batch, "seed": a.seed, "workers": a.workers,
            "item_timeout": a.item_timeout, "batch_timeout": a.batch_timeout,
            "figures": {"speedup": speedup, "speedup_cold": speedup_cold, "speedup_finished": speedup_fin,
                        "speedup_clean": speedup_clean, "load_before": load0, "rlkit_s": rl_total, "trl_s": trl_total,
                        "rlkit_cpu_s": sum(rl_cpu), "trl_cpu_s_finished": sum(trl_cpu),
                        "pool_start_s": pool_start_s, "trl_start_s": trl_start_s, "worst_batch_s": worst_rl,
                        "trl_worst_batch_s": worst_trl, "agreement": agreement, "workers_killed": killed,
                        "trl_hung_batches": sum(trl_hung), "batch_deadline_ok": batch_ok, "item_deadline_ok": item_ok,
                        "markers": markers},
            "batch_seconds": {"rlkit": rl_times, "trl": trl_times, "trl_hung": trl_hung, "rlkit_cpu": rl_cpu,
                              "trl_cpu_finished": trl_cpu},
            "disagreements": disagreements,
            "adversarial": [{k: it[k] for k in ("idx", "variant", "rlkit_status", "rlkit_item_s", "rlkit_score",
                                                "trl_verdict", "trl_answer")} for it in adv_items],
            "items": [{k: (v[:300] if isinstance(v, str) else v) for k, v in it.items()
                       if k not in ("completion", "prompt", "question")} for it in items],
        }
        a.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {a.out}")
    print_result(speedup=speedup, agreement=agreement, worst_batch_s=worst_rl, speedup_cold=speedup_cold,
                 speedup_finished=speedup_fin, speedup_clean=speedup_clean, trl_worst_batch_s=worst_trl,
                 rlkit_s=rl_total, trl_s=trl_total, pool_start_s=pool_start_s, disagreements=len(disagreements),
                 trl_hung_batches=sum(trl_hung), workers_killed=killed, n=len(items), digits=2,
                 precision={"agreement": 4})
    return 0


if __name__ == "__main__":
    sys.exit(main())
