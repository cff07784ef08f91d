"""OREO's losses as pure torch functions, in the tensor layout of the released code (``pcl_trainer.py``).

Layout (one batch, right-padded to length L):

- ``ids[b, :]``: prompt tokens, then the completion tokens, then EOS; ``attention_mask`` 1 on real tokens;
  ``lengths[b]`` the number of real tokens.
- ``logps[b, j] = log pi(ids[b, j+1] | ids[b, :j+1])`` for ``j = 0..L-2`` (shape ``[B, L-1]``); the same for
  the frozen reference (``ref_logps``).
- ``action_mask[b, i] = 1`` where ``ids[b, i]`` is a completion token (EOS included), shape ``[B, L]``. In logps
  index space the action taken in state j is ``ids[j+1]``, so ``action_mask[:, 1:]`` marks the action positions.
- ``values[b, j] = V(ids[b, :j+1])``: the critic's output at the state's last token, ``critic(ids)[:, :-1]``.
- ``state_mask[b, j] = 1`` at the states that enter the losses (shape ``[B, L-1]``): token level, every
  state before a completion token (``j = P-1 .. len-2`` for a prompt of P tokens); step level, the state
  just before the first token of each step (``j = start - 1``).
- ``rewards[b] = R`` (already mapped, ``reward * rew_mul + rew_add``): the sparse terminal reward.

With ``rho_k = logps_k - ref_logps_k`` on action positions (0 elsewhere), the soft Bellman equation telescoped
over a trajectory (paper Eq. 7) is ``V*(s_j) = R - beta * sum_{k>=j} rho_k``. The losses:

- value (Eq. 8): per sequence, ``sum_j m_j (beta * (acc_j - acc_ref_j) + V_j - R)^2 / sum_j m_j``, then the mean
  over the batch; the policy's accumulated log-probs enter without gradient (``acc`` under no_grad).
- token-level policy (Eq. 9, ``dro_loss``): ``pr_j = sg[sum_{k>j} rho_k] + rho_j`` and the same masked mean of
  ``(beta * pr_j + sg[V_j] - R)^2``: each state's error moves only its own action's log-prob.
- step-level policy: ``pr_j = A_j - A_{n(j)} + sg[A_{n(j)}]`` with ``A = accumulated_logps(rho)`` and ``n(j)`` the
  next state (the terminal for the last step): the gradient flows through the current step's tokens only.
- response-level policy (Eq. 10, ``traj_loss``): at the first state only, ``(beta * A_{j0} + sg[V_{j0}] - R)^2``,
  batch mean; the whole sum carries the gradient.
- KL regulariser: exact ``KL(pi_theta(.|s_j) || pi_ref(.|s_j))`` over the full vocabulary at every action
  position (``--unbiased_kl``), or the k3 estimator ``exp(ref - logp) + (logp - ref) - 1`` at the taken token;
  averaged over the action positions of each sequence, then over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accumulated_logps", "action_positions", "exact_kl", "first_state_index", "k3_kl",
           "masked_sequence_mean", "next_state_index", "response_policy_loss", "selective_log_softmax",
           "step_policy_loss", "step_state_mask", "token_policy_loss", "token_state_mask", "value_loss"]


def action_positions(action_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]``: 1 at logps index j when the action taken there, ``ids[j+1]``, is a completion token."""
    return action_mask[:, 1:]


