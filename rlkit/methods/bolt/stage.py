"""BOLT's generating stages (arXiv 2502.03860; see ``docs/methods/bolt.md``).

- ``method: bolt_bootstrap`` (Stage 1, long-CoT bootstrapping): for every query of ``data.train``, an in-context
  prompt with ``n_shots`` (3) of the hand-written (query, thoughts, solution) examples in ``examples`` (10 shipped
  in ``recipes/bolt/icl_examples.jsonl``), drawn at random with a seed per query; ``num_samples`` (8) responses;
  the format filter; the outcome score of the **solution part only** with the recipe's ``rewards`` (the
  verifiable ``math_accuracy``, a ``reward_model`` by hub id or path, any ``callable``); then the global
  ``percentile`` (30th) cut over the format-valid scores and the best response per query
  (:func:`~rlkit.methods.bolt.core.bootstrap_select`). Datasets: ``samples`` (every response) and ``selected``
  (the kept ones, with ``solution`` = the thoughts and solution in the thought format, what Stage 2's ``sft``
  trains on after the plain query).
- ``method: bolt_sample`` (Stage 3's sampler): the same without in-context examples or selection: on-policy
  samples from the current policy on the plain query, scored the same way, for ``dpo`` with ``pairs:
  best_worst`` (chosen = best, rejected = worst, format violators lowest).

Rows of ``samples.jsonl``: the input row's fields (its reference ``solution``, if any, as ``reference_solution``),
``prompt_index``, ``sample_index``, ``prompt`` (the text the model saw), ``completion``, ``format_ok``,
``thoughts`` and ``solution`` (the parsed parts; None for a violator), ``reward`` (weighted outcome score of the
solution; None for a violator, which is not scored), ``rewards`` (each by name), ``status`` (the engine's, or
``format`` for a violator), token counts, ``finish_reason``, ``icl_examples`` (the example indices; bootstrap
only), ``model``, ``seed``. Resumable like ``sample``: chunks of prompts appended whole; a restart keeps the
prompts with all their samples and generates the rest (a prompt cut off mid-way is generated again).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ...config import RecipeError
from .. import register_method
from ..sample import (GenerationArgs, GeneratingMethod, _main, _num, _status_counts, check_generation_fields,
                      read_complete_rows, write_resume_meta)
from ..base import StageOutput
from .core import ThoughtFormat, bootstrap_select

__all__ = ["BoltBootstrapConfig", "BoltSampleConfig", "DEFAULT_EXAMPLES", "load_examples", "icl_prompt"]

DEFAULT_EXAMPLES = Path(__file__).resolve().parents[3] / "recipes" / "bolt" / "icl_examples.jsonl"
DEFAULT_INSTRUCTION = ("Answer in two parts. First write your internal thoughts between {start} and {end}: analyse "
                       "the problem, plan, try alternatives where useful and check your work. Then write the "
                       "solution for the reader.")


@dataclass
class BoltSampleConfig(GenerationArgs):
    """Settings of ``bolt_sample`` (Stage 3's on-policy sampler; recipe section ``args:``): the shared generation
    settings (:class:`~rlkit.methods.sample.GenerationArgs`; temperature and top_p 1.0 as the paper's Stage 3) and
    these."""

    num_samples: int = 8
    """Responses per query (the paper: 8 in Stages 1 and 3)."""
    max_new_tokens: int = 1024
    """Longest response, in tokens (the paper trains at up to 16,384 tokens; set what the model and budget allow)."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Extra ``vllm.LLM(...)`` arguments for backend vllm, e.g. ``{tensor_parallel_size: 8}`` for a 70B model."""
    thought_start: str = ThoughtFormat.start
    """Marker opening the internal thoughts (the paper's delimiters are unconfirmed)."""
    thought_end: str = ThoughtFormat.end
    """Marker closing them; the solution follows."""

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        check_generation_fields(self, self.num_samples, "num_samples", "sample")
        ThoughtFormat(self.thought_start, self.thought_end)

    @property
    def format(self) -> ThoughtFormat:
        return ThoughtFormat(self.thought_start, self.thought_end)


@dataclass
class BoltBootstrapConfig(BoltSampleConfig):
    """Settings of ``bolt_bootstrap`` (Stage 1; recipe section ``args:``)."""

    examples: str | None = None
    """jsonl of hand-written in-context examples with ``query``, ``thoughts`` and ``solution`` (None: the 10
    shipped in ``recipes/bolt/icl_examples.jsonl``, written for rlkit; the paper's 10 are unpublished)."""
    n_shots: int = 3
    """Examples in each prompt, drawn at random per query (the paper: 3 of 10)."""
    percentile: float = 30.0
    """Responses scoring below this percentile of all format-valid scores are dropped (the paper: 30)."""
    instruction: str = DEFAULT_INSTRUCTION
    """What the prompt says before the examples (``{start}`` / ``{end}``: the markers; "" for none). The paper's
    formatting prompt is unpublished: this one is rlkit's."""
    min_selected: int = 1
    """Fail (one line, before Stage 2 would) when fewer responses are kept (0: never, e.g. to only measure how well a
    model follows the in-context format)."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_shots < 0:
            raise ValueError(f"n_shots must be >= 0, got {self.n_shots}")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")


def load_examples(path: str | Path | None, fmt: ThoughtFormat, n_shots: int,
                  where: str = "args.examples") -> list[dict]:
    """The in-context examples of ``path`` (default: the shipped ten), checked: at least ``n_shots``, each with
    non-empty ``query``, ``thoughts`` and ``solution``, each passing the format filter once rendered."""
    p = Path(path) if path else DEFAULT_EXAMPLES
    if not p.is_file():
        raise RecipeError(f"{where}: {p} not found (a jsonl of {{query, thoughts, solution}} rows)")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            raise RecipeError(f"{where}: {p} line {n} is not valid JSON") from None
        for key in ("query", "thoughts", "solution"):
            if not isinstance(ex, dict) or not isinstance(ex.get(key), str) or not ex[key].strip():
                raise RecipeError(f"{where}: {p} line {n} needs a non-empty text {key!r}")
        if fmt.parse(fmt.render(ex["thoughts"], ex["solution"])) != (ex["thoughts"].strip(), ex["solution"].strip()):
            raise RecipeError(f"{where}: {p} line {n} fails the format filter (a thought marker inside the thoughts "
                              "or the solution?)")
        out.append(ex)
    if len(out) < n_shots:
        raise RecipeError(f"{where}: {p} has {len(out)} examples, fewer than n_shots={n_shots}")
    return out


def draw_shots(n_examples: int, n_shots: int, seed: int, prompt_index: int) -> list[int]:
    """The example indices of one query's prompt: ``n_shots`` distinct ones, seeded by (seed, query)."""
    return random.Random(seed * 1_000_003 + prompt_index).sample(range(n_examples), n_shots)


def icl_prompt(prompt, shots: list[dict], template: str, fmt: ThoughtFormat, instruction: str = ""):
    """The query's ``prompt`` (text or chat messages, as the recipe's template wrote it) preceded by the
    examples in the same template and the format ``instruction``: for chat, a system message and one user /
    assistant turn per example; for text, the examples' prompts each followed by the response, blank-line
    separated."""
    from ...data import format_prompt

    note = instruction.format(start=fmt.start, end=fmt.end) if instruction else ""
    answers = [fmt.render(ex["thoughts"], ex["solution"]) for ex in shots]
    if isinstance(prompt, str):
        blocks = [f"{format_prompt(ex['query'], template)}{a}" for ex, a in zip(shots, answers)]
        return "\n\n".join(([note] if note else []) + blocks + [prompt])
    messages = [dict(m) for m in prompt]
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if note:
        system = [{"role": "system", "content": "\n\n".join([m["content"] for m in system] + [note])}]
    turns = []
    for ex, a in zip(shots, answers):
        turns += [format_prompt(ex["query"], "chat")[-1], {"role": "assistant", "content": a}]
    return system + turns + rest


class _BoltGenerating(GeneratingMethod):
    """Shared run of ``bolt_bootstrap`` and ``bolt_sample`` (module docstring)."""

    icl: bool = False

    def check(self, run, config, where: str) -> None:
        super().check(run, config, where)
        if self.icl:
            load_examples(config.examples, config.format, config.n_shots, f"{where}.examples")

    def run(self, run, ctx) -> StageOutput:
        from tqdm.auto import tqdm

        from ...data import build_dataset, resolve_template
        from ...rewarding import answer_check_for, score
        from ...rollout import generate, render_prompts

        config = self.make_config(run)
        fmt = config.format
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path, meta_path = out / "samples.jsonl", out / "samples.meta.json"
        model_name = ctx.model_path or run.model.name
        write_resume_meta(path, meta_path, config, run, model_name)
        examples = load_examples(config.examples, fmt, config.n_shots) if self.icl else []
        template = resolve_template(run.data.train.template, ctx.tokenizer)

        rows = build_dataset(run.data.train, ctx.tokenizer).to_list()
        old = read_complete_rows(path, self.name)
        counts: dict[int, int] = {}
        for r in old:
            counts[r["prompt_index"]] = counts.get(r["prompt_index"], 0) + 1
        done = {i for i, c in counts.items() if c == config.num_samples}
        if len(done) < len(counts) and _main():  # a prompt cut off mid-way: its rows go, it is generated again
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in old if r["prompt_index"] in done))
        todo = [i for i in range(len(rows)) if i not in done]
        funcs, weights, names, engine, vllm_path = self.scoring(run, ctx, config.backend, model_name)
        written, bar = 0, tqdm(total=len(rows), initial=len(rows) - len(todo), desc=self.name, disable=not _main())
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start:start + config.chunk_size]
            shots = {i: draw_shots(len(examples), config.n_shots, run.seed, i) if self.icl else [] for i in chunk}
            raw = [icl_prompt(rows[i]["prompt"], [examples[k] for k in shots[i]], template, fmt, config.instruction)
                   if self.icl else rows[i]["prompt"] for i in chunk]
            prompts = render_prompts(raw, ctx.tokenizer)
            settings = config.settings(run, chunk[0], vllm_kwargs=dict(config.vllm_kwargs))
            outs = generate(ctx.model, ctx.tokenizer, prompts, settings, config.num_samples,
                            do_sample=config.temperature > 0, progress=False, model_path=vllm_path)
            flat = [(i, k, p, c) for i, p, cs in zip(chunk, prompts, outs) for k, c in enumerate(cs)]
            parts = [fmt.parse(c.text) for _, _, _, c in flat]
            valid = [n for n, part in enumerate(parts) if part is not None]
            scored = None
            if valid:  # the outcome scorer reads the solution only, never the thoughts
                cols = {key: [rows[flat[n][0]][key] for n in valid] for key in rows[0] if key != "prompt"}
                scored = score(engine, funcs, weights, [flat[n][2] for n in valid], [parts[n][1] for n in valid],
                               None, cols, answer_check=answer_check_for(run.rewards))
            at = {n: j for j, n in enumerate(valid)}
            prompt_tokens = {i: len(ctx.tokenizer(p, add_special_tokens=False)["input_ids"])
                             for i, p in zip(chunk, prompts)}
            lines = []
            for n, (i, k, p, c) in enumerate(flat):
                row = {key: v for key, v in rows[i].items() if key not in ("prompt", "solution")}
                if "solution" in rows[i]:
                    row["reference_solution"] = rows[i]["solution"]
                ok = n in at
                row.update(prompt_index=i, sample_index=k, prompt=p, completion=c.text, format_ok=ok,
                           thoughts=parts[n][0] if ok else None, solution=parts[n][1] if ok else None,
                           reward=scored.total[at[n]] if ok else None,
                           rewards={name: _num(v) for name, v in zip(names, scored.per_func[at[n]])} if ok else {},
                           status=scored.status[at[n]] if ok else "format",
                           prompt_tokens=prompt_tokens[i], completion_tokens=len(c.token_ids),
                           finish_reason=c.finish_reason,
                           model=model_name, seed=run.seed)
                if self.icl:
                    row["icl_examples"] = shots[i]
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            if _main():
                with path.open("a") as f:
                    f.write("".join(lines))
            written += len(lines)
            bar.update(len(chunk))
            bar.set_postfix(format_ok=sum(p is not None for p in parts), written=written)
        bar.close()
        total = read_complete_rows(path, self.name) if _main() else []
        scores = [r["reward"] for r in total if r["format_ok"] and r["reward"] is not None]
        summary = {"samples": len(total), "prompts": len(rows), "written_now": written,
                   "format_rate": round(sum(r["format_ok"] for r in total) / len(total), 4) if total else None,
                   "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
                   "mean_score_all": round(sum(r["reward"] or 0.0 for r in total) / len(total), 4) if total else None,
                   "status": _status_counts(total)}
        datasets = {"samples": str(path)}
        if self.icl:
            datasets["selected"] = str(self.select(total, fmt, config.percentile, out, summary))
        print(f"[rlkit] {self.name}: {len(total)} responses for {len(rows)} queries in {path} (format "
              f"{summary['format_rate']}, mean score of the valid {summary['mean_score']}"
              + (f", {summary['selected']} kept" if self.icl else "") + ")", flush=True)
        return StageOutput(model=model_name, datasets=datasets, summary=summary)

    @staticmethod
    def select(rows: list[dict], fmt: ThoughtFormat, q: float, out: Path, summary: dict) -> Path:
        """Write ``selected.jsonl``: the global percentile cut and the best response per query."""
        valid = [bool(r["format_ok"]) and r["reward"] is not None for r in rows]
        kept = bootstrap_select([r["prompt_index"] for r in rows], [r["reward"] if v else 0.0 for r, v in
                                                                    zip(rows, valid)], valid, q)
        path, tmp = out / "selected.jsonl", out / "selected.jsonl.tmp"
        if _main():
            with tmp.open("w") as f:
                for i in kept:
                    row = dict(rows[i], solution=fmt.render(rows[i]["thoughts"], rows[i]["solution"]),
                               external_solution=rows[i]["solution"])
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            tmp.replace(path)
        ok = [rows[i]["status"] == "ok" for i in kept]
        summary.update(selected=len(kept), selected_ok_rate=round(sum(ok) / len(ok), 4) if ok else None)
        return path


@register_method
class BoltSampleMethod(_BoltGenerating):
    """``method: bolt_sample``: on-policy responses scored on their solution part (BOLT Stage 3's sampler)."""

    name = "bolt_sample"
    outputs = ("samples",)
    config = BoltSampleConfig


@register_method
class BoltBootstrapMethod(_BoltGenerating):
    """``method: bolt_bootstrap``: in-context long-CoT bootstrapping with the percentile cut (BOLT Stage 1)."""

    name = "bolt_bootstrap"
    outputs = ("samples", "selected")
    config = BoltBootstrapConfig
    icl = True

    def run(self, run, ctx) -> StageOutput:
        output = super().run(run, ctx)
        kept = output.summary.get("selected", 0)
        if kept < self.make_config(run).min_selected:
            raise RecipeError(f"{self.name}: {kept} responses passed the format filter and the cut, too few for "
                              "Stage 2 (args.min_selected); use a model that follows the in-context format (the "
                              "paper bootstraps with a 70B model), more samples, or a larger max_new_tokens")
        return output
