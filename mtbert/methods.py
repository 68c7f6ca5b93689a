"""Multitask methods beyond the source report, each chosen by a TrainConfig field.

- task sampling (`task_sampling`): which task(s) each step trains, as a plan computed from (seed,
  epoch) alone, so a resumed run replays the same task sequence;
- loss weighting (`loss_weighting`): sum, fixed weights, or learned uncertainty weights;
- gradient surgery (`pcgrad`): PCGrad on the shared encoder's parameters;
- named losses of the task table (`quora_loss`, `sts_loss`): in-batch multiple-negatives ranking, CoSENT;
- layer-wise learning-rate decay (`layer_decay`): the encoder lr per layer depth.
At the defaults every function here computes exactly what the report's trainer computed.
docs/methods.md lists the switches; the training loop (mtbert.train) only calls in here.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .losses import cosent_loss, mnr_loss, symmetric_kl, symmetric_kl_binary  # noqa: F401 (re-exported)
from .tasks import TASK_TABLE, TASKS, Task

DEFAULTS = TrainConfig()  # the report's methods: what callers that pass no config get
# the fields that change what a training step computes (layer_decay and schedule change only the optimizer)
STEP_FIELDS = ("quora_encoding", "sts_encoding", "task_sampling", "loss_weighting", "pcgrad", "quora_loss", "sts_loss",
               "smart_weight")


def report_step(cfg: TrainConfig) -> bool:
    """Whether cfg's step is the report's (every task each step, losses summed, bi-encoding, BCE/MSE):
    what a specialised step (e.g. a static-shape CUDA graph) may assume; otherwise use train_step."""
    return all(getattr(cfg, f) == getattr(DEFAULTS, f) for f in STEP_FIELDS) and cfg.multitask

# ---------------------------------------------------------------- task sampling

Plan = list[list[tuple[str, int]]]  # per step: (task, that task's stream step)


def sampling_exponent(mode: str, epoch: int, epochs: int) -> float:
    """alpha of p_t proportional to N_t ** alpha for a one-task-per-step mode at (0-based) `epoch`.

    proportional 1, sqrt 0.5, round_robin and all 0 (uniform); annealed (Stickland & Murray 2019,
    "BERT and PALs", sec. 4): alpha = 1 - 0.8 (e - 1) / (E - 1) for epoch e = 1..E, i.e. proportional
    in the first epoch, moving to nearly uniform (0.2) in the last.
    """
    if mode == "proportional":
        return 1.0
    if mode == "sqrt":
        return 0.5
    if mode == "annealed":
        return 1.0 - 0.8 * epoch / (epochs - 1) if epochs > 1 else 1.0
    return 0.0


def sampling_probabilities(sizes: dict[str, int], mode: str, epoch: int, epochs: int) -> dict[str, float]:
    """Probability of each task being a step's task: N_t ** alpha, normalised (see sampling_exponent)."""
    alpha = sampling_exponent(mode, epoch, epochs)
    raw = {t: float(sizes[t]) ** alpha for t in sizes}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


def _task_sequence(sizes: dict[str, int], mode: str, epoch: int, epochs: int, seed: int, steps: int) -> np.ndarray:
    """Task index (into TASKS order of `sizes`) of every step of one epoch, from (seed, epoch) alone."""
    names = list(sizes)
    if mode == "round_robin":
        return (epoch * steps + np.arange(steps)) % len(names)
    p = sampling_probabilities(sizes, mode, epoch, epochs)
    rng = np.random.default_rng([seed, 0x5A3, epoch])  # its own stream: data order and dropout are untouched
    return rng.choice(len(names), size=steps, p=[p[t] for t in names])


