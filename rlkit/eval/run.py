"""``rlkit eval``: load a model, build a benchmark's prompts, evaluate, write completions and summary.

Decoders: ``greedy`` (pass@1, plus pass@k / maj@k with ``samples``, and best-of-N with a ``select`` rule),
``value_search`` (value-guided step-level beam search steered by a saved value model, HF backend only) and
``rsd`` (reward-guided speculative decoding: a draft model, a target model and a PRM or value model; HF or
vLLM).

``calibration`` (greedy decoder, HF backend): the model's confidence in each greedy final answer, the ECE and a
reliability diagram (``reliability.png`` beside ``summary.json``); see :mod:`rlkit.eval.calibration`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import build_dataset
from ..recipe import DatasetSpec, ModelSpec
from .math_eval import GenerationSettings, evaluate_rows, evaluate_rsd, evaluate_search, write_outputs

DECODERS = ("greedy", "value_search", "rsd")


def _check_decoder(decoder: str, backend: str, value_model: str | None, samples: int, kv_cache,
                   model: str | None = None, draft: str | None = None, target: str | None = None,
                   scorer: str | None = None, select: str | None = None) -> None:
    from ..config import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; use one of {', '.join(DECODERS)}")
    if decoder != "rsd":
        for flag, value in (("--draft", draft), ("--target", target), ("--scorer", scorer)):
            if value is not None:
                raise ConfigError(f"{flag} only applies to --decoder rsd")
        if model is None:
            raise ConfigError("rlkit eval needs --model (or --decoder rsd with --draft, --target and --scorer)")
    if select is not None and (decoder != "greedy" or not samples):
        raise ConfigError("--select picks one of --samples N completions: give --samples N (greedy decoder)")
    if decoder == "rsd":
        if value_model is not None:
            raise ConfigError("--value-model applies to --decoder value_search; rsd takes its PRM as --scorer DIR")
        if draft is None:
            raise ConfigError("--decoder rsd needs --draft MODEL (the small model that proposes each step)")
        if target is None and model is None:
            raise ConfigError("--decoder rsd needs --target MODEL (or --model, the default target)")
        if scorer is None:
            raise ConfigError("--decoder rsd needs --scorer DIR (a PRM, a `method: prm` stage's final/, or a value "
                              "model)")
        if samples:
            raise ConfigError("--samples applies to the greedy decoder; rsd decodes one solution per problem")
        if kv_cache is not None:
            raise ConfigError("--kv-cache is not supported with --decoder rsd")
        return
    if decoder != "value_search":
        if value_model is not None:
            raise ConfigError("--value-model only applies to --decoder value_search")
        return
    if backend != "hf":
        raise ConfigError("--decoder value_search runs on the HF backend only (it generates one step at a time "
                          "with transformers generate); drop --backend vllm")
    if value_model is None:
        raise ConfigError("--decoder value_search needs --value-model DIR (a saved value model, e.g. an OREO "
                          "stage's final/critic)")
    if samples:
        raise ConfigError("--samples applies to the greedy decoder; value_search returns one solution per problem")
    if kv_cache is not None:
        raise ConfigError("--kv-cache is not supported with --decoder value_search")


def _check_calibration(calibration: str | None, ece_bins: int, decoder: str, backend: str) -> None:
    from ..config import ConfigError
    from .calibration import CONFIDENCE_MODES

    if calibration is None:
        return
    if calibration not in CONFIDENCE_MODES:
        raise ConfigError(f"unknown --calibration {calibration!r}; use one of {', '.join(CONFIDENCE_MODES)}")
    if isinstance(ece_bins, bool) or not isinstance(ece_bins, int) or ece_bins < 1:
        raise ConfigError(f"--ece-bins must be a positive integer, got {ece_bins!r}")
    if decoder != "greedy":
        raise ConfigError(f"--calibration scores the greedy decoder's answers; drop it for --decoder {decoder}")
    if backend != "hf":
        raise ConfigError("--calibration needs --backend hf: token log-probabilities are not read from vLLM's "
                          "offline engine yet")


def check_value_model_dir(path: str) -> None:
    """One-line ModelError unless ``path`` holds a saved value model."""
    from ..models import ModelError
    from ..value import is_value_model_dir

    if not is_value_model_dir(path):
        raise ModelError(f"--value-model {path} is not a value model folder (no rlkit value_model.json); pass the "
                         "critic folder an OREO stage writes, e.g. <run>/final/critic")


def check_scorer_dir(path: str) -> None:
    """One-line ModelError unless ``path`` holds a saved PRM (``prm.json``) or value model (``value_model.json``)."""
    from ..models import ModelError
    from ..process_reward import is_prm_dir
    from ..value import is_value_model_dir

    if not (is_prm_dir(path) or is_value_model_dir(path)):
        raise ModelError(f"--scorer {path} is not a PRM or value-model folder (no rlkit prm.json or value_model.json); "
                         "pass a `method: prm` stage's final/ or an OREO stage's final/critic")


def _reject_tiny(*names: str | None) -> None:
    from ..models import ModelError

    if "tiny" in names:
        raise ModelError("--model tiny is an untrained random model; pass a trained checkpoint folder instead")


def _decoding_model(name: str, dtype: str, backend: str):
    """An ``rlkit.rollout.rsd.DecodingModel``: HF weights on the GPU when there is one, or (vLLM) the tokenizer
    and the path the engine loads."""
    from ..models import BUILTIN_MODELS, builtin_path, load_model, load_tokenizer
    from ..rollout.rsd import DecodingModel

    spec = ModelSpec(name=name, dtype=dtype)
    if backend == "vllm":
        path = str(builtin_path(name)) if name in BUILTIN_MODELS else name
        return DecodingModel(None, load_tokenizer(spec), path=path)
    import torch

    lm, tokenizer = load_model(spec)
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    return DecodingModel(lm, tokenizer, path=name)


def _run_rsd(model, data, temperature, max_new_tokens, batch_size, backend, dtype, vllm, draft, target, scorer,
             rsd) -> tuple[dict, list[dict], object]:
    from ..process_reward import load_step_scorer
    from ..rollout.rsd import RSDSettings

    target = target or model
    _reject_tiny(draft, target)
    check_scorer_dir(scorer)  # before any model loads
    if backend == "vllm":
        from ..rollout.settings import VLLMSettings
        from ..rollout.vllm import platform

        platform()
        if vllm is None:
            vllm = VLLMSettings(dtype=dtype)
    fields = dataclasses.asdict(rsd) if rsd is not None else {}
    fields.update(max_total_tokens=max_new_tokens, batch_size=batch_size, backend=backend, vllm=vllm)
    if temperature is not None:
        fields.update(draft_temperature=temperature, target_temperature=temperature)
    settings = RSDSettings(**fields)
    draft_lm = _decoding_model(draft, dtype, backend)
    target_lm = _decoding_model(target, dtype, backend)
    step_scorer = load_step_scorer(scorer, tokenizer=target_lm.tokenizer, dtype=dtype)
    ds = build_dataset(data, draft_lm.tokenizer)
    try:
        summary, records = evaluate_rsd(draft_lm, target_lm, ds.to_list(), step_scorer, settings)
    finally:
        if backend == "vllm":
            from ..rollout.vllm import close_engines

            close_engines()
    summary.update({"draft": draft, "target": target, "scorer": scorer, "model": target})
    return summary, records, vllm


def load_value_model(path: str, tokenizer, dtype: str = "auto"):
    """The value model saved at ``path`` (on the GPU when there is one), with a tokenizer: its own if one was
    saved with it, else ``tokenizer`` (the policy's). One-line ModelError when ``path`` is not a value model."""
    import torch

    from ..value import ValueModel

    check_value_model_dir(path)
    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    vm = ValueModel.from_pretrained(path, dtype=torch_dtype, device="cuda" if torch.cuda.is_available() else None)
    if getattr(vm, "tokenizer", None) is None:
        vm.attach_tokenizer(tokenizer)
    elif vm.tokenizer.get_vocab() != tokenizer.get_vocab():
        import warnings

        warnings.warn(f"the value model at {path} has a different vocabulary from the policy's tokenizer; it "
                      "scores the text with its own tokenizer", stacklevel=2)
    vm.eval()
    return vm


def run_eval(model: str, benchmark: str, split: str = "test", limit: int | None = None, samples: int = 0,
             temperature: float | None = None, max_new_tokens: int = 512, batch_size: int = 16, backend: str = "hf",
             template: str = "auto", output_dir: str | None = None, dtype: str = "auto",
             kv_cache=None, vllm=None, path: str | None = None, decoder: str = "greedy",
             value_model: str | None = None, search=None, draft: str | None = None, target: str | None = None,
             scorer: str | None = None, rsd=None, select: str | None = None, synthetic: dict | None = None,
             idk_phrases: str | list[str] | None = None, idk_lambda: float = 0.2, calibration: str | None = None,
             ece_bins: int = 10, patches: list[dict] | None = None, prompt_style: str | None = None,
             judge: str | None = None) -> dict:
    """Evaluate ``model`` on ``benchmark``; ``kv_cache`` is an ``rlkit.kvcache.KVCacheConfig`` (HF backend),
    ``vllm`` an ``rlkit.rollout.VLLMSettings`` (vLLM backend; its dtype defaults to ``dtype``), ``path`` a local
    jsonl for a known benchmark.

    ``decoder="value_search"`` runs value-guided step-level beam search steered by the value model saved at
    ``value_model``, with ``search`` (an ``rlkit.rollout.SearchSettings``; its ``max_total_tokens`` becomes
    ``max_new_tokens``, its ``batch_size`` ``batch_size`` problems, and its ``temperature`` ``temperature`` when
    given). ``temperature`` defaults to 0.6 for sampled pass@k and to the search's (1.0) for value search.

    ``decoder="rsd"`` runs reward-guided speculative decoding with the ``draft`` and ``target`` models (the target
    defaults to ``model``) and the step scorer saved at ``scorer`` (a PRM or a value model), with ``rsd`` (an
    ``rlkit.rollout.rsd.RSDSettings``; its ``max_total_tokens`` becomes ``max_new_tokens``, its ``batch_size``
    ``batch_size`` problems, its backend ``backend``, and both temperatures ``temperature`` when given; default 0,
    greedy, as the paper). Every record keeps its RSD record; the summary has the acceptance rate, token counts
    and FLOPs per model.

    ``select`` (``prm:DIR``, ``orm:DIR``, ``majority`` or ``first``, with ``samples``): best-of-N, one of the
    samples chosen per problem (see ``rlkit.eval.select``), ``bon@{samples}`` in the summary.

    ``synthetic``: options of the synthetic task (``benchmark="synthetic"`` only), e.g. a recipe's
    ``{max_operand: 12, min_ops: 2, max_ops: 4}``, so a model is evaluated on the distribution it trained on.

    ``idk_phrases`` (``eval``, ``reward``, ``"phrase1;phrase2"`` or a list; see :mod:`rlkit.eval.idk`): also report
    Auto-CEI's refusal-aware figures, ``precision`` (correct / non-IDK), ``idk_rate``, ``accuracy`` (an IDK answer
    is never correct) and ``f`` with lambda ``idk_lambda``, and mark every record ``idk``.

    ``calibration`` (``answer`` or ``sequence``; greedy decoder, HF backend): every greedy record gets the model's
    ``confidence`` in its final answer (``answer``: the probability of the answer's tokens; ``sequence``: of the
    whole completion), the summary ``ece`` over ``ece_bins`` equal-width bins, ``mean_confidence``, the reliability
    table, and ``outputs.reliability``, a reliability-diagram PNG beside summary.json.

    ``patches``: model patches (``[{"name": "pear", "coefficients": [...]}]``, see :mod:`rlkit.patches`) applied after
    loading, so a patched model (PEAR, HoPE, ...) is measured without saving it first.

    ``benchmark="mathhay:PATH"``: MathHay long-context items (a folder or jsonl from ``rlkit mathhay build``, or the
    released JSON), greedy, with ``prompt_style`` (``short`` or ``released``; None: each item's own) and an
    optional ``judge`` model for answers whose units or scale differ; ``max_new_tokens`` None means 32 with a
    newline stop when every prompt is short, else 512; accuracy per task type x length x placement and ``mathhay.png`` (accuracy
    against length). See :mod:`rlkit.eval.mathhay`."""
    from ..models import load_model, load_tokenizer

    if benchmark.startswith("mathhay:"):
        _check_mathhay(samples, decoder, select, calibration, idk_phrases, synthetic, backend, kv_cache, limit)
        return _run_mathhay(model, benchmark.partition(":")[2], limit, max_new_tokens, batch_size, backend, dtype,
                            kv_cache, vllm, output_dir, patches, prompt_style, judge)

    phrases = None
    if idk_phrases is not None:
        from ..config import ConfigError
        from .idk import parse_idk_phrases

        try:
            phrases = parse_idk_phrases(idk_phrases)
            if not 0.0 <= idk_lambda <= 1.0:
                raise ValueError(f"--idk-lambda must be in [0, 1], got {idk_lambda}")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    if synthetic and benchmark != "synthetic":
        from ..config import ConfigError

        raise ConfigError("--synthetic options apply to --benchmark synthetic only")
    data = DatasetSpec(name=benchmark, split=split, limit=limit, template=template, path=path,
                       synthetic=dict(synthetic or {}))

    _check_decoder(decoder, backend, value_model, samples, kv_cache, model, draft, target, scorer, select)
    _check_calibration(calibration, ece_bins, decoder, backend)
    if decoder == "value_search":
        check_value_model_dir(value_model)  # before the policy loads
    if decoder == "rsd":
        summary, records, vllm = _run_rsd(model, data, temperature, max_new_tokens, batch_size, backend, dtype, vllm,
                                          draft, target, scorer, rsd)
        return _finish(summary, records, benchmark, split, backend, kv_cache, vllm if backend == "vllm" else None,
                       output_dir, f"rsd-{Path(draft).name}-{Path(summary['target']).name}", phrases, idk_lambda)
    _reject_tiny(model)
    selector = None
    if select is not None:
        from .select import load_selector

        selector = load_selector(select, dtype)  # before the policy loads: a wrong folder fails fast
    mspec = ModelSpec(name=model, dtype=dtype, patches=list(patches or []))
    if backend == "vllm":
        if patches:
            from ..config import ConfigError

            raise ConfigError("--patch needs --backend hf (vLLM loads the checkpoint itself): save the patched model "
                              "first (a recipe stage with model.patches) and evaluate that folder")
        from ..models import BUILTIN_MODELS, builtin_path
        from ..rollout.settings import VLLMSettings
        from ..rollout.vllm import platform

        platform()  # a clear error now if vLLM cannot run here, before anything loads
        if vllm is None:
            vllm = VLLMSettings(dtype=dtype)
        tokenizer, lm = load_tokenizer(mspec), None
        model_path = str(builtin_path(model)) if model in BUILTIN_MODELS else model
    else:
        lm, tokenizer = load_model(mspec)
        import torch

        if torch.cuda.is_available():
            lm = lm.to("cuda")
        model_path = model
    critic = load_value_model(value_model, tokenizer, dtype) if decoder == "value_search" else None
    ds = build_dataset(data, tokenizer)
    if decoder == "value_search":
        from ..rollout.search import SearchSettings, parse_step_stops

        fields = dataclasses.asdict(search) if search is not None else {"stop": parse_step_stops(None, benchmark)}
        fields.update(max_total_tokens=max_new_tokens, batch_size=batch_size)
        if temperature is not None:
            fields["temperature"] = temperature
        search = SearchSettings(**fields)
        summary, records = evaluate_search(lm, tokenizer, ds.to_list(), critic, search)
        summary["value_model"] = value_model
    else:
        settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      temperature=0.6 if temperature is None else temperature,
                                      backend=backend, kv_cache=kv_cache, vllm=vllm)
        try:
            summary, records = evaluate_rows(lm, tokenizer, ds.to_list(), settings, samples=samples,
                                             model_path=model_path, selector=selector, calibration=calibration,
                                             ece_bins=ece_bins)
        finally:
            if backend == "vllm":
                from ..rollout.vllm import close_engines

                close_engines()
        summary["decoder"] = "greedy"
    summary["model"] = model
    return _finish(summary, records, benchmark, split, backend, kv_cache, vllm if backend == "vllm" else None,
                   output_dir, Path(model).name, phrases, idk_lambda)


