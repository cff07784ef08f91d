"""Key-cache compression on SmolLM2-135M-Instruct: PolarQuant and ThinK against the default cache.

Every figure compares a compressed cache (``rlkit.kvcache``: ``polarquant`` 4+4 bits, group 128, the last
< 128 tokens full precision, a decode step attends before its group is quantized; ``think`` with 40% of the
key channels pruned per KV head (``think_heads="kv"``, the configuration that saves memory on this GQA
model), 32 recent tokens whole, all prompt keys scored; ``think_query``: ThinK at rlkit's defaults, the
released per-query-head rule, whose pruned prefix is stored once per query head; ``both``: ThinK per KV head
+ PolarQuant) with the uncompressed ``DynamicCache`` on the same model, inputs and machine, in this run:

1. **Key bytes per token** after a prefill of real text (GSM8K test questions and answers concatenated) of
   1024 and 4096 tokens plus 32 greedy decode steps, normalised to a 16-bit cache (codes and indices as
   stored, floats at 16 bits: the model runs in float32 on CPU). Targets: PolarQuant <= 0.3x, ThinK <= 0.65x
   (per KV head; per query head it is about 1.8x on SmolLM2's 9 query / 3 KV heads).
2. **Decode speed**: tokens/s of 32 greedy single-token steps after that prefill (batch 1), as a ratio to
   the default cache; the kinds alternate over ``--speed-repeats`` rounds and the median round counts.
3. **GSM8K**: greedy pass@1 on the first ``--gsm8k`` test problems (chat template, ``max_new_tokens``
   256, batches of 16) with each cache, through ``rlkit.eval.evaluate_rows`` (the path ``rlkit eval
   --kv-cache`` takes). ``gsm8k_delta_*`` = accuracy with the compressed cache - accuracy with the default
   one, in points (target: within 1). ``agree_*``: share of problems whose greedy completion is identical to
   the default cache's; ``answer_agree_*``: share with the same extracted final answer (None included);
   ``prefix_agree_*``: mean length of the common prefix with the default cache's completion, over the longer
   of the two (characters).
4. **Teacher-forced quality**: the GSM8K reference solutions of the first ``--teacher-forced`` problems are
   fed token by token after the chat prompt through each cache (every prediction reads the compressed
   cache, as in decoding); ``tf_nll_delta_*`` = mean NLL with the compressed cache - with the default one,
   ``tf_top1_agree_*`` = share of positions whose top-1 token equals the default cache's. SmolLM2-135M
   solves almost no GSM8K problem greedily, so this is the sensitive quality measure here. (``--smoke`` feeds
   only the first 24 tokens of each solution.)
5. **Long-context retrieval**: a sentence "The pass code of <name> is <5 digits>." placed at depths 0.1 ...
   0.9 of a 2048-token context of real text (GSM8K), then asked for at the end (chat template; the answer
   starts "The pass code of <name> is" and the model continues, greedy, 8 tokens); a trial counts when the
   code appears. Accuracy over 4 names x 5 depths per cache (not ``think_query``: the long-context accuracy
   of both ThinK modes is ``bench/mathhay.py``'s).

Each GSM8K cache runs in its own subprocess (``--jobs`` at a time, one torch thread each unless
``--threads``), and its result is kept in ``<out>/gsm8k_<kind>.json``, so a re-run resumes.

    python bench/kv_cache.py                 # 200 GSM8K problems, 1k/4k speed, retrieval at 2k
    python bench/kv_cache.py --quick         # 24 problems, 1k only, retrieval at 1k
    python bench/kv_cache.py --smoke         # seconds-scale (tests)
    python bench/kv_cache.py --gsm8k 100 --jobs 2 --out runs/bench_kv

Ends with ``RESULT polar_bytes_ratio=... think_bytes_ratio=... gsm8k_delta_polar=... gsm8k_delta_think=...``
(and ``think_query_bytes_ratio``, ``tf_nll_delta_think_query``... for the default ThinK).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, data_dir, preset_of, print_result  # noqa: E402

MODEL = "smollm2-135m-instruct"
KINDS = ("polarquant", "think", "think_query", "both")
SHORT = {"polarquant": "polar", "think": "think", "think_query": "think_query", "both": "both", "none": "none"}
# the cache configuration of each kind (KVCacheConfig keyword arguments; rlkit's defaults otherwise)
CONFIGS = {"polarquant": {"kind": "polarquant"}, "think": {"kind": "think", "think_heads": "kv"},
           "think_query": {"kind": "think"}, "both": {"kind": "both", "think_heads": "kv"}}
RETRIEVAL_KINDS = ("polarquant", "think", "both")  # long-context accuracy of both ThinK modes: bench/mathhay.py
PRESETS = {  # GSM8K problems, contexts for bytes/speed, decode steps, speed rounds, haystack tokens, depths, names
    "smoke": (4, (256,), 4, 1, 300, (0.5,), 1),
    "quick": (24, (1024,), 16, 2, 1024, (0.1, 0.5, 0.9), 2),
    "full": (200, (1024, 4096), 32, 3, 2048, (0.1, 0.3, 0.5, 0.7, 0.9), 4),
}
NAMES = ["Alice Moreau", "Bilal Haddad", "Chen Wei", "Dara Okafor", "Elena Petrova", "Farid Nasser"]


def load(threads: int):
    import torch

    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec

    torch.set_num_threads(threads)
    model, tok = load_model(ModelSpec(name=MODEL, dtype="float32"))
    model.eval()
    return model, tok


def real_text_ids(tok, n_tokens: int) -> list[int]:
    rows = [json.loads(x) for x in (data_dir() / "gsm8k_test.jsonl").read_text().splitlines()]
    ids: list[int] = []
    for r in rows:
        ids += tok(r["question"] + "\n" + r["answer"] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"not enough GSM8K text for {n_tokens} tokens")
    return ids[:n_tokens]


def config(kind: str):
    from rlkit.kvcache import KVCacheConfig

    return KVCacheConfig(**CONFIGS.get(kind, {"kind": kind}))


def fresh_cache(model, kind: str):
    """Prepare ``model`` for ``kind`` and return an empty cache for one forward sequence (the default
    ``DynamicCache`` for ``none``); ``rlkit.kvcache.restore_model`` undoes the preparation."""
    from transformers import DynamicCache

    from rlkit.kvcache import make_cache, prepare_model

    prepare_model(model, config(kind))  # kind none: puts the model back as it was
    return DynamicCache() if kind == "none" else make_cache(model, config(kind))


def prefill_and_decode(model, ids: list[int], kind: str, steps: int) -> tuple[float, object]:
    """Seconds for ``steps`` greedy decode steps after a prefill of ``ids``, and the cache at the end."""
    import torch

    from rlkit.compat import cache_kwargs
    from rlkit.kvcache import restore_model

    cache = fresh_cache(model, kind)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, **cache_kwargs(cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    restore_model(model)
    return dt, cache


def bytes_and_speed(model, tok, contexts, steps: int, rounds: int) -> dict:
    from rlkit.kvcache import key_cache_report

    kinds = ("none",) + KINDS
    res: dict = {}
    for n in contexts:
        ids = real_text_ids(tok, n)
        times = {k: [] for k in kinds}
        reports = {}
        prefill_and_decode(model, ids[:64], "none", 2)  # warm-up
        for r in range(rounds):
            for k in (kinds if r % 2 == 0 else kinds[::-1]):
                dt, cache = prefill_and_decode(model, ids, k, steps)
                times[k].append(dt)
                reports[k] = key_cache_report(cache)
        base_tps = steps / statistics.median(times["none"])
        res[n] = {k: {"bytes_ratio": reports[k]["ratio"], "bits_per_element": reports[k]["bits_per_element"],
                      "tokens": reports[k]["tokens"], "tokens_per_s": steps / statistics.median(times[k]),
                      "speed_ratio": steps / statistics.median(times[k]) / base_tps} for k in kinds}
    return res


def retrieval(model, tok, haystack: int, depths, n_names: int) -> dict:
    """Accuracy of recalling a planted pass code per cache kind."""
    import torch

    from rlkit.kvcache import kv_compression

    rng = random.Random(0)
    filler = tok.decode(real_text_ids(tok, haystack))
    sentences = filler.split(". ")
    trials = []
    for name in NAMES[:n_names]:
        for depth in depths:
            code = str(rng.randint(10000, 99999))
            cut = max(1, int(len(sentences) * depth))
            context = ". ".join(sentences[:cut]) + f". The pass code of {name} is {code}. " + ". ".join(sentences[cut:])
            question = f"{context}\n\nWhat is the pass code of {name}?"
            # cloze form: the answer's first words are given, the model continues with the code (a 135M chat
            # model asked to "answer with the number" mostly continues the haystack instead)
            prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True) + f"The pass code of {name} is"
            trials.append((name, depth, code, prompt))
    out: dict = {}
    for kind in ("none",) + RETRIEVAL_KINDS:
        hits = {d: 0 for d in depths}
        answers = []
        for name, depth, code, prompt in trials:
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            kwargs = dict(max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                if kind == "none":
                    gen = model.generate(**enc, **kwargs)
                else:
                    with kv_compression(model, config(kind)):
                        gen = model.generate(**enc, **kwargs)
            text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            hits[depth] += code in text
            answers.append(text.strip())
        out[kind] = {"accuracy": sum(hits.values()) / len(trials),
                     "by_depth": {str(d): hits[d] / n_names for d in depths}, "answers": answers,
                     "context_tokens": int(statistics.mean(len(tok(t[3])["input_ids"]) for t in trials))}
    return out


def teacher_forced(model, tok, n: int, batch_size: int = 16, max_tokens: int | None = None) -> dict:
    """Per cache kind: mean NLL of GSM8K reference solutions (calculator annotations removed) decoded token by
    token after the chat prompt, and top-1 agreement with the default cache at every solution position.

    The prompt is prefilled through the cache, then every solution token is fed as a one-token step, so each
    prediction reads the compressed cache as decoding would. Batches are left-padded prompts; solutions of
    different lengths are right-padded with masked steps. ``max_tokens``: feed only the first tokens of each
    solution (its EOS included only when it fits)."""
    import re

    import torch

    from rlkit.compat import cache_kwargs
    from rlkit.data import build_dataset
    from rlkit.kvcache import restore_model
    from rlkit.recipe import DatasetSpec

    rows = build_dataset(DatasetSpec(name="gsm8k", path=str(data_dir() / "gsm8k_test.jsonl"), split="test", limit=n),
                         tok).to_list()
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    sols = [re.sub(r"<<[^<>]*>>", "", r.get("solution") or "") for r in rows]
    side = tok.padding_side
    tok.padding_side = "left"
    batches = []
    for b in range(0, len(rows), batch_size):
        enc = tok(prompts[b:b + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ans = [(tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_tokens]
               for x in sols[b:b + batch_size]]
        batches.append((enc, ans))
    tok.padding_side = side
    out: dict = {}
    argmax_none: list = []
    for kind in ("none",) + KINDS:
        total, count, agree, seen = 0.0, 0, 0, 0
        for bi, (enc, ans) in enumerate(batches):
            cache = fresh_cache(model, kind)
            mask = enc["attention_mask"]
            steps = max(map(len, ans))
            tgt = torch.full((len(ans), steps), tok.pad_token_id)
            valid = torch.zeros(len(ans), steps, dtype=torch.bool)
            for i, a in enumerate(ans):
                tgt[i, :len(a)] = torch.tensor(a)
                valid[i, :len(a)] = True
            preds = []
            with torch.no_grad():
                pos = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos,
                               **cache_kwargs(cache), use_cache=True).logits[:, -1]
                for t in range(steps):
                    lp = torch.log_softmax(logits.float(), -1)
                    nll = -lp.gather(1, tgt[:, t:t + 1]).squeeze(1)
                    total += float(nll[valid[:, t]].sum())
                    count += int(valid[:, t].sum())
                    preds.append(logits.argmax(-1))
                    mask = torch.cat([mask, valid[:, t:t + 1].long()], dim=1)
                    pos = pos[:, -1:] + 1
                    logits = model(input_ids=tgt[:, t:t + 1], attention_mask=mask, position_ids=pos,
                                   **cache_kwargs(cache), use_cache=True).logits[:, -1]
            pred = torch.stack(preds, 1)
            if kind == "none":
                argmax_none.append(pred)
            else:
                agree += int((pred == argmax_none[bi])[valid].sum())
                seen += int(valid.sum())
            restore_model(model)
        out[kind] = {"nll": total / count, "tokens": count, "top1_agree": agree / seen if seen else 1.0}
    return out


def common_prefix(a: str, b: str) -> float:
    """Length of the common prefix of two completions over the longer one's length (1.0: identical)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b)) if max(len(a), len(b)) else 1.0


