"""Many-shot episodes (ICL-50 format, the local task catalogue, the generator, encoding) and the many-shot
evaluation (accuracy against shots, exact match, the plot)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import TINY_SHAPE
from rlkit.data import manyshot as ms
from rlkit.eval import manyshot as ev

# a chat template in the ChatML style of SmolLM2's, for the char tokenizer (it has none)
CHATML = ("{% for message in messages %}{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


@pytest.fixture
def chat_tokenizer():
    from rlkit.models import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    return tok


def _episode(n=3):
    return {"id": 7, "messages": ms.episode_messages("Say it.", [(f"x{i}", f"y{i}") for i in range(n)]),
            "resource": "toy", "len": 12, "extra": [1, 2]}


# ---------------------------------------------------------------------------------------------- loader


def test_loader_round_trip(tmp_path):
    rows = [_episode(2), {**_episode(1), "id": 8}]
    path = ms.write_episodes(rows, tmp_path / "e.jsonl")
    assert ms.load_episodes(path) == rows
    # ICL-50 rows without ids or loss flags: ids from the line index, loss 0 by default
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                  "content": "a", "loss": 1}]}) + "\n")
    (row,) = ms.load_episodes(path)
    assert row["id"] == 0 and row["messages"][0]["loss"] == 0 and row["messages"][1]["loss"] == 1


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"id": 1}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "a", "loss": 0}]}', "role 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": 3, "loss": 0}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "q", "loss": 2}]}', "loss must be 0 or 1"),
    ('{"messages": [{"role": "user", "content": "q", "loss": true}]}', "loss must be 0 or 1"),
    ('{"messages": [{"role": "user", "content": "q", "loss": 1}]}', "only assistant turns carry loss 1"),
    ('{"messages": [{"role": "assistant", "content": "a", "loss": 1}]}', "must follow a user turn"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}', "may only come first"),
    ('{"messages": [{"role": "user", "content": "q"}], "len": -3}', "'len' must be a non-negative"),
])
def test_loader_rejects_malformed_rows(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_episode()) + "\n" + line + "\n")
    with pytest.raises(ms.EpisodeError) as e:
        ms.load_episodes(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and f"{path}:2" in msg


# ---------------------------------------------------------------------------------------------- tasks, generator


def test_heldout_tasks_are_new_rules():
    train, held = ms.task_names("train"), ms.task_names("heldout")
    assert len(train) >= 20 and len(held) >= 6 and not set(train) & set(held)
    kinds = {ms.get_task(n).kind for n in held}
    assert {"word_category", "number_rule", "string_op", "arithmetic", "list_op", "mapping"} <= kinds
    types = {ms.get_task(n).type for n in train}
    assert types == {"classification", "short_answer"}
    # the rule part of a name (category pair, predicate, operation, table) is never shared, nor a label word
    rule = lambda n: n.split(":")[:2]  # noqa: E731
    assert not {tuple(rule(n)) for n in train} & {tuple(rule(n)) for n in held}
    labels = lambda names: {w for n in names for w in ms.get_task(n).labels}  # noqa: E731
    assert labels(held) and not labels(train) & labels(held)
    # the held-out mapping tables share no (word, code) entry with the training ones
    entries = lambda names: {ms.get_task(n).sample(random.Random(i)) for n in names if n.startswith("mapping")  # noqa: E731
                             for i in range(200)}
    assert not entries(train) & entries(held)
    # answers are short: at most 3 tokens of a BPE-free count (characters / 4, rounded up) on sampled items
    rng = random.Random(0)
    for name in train + held:
        for _ in range(5):
            x, y = ms.get_task(name).sample(rng)
            assert x and y and len(y) <= 12
    with pytest.raises(ms.EpisodeError, match="unknown many-shot task 'arithmetic:add_11'; did you mean"):
        ms.get_task("arithmetic:add_11")


def test_generator_deterministic_and_split(char_tokenizer):
    a = ms.generate_episodes("train", char_tokenizer, 30, max_shots=40, max_tokens=600, seed=3)
    b = ms.generate_episodes("train", char_tokenizer, 30, max_shots=40, max_tokens=600, seed=3)
    c = ms.generate_episodes("train", char_tokenizer, 30, max_shots=40, max_tokens=600, seed=4)
    assert a == b and a != c
    assert all(r["split"] == "train" and r["task"] in ms.task_names("train") for r in a)
    assert len({r["task"] for r in a}) == 30  # round robin over the tasks
    held = ms.generate_episodes("heldout", char_tokenizer, 13, max_shots=5, max_tokens=600, seed=3)
    assert {r["task"] for r in held} == set(ms.task_names("heldout"))
    for r in a + held:
        ms.validate_episode(r)
        msgs = r["messages"]
        assert msgs[0]["content"].startswith(ms.get_task(r["task"]).instruction)
        assert all(ms.get_task(r["task"]).instruction not in m["content"] for m in msgs[1:])
        assert [m["role"] for m in msgs] == ["user", "assistant"] * r["shots"]
        assert [m["loss"] for m in msgs] == [0, 1] * r["shots"]


def test_shot_counts_honoured_and_packed(char_tokenizer):
    exact = ms.generate_episodes("heldout", char_tokenizer, 13, min_shots=4, max_shots=4, max_tokens=4000,
                                 distribution="uniform")
    assert all(r["shots"] == r["requested_shots"] == 4 for r in exact)
    budget = 400
    rows = ms.generate_episodes("train", char_tokenizer, 20, min_shots=1, max_shots=300, max_tokens=budget, seed=1)
    assert any(r["requested_shots"] >= 50 for r in rows)
    cut = 0
    for r in rows:
        enc = ms.encode_episode(r["messages"], char_tokenizer)
        assert len(enc.input_ids) == r["len"] <= budget
        assert r["shots"] <= r["requested_shots"]
        if r["shots"] < r["requested_shots"]:
            cut += 1
            # packed: one more demonstration of the same episode would not fit
            task = ms.get_task(r["task"])
            rng = random.Random(f"manyshot|1|{r['id']}|{task.name}")
            want = ms.draw_shots(rng, 1, 300)
            full = ms.episode_messages(task.instruction, ms.draw_demos(task, rng, want))
            assert full[: 2 * r["shots"]] == r["messages"]
            assert len(ms.encode_episode(full[: 2 * r["shots"] + 2], char_tokenizer).input_ids) > budget
    assert cut >= 3
    # hundreds of shots fit a larger budget
    many = ms.generate_episodes(["mapping:train_0"], char_tokenizer, 1, min_shots=200, max_shots=200,
                                max_tokens=20000)
    assert many[0]["shots"] == 200
    with pytest.raises(ms.EpisodeError, match="under min_shots 50"):
        ms.generate_episodes(["mapping:train_0"], char_tokenizer, 1, min_shots=50, max_shots=60, max_tokens=300)
    with pytest.raises(ms.EpisodeError, match="min_shots <= max_shots"):
        ms.generate_episodes("train", char_tokenizer, 1, min_shots=5, max_shots=2)


@pytest.mark.parametrize("chat", [False, True])
def test_encoding_and_prompt_layout(char_tokenizer, chat_tokenizer, chat):
    tok = chat_tokenizer if chat else char_tokenizer
    demos = [("cat", "sun"), ("plum", "moon"), ("dog", "sun")]
    msgs = ms.episode_messages("Classify each word as sun or moon.", demos)
    enc = ms.encode_episode(msgs, tok)
    assert enc.shots == 3 and len(enc.answer_spans) == 3
    end = "</s>" if chat else "\n"
    for (s, e), (_, y) in zip(enc.answer_spans, demos):
        assert tok.decode(enc.input_ids[s:e]) == (y + end if chat else " " + y + end)
        assert enc.labels[s:e] == enc.input_ids[s:e]
    supervised = sum(e - s for s, e in enc.answer_spans)
    assert sum(label != -100 for label in enc.labels) == supervised
    # the evaluation prompt for the third demonstration is exactly the training text before its answer
    prompt = ms.render_messages(ms.query_messages("Classify each word as sun or moon.", demos[:2], "dog"), tok,
                                add_generation_prompt=True)
    assert enc.text.startswith(prompt)
    assert enc.text[len(prompt):] == ("sun</s>\n" if chat else " sun\n")
    assert prompt.endswith("<s>assistant\n" if chat else "assistant:")
    # the instruction is only in the first user turn; k = 0 puts it in the query's turn
    zero = ms.query_messages("Say.", [], "cat")
    assert zero == [{"role": "user", "content": "Say.\n\nInput: cat\nOutput:", "loss": 0}]
    # truncation keeps whole demonstrations
    short = ms.encode_episode(msgs, tok, max_tokens=len(enc.input_ids) - 1)
    assert short.shots == 2 and short.input_ids == ms.encode_episode(msgs[:4], tok).input_ids
    with pytest.raises(ms.EpisodeError, match="first demonstration alone"):
        ms.encode_episode(msgs, tok, max_tokens=5)


# ---------------------------------------------------------------------------------------------- evaluation


def test_normalisation_and_exact_match():
    assert ev.normalize_answer('  Output: "Sun".\nInput: dog') == "sun"
    assert ev.exact_match("**North**", "north") and ev.exact_match(" 35\n", "35")
    assert ev.exact_match("answer:  left  ", "Left")
    assert not ev.exact_match("suns", "sun") and not ev.exact_match("3 5", "35")
    assert not ev.exact_match("", "sun") and not ev.exact_match("The answer is sun", "sun")


def _tiny(max_pos):
    from rlkit.models import build_char_tokenizer, build_tiny_model
    from rlkit.recipe import TinyModelSpec

    tok = build_char_tokenizer()
    return build_tiny_model(TinyModelSpec(**dict(TINY_SHAPE, max_position_embeddings=max_pos)), tok, seed=0), tok


def test_evaluate_manyshot_tiny_model():
    model, tok = _tiny(512)
    tasks = ["string_op:last_letter", "arithmetic:add_10"]
    res = ev.evaluate_manyshot(model, tok, tasks, shots=[0, 1, 5, 100], items=3, max_new_tokens=4)
    assert res["shots"] == [0, 1, 5, 100]
    assert set(res["accuracy"]) == {0, 1, 5} and all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert res["skipped"] == {t: [100] for t in tasks}  # 100 shots of characters exceed 512 positions
    assert set(res["per_task"]) == set(tasks) and all(set(v) == {0, 1, 5} for v in res["per_task"].values())
    assert res["n"] == {0: 6, 1: 6, 5: 6} and len(res["records"]) == 18
    assert res["prompt_tokens"]["arithmetic:add_10"][5] > res["prompt_tokens"]["arithmetic:add_10"][1]


def test_evaluate_manyshot_scores_and_nests(monkeypatch, chat_tokenizer):
    """A stub generator that answers right only with at least 5 shots: the accuracy per k follows, and the
    k-shot prompts of an item are nested (the same demonstrations, more of them)."""
    from rlkit.rollout.generation import Completion

    seen = []

    def fake_generate(model, tokenizer, prompts, settings, **kw):
        outs = []
        for p in prompts:
            seen.append(p)
            k = p.count("<s>assistant\n") - 1
            query = p.rsplit("Input: ", 1)[1].split("\n")[0]
            right = str(int(query) + 10)
            outs.append([Completion(f" Output: {right}.\nInput: 3" if k >= 5 else "7", [])])
        return outs

    import rlkit.rollout

    monkeypatch.setattr(rlkit.rollout, "generate", fake_generate)
    model, _ = _tiny(4096)
    res = ev.evaluate_manyshot(model, chat_tokenizer, "arithmetic:add_10", shots=[10, 0, 5, 1], items=4)
    assert res["accuracy"] == {0: 0.0, 1: 0.0, 5: 1.0, 10: 1.0} and res["skipped"] == {}
    by_item = {}
    for p in seen:
        by_item.setdefault(p.rsplit("Input: ", 1)[1], []).append(p)
    assert len(by_item) == 4 and all(len(p) == 4 for p in by_item.values())
    for prompts in by_item.values():
        prompts.sort(key=len)
        for short, long in zip(prompts[1:], prompts[2:]):  # 1 -> 5 -> 10 shots: the shorter's demos lead the longer
            head = short.rsplit("<s>user\n", 1)[0]
            assert head.count("<s>assistant\n") >= 1 and long.startswith(head)
        # the query's input never appears among its own demonstrations (non-mapping tasks)
        query = prompts[-1].rsplit("Input: ", 1)[1].split("\n")[0]
        assert f"Input: {query}\n" not in prompts[-1].rsplit("Input: ", 1)[0]


def test_run_manyshot_eval_on_episodes_and_plot(tmp_path):
    model, tok = _tiny(1024)
    rows = ms.generate_episodes("heldout", tok, 4, min_shots=6, max_shots=6, max_tokens=2000, seed=5)
    path = ms.write_episodes(rows, tmp_path / "test.jsonl")
    summary = ev.run_manyshot_eval(model, str(path), shots=[0, 2, 5, 9], items=1, output_dir=tmp_path / "out",
                                   tokenizer=tok, max_new_tokens=3, label="tiny")
    assert set(summary["per_task"]) == {r["resource"] for r in rows}
    assert summary["skipped"] == {r["resource"]: [9] for r in rows}  # 6 shots: 5 before the query, not 9
    assert set(summary["accuracy"]) == {"0", "2", "5"}
    written = json.loads((tmp_path / "out" / "manyshot.json").read_text())
    assert written == summary and (tmp_path / "out" / "manyshot.png").read_bytes()[:4] == b"\x89PNG"
    recs = [json.loads(x) for x in (tmp_path / "out" / "manyshot_records.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and {r["answer"] for r in recs if r["task"] == rows[0]["resource"]} == \
        {rows[0]["messages"][-1]["content"]}
    # several runs on one plot, string keys (read back from json) and int keys alike
    other = {"label": "b", "accuracy": {0: 0.1, 1: 0.5, 100: 0.9}}
    png = ev.plot_manyshot([written, other], tmp_path / "both.png", title="t")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="at least one result"):
        ev.plot_manyshot([], tmp_path / "none.png")


def test_manyshot_data_stage(tmp_path):
    import importlib

    importlib.import_module("rlkit.methods.manyshot_data")  # registers it (also when _BUILTIN lists it)
    from rlkit.pipeline import read_manifest, run_recipe
    from rlkit.recipe import recipe_from_dict

    raw = {"method": "manyshot_data", "seed": 2, "plot": False, "output_dir": str(tmp_path / "data"),
           "model": {"name": "tiny", "tiny": dict(TINY_SHAPE)},
           "args": {"tasks": "heldout", "num_episodes": 5, "max_shots": 20, "max_tokens": 300}}
    run_recipe(recipe_from_dict(raw))
    manifest = read_manifest(tmp_path / "data")
    rows = ms.load_episodes(manifest["datasets"]["episodes"])
    assert len(rows) == 5 and all(r["split"] == "heldout" and r["len"] <= 300 and r["seed"] == 2 for r in rows)
    from rlkit.config import RecipeError

    with pytest.raises((RecipeError, ValueError), match="unknown many-shot task"):
        recipe_from_dict({**raw, "args": {"tasks": "heldout,nope"}})


@pytest.mark.slow
def test_smollm2_chat_layout():
    """SmolLM2's chat template: answers are their content plus <|im_end|>, prompts are prefixes of episodes."""
    from rlkit.models import load_tokenizer
    from rlkit.recipe import ModelSpec

    tok = load_tokenizer(ModelSpec(name="smollm2-135m-instruct"))
    rows = ms.generate_episodes("heldout", tok, 13, min_shots=100, max_shots=100, max_tokens=3000)
    assert all(r["shots"] == 100 and r["len"] <= 3000 for r in rows)
    for r in rows[:3]:
        enc = ms.encode_episode(r["messages"], tok)
        answers = [m["content"] for m in r["messages"] if m["loss"]]
        assert [tok.decode(enc.input_ids[s:e]) for s, e in enc.answer_spans] == [a + "<|im_end|>" for a in answers]
        prompt = ms.render_messages(r["messages"][:-1], tok, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert enc.input_ids[: len(ids)] == ids and enc.answer_spans[-1][0] == len(ids)
