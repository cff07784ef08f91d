"""Many-shot in-context episodes: the ICL-50 / MICLB row format, a catalogue of local tasks, an offline episode
generator, and the one function that turns an episode's messages into text and tokens.

Used by ``method: dricl`` (training, :mod:`rlkit.methods.dricl`) and the many-shot evaluation
(:mod:`rlkit.eval.manyshot`); the DR-ICL paper (arXiv 2501.04070) and the choices made here are in
``docs/methods/manyshot.md``.

**Row format** (ICL-50, one episode per jsonl line)::

    {"id": 0, "messages": [{"role": "user", "content": "<instruction>\\n\\nInput: cat\\nOutput:", "loss": 0},
                           {"role": "assistant", "content": "sun", "loss": 1},
                           {"role": "user", "content": "Input: dog\\nOutput:", "loss": 0}, ...],
     "resource": "<task name>", "len": <token count>}

The instruction is only in the first user turn; every demonstration is a user turn (the input) followed by an
assistant turn (the answer, ``loss: 1``). :func:`load_episodes` reads and validates such a file (extra fields are
kept), :func:`validate_episode` checks one row, :func:`write_episodes` writes rows.

**Tasks** (:class:`Task`, :func:`get_task`, :func:`task_names`): a fixed catalogue of synthetic tasks with short
answers (one to three tokens) in six kinds, split once and for all into ``train`` and ``heldout`` tasks whose
*rules* differ (held-out tasks use word categories, number rules, string operations, arithmetic constants, list
operations, code tables and label words that no training task uses):

- classification: ``word_category`` (words of two categories, arbitrary label words), ``number_rule`` (numbers
  labelled by a predicate, arbitrary label words);
- short answer: ``string_op`` (e.g. the first letter of a word), ``arithmetic`` (a hidden rule such as ``x+2``),
  ``list_op`` (e.g. the largest of a few digits), ``mapping`` (a fixed table of word -> code that the
  demonstrations reveal one entry at a time: accuracy grows with the number of shots).

**Generator**: :func:`generate_episodes` draws episodes from a list of tasks, deterministically in ``seed``, with a
shot count between ``min_shots`` and ``max_shots`` (log-uniform by default) and keeps the longest prefix of
demonstrations that fits ``max_tokens`` tokens of the given tokenizer.

**Rendering and encoding** (shared by training and evaluation, so both see the same layout):

- :func:`render_messages(messages, tokenizer, add_generation_prompt)` -> text: the tokenizer's chat template when
  it has one; otherwise the plain layout ``"user: ...\\n"`` / ``"assistant: ...\\n"``, whose generation prompt is
  ``"assistant:"`` (the model writes `` answer``).
- :func:`encode_episode(messages, tokenizer, max_tokens=None)` -> :class:`EncodedEpisode` (``input_ids``,
  ``labels`` with -100 outside the answers, ``answer_spans`` as token ``[start, end)`` per ``loss: 1`` turn,
  ``shots``). An answer's span covers its content and the end-of-turn text right after it (the tokenizer's EOS
  token under a chat template, the newline in the plain layout), so a model trained on it learns to stop.
  ``max_tokens`` drops whole trailing demonstrations until the episode fits.
- :func:`query_messages(task_instruction, demos, query)` builds the evaluation prompt (demonstrations as
  user/assistant turns, the query as the last user turn); render it with ``add_generation_prompt=True``.
  A prompt rendered so is a prefix of the rendered episode that also holds the query's answer.
"""

from __future__ import annotations

import json
import math
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "heldout")
DATASET = "episodes"


class EpisodeError(ValueError):
    """A malformed many-shot episode (one line, saying where)."""


# --------------------------------------------------------------------------------------------------
# The ICL-50 row format


