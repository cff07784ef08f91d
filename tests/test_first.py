"""FIRST (rlkit.methods.first): the calibrated top-k loss, temperature scaling and its choice, the stored top-k
against the teacher, the trainers (resume), the stages in a recipe, and the errors a user can cause."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import TINY_SHAPE
from rlkit.methods.first.calibration import calibrated_logprobs, choose_tau, parse_tau
from rlkit.methods.first.topk import META_FILE, prepare_topk, read_topk
from rlkit.methods.first.trainer import first_loss, kd_loss, student_bucket_logprobs

ROWS = [{"prompt": f"{a}+{b}=", "completion": f"{a}+{b}={a + b}\n#### {a + b}"} for a in range(1, 5) for b in (3, 7)]


def _teacher(V=13, k=4, B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, dim=-1)
    values, ids = torch.topk(lp, k, dim=-1)
    return values, ids, V


def _student_matching(cal: torch.Tensor, ids: torch.Tensor, V: int, use_other: bool) -> torch.Tensor:
    """Student logits whose probabilities on ``ids`` are the calibrated teacher's (and, with the other bucket, the
    rest of the mass spread over the other tokens)."""
    k = ids.shape[-1]
    p = cal.exp()
    rest = p[..., k:].sum(-1, keepdim=True) if use_other else torch.full_like(p[..., :1], 0.3)
    probs = (rest / (V - k)).expand(*ids.shape[:-1], V).clone()
    probs.scatter_(-1, ids, p[..., :k] * (1.0 if use_other else 0.7))
    return probs.log() + 3.0  # logits up to a constant


@pytest.mark.parametrize("use_other", [False, True])
@pytest.mark.parametrize("normalization", ["linear", "softmax"])
def test_loss_is_zero_iff_the_student_equals_the_calibrated_teacher(use_other, normalization):
    lp, ids, V = _teacher()
    mask = torch.ones(ids.shape[:-1])
    tau = 1.7
    cal = calibrated_logprobs(lp, tau, use_other)
    student = _student_matching(cal, ids, V, use_other).requires_grad_(True)
    loss, kl = first_loss(student, ids, lp, mask, tau=tau, use_other=use_other, normalization=normalization)
    assert abs(loss.item()) < 1e-4 and kl.abs().max() < 1e-5
    # the uncalibrated teacher is another target: the same student is now off
    off, _ = first_loss(student, ids, lp, mask, tau=1.0, use_other=use_other, normalization=normalization)
    assert off.item() > 1e-2
    noisy = student.detach() + 0.5 * torch.randn(student.shape, generator=torch.Generator().manual_seed(1))
    loss2, kl2 = first_loss(noisy, ids, lp, mask, tau=tau, use_other=use_other, normalization=normalization)
    assert loss2.item() > 1e-2 and (kl2 > -1e-6).all()
    # summed over the tokens of a row (masked ones excluded), averaged over rows
    mask2 = mask.clone()
    mask2[0, 3:] = 0
    loss3, kl3 = first_loss(noisy, ids, lp, mask2, tau=tau, use_other=use_other, normalization=normalization)
    assert loss3.item() == pytest.approx((kl2 * mask2).sum().item() / 2, rel=1e-5)
    assert (kl3[0, 3:] == 0).all()


def test_other_bucket_is_a_kl_of_log_probabilities():
    """The released other-token branch passes probabilities as log-targets; here the loss is the textbook KL."""
    lp, ids, V = _teacher(V=9, k=3)
    student = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 5)
    loss, _ = first_loss(student, ids, lp, mask, tau=1.0, use_other=True, normalization="softmax")
    p = torch.cat([lp.exp(), 1 - lp.exp().sum(-1, keepdim=True)], -1)
    q_full = torch.softmax(student, -1)
    qk = q_full.gather(-1, ids)
    q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    lin, _ = first_loss(student, ids, lp, mask, tau=1.0, use_other=True, normalization="linear")
    assert lin.item() == pytest.approx(expected.item(), rel=1e-3)
    # the released softmax-over-probabilities is a different (flatter) student distribution
    flat = student_bucket_logprobs(student, ids, use_other=True, normalization="prob_softmax")
    assert torch.allclose(flat, torch.log_softmax(q, -1), atol=1e-6)


def test_temperature_scaling_and_its_limits():
    lp, ids, V = _teacher(V=20, k=5)
    for use_other, n in ((False, 5), (True, 6)):
        uniform = torch.full(lp.shape[:-1] + (n,), 1.0 / n)
        assert torch.allclose(calibrated_logprobs(lp, math.inf, use_other).exp(), uniform)
        assert torch.allclose(calibrated_logprobs(lp, 1e6, use_other).exp(), uniform, atol=1e-5)
        sharp = calibrated_logprobs(lp, 1e-3, use_other).exp()
        assert torch.allclose(sharp[..., 0], torch.ones(()), atol=1e-4) or use_other  # top-1 takes it all
    # tau 1: the stored distribution (renormalised over the top-k; with the other bucket exactly as stored)
    assert torch.allclose(calibrated_logprobs(lp, 1.0, False), torch.log_softmax(lp, -1), atol=1e-6)
    with_other = calibrated_logprobs(lp, 1.0, True).exp()
    assert torch.allclose(with_other[..., :5], lp.exp(), atol=1e-6)
    # over the top-k, scaling the log-probs is softmax(z / tau) of the logits restricted to the top-k
    z = torch.randn(20, generator=torch.Generator().manual_seed(3))
    v, i = torch.topk(torch.log_softmax(z, -1), 5)
    assert torch.allclose(calibrated_logprobs(v, 2.5, False), torch.log_softmax(z[i] / 2.5, -1), atol=1e-6)
    assert parse_tau("auto") is None and parse_tau("2") == 2.0 and parse_tau(0.5) == 0.5
    for bad in ("hot", 0, -1.0):
        with pytest.raises(ValueError, match="tau must be"):
            parse_tau(bad)


@pytest.mark.parametrize("criterion", ["ece", "nll"])
def test_tau_choice_undoes_an_overconfident_teacher(criterion):
    g = torch.Generator().manual_seed(0)
    N, V = 4000, 6
    z = torch.randn(N, V, generator=g) * 1.5
    target = torch.multinomial(torch.softmax(z, -1), 1, generator=g)[:, 0]   # the truth is softmax(z)
    values, ids = torch.topk(torch.log_softmax(2.0 * z, -1), V)              # the teacher is sharper: z * 2
    tau, table = choose_tau(values, ids, target, use_other=False, criterion=criterion)
    assert 1.5 <= tau <= 2.7, table
    at = dict((round(t, 6), v) for t, v in table)
    assert at[round(tau, 6)] < (0.5 * at[1.0] if criterion == "ece" else at[1.0] - 0.1)
    with pytest.raises(ValueError, match="criterion"):
        choose_tau(values, ids, target, use_other=False, criterion="brier")


def test_stored_topk_equals_the_teachers(tiny_model, tmp_path):
    model, tok = tiny_model
    k = 5
    summary = prepare_topk(model, tok, ROWS, tmp_path / "topk", k=k, heldout_fraction=0.25, batch_size=3,
                           teacher_name="tiny")
    data = read_topk(tmp_path / "topk")
    assert len(data.rows) == len(ROWS) and sum(r["heldout"] for r in data.rows) == 2
    assert data.ids.dtype == torch.int32 and data.logprobs.dtype == torch.float32
    with torch.no_grad():
        for i, r in enumerate(data.rows):
            ids = torch.tensor([r["input_ids"]])
            p = r["prompt_length"]
            assert r["input_ids"][-1] == tok.eos_token_id
            assert tok.decode(r["input_ids"][p:-1]) == ROWS[i]["completion"]
            full = torch.log_softmax(model(ids).logits[0, p - 1:-1].float(), -1)
            want_lp, want_ids = torch.topk(full, k, -1)
            got_ids, got_lp = data.row_topk(i)
            assert torch.equal(got_ids.long(), want_ids)
            assert torch.allclose(got_lp, want_lp, atol=1e-5)
    n, V = data.ids.shape[0], len(tok)
    meta = json.loads((tmp_path / "topk" / META_FILE).read_text())
    assert meta["tokens"] == n == sum(len(r["input_ids"]) - r["prompt_length"] for r in data.rows)
    assert meta["bytes_topk"] == n * k * 8 and meta["bytes_full_fp32"] == n * V * 4
    assert meta["bytes_ratio_fp32"] == pytest.approx(2 * k / V)
    assert set(meta["tau"]) == {"topk", "other"} and summary["tau_chosen"] == meta["tau"]["other"]
    assert len(meta["tau_search"]["topk"]) >= 41 and meta["tau_source"].startswith("auto (ece")
    fixed = prepare_topk(model, tok, ROWS, tmp_path / "fixed", k=2, heldout_fraction=0.0, tau=1.0)
    assert fixed["tau"] == {"topk": 1.0, "other": 1.0} and fixed["heldout_rows"] == 0


def test_teacher_generated_responses(tiny_model, tmp_path):
    model, tok = tiny_model
    summary = prepare_topk(model, tok, ROWS[:4], tmp_path / "gen", k=3, responses="generate",
                           heldout_fraction=0.25, max_new_tokens=6)
    data = read_topk(tmp_path / "gen")
    held = [r for r in data.rows if r["heldout"]]
    assert len(held) == 1 and held[0]["completion"] in {r["completion"] for r in ROWS[:4]}  # reference kept
    from rlkit.rollout import GenerationSettings, generate

    own = [r for r in data.rows if not r["heldout"]]
    texts = generate(model, tok, [r["prompt"] for r in own], GenerationSettings(max_new_tokens=6), progress=False)
    assert [r["completion"] for r in own] == [t[0].text for t in texts]
    assert summary["responses"] == "generate"


def _first_args(out, **kw):
    from rlkit.methods.first.trainer import FIRSTConfig

    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
                dataloader_pin_memory=False, use_cpu=True, seed=0)
    base.update(kw)
    return FIRSTConfig(**base)


def test_first_trainer_learns_and_resumes(tiny_model, tiny_spec, char_tokenizer, tmp_path):
    from rlkit.methods.first.trainer import DistillCollator, FIRSTTrainer, load_topk_items
    from rlkit.models import build_tiny_model

    teacher, tok = tiny_model
    prepare_topk(teacher, tok, ROWS, tmp_path / "topk", k=4, heldout_fraction=0.25)
    data = read_topk(tmp_path / "topk")
    items = load_topk_items(data, tok)
    assert len(items) == len(ROWS) - 2
    student0 = build_tiny_model(tiny_spec, char_tokenizer, seed=7)
    tau = data.tau(True)

    def run(out, resume=None):
        trainer = FIRSTTrainer(model=copy.deepcopy(student0), args=_first_args(out), train_dataset=items,
                               processing_class=tok, tau=tau)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    batch = DistillCollator(tok.pad_token_id)(items)

    def loss_of(m):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return first_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["loss_mask"], tau=tau,
                              use_other=True)[0].item()

    assert loss_of(whole.model) < 0.9 * loss_of(student0)
    logs = [h for h in whole.state.log_history if "loss" in h]
    assert len(logs) == 4 and all("kl_per_token" in h and "top1_agreement" in h for h in logs)
    assert whole.args.learning_rate == 1e-2 and _first_args(tmp_path).warmup_steps == 0.03


def test_released_defaults_and_kd_loss():
    from rlkit.methods.first.trainer import FIRSTConfig, KDConfig

    for cls in (FIRSTConfig, KDConfig):
        args = cls(output_dir="unused", report_to="none")
        assert (args.learning_rate, args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value")
                else args.lr_scheduler_type) == (2e-6, "cosine")
        assert args.get_warmup_steps(1000) == 30  # the released 3% warm-up reaches the scheduler
    with pytest.raises(ValueError, match="normalization"):
        FIRSTConfig(output_dir="unused", normalization="cubic")
    t = torch.randn(2, 4, 11)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    assert kd_loss(t, t.clone(), mask)[0].abs().item() < 1e-6
    s = torch.randn(2, 4, 11)
    loss, kl = kd_loss(s, t, mask)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    expected = ((p * (p.log() - q.log())).sum(-1) * mask).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0


def test_recipe_prepare_first_and_kd(tmp_path):
    from rlkit.pipeline import read_manifest, run_recipe
    from rlkit.recipe import recipe_from_dict

    model = {"name": "tiny", "tiny": dict(TINY_SHAPE)}
    trainer = {"max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
               "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    raw = {"seed": 0, "plot": False, "output_dir": str(tmp_path), "model": model,
           "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 16,
                              "synthetic": {"num_train": 32, "num_test": 8}}},
           "stages": [{"name": "prep", "method": "distill_prepare", "args": {"k": 3, "heldout_fraction": 0.25}},
                      {"name": "first", "method": "first", "model": model,
                       "data": {"train": {"from": "prep", "dataset": "topk"}}, "trainer": trainer},
                      {"name": "uncal", "method": "first", "model": model,
                       "data": {"train": {"from": "prep", "dataset": "topk"}},
                       "trainer": {**trainer, "tau": 1.0, "use_other": False, "normalization": "softmax"}},
                      {"name": "fly", "method": "first", "model": model, "trainer": {**trainer, "teacher": "tiny"}},
                      {"name": "kd", "method": "kd", "model": model,
                       "trainer": {**trainer, "teacher": {"from": "prep"}}}]}
    summaries = run_recipe(recipe_from_dict(raw))
    assert len(summaries) == 5
    prep = read_manifest(tmp_path / "prep")
    assert prep["datasets"]["topk"].endswith("topk.jsonl") and read_topk(prep["datasets"]["topk"]).meta["k"] == 3
    for stage in ("first", "uncal", "fly", "kd"):
        assert (tmp_path / stage / "final" / "model.safetensors").is_file()
    assert read_topk(tmp_path / "fly" / "topk").meta["k"] == 5  # prepared on the fly, the released k


def test_errors_a_user_can_cause(tmp_path, tiny_model):
    from rlkit.config import RecipeError
    from rlkit.data import DataError
    from rlkit.recipe import recipe_from_dict

    model = {"name": "tiny", "tiny": dict(TINY_SHAPE)}
    data = {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 8}}
    with pytest.raises(RecipeError, match="top-k dataset"):
        recipe_from_dict({"method": "first", "model": model, "data": data, "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match="needs a teacher"):
        recipe_from_dict({"method": "kd", "model": model, "data": data, "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match="tau must be"):
        recipe_from_dict({"method": "distill_prepare", "model": model, "data": data, "args": {"tau": "warm"},
                          "output_dir": str(tmp_path)})
    with pytest.raises(DataError, match="not a prepared top-k folder"):
        read_topk(tmp_path)
    m, tok = tiny_model
    with pytest.raises(DataError, match="no response"):
        prepare_topk(m, tok, [{"prompt": "1+1="}], tmp_path / "x")
    with pytest.raises(DataError, match="too few"):
        prepare_topk(m, tok, ROWS[:1], tmp_path / "x")