def gsm8k_worker(kind: str, n: int, max_new_tokens: int, out: Path, threads: int) -> None:
    """One cache kind on the first ``n`` GSM8K test problems; writes ``out`` (JSON)."""
    from rlkit.data import build_dataset
    from rlkit.eval.math_eval import GenerationSettings, evaluate_rows
    from rlkit.recipe import DatasetSpec

    model, tok = load(threads)
    rows = build_dataset(DatasetSpec(name="gsm8k", path=str(data_dir() / "gsm8k_test.jsonl"), split="test", limit=n),
                         tok).to_list()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=16,
                                  kv_cache=None if kind == "none" else config(kind))
    t0 = time.time()
    summary, records = evaluate_rows(model, tok, rows, settings, progress=True)
    out.write_text(json.dumps({"kind": kind, "summary": summary, "seconds": time.time() - t0,
                               "records": [{k: r[k] for k in ("completion", "extracted", "correct")} for r in records]})
                   + "\n")


def gsm8k(kinds, n: int, max_new_tokens: int, out: Path, jobs: int, threads: int) -> dict:
    def one(kind):
        f = out / f"gsm8k_{kind}_{n}.json"
        if not f.exists():
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
            log = out / f"gsm8k_{kind}_{n}.log"
            with open(log, "w") as fh:
                r = subprocess.run([sys.executable, __file__, "--gsm8k-worker", kind, "--gsm8k", str(n),
                                    "--max-new-tokens", str(max_new_tokens), "--threads", str(threads),
                                    "--out", str(out)], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
            if r.returncode != 0:
                raise RuntimeError(f"GSM8K worker {kind} failed; see {log}:\n" + log.read_text()[-3000:])
        return json.loads(f.read_text())

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(kinds, pool.map(one, kinds)))


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="24 GSM8K problems, 1k context only", smoke="seconds-scale, for tests")
    p.add_argument("--gsm8k", type=int, default=None, help="GSM8K test problems (greedy)")
    p.add_argument("--gsm8k-kinds", nargs="+", default=["polarquant", "think"], choices=list(KINDS),
                   help="compressed caches evaluated on GSM8K (the default cache always is)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--teacher-forced", type=int, default=None,
                   help="GSM8K reference solutions scored token by token through each cache (default 64)")
    add_jobs_threads(p, jobs_help="GSM8K evaluations at a time (one process each)")
    p.add_argument("--speed-repeats", type=int, default=None, help="alternating rounds for the decode timing")
    add_out(p, "output folder (default: runs/bench_kv_<preset>)")
    p.add_argument("--gsm8k-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    preset = preset_of(a)
    n_gsm, contexts, steps, rounds, haystack, depths, n_names = PRESETS[preset]
    n_tf = {"smoke": 4, "quick": 16, "full": 64}[preset] if a.teacher_forced is None else a.teacher_forced
    n_gsm = a.gsm8k if a.gsm8k is not None else n_gsm
    rounds = a.speed_repeats or rounds
    max_new = a.max_new_tokens or (16 if preset == "smoke" else 256)
    out = Path(a.out or ROOT / "runs" / f"bench_kv_{preset}")
    out.mkdir(parents=True, exist_ok=True)
    if a.gsm8k_worker:
        gsm8k_worker(a.gsm8k_worker, n_gsm, max_new, out / f"gsm8k_{a.gsm8k_worker}_{n_gsm}.json", a.threads)
        return 0
    if not (data_dir() / "gsm8k_test.jsonl").is_file():
        p.error(f"{data_dir() / 'gsm8k_test.jsonl'} not found; set RLKIT_DATA_DIR")
    print(f"KV-cache compression on {MODEL} ({preset}): contexts {list(contexts)}, {n_gsm} GSM8K problems, "
          f"out {out}", flush=True)
    t0 = time.time()
    kinds_gsm = ["none"] + [k for k in a.gsm8k_kinds if k != "none"]
    # GSM8K runs in the background processes while this one measures bytes, speed and retrieval
    with ThreadPoolExecutor(max_workers=1) as bg:
        future = bg.submit(gsm8k, kinds_gsm, n_gsm, max_new, out, a.jobs, a.threads)
        model, tok = load(a.threads)
        speed = bytes_and_speed(model, tok, contexts, steps, rounds)
        for n in contexts:
            for k in ("none",) + KINDS:
                s = speed[n][k]
                print(f"context {n}: {k:>10}: key bytes {s['bytes_ratio']:.3f}x of 16-bit ({s['bits_per_element']:.2f} "
                      f"bits/element over {s['tokens']} tokens), decode {s['tokens_per_s']:.1f} tok/s "
                      f"({s['speed_ratio']:.2f}x)", flush=True)
        ret = retrieval(model, tok, haystack, depths, n_names)
        for k, r in ret.items():
            print(f"retrieval ({r['context_tokens']} tokens): {k:>10}: {r['accuracy']:.2f} by depth "
                  + ", ".join(f"{d}: {v:.2f}" for d, v in r["by_depth"].items()), flush=True)
        tf = teacher_forced(model, tok, n_tf, max_tokens=24 if preset == "smoke" else None)
        for k, r in tf.items():
            print(f"GSM8K reference solutions, teacher-forced ({n_tf} problems, {r['tokens']} tokens): {k:>10}: "
                  f"NLL {r['nll']:.4f}, top-1 agreement with the default cache {r['top1_agree']:.3f}", flush=True)
        gsm = future.result()
    fields: dict[str, float] = {}
    longest = max(contexts)
    for k in KINDS:
        fields[f"{SHORT[k]}_bytes_ratio"] = speed[longest][k]["bytes_ratio"]
    base = gsm["none"]
    base_acc = base["summary"]["pass@1"]
    print(f"GSM8K ({n_gsm} problems, greedy): default cache {100 * base_acc:.1f}% "
          f"({base['seconds']:.0f} s)", flush=True)
    for k in kinds_gsm[1:]:
        g = gsm[k]
        acc = g["summary"]["pass@1"]
        same = sum(a_["completion"] == b_["completion"] for a_, b_ in zip(g["records"], base["records"])) / n_gsm
        same_ans = sum(a_["extracted"] == b_["extracted"] for a_, b_ in zip(g["records"], base["records"])) / n_gsm
        prefix = statistics.mean(common_prefix(a_["completion"], b_["completion"])
                                 for a_, b_ in zip(g["records"], base["records"]))
        fields[f"gsm8k_delta_{SHORT[k]}"] = 100 * (acc - base_acc)
        fields[f"prefix_agree_{SHORT[k]}"] = prefix
        fields[f"agree_{SHORT[k]}"] = same
        fields[f"answer_agree_{SHORT[k]}"] = same_ans
        print(f"GSM8K {k}: {100 * acc:.1f}% (delta {100 * (acc - base_acc):+.1f} points), identical completions "
              f"{same:.2f}, same extracted answer {same_ans:.2f}, common prefix {prefix:.2f} of the longer "
              f"completion ({g['seconds']:.0f} s)", flush=True)
    fields["gsm8k_acc_none"] = 100 * base_acc
    for n in contexts:
        for k in KINDS:
            fields[f"decode_ratio_{SHORT[k]}_{n}"] = speed[n][k]["speed_ratio"]
        fields[f"decode_tps_none_{n}"] = speed[n]["none"]["tokens_per_s"]
    for k, r in ret.items():
        fields[f"retrieval_{SHORT[k]}"] = r["accuracy"]
    for k in KINDS:
        fields[f"tf_nll_delta_{SHORT[k]}"] = tf[k]["nll"] - tf["none"]["nll"]
        fields[f"tf_top1_agree_{SHORT[k]}"] = tf[k]["top1_agree"]
    (out / "results.json").write_text(json.dumps({
        "preset": preset, "fields": fields, "speed": {str(n): v for n, v in speed.items()}, "retrieval": ret,
        "teacher_forced": tf,
        "gsm8k": {k: {"summary": v["summary"], "seconds": v["seconds"]} for k, v in gsm.items()}}, indent=1) + "\n")
    print(f"wall time {time.time() - t0:.0f} s")
    order = ["polar_bytes_ratio", "think_bytes_ratio", "gsm8k_delta_polar", "gsm8k_delta_think"]
    keys = [k for k in order if k in fields] + [k for k in fields if k not in order]
    print_result(**{k: float(fields[k]) for k in keys}, gsm8k_n=n_gsm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