def task_plan(sizes: dict[str, int], batches_per_pass: dict[str, int], mode: str, epoch: int, epochs: int,
              seed: int) -> Plan:
    """The steps of one (0-based) epoch in task-sampling `mode` (TrainConfig.task_sampling).

    "all" (the report's): max(batches per pass) steps, every task in each step, smaller tasks
    cycling. The one-task-per-step modes run len(tasks) * max(batches per pass) steps, so an epoch
    trains the same number of batches as in "all" and costs the same; each task's batches continue
    from where its stream stopped, which is counted by replaying the earlier epochs' plans.
    """
    names = list(sizes)
    n = max(batches_per_pass.values())
    if mode == "all":
        return [[(t, epoch * n + i) for t in names] for i in range(n)]
    steps = len(names) * n
    position = np.zeros(len(names), dtype=np.int64)
    for earlier in range(epoch):
        position += np.bincount(_task_sequence(sizes, mode, earlier, epochs, seed, steps), minlength=len(names))
    plan: Plan = []
    for k in _task_sequence(sizes, mode, epoch, epochs, seed, steps):
        plan.append([(names[k], int(position[k]))])
        position[k] += 1
    return plan


# ---------------------------------------------------------------- named losses


def task_loss(task: Task, cfg: TrainConfig):
    """The named loss of `task` that cfg chooses (the table's first where the task has no option)."""
    return task.losses[getattr(cfg, task.loss_option)].fn if task.loss_option else task.report_loss.fn


def pair_encoding(task: Task, cfg: TrainConfig) -> str | None:
    """'bi' | 'cross' | 'both' for a pair task, None for a sentence task."""
    return getattr(cfg, task.encoding_option) if task.encoding_option else None


def head_output(model, task: Task, vecs: list[torch.Tensor] | None, joint: torch.Tensor | None) -> torch.Tensor:
    """The task head's output from the sentence vectors (bi), the joint pair vector (cross) or both."""
    return task.outputs(model, vecs) if joint is None else task.joint_outputs(model, joint, vecs)


# ---------------------------------------------------------------- loss weighting