def accumulated_logps(logps: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """``acc[:, j] = sum_{k>=j} logps[:, k] * action_mask[:, k+1]`` (flip, cumsum, flip), shape ``[B, L-1]``.

    ``logps`` may be log-probs or log-ratios (``logps - ref_logps``); positions past the last action are 0."""
    x = logps * action_positions(action_mask).to(logps.dtype)
    return x.flip(-1).cumsum(-1).flip(-1)


def masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence ``sum_j mask_j x_j / sum_j mask_j`` (a row with an empty mask gives 0), then the batch mean."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


# --------------------------------------------------------------------------------------------------
# States


def token_state_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` (width = L-1): 1 for ``j`` from ``P-1`` to ``len-2``, every state before a completion token."""
    j = torch.arange(width, device=lengths.device)[None, :]
    return ((j >= prompt_lengths[:, None] - 1) & (j <= lengths[:, None] - 2)).long()


def step_state_mask(step_starts: list[list[int]], width: int, device=None) -> torch.Tensor:
    """``[B, width]``: 1 at ``j = start - 1`` for the token index ``start`` where each step begins (the state
    whose next action is the step's first token)."""
    mask = torch.zeros(len(step_starts), width, dtype=torch.long, device=device)
    for b, starts in enumerate(step_starts):
        for s in starts:
            if not 1 <= s <= width:
                raise ValueError(f"step start {s} of row {b} is outside 1..{width}")
            mask[b, s - 1] = 1
    return mask


def next_state_index(state_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``n[b, j]``: the smallest state index ``k > j`` of row b, or the terminal index ``lengths[b] - 1`` when
    there is none (shape ``[B, L-1]``, long). Indices point into ``acc`` padded with one zero column
    (:func:`step_policy_loss`), where the terminal's accumulated log-ratio is 0."""
    B, W = state_mask.shape
    idx = torch.arange(W, device=state_mask.device).expand(B, W)
    terminal = (lengths - 1).to(torch.long)[:, None]
    big = torch.full_like(idx, W + 1)
    cand = torch.where(state_mask.bool(), idx, big)
    cand = torch.cat([cand, terminal], dim=1)  # position W: the terminal always qualifies
    suffix_min = cand.flip(-1).cummin(-1).values.flip(-1)  # min_{k>=j} cand[k]
    return torch.minimum(suffix_min[:, 1:], terminal)  # min_{k>j}


def first_state_index(state_mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: the first state of each row (the state before the first completion token, ``P-1``)."""
    return state_mask.long().argmax(-1)


# --------------------------------------------------------------------------------------------------
# Losses


def value_loss(values: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, action_mask: torch.Tensor,
               state_mask: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 8 as implemented: masked mean over states of ``(beta * (acc_j - acc_ref_j) + V_j - R)^2``, then the
    batch mean. Only ``values`` carries a gradient (the policy's ``acc`` is computed under no_grad)."""
    with torch.no_grad():
        target_shift = beta * (accumulated_logps(logps.detach().float(), action_mask)
                               - accumulated_logps(ref_logps.detach().float(), action_mask))
    err = target_shift + values.float() - rewards.float()[:, None]
    return masked_sequence_mean(err.pow(2), state_mask)


def _log_ratios(logps: torch.Tensor, ref_logps: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    return (logps.float() - ref_logps.detach().float()) * action_positions(action_mask).float()


def token_policy_loss(logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor,
                      state_mask: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 9 (``dro_loss``): ``pr_j = sg[sum_{k>j} rho_k] + rho_j``; masked mean of
    ``(beta * pr_j + sg[V_j] - R)^2`` over the states, then the batch mean.

    The gradient wrt ``logps_j`` is ``2 beta (beta pr_j + V_j - R) m_j / sum(m) / B``."""
    rho = _log_ratios(logps, ref_logps, action_mask)
    later = accumulated_logps(rho, action_mask) - rho  # sum_{k>j} rho_k
    pr = later.detach() + rho
    err = beta * pr + values.detach().float() - rewards.float()[:, None]
    return masked_sequence_mean(err.pow(2), state_mask)


def step_policy_loss(logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor,
                     state_mask: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor,
                     beta: float, next_state: torch.Tensor | None = None) -> torch.Tensor:
    """Step level (``dro_loss --step_level``): at each step-start state j with next state n(j),
    ``pr_j = A_j - A_{n(j)} + sg[A_{n(j)}]`` (``A`` the accumulated log-ratio; the value is the same as
    ``A_j``, the gradient only that of the step's own tokens ``j .. n(j)-1``); masked mean of
    ``(beta * pr_j + sg[V_j] - R)^2``, then the batch mean. ``next_state``: n(j) (default: from ``state_mask``
    and ``lengths`` by :func:`next_state_index`)."""
    rho = _log_ratios(logps, ref_logps, action_mask)
    acc = accumulated_logps(rho, action_mask)
    padded = torch.cat([acc, acc.new_zeros(acc.shape[0], 1)], dim=1)  # index L-1: the terminal, 0
    if next_state is None:
        next_state = next_state_index(state_mask, lengths)
    nxt = padded.gather(1, next_state)
    pr = acc - nxt + nxt.detach()
    err = beta * pr + values.detach().float() - rewards.float()[:, None]
    return masked_sequence_mean(err.pow(2), state_mask)


def response_policy_loss(logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor,
                         action_mask: torch.Tensor, state_mask: torch.Tensor, rewards: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """Eq. 10 (``traj_loss``): at the first state j0 only, ``(beta * sum_{k>=j0} rho_k + sg[V_{j0}] - R)^2``,
    batch mean; the whole sum carries the gradient."""
    rho = _log_ratios(logps, ref_logps, action_mask)
    acc = accumulated_logps(rho, action_mask)
    j0 = first_state_index(state_mask)[:, None]
    a0 = acc.gather(1, j0).squeeze(1)
    v0 = values.detach().float().gather(1, j0).squeeze(1)
    return (beta * a0 + v0 - rewards.float()).pow(2).mean()


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., targets]`` without materialising the full log-softmax (float32)."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def exact_kl(logp_all: torch.Tensor, ref_logp_all: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary ``KL(pi_theta || pi_ref)`` at each action position (``[B, L-1, V]`` log-softmaxes), averaged
    over the action positions of each sequence, then over the batch
    (``F.kl_div(ref_logp_all, logp_all, log_target=True).sum(-1)`` = ``sum_v p_v (log p_v - log q_v)``)."""
    kl = F.kl_div(ref_logp_all.detach().float(), logp_all.float(), log_target=True, reduction="none").sum(-1)
    return masked_sequence_mean(kl, action_positions(action_mask))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """The k3 estimator ``exp(ref - logp) + (logp - ref) - 1`` at the taken tokens, averaged like
    :func:`exact_kl`."""
    d = ref_logps.detach().float() - logps.float()
    return masked_sequence_mean(torch.exp(d) - d - 1, action_positions(action_mask))