def validate_episode(row: Any, where: str = "episode") -> dict:
    """Check one ICL-50 row (``id``, ``messages`` with ``role``/``content``/``loss``); returns it. Raises
    :class:`EpisodeError` with one line naming the first problem."""
    if not isinstance(row, dict):
        raise EpisodeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EpisodeError(f"{where}: 'messages' must be a non-empty list of turns")
    seen_user = False
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise EpisodeError(f"{at}: expected an object with role, content and loss")
        role = m.get("role")
        if role not in ROLES:
            raise EpisodeError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise EpisodeError(f"{at}: content must be a string")
        loss = m.get("loss", 0)
        if isinstance(loss, bool) or loss not in (0, 1):
            raise EpisodeError(f"{at}: loss must be 0 or 1, got {loss!r}")
        if loss == 1 and role != "assistant":
            raise EpisodeError(f"{at}: only assistant turns carry loss 1 ({role} turn has loss 1)")
        if role == "system" and i != 0:
            raise EpisodeError(f"{at}: a system turn may only come first")
        if role == "assistant" and (i == 0 or messages[i - 1].get("role") != "user"):
            raise EpisodeError(f"{at}: an assistant turn must follow a user turn")
        seen_user = seen_user or role == "user"
    if not seen_user:
        raise EpisodeError(f"{where}: the episode has no user turn")
    if "len" in row and (isinstance(row["len"], bool) or not isinstance(row["len"], int) or row["len"] < 0):
        raise EpisodeError(f"{where}: 'len' must be a non-negative integer token count, got {row['len']!r}")
    return row


def load_episodes(path: str | Path) -> list[dict]:
    """The episodes of an ICL-50 / MICLB jsonl file, validated (extra fields are kept; a missing ``loss`` reads
    as 0; a missing ``id`` becomes the line index)."""
    p = Path(path)
    if not p.is_file():
        raise EpisodeError(f"{p}: no such episode file")
    rows = []
    with open(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EpisodeError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            validate_episode(row, f"{p}:{n}")
            row.setdefault("id", len(rows))
            for m in row["messages"]:
                m.setdefault("loss", 0)
            rows.append(row)
    if not rows:
        raise EpisodeError(f"{p}: the file holds no episodes")
    return rows


def write_episodes(rows: Sequence[dict], path: str | Path) -> Path:
    """Write episodes as jsonl (validating each); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as fh:
        for i, row in enumerate(rows):
            validate_episode(row, f"episode {i}")
            fh.write(json.dumps(row) + "\n")
    return p


# --------------------------------------------------------------------------------------------------
# Rendering and encoding


PLAIN_GENERATION_PROMPT = "assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain(messages: Sequence[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + (PLAIN_GENERATION_PROMPT if add_generation_prompt else "")


def _strip(messages: Sequence[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_messages(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """An episode's (or a prompt's) messages as text: the tokenizer's chat template, or the plain layout (module
    docstring) for a tokenizer without one."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_strip(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return _plain(messages, add_generation_prompt)


def _special_tokens(text: str, tokenizer) -> bool:
    """Whether the tokenizer should add its special tokens (not when the text already starts with BOS, as a
    chat template's output may; mirrors :func:`rlkit.rollout.generate_hf`)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def _content_spans(messages: Sequence[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each message's content in it."""
    if not has_chat_template(tokenizer):
        spans, pos, parts = [], 0, []
        for m in messages:
            head = f"{m['role']}: "
            parts.append(head + m["content"] + "\n")
            spans.append((pos + len(head), pos + len(head) + len(m["content"])))
            pos += len(parts[-1])
        return "".join(parts), spans
    # Render once with unique markers in place of the contents; the text between markers is the template's glue.
    text = render_messages(messages, tokenizer)
    tag = "\x00" + "".join(random.Random(len(text)).choices(string.ascii_letters, k=12))
    marked = render_messages([{**m, "content": f"{tag}{i}{tag}"} for i, m in enumerate(messages)], tokenizer)
    glue = marked.split(tag)
    # glue = [g0, "0", g1, "1", g2, ...]
    if len(glue) == 2 * len(messages) + 1 and all(glue[2 * i + 1] == str(i) for i in range(len(messages))):
        spans, pos, out = [], 0, []
        for i, m in enumerate(messages):
            out.append(glue[2 * i])
            pos += len(glue[2 * i])
            spans.append((pos, pos + len(m["content"])))
            out.append(m["content"])
            pos += len(m["content"])
        out.append(glue[-1])
        if "".join(out) == text:
            return text, spans
    # The template rewrites contents (e.g. trims them): locate each content after the previous prefix render.
    spans = []
    for i, m in enumerate(messages):
        before = len(render_messages(messages[:i], tokenizer, add_generation_prompt=False)) if i else 0
        start = text.find(m["content"], before)
        if start < 0:
            raise EpisodeError(f"the chat template of {type(tokenizer).__name__} does not keep message {i}'s content "
                               "as it is; cannot locate the answers")
        spans.append((start, start + len(m["content"])))
    return text, spans