def _check_mathhay(samples, decoder, select, calibration, idk_phrases, synthetic, backend, kv_cache, limit) -> None:
    from ..config import ConfigError

    given = [flag for flag, on in (("--samples", samples), ("--decoder " + decoder, decoder != "greedy"),
                                   ("--select", select), ("--calibration", calibration),
                                   ("--idk-phrases", idk_phrases), ("--synthetic", synthetic)) if on]
    if given:
        raise ConfigError(f"--benchmark mathhay: greedy answers only; drop {', '.join(given)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")


def _run_mathhay(model: str, path: str, limit, max_new_tokens, batch_size, backend, dtype, kv_cache, vllm,
                 output_dir, patches, prompt_style, judge) -> dict:
    """``--benchmark mathhay:PATH``: greedy answers to long-context items, scored numerically (and by ``judge``)."""
    from ..config import ConfigError
    from ..data.mathhay import MathHayError, load_mathhay
    from ..models import load_model
    from .mathhay import evaluate_mathhay, plot_mathhay

    if not path:
        raise ConfigError("--benchmark mathhay:PATH: give the items, e.g. mathhay:runs/mathhay (a folder or jsonl "
                          "from `rlkit mathhay build`, or the released MathHay JSON)")
    try:
        rows = load_mathhay(path)
    except MathHayError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    rows = rows[:limit] if limit is not None else rows
    _reject_tiny(model, judge)
    lm, tokenizer = load_model(ModelSpec(name=model, dtype=dtype, patches=list(patches or [])))
    import torch

    if torch.cuda.is_available():
        lm = lm.to("cuda")
    short = all((prompt_style or r.get("style") or "released") == "short" for r in rows)
    if max_new_tokens is None:
        max_new_tokens = 32 if short else 512
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0.0,
                                  backend=backend, kv_cache=kv_cache, vllm=vllm, stop=["\n"] if short else [])
    judge_lm = None
    if judge is not None:
        judge_lm = load_model(ModelSpec(name=judge, dtype=dtype)) if judge != model else (lm, tokenizer)
    summary, records = evaluate_mathhay(lm, tokenizer, rows, settings, style=prompt_style, judge=judge_lm)
    summary.update({"decoder": "greedy", "model": model, "patches": list(patches or []), "prompt_style": prompt_style,
                    "judge": judge})
    name = Path(model).name
    result = _finish(summary, records, "mathhay:" + path, "test", backend, kv_cache,
                     vllm if backend == "vllm" else None, output_dir, name)
    curve = {int(k): v for k, v in (summary.get("by_length") or {}).items()}
    if curve:
        png = plot_mathhay({_config_label(kv_cache, patches): curve}, Path(result["outputs"]["summary"]).parent
                           / "mathhay.png", title=f"{name} on MathHay")
        result["outputs"]["plot"] = str(png)
    return result


