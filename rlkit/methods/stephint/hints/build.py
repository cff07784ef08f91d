"""StepHint hint rows: reference chains from the data set or verified teacher samples (through ``rlkit.rollout``),
split into steps and hint levels (``build_hints``), and the resumable ``rlkit hints build`` run (``run_build``).
See ``docs/methods/stephint.md``."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .chains import _split_all, hint_levels, reference_of
from .config import GenerateConfig, HintConfig, HintError
from .io import _flat, _meta_path, _repair_tail, read_hints, write_hints

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Generation of reference chains


def default_verifier(completion: str, gold: str) -> bool:
    """``rlkit_rewards`` math accuracy: the completion's extracted final answer equals ``gold``."""
    from rlkit_rewards.math import verify_answer
    from rlkit_rewards.text import extract_answer

    pred = extract_answer(completion)
    return bool(pred is not None and verify_answer(str(gold), pred))


def load_teacher(gen: GenerateConfig) -> GenerateConfig:
    """``gen`` with its teacher loaded through ``rlkit.models`` (HF: model + tokenizer; vLLM: tokenizer)."""
    from ....models import load_model, load_tokenizer
    from ....recipe import ModelSpec

    if gen.backend == "hf" and gen.model is not None:
        return gen
    spec = ModelSpec(name=gen.teacher, dtype=gen.dtype)
    if gen.backend == "vllm":
        if gen.teacher == "tiny":
            raise HintError("backend 'vllm' cannot run the built-in 'tiny' model; use --backend hf")
        _check_vllm()
        return replace(gen, tokenizer=gen.tokenizer or load_tokenizer(spec))
    model, tok = load_model(spec)
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return replace(gen, model=model, tokenizer=tok)


def _check_vllm() -> None:
    from ....rollout.vllm import VLLMError, platform

    try:
        platform()
    except VLLMError as e:
        raise HintError(str(e)) from None


def _teacher_completions(rows: list[dict], gen: GenerateConfig, progress: bool) -> list[list[str]]:
    """Teacher chains through :mod:`rlkit.rollout` (HF ``generate`` or the shared vLLM engine)."""
    from ....data import format_prompt, resolve_template
    from ....rollout import GenerationSettings, generate_texts, render_prompts

    if (gen.backend == "hf" and gen.model is None) or (gen.backend == "vllm" and gen.tokenizer is None):
        gen = load_teacher(gen)
    template = resolve_template(gen.template, gen.tokenizer)
    if template == "chat" and not getattr(gen.tokenizer, "chat_template", None):
        raise HintError("template 'chat' needs a teacher tokenizer with a chat template; use 'plain' or 'think_answer'")
    prompts = render_prompts([format_prompt(r["question"], template, gen.system_prompt) for r in rows], gen.tokenizer)
    do_sample = gen.temperature > 0
    if gen.backend == "hf":
        settings = GenerationSettings(max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                                      temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed)
        return generate_texts(gen.model, gen.tokenizer, prompts, settings, gen.samples, do_sample, progress, "teacher")
    from ....models import BUILTIN_MODELS, builtin_path
    from ....rollout.settings import VLLMSettings
    from ....rollout.vllm import generate_vllm

    _check_vllm()
    path = str(builtin_path(gen.teacher)) if gen.teacher in BUILTIN_MODELS else gen.teacher
    engine_kwargs = dict(gen.vllm_kwargs)
    if gen.seed is not None:
        engine_kwargs.setdefault("seed", gen.seed)  # the engine's seed, as the vLLM teacher always had
    settings = GenerationSettings(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                  backend="vllm")
    outs = generate_vllm(path, prompts, settings, gen.samples, do_sample, vllm=VLLMSettings(dtype=gen.dtype),
                         **engine_kwargs)
    return [[c.text for c in o] for o in outs]


# --------------------------------------------------------------------------------------------------
# Building hint rows


class BuiltHints(list):
    """The output rows of ``build_hints`` (a list), plus ``dropped`` (reason -> count of input rows left
    out: ``no_reference``, ``no_gold``, ``unverified``) and ``step_tokens`` (token length of every step)."""

    def __init__(self, rows=(), dropped: Counter | None = None, step_tokens: list[int] | None = None):
        super().__init__(rows)
        self.dropped = Counter(dropped or {})
        self.step_tokens = list(step_tokens or [])


def _scorer_prompt(row: dict, tokenizer, config: HintConfig):
    if config.prompt_template == "none":
        return None
    from ....data import format_prompt, resolve_template

    template = resolve_template(config.prompt_template, tokenizer)
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise HintError("prompt_template 'chat' needs a tokenizer with a chat template; use 'plain' or 'none'")
    return format_prompt(row["question"], template)