@dataclass
class EncodedEpisode:
    """An episode as tokens (see :func:`encode_episode`)."""

    input_ids: list[int]
    labels: list[int]
    """-100 except on the answer tokens of ``loss: 1`` turns."""
    answer_spans: list[tuple[int, int]]
    """Token ``[start, end)`` of each ``loss: 1`` answer (content plus its end-of-turn text), in order."""
    shots: int
    """Demonstrations (assistant turns) kept."""
    text: str = ""


def _answer_char_spans(text: str, messages: Sequence[dict], spans: list[tuple[int, int]], tokenizer) -> list:
    out = []
    chat = has_chat_template(tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    for m, (s, e) in zip(messages, spans):
        if m.get("loss", 0) != 1:
            continue
        if chat:
            if eos and text.startswith(eos, e):
                e += len(eos)
        else:
            s -= 1  # the space after "assistant:" belongs to what the model writes
            e += 1  # the newline ends the turn
        out.append((s, e))
    return out


def encode_episode(messages: Sequence[dict], tokenizer, max_tokens: int | None = None) -> EncodedEpisode:
    """Token ids, labels (answers of ``loss: 1`` turns only) and answer spans of an episode; with ``max_tokens``,
    trailing demonstrations (user + assistant pairs) are dropped whole until it fits (an episode whose first
    demonstration alone is longer raises :class:`EpisodeError`)."""
    messages = list(messages)
    enc = _encode(messages, tokenizer)
    if max_tokens is None or len(enc.input_ids) <= max_tokens:
        return enc
    cuts = _demo_ends(messages)
    # the largest number of whole demonstrations that fits (binary search; encoding is monotone in it)
    lo, hi, best = 1, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = _encode(messages[: cuts[mid - 1]], tokenizer)
        if len(cand.input_ids) <= max_tokens:
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    if best is None:
        n = len(_encode(messages[: cuts[0]], tokenizer).input_ids)
        raise EpisodeError(f"the episode's first demonstration alone is {n} tokens, over max_tokens {max_tokens}")
    return best


def _demo_ends(messages: Sequence[dict]) -> list[int]:
    """Message counts that end after each assistant turn."""
    return [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]


def _encode(messages: Sequence[dict], tokenizer) -> EncodedEpisode:
    text, spans = _content_spans(messages, tokenizer)
    answers = _answer_char_spans(text, messages, spans, tokenizer)
    enc = tokenizer(text, add_special_tokens=_special_tokens(text, tokenizer), return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    token_spans = []
    j = 0
    for s, e in answers:
        while j < len(ids) and offsets[j][1] <= s:
            j += 1
        start = j
        while j < len(ids) and offsets[j][0] < e:
            if offsets[j][1] > offsets[j][0]:
                labels[j] = ids[j]
            j += 1
        token_spans.append((start, j))
    shots = sum(m["role"] == "assistant" for m in messages)
    return EncodedEpisode(list(ids), labels, token_spans, shots, text)


def text_tokens(text: str, tokenizer) -> int:
    """Tokens of a rendered text (special tokens added as :func:`rlkit.rollout.generate_hf` adds them)."""
    return len(tokenizer(text, add_special_tokens=_special_tokens(text, tokenizer))["input_ids"])


def count_tokens(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> int:
    """Tokens of rendered messages."""
    return text_tokens(render_messages(messages, tokenizer, add_generation_prompt), tokenizer)


# --------------------------------------------------------------------------------------------------
# Tasks


def user_turn(x: str, instruction: str | None = None) -> str:
    """A demonstration's or query's user turn; the first one carries the instruction."""
    body = f"Input: {x}\nOutput:"
    return f"{instruction}\n\n{body}" if instruction else body


def episode_messages(instruction: str, demos: Sequence[tuple[str, str]], query: str | None = None) -> list[dict]:
    """ICL-50 messages: ``demos`` as (input, answer) user/assistant pairs with ``loss: 1`` on the answers, the
    instruction in the first user turn, and (for a prompt) ``query`` as the last user turn."""
    msgs: list[dict] = []
    for i, (x, y) in enumerate(demos):
        msgs.append({"role": "user", "content": user_turn(x, instruction if i == 0 else None), "loss": 0})
        msgs.append({"role": "assistant", "content": y, "loss": 1})
    if query is not None:
        msgs.append({"role": "user", "content": user_turn(query, None if demos else instruction), "loss": 0})
    return msgs


def query_messages(instruction: str, demos: Sequence[tuple[str, str]], query: str) -> list[dict]:
    """The evaluation prompt's messages (render with ``add_generation_prompt=True``)."""
    return episode_messages(instruction, demos, query)


@dataclass(frozen=True)
class Task:
    """One many-shot task: an instruction and a rule that draws (input, answer) pairs."""

    name: str
    kind: str
    type: Literal["classification", "short_answer"]
    split: Literal["train", "heldout"]
    instruction: str
    draw: Callable[[random.Random], tuple[str, str]] = field(repr=False, compare=False)
    labels: tuple[str, ...] = ()
    """The label words (classification)."""
    query_in_demos: bool = False
    """Whether an evaluation query may also appear among its demonstrations (``mapping``: the table is only
    learnt from them); other tasks draw the demonstrations without the query's input."""

    def sample(self, rng: random.Random) -> tuple[str, str]:
        return self.draw(rng)


_CATEGORIES = {
    # training categories
    "animal": "cat dog horse cow sheep goat lion tiger bear wolf fox rabbit mouse deer monkey camel zebra duck",
    "fruit": "apple banana orange grape lemon cherry peach pear plum mango melon kiwi lime apricot papaya fig",
    "vehicle": "car bus truck train bicycle plane boat ship taxi van tractor scooter subway tram ferry jeep",
    "clothing": "shirt dress coat jacket sweater skirt scarf hat glove sock shoe boot belt tie vest blouse",
    "tool": "hammer saw drill wrench screwdriver chisel shovel rake axe pliers ladder knife file clamp",
    "furniture": "chair table sofa bed desk shelf cabinet stool bench couch dresser wardrobe bookcase",
    "job": "doctor teacher farmer lawyer nurse pilot chef baker painter driver singer dentist plumber",
    "sport": "soccer tennis golf hockey rugby boxing cricket baseball skiing rowing cycling surfing",
    # held-out categories
    "color": "red blue green yellow purple orange pink brown black white gray violet",
    "body": "hand foot head nose ear eye mouth knee elbow finger shoulder neck",
    "instrument": "piano guitar violin drum flute trumpet harp cello organ banjo",
    "drink": "coffee tea milk juice water soda wine beer cocoa lemonade",
}
_CATEGORY_WORDS = {k: tuple(v.split()) for k, v in _CATEGORIES.items()}
_TRAIN_CATEGORIES = ("animal", "fruit", "vehicle", "clothing", "tool", "furniture", "job", "sport")
_HELDOUT_CATEGORIES = ("color", "body", "instrument", "drink")
_TRAIN_LABELS = (("sun", "moon"), ("rain", "snow"), ("star", "cloud"), ("wind", "storm"), ("A", "B"),
                 ("yes", "no"))
_HELDOUT_LABELS = (("north", "south"), ("X", "Y"), ("left", "right"))
_WORDS = tuple(sorted({w for ws in _CATEGORY_WORDS.values() for w in ws}))


def _balanced(rng: random.Random, labels: Sequence[str], pools: Sequence[Sequence[str]]) -> tuple[str, str]:
    i = rng.randrange(len(labels))
    return rng.choice(pools[i]), labels[i]


def _number_pools(pred: Callable[[int], bool], lo: int = 1, hi: int = 99) -> tuple[tuple[str, ...], tuple[str, ...]]:
    yes = tuple(str(n) for n in range(lo, hi + 1) if pred(n))
    no = tuple(str(n) for n in range(lo, hi + 1) if not pred(n))
    return yes, no


_NUMBER_RULES: dict[str, tuple[str, Callable[[int], bool]]] = {
    # name: (split, predicate) -- the first label goes to the numbers that satisfy it
    "even": ("train", lambda n: n % 2 == 0),
    "above_50": ("train", lambda n: n > 50),
    "multiple_of_5": ("train", lambda n: n % 5 == 0),
    "tens_above_units": ("train", lambda n: n // 10 > n % 10),
    "below_10": ("heldout", lambda n: n < 10),
    "multiple_of_10": ("heldout", lambda n: n % 10 == 0),
}

_STRING_OPS: dict[str, tuple[str, str, Callable[[str], str]]] = {
    # name: (split, instruction, function)
    "first_letter": ("train", "Write the first letter of the word.", lambda w: w[0]),
    "uppercase": ("train", "Write the word in capital letters.", lambda w: w.upper()),
    "length": ("train", "Write how many letters the word has.", lambda w: str(len(w))),
    "capitalize": ("train", "Write the word with a capital first letter.", lambda w: w.capitalize()),
    "last_letter": ("heldout", "Write the last letter of the word.", lambda w: w[-1]),
    "first_two": ("heldout", "Write the first two letters of the word.", lambda w: w[:2]),
}

_ARITHMETIC: dict[str, tuple[str, Callable[[int], int]]] = {
    "add_1": ("train", lambda x: x + 1),
    "add_2": ("train", lambda x: x + 2),
    "sub_1": ("train", lambda x: x - 1),
    "times_2": ("train", lambda x: 2 * x),
    "times_10": ("train", lambda x: 10 * x),
    "add_10": ("heldout", lambda x: x + 10),
    "add_100": ("heldout", lambda x: x + 100),
}

_LIST_OPS: dict[str, tuple[str, str, Callable[[list[int]], int]]] = {
    "first": ("train", "Write the first number of the list.", lambda xs: xs[0]),
    "largest": ("train", "Write the largest number of the list.", max),
    "count": ("train", "Write how many numbers the list has.", len),
    "last": ("heldout", "Write the last number of the list.", lambda xs: xs[-1]),
    "smallest": ("heldout", "Write the smallest number of the list.", min),
}

_MAPPING_TABLES = {"train": 6, "heldout": 2}
_MAPPING_KEYS = 8


def _word_category_tasks() -> list[Task]:
    tasks = []
    for split, cats, label_sets in (("train", _TRAIN_CATEGORIES, _TRAIN_LABELS),
                                    ("heldout", _HELDOUT_CATEGORIES, _HELDOUT_LABELS)):
        pairs = [(a, b) for i, a in enumerate(cats) for b in cats[i + 1:]]
        if split == "heldout":
            pairs = pairs[:3]
        for n, (a, b) in enumerate(pairs):
            labels = label_sets[n % len(label_sets)]
            pools = (tuple(w for w in _CATEGORY_WORDS[a] if w not in _CATEGORY_WORDS[b]),
                     tuple(w for w in _CATEGORY_WORDS[b] if w not in _CATEGORY_WORDS[a]))
            tasks.append(Task(f"word_category:{a}-{b}:{labels[0]}/{labels[1]}", "word_category", "classification",
                              split, f"Classify each word as {labels[0]} or {labels[1]}.",
                              lambda rng, labels=labels, pools=pools: _balanced(rng, labels, pools), labels))
    return tasks


def _number_rule_tasks() -> list[Task]:
    tasks, counters = [], {"train": 0, "heldout": 0}
    for rule, (split, pred) in _NUMBER_RULES.items():
        label_sets = _TRAIN_LABELS if split == "train" else _HELDOUT_LABELS
        for _ in range(2 if split == "train" else 1):
            labels = label_sets[counters[split] % len(label_sets)]
            counters[split] += 1
            pools = _number_pools(pred)
            tasks.append(Task(f"number_rule:{rule}:{labels[0]}/{labels[1]}", "number_rule", "classification", split,
                              f"Classify each number as {labels[0]} or {labels[1]}.",
                              lambda rng, labels=labels, pools=pools: _balanced(rng, labels, pools), labels))
    return tasks


def _string_op_tasks() -> list[Task]:
    return [Task(f"string_op:{op}", "string_op", "short_answer", split, instruction,
                 lambda rng, f=f: (lambda w: (w, f(w)))(rng.choice(_WORDS)))
            for op, (split, instruction, f) in _STRING_OPS.items()]


def _arithmetic_tasks() -> list[Task]:
    return [Task(f"arithmetic:{op}", "arithmetic", "short_answer", split,
                 "Apply the same rule to each number.",
                 lambda rng, f=f: (lambda x: (str(x), str(f(x))))(rng.randint(1, 49)))
            for op, (split, f) in _ARITHMETIC.items()]


def _list_draw(rng: random.Random, f) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return " ".join(map(str, xs)), str(f(xs))


def _list_op_tasks() -> list[Task]:
    return [Task(f"list_op:{op}", "list_op", "short_answer", split, instruction,
                 lambda rng, f=f: _list_draw(rng, f))
            for op, (split, instruction, f) in _LIST_OPS.items()]


def _mapping_tasks() -> list[Task]:
    # Keys: words of the split's categories; codes: three-digit numbers. Each table comes from its own fixed seed.
    tasks = []
    for split, n in _MAPPING_TABLES.items():
        cats = _TRAIN_CATEGORIES if split == "train" else _HELDOUT_CATEGORIES
        words = sorted({w for c in cats for w in _CATEGORY_WORDS[c]})
        for t in range(n):
            rng = random.Random(f"mapping|{split}|{t}")
            keys = rng.sample(words, _MAPPING_KEYS)
            codes = rng.sample(range(100, 1000), _MAPPING_KEYS)
            table = tuple((k, str(c)) for k, c in zip(keys, codes))
            tasks.append(Task(f"mapping:{split}_{t}", "mapping", "short_answer", split, "Write the code of the word.",
                              lambda rng, table=table: rng.choice(table), query_in_demos=True))
    return tasks


_CATALOGUE: dict[str, Task] | None = None


def catalogue() -> dict[str, Task]:
    """Every built-in task by name (fixed: it does not depend on any seed)."""
    global _CATALOGUE
    if _CATALOGUE is None:
        tasks = (_word_category_tasks() + _number_rule_tasks() + _string_op_tasks() + _arithmetic_tasks()
                 + _list_op_tasks() + _mapping_tasks())
        _CATALOGUE = {t.name: t for t in tasks}
        assert len(_CATALOGUE) == len(tasks), "task names must be unique"
    return _CATALOGUE


def task_names(split: str | None = None) -> list[str]:
    """Names of the built-in tasks of one split (``train`` / ``heldout``), or all."""
    if split is not None and split not in SPLITS:
        raise EpisodeError(f"unknown task split {split!r}; use one of {', '.join(SPLITS)}")
    return [n for n, t in catalogue().items() if split is None or t.split == split]


def get_task(name: str) -> Task:
    tasks = catalogue()
    if name not in tasks:
        from ..config import nearest

        hint = nearest(name, list(tasks), cutoff=0.6)
        hint = hint if hint.startswith("; did") else " (see rlkit.data.manyshot.task_names())"
        raise EpisodeError(f"unknown many-shot task {name!r}{hint}")
    return tasks[name]


def resolve_tasks(spec: str | Sequence[str | Task]) -> list[Task]:
    """Tasks from a comma-separated string or a list of: task names, the splits ``train`` / ``heldout``, ``all``,
    and :class:`Task` objects (duplicates dropped, order kept)."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    out: list[Task] = []
    for item in items:
        if isinstance(item, Task):
            out.append(item)
        elif item == "all":
            out.extend(catalogue().values())
        elif item in SPLITS:
            out.extend(get_task(n) for n in task_names(item))
        else:
            out.append(get_task(item))
    if not out:
        raise EpisodeError("no many-shot tasks given")
    return list({t.name: t for t in out}.values())


# --------------------------------------------------------------------------------------------------
# The generator


def draw_shots(rng: random.Random, min_shots: int, max_shots: int, distribution: str = "log_uniform") -> int:
    if distribution == "uniform":
        return rng.randint(min_shots, max_shots)
    if distribution == "log_uniform":
        return min(max_shots, int(math.exp(rng.uniform(math.log(min_shots), math.log(max_shots + 1)))))
    raise EpisodeError(f"unknown shot distribution {distribution!r}; use log_uniform or uniform")


def draw_demos(task: Task, rng: random.Random, n: int, exclude: str | None = None) -> list[tuple[str, str]]:
    """``n`` demonstrations of ``task`` (inputs equal to ``exclude`` are redrawn unless the task allows them)."""
    demos = []
    tries = 0
    while len(demos) < n:
        x, y = task.sample(rng)
        tries += 1
        if exclude is not None and x == exclude and not task.query_in_demos and tries < 100 * (n + 1):
            continue
        demos.append((x, y))
    return demos


def generate_episodes(tasks: str | Sequence[str | Task], tokenizer, num_episodes: int, min_shots: int = 1,
                      max_shots: int = 200, max_tokens: int = 2048, seed: int = 0,
                      distribution: str = "log_uniform") -> list[dict]:
    """``num_episodes`` ICL-50 rows, task ``i % len(tasks)`` for episode ``i`` (tasks in the given order), each
    with a shot count drawn from ``[min_shots, max_shots]`` and packed into ``max_tokens`` tokens of
    ``tokenizer`` (the longest prefix of whole demonstrations that fits; an episode that cannot hold
    ``min_shots`` raises). Deterministic in ``seed``. Fields: ``id``, ``messages``, ``resource`` (the task
    name), ``len`` (tokens), ``task``, ``kind``, ``type``, ``split``, ``shots``, ``requested_shots``, ``seed``."""
    if min_shots < 1 or max_shots < min_shots:
        raise EpisodeError(f"need 1 <= min_shots <= max_shots, got {min_shots} and {max_shots}")
    if num_episodes < 1:
        raise EpisodeError(f"num_episodes must be at least 1, got {num_episodes}")
    task_list = resolve_tasks(tasks)
    rows = []
    for i in range(num_episodes):
        task = task_list[i % len(task_list)]
        rng = random.Random(f"manyshot|{seed}|{i}|{task.name}")
        want = draw_shots(rng, min_shots, max_shots, distribution)
        messages = episode_messages(task.instruction, draw_demos(task, rng, want))
        enc = encode_episode(messages, tokenizer, max_tokens)
        if enc.shots < min_shots:
            raise EpisodeError(f"task {task.name}: only {enc.shots} demonstrations fit max_tokens {max_tokens}, "
                               f"under min_shots {min_shots}; raise max_tokens")
        rows.append({"id": i, "messages": messages[: 2 * enc.shots], "resource": task.name, "len": len(enc.input_ids),
                     "task": task.name, "kind": task.kind, "type": task.type, "split": task.split,
                     "shots": enc.shots, "requested_shots": want, "seed": seed})
    return rows