def _config_label(kv_cache, patches) -> str:
    parts = [kv_cache.kind if kv_cache is not None else "default cache"]
    parts += [p["name"] for p in patches or []]
    return " + ".join(parts)


def _finish(summary: dict, records: list[dict], benchmark: str, split: str, backend: str, kv_cache, vllm,
            output_dir: str | None, name: str, idk_phrases=None, idk_lambda: float = 0.2) -> dict:
    """Add the run's settings (and, with ``idk_phrases``, the IDK figures) to the summary and write
    completions.jsonl, summary.json and, with calibration figures, reliability.png."""
    if idk_phrases is not None:
        from .idk import idk_summary

        summary.update(idk_summary(records, idk_phrases, idk_lambda))
    summary.update({"benchmark": benchmark, "split": split, "backend": backend,
                    "kv_cache": kv_cache.to_dict() if kv_cache is not None else None,
                    "vllm": dataclasses.asdict(vllm) if vllm is not None else None})
    out = output_dir or str(Path("runs") / "eval" / f"{name}-{benchmark.replace(':', '_').replace('/', '_')}")
    outputs = {}
    if summary.get("ece") is not None:
        from .calibration import reliability_diagram

        scored = [r for r in records if r.get("confidence") is not None]
        png = reliability_diagram([r["confidence"] for r in scored], [r["correct"] for r in scored],
                                  Path(out) / "reliability.png", summary["ece_bins"],
                                  title=f"{name} on {benchmark} ({summary['confidence']} confidence)")
        outputs["reliability"] = str(png)
    comp, summ = write_outputs(out, summary, records)
    summary["outputs"] = {"completions": str(comp), "summary": str(summ), **outputs}
    return summary