def weigh_losses(losses: dict[str, torch.Tensor], cfg: TrainConfig,
                 log_vars: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each task's term of the step's objective (their sum is what is minimised).

    sum: the losses as they are (the report's). fixed: w_t * L_t. uncertainty (Kendall, Gal &
    Cipolla 2018) with learned s_t = log sigma_t^2 (log_vars, in TASKS order):
      classification (softmax/Bernoulli likelihood with temperature): exp(-s) * L + s / 2
      regression (Gaussian likelihood):                              exp(-s) * L / 2 + s / 2
    i.e. L / sigma^2 + log sigma and L / (2 sigma^2) + log sigma, the paper's eqs. 7 and 10; s_t settles
    at log(2 L_t) (classification) or log(L_t) (regression), so a task with a large loss is down-weighted.
    """
    if cfg.loss_weighting == "sum":
        return losses
    if cfg.loss_weighting == "fixed":
        return {t: getattr(cfg, TASK_TABLE[t].weight_option) * loss for t, loss in losses.items()}
    terms = {}
    for t, loss in losses.items():
        s = log_vars[TASKS.index(t)]
        factor = 1.0 if TASK_TABLE[t].classification else 0.5
        terms[t] = factor * torch.exp(-s) * loss + 0.5 * s
    return terms


# ---------------------------------------------------------------- gradient surgery


def pcgrad_project(grads: torch.Tensor, orders: list[list[int]] | None = None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, alg. 1): each task gradient, projected off every other task's it conflicts with.

    grads: (tasks, params). For task i, in a random order of the other tasks j (`orders[i]`, else a
    torch.randperm draw): if g_i' . g_j < 0, g_i' -= (g_i' . g_j) / |g_j|^2 g_j (g_j the original).
    Non-conflicting gradients come back unchanged; with two tasks the projected pair no longer conflicts.
    Returns the projected gradients (tasks, params); the update uses their sum.
    """
    n = grads.shape[0]
    out = grads.clone()
    norms = (grads * grads).sum(1)
    for i in range(n):
        if orders is not None:
            order = orders[i]
        else:
            order = [j for j in torch.randperm(n).tolist() if j != i]
        for j in order:
            dot = out[i] @ grads[j]
            if dot < 0 and norms[j] > 0:
                out[i] -= dot / norms[j] * grads[j]
    return out


def pcgrad_backward(terms: dict[str, torch.Tensor], shared: list[nn.Parameter], rest: list[nn.Parameter]) -> None:
    """Fill .grad: the shared parameters get the sum of the PCGrad-projected task gradients; the
    rest (task heads, loss weights: each used by one task only) the plain gradient of the sum.

    One backward per task through the encoder (graph kept), then one of the sum for `rest`.
    """
    flat = []
    used = torch.zeros(len(shared), dtype=torch.bool)
    for term in terms.values():
        grads = torch.autograd.grad(term, shared, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, shared)]))
        used |= torch.tensor([g is not None for g in grads])
    total = pcgrad_project(torch.stack(flat)).sum(0)
    offset = 0
    for p, was_used in zip(shared, used.tolist()):
        n = p.numel()
        if was_used:  # a parameter no task reaches (e.g. BERT's unused pooler) keeps grad None, as with backward()
            p.grad = total[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    rest = [p for p in rest if p.requires_grad]
    torch.autograd.backward(sum(terms.values()), inputs=rest)


# ---------------------------------------------------------------- layer-wise lr decay

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_depth(name: str, n_layers: int) -> int:
    """Depth of an encoder parameter: 0 the embeddings, i + 1 transformer layer i, n_layers anything
    above the last layer (e.g. a pooler)."""
    if "embeddings" in name:
        return 0
    match = _LAYER.search(name)
    return int(match.group(1)) + 1 if match else n_layers


def layer_lr_scale(depth: int, n_layers: int, decay: float) -> float:
    """decay ** (n_layers - depth): the top layer (and above) at 1, the embeddings at decay ** n_layers."""
    return decay ** max(0, n_layers - depth)


def cosine_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then half a cosine from 1 down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- SMART


class EmbeddingNoise:
    """Adds a perturbation to every output of the word-embedding layer while active, one per call
    in call order: "sample" draws N(0, epsilon^2) noise that requires grad, "replay" reuses the
    (updated) perturbations of the same calls. A forward hook, so every input path (per piece,
    fused, packed, joint pairs) is perturbed without knowing about it."""

    def __init__(self, module: nn.Module, epsilon: float) -> None:
        self.epsilon, self.mode, self.deltas, self.calls = epsilon, "sample", [], 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.mode == "sample":
            delta = (torch.randn_like(output, dtype=torch.float32) * self.epsilon).requires_grad_()
            self.deltas.append(delta)
        else:
            delta = self.deltas[self.calls]
            self.calls += 1
        return output + delta.to(output.dtype)

    def replay(self, deltas: list[torch.Tensor]) -> None:
        self.mode, self.deltas, self.calls = "replay", deltas, 0

    def remove(self) -> None:
        self.handle.remove()


def smart_regularizer(model: nn.Module, forward, clean: dict[str, torch.Tensor], cfg: TrainConfig
                      ) -> dict[str, torch.Tensor]:
    """SMART's smoothness-inducing regulariser (Jiang et al. 2020, eq. 3), per task.

    R_t = D_t(f(x + delta), f(x)) with delta on the word embeddings, found by one step of projected
    gradient ascent (the paper's setting): delta_0 ~ N(0, eps^2); g = grad of sum_t D_t(f(x + delta_0),
    f(x) detached); delta = clip(delta_0 + step * g / |g|_inf, -eps, eps) per token. D_t is the task
    table's divergence (symmetric KL for classes, squared error for scores). `forward()` recomputes
    {task: head output} on the same batches; `clean` holds the unperturbed outputs. Only the
    regulariser, not the paper's Bregman proximal-point (momentum teacher) update.
    """
    noise = EmbeddingNoise(model.encoder.get_input_embeddings(), cfg.smart_epsilon)
    try:
        adversarial = forward()
        ascent = sum(TASK_TABLE[t].divergence(adversarial[t], out.detach()) for t, out in clean.items())
        grads = torch.autograd.grad(ascent, noise.deltas, allow_unused=True)
        deltas = []
        for delta, grad in zip(noise.deltas, grads):
            if grad is not None:
                delta = delta + cfg.smart_step * grad / (grad.abs().amax(-1, keepdim=True) + 1e-12)
            deltas.append(delta.detach().clamp(-cfg.smart_epsilon, cfg.smart_epsilon))
        noise.replay(deltas)
        adversarial = forward()
    finally:
        noise.remove()
    return {t: TASK_TABLE[t].divergence(adversarial[t], out) for t, out in clean.items()}