def build_hints(rows: list[dict], tokenizer, config: HintConfig, scorer=None, generate: GenerateConfig | None = None,
                progress: bool = True) -> BuiltHints:
    """Hint rows for ``rows`` (normalized: ``question``, ``answer``, ``solution``?): each kept row is the input
    row plus ``reference``, ``steps``, ``hints`` and ``hint_source`` (``dataset`` | ``generated``). Rows with
    no usable reference are dropped; ``result.dropped`` counts them by reason (also logged)."""
    if not isinstance(config, HintConfig):
        raise HintError("config must be a HintConfig")
    if config.splitter == "adaptive" and scorer is None:
        raise HintError("splitter 'adaptive' needs a scorer model (CLI: --scorer MODEL), or use 'paragraph'/'equal'")
    dropped: Counter = Counter()
    generated: list[list[str]] | None = None
    if generate is not None:
        generated = _teacher_completions(rows, generate, progress) if rows else []
        verify = generate.verifier or default_verifier
    kept, refs, sources = [], [], []
    for i, row in enumerate(rows):
        if "question" not in row:
            raise HintError(f"row {i} has no 'question' (columns: {sorted(row)})")
        ref, source = None, "dataset"
        if generated is not None:
            gold = row.get("answer")
            if gold is None or str(gold).strip() == "":
                reason = "no_gold"
            else:
                reason = "unverified"
                ref = next((c.strip() for c in generated[i] if c.strip() and verify(c, str(gold))), None)
                source = "generated"
            if ref is None and generate.fallback_to_dataset:
                ref, source = reference_of(row), "dataset"
        else:
            reason = "no_reference"
            ref = reference_of(row)
        if ref is None:
            dropped[reason] += 1
            continue
        kept.append(row)
        refs.append(ref)
        sources.append(source)
    prompts = [_scorer_prompt(r, tokenizer, config) for r in kept] if config.splitter == "adaptive" else None
    split = _split_all(refs, tokenizer, config, scorer, prompts, progress)
    out = BuiltHints(dropped=dropped)
    for row, ref, source, (steps, lens) in zip(kept, refs, sources, split):
        out.append({**row, "reference": ref, "steps": steps, "hints": hint_levels(steps), "hint_source": source})
        out.step_tokens.extend(lens)
    if dropped:
        log.info("build_hints: dropped %d of %d rows (%s)", sum(dropped.values()), len(rows), dict(dropped))
    return out


def run_build(data: str, out, config: HintConfig, split: str = "train", path: str | None = None,
              limit: int | None = None, tokenizer: str | None = None, scorer: str | None = None,
              generate: GenerateConfig | None = None, dtype: str = "auto", chunk_size: int = 64,
              progress: bool = True) -> dict:
    """``rlkit hints build``: load rows, tokenizer and models, build hints in chunks appended to ``out``
    (skipping questions already there), and return a summary."""
    from tqdm.auto import tqdm

    from ....data import load_rows
    from ....models import load_model, load_tokenizer
    from ....recipe import DatasetSpec, ModelSpec

    if chunk_size < 1:
        raise HintError("chunk_size must be >= 1")
    if config.splitter == "adaptive" and not scorer:
        raise HintError("--splitter adaptive needs --scorer MODEL (a causal LM sharing the tokenizer's vocabulary); "
                        "or use --splitter paragraph|equal")
    if config.splitter != "adaptive" and scorer:
        raise HintError(f"--scorer is only used by --splitter adaptive (got --splitter {config.splitter})")
    tok_name = tokenizer or scorer
    if not tok_name:
        raise HintError("pass --tokenizer MODEL: the policy model's tokenizer, under which every cut must be "
                        "splittable")
    t0 = time.time()
    out = Path(out)
    meta = {"hint_config": config.settings(), "tokenizer": tok_name, "scorer": scorer, "data": data, "split": split,
            "generate": generate.settings() if generate is not None else None}
    meta = json.loads(json.dumps(meta))
    meta_file = _meta_path(out)
    if out.is_file() and out.stat().st_size > 0 and meta_file.is_file():
        old, new = _flat(json.loads(meta_file.read_text())), _flat(meta)
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise HintError(f"{out} was built with different settings ({'; '.join(diff)}); "
                            "resume with the same options or write to a new --out")
    rows = load_rows(DatasetSpec(name=data, split=split, path=path, limit=limit))
    _repair_tail(out)
    done = {r["question"] for r in read_hints(out)} if out.is_file() else set()
    todo, seen = [], set(done)
    for r in rows:
        if r["question"] not in seen:
            seen.add(r["question"])
            todo.append(r)
    skipped = len(rows) - len(todo)

    scorer_model, tok = None, None
    if scorer and todo:
        scorer_model, tok = load_model(ModelSpec(name=scorer, dtype=dtype))
        if tokenizer and tokenizer != scorer:
            tok = load_tokenizer(ModelSpec(name=tokenizer))
            other = load_tokenizer(ModelSpec(name=scorer))
            if tok.get_vocab() != other.get_vocab():
                raise HintError(f"the scorer {scorer!r} and the tokenizer {tokenizer!r} have different vocabularies; "
                                "the scorer must share the policy tokenizer's vocabulary")
        import torch

        if torch.cuda.is_available():
            scorer_model = scorer_model.to("cuda")
    elif todo:
        tok = load_tokenizer(ModelSpec(name=tok_name))
    if generate is not None and todo:
        generate = load_teacher(generate)

    out.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    if not out.exists():
        out.touch()
    dropped: Counter = Counter()
    written, steps_total, step_tokens, full, sources = 0, 0, [], 0, Counter()
    bar = tqdm(total=len(todo), desc="hints", disable=not progress)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        built = build_hints(chunk, tok, config, scorer_model, generate, progress=False)
        write_hints(out, built, append=True)
        dropped.update(built.dropped)
        written += len(built)
        steps_total += sum(len(r["steps"]) for r in built)
        full += sum(len(r["hints"]) == config.m - 1 for r in built)
        sources.update(r["hint_source"] for r in built)
        step_tokens.extend(built.step_tokens)
        bar.update(len(chunk))
        bar.set_postfix(written=written, dropped=sum(dropped.values()))
    bar.close()
    return {
        "out": str(out),
        "rows_in": len(rows),
        "skipped_existing": skipped,
        "written": written,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped),
        "rows_in_file": len(done) + written,
        "rows_with_all_levels": full,
        "mean_steps": round(steps_total / written, 3) if written else None,
        "mean_tokens_per_step": round(sum(step_tokens) / len(step_tokens), 2) if step_tokens else None,
        "hint_source": dict(sources),
        "splitter": config.splitter,
        "m": config.m,
        "end_marker": config.end_marker,
        "seconds": round(time.time() - t0, 2),
    }
