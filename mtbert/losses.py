"""Named losses and divergences of the tasks (MNR, CoSENT, symmetric KL).

Their own module so mtbert.tasks can import them at module top without the circle
config -> tasks -> methods -> config; they depend on torch only, and import it inside each function
because mtbert.tasks must import no torch at import time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def mnr_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """In-batch multiple-negatives ranking (Henderson et al. 2017; sentence-transformers' MNRL).

    Row i of S = scale * cos(u_i, v_j) over every pair j of the batch; for each duplicate pair i the
    loss is the cross-entropy of row i with target i (its own second sentence against every other
    pair's), averaged over the duplicates. No duplicate in the batch: 0 (and a zero gradient).
    """
    import torch
    import torch.nn.functional as F

    u, v = F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)
    scores = scale * u @ v.T
    rows = F.cross_entropy(scores, torch.arange(len(u), device=u.device), reduction="none")
    duplicate = (labels > 0.5).float()
    return (rows * duplicate).sum() / duplicate.sum().clamp(min=1.0)


def cosent_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """CoSENT (Su 2022): log(1 + sum over pairs (i, j) with y_i > y_j of exp(scale * (s_j - s_i))).

    A ranking loss: only the order of the scores within the batch matters. 0 when no pair is ordered.
    """
    import torch
    import torch.nn.functional as F

    s = scores.float()
    diff = scale * (s.unsqueeze(0) - s.unsqueeze(1))  # [i, j] = scale * (s_j - s_i)
    ordered = labels.unsqueeze(1) > labels.unsqueeze(0)  # [i, j]: y_i > y_j
    terms = diff.masked_fill(~ordered, float("-inf")).reshape(-1)
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(p_b || p_a) + KL(p_a || p_b) of softmax(logits), batch mean; each KL's target side detached
    (mt-dnn's SymKlCriterion), so the gradient reaches both `a` and `b` through their log-probabilities."""
    import torch
    import torch.nn.functional as F

    la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    return (F.kl_div(la, lb.detach(), log_target=True, reduction="batchmean")
            + F.kl_div(lb, la.detach(), log_target=True, reduction="batchmean"))


def symmetric_kl_binary(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """symmetric_kl of Bernoulli distributions given by logits (N,)."""
    import torch
    import torch.nn.functional as F

    zeros = torch.zeros_like(a.float())
    return symmetric_kl(torch.stack([zeros, a.float()], -1), torch.stack([zeros, b.float()], -1))
