"""OREO (``method: oreo``, rlkit.methods.oreo) and the value model (rlkit.value).

Losses on hand-made tensors against the equations written out by hand; the trainer's combined step against a
hand-written loop in the released order (two Adam optimizers, critic step first); resume; bad data; the saved
critic; a sample -> oreo -> oreo pipeline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from rlkit.methods.oreo import losses as L

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
ROWS = [{"prompt": f"{a}+{b}=", "completion": (f"{a}+{b}\n={a + b}" if k else f"{a + b + 1}"), "reward": k}
        for a in range(3) for b in range(2) for k in (0, 1)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and does not fight other jobs for the cores (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec, TinyModelSpec

    return load_model(ModelSpec(name="tiny", tiny=TinyModelSpec(**TINY)), seed=0)


def _args(tmp_path, **kw):
    from rlkit.methods.oreo.trainer import OREOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", lr_scheduler_type="constant",
                warmup_steps=0, dataloader_pin_memory=False, use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return OREOConfig(**base)


# --------------------------------------------------------------------------------------------------
# Hand-made sequences: accumulated log-ratios, state masks, next states

# Row 0: 3 prompt tokens, 4 completion tokens (the last is EOS): L = 7, logps index j = 0..5.
# Row 1: 2 prompt tokens, 2 completion tokens, 3 padding: length 4.
ACTION = torch.tensor([[0, 0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 0, 0, 0]])
LOGPS = torch.tensor([[1., 2., 3., 4., 5., 6.],
                      [10., 20., 30., 40., 50., 60.]])
LENGTHS = torch.tensor([7, 4])
PROMPTS = torch.tensor([3, 2])


def test_accumulated_logps_by_hand():
    # acc[j] = sum_{k>=j} logps[k] * action[k+1]: row 0 acts at j = 2..5 (3+4+5+6), row 1 at j = 1, 2
    expected = torch.tensor([[18., 18., 18., 15., 11., 6.],
                             [50., 50., 30., 0., 0., 0.]])
    assert torch.equal(L.accumulated_logps(LOGPS, ACTION), expected)


def test_state_masks_and_next_states_by_hand():
    token = L.token_state_mask(PROMPTS, LENGTHS, 6)
    assert torch.equal(token, torch.tensor([[0, 0, 1, 1, 1, 1],     # j = P-1 .. len-2 = 2..5
                                            [0, 1, 1, 0, 0, 0]]))   # 1..2
    # steps: row 0 starts at tokens 3 and 5 -> states 2, 4; row 1 one step at token 2 -> state 1
    step = L.step_state_mask([[3, 5], [2]], 6)
    assert torch.equal(step, torch.tensor([[0, 0, 1, 0, 1, 0],
                                           [0, 1, 0, 0, 0, 0]]))
    nxt = L.next_state_index(step, LENGTHS)
    # next state after j (terminal = len-1: 6 for row 0, 3 for row 1)
    assert nxt[0].tolist()[2] == 4 and nxt[0].tolist()[4] == 6 and nxt[1].tolist()[1] == 3
    assert nxt[0].tolist() == [2, 2, 4, 4, 6, 6] and nxt[1].tolist() == [1, 3, 3, 3, 3, 3]
    # token level: the next state of every state is j + 1 (the last one: the terminal)
    assert L.next_state_index(token, LENGTHS)[0].tolist()[2:] == [3, 4, 5, 6]
    assert L.first_state_index(token).tolist() == [2, 1]


def test_tokenised_row_positions_by_hand(tiny):
    from rlkit.methods.oreo.data import OREOCollator, tokenize_example

    _, tok = tiny
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731 - char tokenizer: one id a char
    ex = tokenize_example(tok, "ab", "c\nde", 1.0, level="token")
    assert ex.input_ids == ids("abc\nde") + [tok.eos_token_id] and ex.prompt_length == 2
    assert ex.action_mask == [0, 0, 1, 1, 1, 1, 1] and ex.states == [1, 2, 3, 4, 5]
    st = tokenize_example(tok, "ab", "c\nde", 1.0, level="step", splitter="newline")
    assert st.input_ids == ex.input_ids and st.states == [1, 3]  # steps "c\n" (token 2), "de" (token 4)
    cut = tokenize_example(tok, "ab", "c\nde", 1.0, level="step", max_length=4)
    assert cut.input_ids == ids("abc\n") and cut.truncated and cut.states == [1]  # step 2 starts past the cut
    assert tokenize_example(tok, "abcd", "e", 1.0, max_length=4) is None  # no room for a completion token
    batch = OREOCollator(tok.pad_token_id)([ex, cut])
    assert batch["input_ids"].shape == (2, 7) and batch["lengths"].tolist() == [7, 4]
    assert batch["state_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    assert batch["input_ids"][1, 4:].tolist() == [tok.pad_token_id] * 3  # right padding


# --------------------------------------------------------------------------------------------------
# Losses


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2, 6, generator=g) * 3
    ref = -torch.rand(2, 6, generator=g) * 3
    values = torch.randn(2, 6, generator=g)
    rewards = torch.tensor([1.0, 0.0])
    return logps, ref, values, rewards


def test_value_loss_with_beta_zero_targets_R_at_every_state():
    logps, ref, values, rewards = _batch()
    mask = L.token_state_mask(PROMPTS, LENGTHS, 6)
    values = values.clone().requires_grad_(True)
    loss = L.value_loss(values, logps, ref, ACTION, mask, rewards, beta=0.0)
    per_seq = [((values[b] - rewards[b]) ** 2 * mask[b]).sum() / mask[b].sum() for b in range(2)]
    assert torch.allclose(loss, sum(per_seq) / 2)
    loss.backward()
    grad = 2 * (values - rewards[:, None]) * mask / mask.sum(1, keepdim=True) / 2
    assert torch.allclose(values.grad, grad.detach())
    # V = R at every state is the minimum (loss 0, no gradient), whatever V is elsewhere
    at_target = torch.where(mask.bool(), rewards[:, None].expand(2, 6), values.detach()).requires_grad_(True)
    zero = L.value_loss(at_target, logps, ref, ACTION, mask, rewards, beta=0.0)
    zero.backward()
    assert zero.item() == 0 and not at_target.grad.any()


def test_value_loss_is_eq8():
    logps, ref, values, rewards = _batch(1)
    mask = L.token_state_mask(PROMPTS, LENGTHS, 6)
    beta = 0.5
    loss = L.value_loss(values, logps, ref, ACTION, mask, rewards, beta)
    per_seq = []
    for b in range(2):
        terms = []
        for j in range(6):
            if mask[b, j]:
                tail = sum(float(logps[b, k] - ref[b, k]) for k in range(j, 6) if ACTION[b, k + 1])
                terms.append((float(values[b, j]) - float(rewards[b]) + beta * tail) ** 2)
        per_seq.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)


def test_response_level_with_alpha_zero_is_eq10():
    logps, ref, values, rewards = _batch(2)
    mask = L.token_state_mask(PROMPTS, LENGTHS, 6)
    beta = 0.3
    loss = L.response_policy_loss(logps, ref, values, ACTION, mask, rewards, beta)
    by_hand = 0.0
    for b, j0 in enumerate((2, 1)):  # the first state: P - 1
        total = sum(float(logps[b, k] - ref[b, k]) for k in range(6) if ACTION[b, k + 1])
        by_hand += (float(values[b, j0]) - float(rewards[b]) + beta * total) ** 2
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-6)
    # the whole sum carries the gradient: d/dlogp_k = 2 beta err_b / B at every action position
    lp = logps.clone().requires_grad_(True)
    L.response_policy_loss(lp, ref, values, ACTION, mask, rewards, beta).backward()
    acc = L.accumulated_logps(logps - ref, ACTION)
    err = beta * acc[torch.arange(2), torch.tensor([2, 1])] + values[torch.arange(2), torch.tensor([2, 1])] - rewards
    assert torch.allclose(lp.grad, 2 * beta * err[:, None] * ACTION[:, 1:] / 2)


def test_trainer_response_level_loss_with_alpha_zero_is_value_loss_plus_eq10(tiny, tmp_path):
    from rlkit.methods.oreo.data import OREOCollator, normalize_rows, tokenize_rows
    from rlkit.methods.oreo.trainer import OREOTrainer
    from rlkit.value import ValueModel

    lm, tok = tiny
    torch.manual_seed(2)
    critic = ValueModel.from_causal_lm(lm)
    torch.nn.init.normal_(critic.value_head.weight, std=0.3)
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.3
    args = _args(tmp_path, loss_level="response", alpha=0.0, beta=beta)
    trainer = OREOTrainer(model=copy.deepcopy(lm), args=args, train_dataset=ROWS[:4], processing_class=tok,
                          ref_model=ref, critic=critic)
    examples = tokenize_rows(normalize_rows(ROWS[:4]), tok, level="response")
    batch = OREOCollator(tok.pad_token_id)(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    # by hand, row by row: Eq. 10 at s_0 (the whole response's log-ratio) + Eq. 8 over every token state
    eq10, eq8 = 0.0, 0.0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            lp = lm(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            rf = ref(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            v = critic(ids)[0, :-1]
        P, n = ex.prompt_length, len(ex.input_ids)
        rho = [float(lp[k] - rf[k]) for k in range(n - 1)]
        eq10 += (float(v[P - 1]) - ex.reward + beta * sum(rho[P - 1:])) ** 2
        eq8 += sum((float(v[j]) - ex.reward + beta * sum(rho[j:])) ** 2 for j in range(P - 1, n - 1)) / (n - P)
    assert loss.item() == pytest.approx((eq10 + eq8) / len(examples), rel=1e-5)


def test_token_policy_gradients_follow_eq9():
    logps, ref, values, rewards = _batch(3)
    mask = L.token_state_mask(PROMPTS, LENGTHS, 6)
    beta = 0.7
    lp = logps.clone().requires_grad_(True)
    v = values.clone().requires_grad_(True)
    loss = L.token_policy_loss(lp, ref, v, ACTION, mask, rewards, beta)
    loss.backward()
    rho = (logps - ref) * ACTION[:, 1:]
    pr = L.accumulated_logps(rho, ACTION)  # sg[sum_{k>j}] + rho_j has the value of sum_{k>=j}
    expected = 2 * beta * (beta * pr + values - rewards[:, None]) * mask / mask.sum(1, keepdim=True) / 2
    assert torch.allclose(lp.grad, expected, atol=1e-6)
    assert not lp.grad[mask == 0].any()  # prompt and padding positions get nothing
    assert v.grad is None  # no gradient reaches the critic from the policy loss
    # ... nor the policy from the value loss
    lp2 = logps.clone().requires_grad_(True)
    L.value_loss(values.clone().requires_grad_(True), lp2, ref, ACTION, mask, rewards, beta).backward()
    assert lp2.grad is None


def test_step_policy_gradient_flows_only_through_the_current_step():
    logps, ref, values, rewards = _batch(4)
    step = L.step_state_mask([[3, 5], [2]], 6)
    beta = 0.4
    nxt = L.next_state_index(step, LENGTHS)
    spans = {(0, 2): [2, 3], (0, 4): [4, 5], (1, 1): [1, 2]}  # logps positions of each step's tokens
    for (b, j), span in spans.items():
        one = torch.zeros_like(step)  # the loss of one state only, steps as in `step`
        one[b, j] = 1
        lp = logps.clone().requires_grad_(True)
        L.step_policy_loss(lp, ref, values, ACTION, one, LENGTHS, rewards, beta, next_state=nxt).backward()
        nonzero = lp.grad[b].nonzero().flatten().tolist()
        assert nonzero == span, (b, j, nonzero)
        assert not lp.grad[1 - b].any()
    # the value of pr_j is the whole tail sum (as at the token level)
    full = L.step_policy_loss(logps, ref, values, ACTION, step, LENGTHS, rewards, beta)
    acc = L.accumulated_logps(logps - ref, ACTION)
    err = (beta * acc + values - rewards[:, None]) ** 2
    assert full.item() == pytest.approx(((err * step).sum(1) / step.sum(1)).mean().item(), rel=1e-6)


def test_kl_regularisers():
    g = torch.Generator().manual_seed(5)
    logits, ref_logits = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    lp_all, rf_all = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    per_pos = (lp_all.exp() * (lp_all - rf_all)).sum(-1)  # KL(pi_theta || pi_ref)
    am = ACTION[:, 1:].float()
    expected = ((per_pos * am).sum(1) / am.sum(1)).mean()
    assert L.exact_kl(lp_all, rf_all, ACTION).item() == pytest.approx(expected.item(), rel=1e-6)
    targets = torch.randint(0, 9, (2, 6), generator=g)
    lp = L.selective_log_softmax(logits, targets)
    rf = L.selective_log_softmax(ref_logits, targets)
    assert torch.allclose(lp, lp_all.gather(-1, targets[..., None]).squeeze(-1), atol=1e-6)
    k3 = torch.exp(rf - lp) + (lp - rf) - 1
    assert L.k3_kl(lp, rf, ACTION).item() == pytest.approx((((k3 * am).sum(1) / am.sum(1)).mean()).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The value model


def test_value_head_starts_at_zero(tiny):
    from rlkit.value import ValueModel

    lm, tok = tiny
    critic = ValueModel.from_causal_lm(lm).attach_tokenizer(tok)
    assert not critic.value_head.weight.any() and critic.value_head.bias is None
    ids = torch.randint(4, 50, (2, 9))
    assert torch.equal(critic(ids), torch.zeros(2, 9))
    assert critic.score_texts(["1+1=", "2+2="], ["2", "4"]) == [0.0, 0.0]
    assert critic.backbone is not lm.model  # a copy: training it leaves the policy alone


# --------------------------------------------------------------------------------------------------
# The trainer


def _released_order_step(policy, critic, ref, batch, args):
    """One step of the released code (pcl_trainer.py order): two Adam optimizers; (1) policy log-probs without
    gradient, (2) critic forward, (3) reference forward, (4) value loss -> critic step, (5) actor forward with
    gradient, policy loss + alpha KL -> actor step. Gradients clipped per model."""
    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    opt_c = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, betas=betas, eps=eps)
    opt_a = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, betas=betas, eps=eps)
    ids, attn, am, sm, R = (batch[k] for k in ("input_ids", "attention_mask", "action_mask", "state_mask", "rewards"))
    tgt = ids[:, 1:]
    with torch.no_grad():
        old = policy(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
        old = old.gather(-1, tgt[..., None])[..., 0]
    values = critic(ids, attn)[:, :-1]
    with torch.no_grad():
        ref_all = ref(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    ref_lp = ref_all.gather(-1, tgt[..., None])[..., 0]
    acc = old.mul(am[:, 1:]).flip(-1).cumsum(-1).flip(-1)
    acc_ref = ref_lp.mul(am[:, 1:]).flip(-1).cumsum(-1).flip(-1)
    err = args.beta * (acc - acc_ref) + values - R[:, None]
    v_loss = ((err ** 2 * sm).sum(1) / sm.sum(1)).mean()
    opt_c.zero_grad()
    v_loss.backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
    opt_c.step()
    lp_all = policy(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    lp = lp_all.gather(-1, tgt[..., None])[..., 0]
    rho = (lp - ref_lp) * am[:, 1:]
    tail = rho.flip(-1).cumsum(-1).flip(-1) - rho
    err = args.beta * (tail.detach() + rho) + values.detach() - R[:, None]
    p_loss = ((err ** 2 * sm).sum(1) / sm.sum(1)).mean()
    kl = (lp_all.exp() * (lp_all - ref_all)).sum(-1)
    kl = ((kl * am[:, 1:]).sum(1) / am[:, 1:].sum(1)).mean()
    opt_a.zero_grad()
    (p_loss + args.alpha * kl).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    opt_a.step()


def test_one_trainer_step_equals_the_released_order(tiny, tmp_path):
    from rlkit.methods.oreo.data import OREOCollator
    from rlkit.methods.oreo.trainer import OREOTrainer
    from rlkit.value import ValueModel

    lm, tok = tiny
    torch.manual_seed(1)
    policy = copy.deepcopy(lm)
    critic = ValueModel.from_causal_lm(policy)
    torch.nn.init.normal_(critic.value_head.weight, std=0.5)  # non-zero values: the policy loss sees them
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hand_policy, hand_critic, hand_ref = copy.deepcopy(policy), copy.deepcopy(critic), copy.deepcopy(ref)
    rows = ROWS[:6]
    # clipping at 20 is active for the critic (its gradient norm is in the hundreds) and not for the policy (about
    # 10): a joint clipping would have scaled the policy's step too
    args = _args(tmp_path, per_device_train_batch_size=len(rows), max_steps=1, learning_rate=2e-3,
                 critic_learning_rate=5e-3, max_grad_norm=20.0, beta=0.5, alpha=0.2)
    seen = []

    class Recording(OREOCollator):  # the hand loop gets the very batch (row order) the trainer used
        def __call__(self, examples):
            seen.append(super().__call__(examples))
            return seen[-1]

    trainer = OREOTrainer(model=policy, args=args, train_dataset=rows, processing_class=tok, ref_model=ref,
                          critic=critic, data_collator=Recording(tok.pad_token_id))
    trainer.train()
    batch = seen[0]
    _released_order_step(hand_policy, hand_critic, hand_ref, batch, args)
    for mine, hand in ((policy, hand_policy), (critic, hand_critic)):
        for (name, a), b in zip(mine.named_parameters(), hand.parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), (name, (a - b).abs().max().item())
    moved = max((a - b).abs().max().item() for a, b in zip(critic.backbone.parameters(), lm.model.parameters()))
    assert moved > 1e-4  # the step did something (the backbone moves: the head is non-zero)
    log = trainer.state.log_history[0]
    assert log["grad_norm_critic"] > 20 > log["grad_norm_policy"] and {"value_loss", "policy_loss", "kl"} <= set(log)


def test_resume_restores_policy_and_critic(tiny, tmp_path):
    from rlkit.methods.oreo.trainer import OREOTrainer
    from rlkit.value import ValueModel

    lm, tok = tiny

    def run(out, resume=None, max_steps=4):
        policy = copy.deepcopy(lm)
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=2, loss_level="step",
                     lr_scheduler_type="cosine", warmup_steps=0.25)
        trainer = OREOTrainer(model=policy, args=args, train_dataset=ROWS, processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for part in ("policy", "critic"):
        a, b = getattr(whole.model, part), getattr(resumed.model, part)
        for (name, x), y in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(x, y), (part, name)
    fresh = ValueModel.from_causal_lm(lm)
    assert not torch.equal(whole.model.critic.value_head.weight, fresh.value_head.weight)
    # the checkpoint's critic loads back as a value model with the values of the trained one (after step 4)
    ckpt = tmp_path / "whole" / "checkpoint-4"
    assert json.loads((ckpt / "oreo.json").read_text())["loss_level"] == "step"
    loaded = ValueModel.from_pretrained(ckpt / "critic")
    prompts, completions = ["1+2=", "0+0="], ["3", "1+1\n=5"]
    mine = whole.model.critic.attach_tokenizer(tok).score_texts(prompts, completions)
    assert loaded.tokenizer is not None and loaded.score_texts(prompts, completions) == pytest.approx(mine, abs=1e-6)
    assert loaded.score("1+2=", ["1+2\n", "=3"])[-1] == pytest.approx(loaded.score_texts(["1+2="], ["1+2\n=3"])[0])


def test_lora_critic_trains_saves_and_loads(tiny, tmp_path):
    from rlkit.methods.oreo.trainer import OREOTrainer
    from rlkit.value import ValueModel

    lm, tok = tiny
    args = _args(tmp_path, max_steps=1, critic_lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                 critic_learning_rate=1e-2)
    trainer = OREOTrainer(model=copy.deepcopy(lm), args=args, train_dataset=ROWS, processing_class=tok)
    frozen = {n: p.clone() for n, p in trainer.model.critic.named_parameters() if not p.requires_grad}
    trainer.train()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in trainer.model.critic.named_parameters() if n in frozen)
    trainer.save_parts(tmp_path / "final")
    critic = trainer.model.critic
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for n, p in critic.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    critic.save_pretrained(tmp_path / "final" / "critic")
    loaded = ValueModel.from_pretrained(tmp_path / "final" / "critic")  # adapters merged on load
    prompts, completions = ["1+2=", "2+2="], ["3", "5"]
    expected = critic.attach_tokenizer(tok).score_texts(prompts, completions)
    assert loaded.lora is None and loaded.score_texts(prompts, completions) == pytest.approx(expected, abs=1e-5)


def test_bad_data_gives_one_clear_error(tiny, tmp_path):
    from rlkit.data import DataError
    from rlkit.methods.oreo.trainer import OREOTrainer

    lm, tok = tiny
    no_reward = [{k: v for k, v in r.items() if k != "reward"} for r in ROWS]
    with pytest.raises(DataError, match=r"row 0 has no 'reward' field.*sample"):
        OREOTrainer(model=lm, args=_args(tmp_path), train_dataset=no_reward, processing_class=tok)
    bad = [dict(r) for r in ROWS]
    bad[3]["reward"] = 2
    with pytest.raises(DataError, match=r"row 3 has reward 2, outside \{0, 1\}.*rew_mul"):
        OREOTrainer(model=lm, args=_args(tmp_path), train_dataset=bad, processing_class=tok)
    none = [dict(r, reward=None) if i == 1 else r for i, r in enumerate(ROWS)]
    with pytest.raises(DataError, match=r"row 1 has reward None.*where"):
        OREOTrainer(model=lm, args=_args(tmp_path), train_dataset=none, processing_class=tok)


def test_recipe_checks(tmp_path):
    from rlkit.recipe import RecipeError, recipe_from_dict, validate_recipe

    base = {"method": "oreo", "seed": 0, "output_dir": "unused", "plot": False, "model": {"name": "tiny", "tiny": TINY},
            "data": {"train": {"name": "synthetic"}}}
    with pytest.raises(RecipeError, match="scored samples"):
        validate_recipe(recipe_from_dict(base))
    ok = dict(base, data={"train": {"name": "jsonl:x.jsonl"}})
    for key, value, msg in (("loss_level", "trajectory", "loss_level"), ("kl_estimator", "k2", "kl_estimator"),
                            ("step_splitter", "stephint", "step_splitter"), ("betaa", 0.1, "did you mean 'beta'")):
        with pytest.raises(RecipeError, match=msg):
            validate_recipe(recipe_from_dict(dict(ok, trainer={key: value})))
    # a data file that is already there is read at validation time: a bad row fails before any model loads
    data = tmp_path / "rows.jsonl"
    rows = [dict(r, reward=2 if i == 2 else r["reward"]) for i, r in enumerate(ROWS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecipeError, match=r"data.train: oreo: .*rows.jsonl row 2 has reward 2, outside"):
        validate_recipe(recipe_from_dict(dict(base, data={"train": {"name": f"jsonl:{data}"}})))
    kept = {"name": f"jsonl:{data}", "where": {"reward": [0, 1]}}  # `where` drops the bad row: valid
    validate_recipe(recipe_from_dict(dict(base, data={"train": kept})))


def test_config_defaults_are_the_papers():
    from rlkit.methods.oreo.trainer import OREOConfig

    c = OREOConfig(output_dir="unused", report_to="none", use_cpu=True)
    assert (c.beta, c.alpha, c.learning_rate, c.critic_lr, c.adam_beta2, c.weight_decay, c.max_grad_norm) == \
        (0.03, 0.01, 5e-6, 5e-6, 0.95, 0.0, 1.0)
    assert c.lr_scheduler_type == "cosine" and c.warmup_steps == 0.03 and (c.rew_mul, c.rew_add) == (1.0, 0.0)
    assert OREOConfig(output_dir="u", report_to="none", use_cpu=True, loss_level="step").alpha == 0.1
    assert OREOConfig(output_dir="u", report_to="none", use_cpu=True, loss_level="response").alpha == 0.3


def test_reference_inherit(tmp_path):
    from rlkit.methods.oreo.trainer import resolve_reference
    from rlkit.recipe import RecipeError

    sft = tmp_path / "sft"
    sft.mkdir()
    round1 = tmp_path / "round1"
    round1.mkdir()
    (round1 / "oreo.json").write_text(json.dumps({"reference": str(sft)}))
    assert resolve_reference(str(round1), "start") == str(round1)
    assert resolve_reference(str(round1), "inherit") == str(sft)
    assert resolve_reference(str(sft), "inherit") == str(sft)  # not an OREO output: its own reference
    (round1 / "oreo.json").write_text(json.dumps({"reference": "tiny"}))
    with pytest.raises(RecipeError, match="in-memory"):
        resolve_reference(str(round1), "inherit")


def test_pipeline_sample_then_oreo_twice(tmp_path):
    """sample -> oreo -> oreo (round 2 starts from round 1: its critic continues, the reference resets)."""
    from rlkit.pipeline import run_recipe
    from rlkit.recipe import recipe_from_dict
    from rlkit.value import ValueModel

    trainer = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
               "save_strategy": "no", "lr_scheduler_type": "constant", "max_length": 64}
    recipe = {"seed": 0, "output_dir": str(tmp_path), "plot": False, "reward_engine": {"enabled": False},
              "model": {"name": "tiny", "tiny": TINY},
              "data": {"train": {"name": "synthetic", "split": "train", "template": "plain", "limit": 4,
                                 "synthetic": {"num_train": 8, "num_test": 4}}},
              "rewards": [{"name": "math_accuracy"}],
              "stages": [{"name": "sample", "method": "sample", "args": {"num_samples": 2, "max_new_tokens": 8}},
                         {"name": "oreo", "method": "oreo", "trainer": trainer,
                          "data": {"train": {"from": "sample", "dataset": "samples"}}},
                         {"name": "oreo2", "method": "oreo", "trainer": dict(trainer, loss_level="step", max_steps=1),
                          "data": {"train": {"from": "sample", "dataset": "samples"},
                                   "eval": {"name": "synthetic", "split": "test", "template": "plain", "limit": 2,
                                            "synthetic": {"num_train": 8, "num_test": 4}}},
                          # held-out accuracy of the trainer's model (the policy) before, during and after
                          "eval": {"enabled": True, "max_new_tokens": 4, "every_steps": 1}}]}
    summaries = run_recipe(recipe_from_dict(recipe))
    final = Path(summaries[1]["final_model"])
    assert final == tmp_path / "oreo" / "final" and (final / "model.safetensors").is_file()
    assert (final / ".rlkit_done").is_file() and not list(final.glob("*.bin"))
    critic = ValueModel.from_pretrained(final / "critic")
    assert len(critic.score("Question: 1+1\nAnswer: ", ["2"])) == 1
    info = json.loads((final / "oreo.json").read_text())
    assert info["reference"] == "tiny" and info["critic_init"] == "model" and info["rows"] == 8
    info2 = json.loads((tmp_path / "oreo2" / "final" / "oreo.json").read_text())
    assert info2["reference"] == str(final) and info2["critic_init"] == str(final / "critic")
    assert info2["loss_level"] == "step" and summaries[2]["oreo"]["sequences"] == 8
    assert summaries[2]["before"]["n"] == summaries[2]["after"]["n"] == 2
