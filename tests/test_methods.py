"""Multitask methods (mtbert/methods.py, README "Multitask methods"): each switch does what it claims,
the report's configuration is unchanged at the defaults, runs resume exactly, studies search them."""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from mtbert.config import ENCODINGS, TASK_SAMPLINGS, TrainConfig, add_config_arguments
from mtbert.data import TASKS, TaskStream, load_splits
from mtbert.inputs import batch_pieces, embed_pieces
from mtbert.methods import (DEFAULTS, cosent_loss, layer_depth, mnr_loss, pcgrad_backward, pcgrad_project,
                            sampling_probabilities, task_plan, weigh_losses)
from mtbert.model import MultitaskBert, load_pretrained
from mtbert.tasks import TASK_TABLE
from mtbert.train import build_optimizer, epoch_plan, prepare, seed_everything, task_losses, train
from studies import StudySpecError, load_spec
from tiny import write_data

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_cfg(tiny_model: Path, tiny_data: Path, **kw) -> TrainConfig:
    # fp32 on every CPU (amp "auto" is bf16 on CPUs with native bf16): these tests pin behaviour, not bf16
    # numerics, which tests/test_amp.py covers
    base = dict(model=str(tiny_model), data_dir=str(tiny_data), epochs=1, batch_size=8, device="cpu", amp="off",
                eval_batch_size=32, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def first_batches(prepared, cfg: TrainConfig):
    streams = {t: TaskStream(prepared.train[t], cfg.batch_size, cfg.seed) for t in TASKS}
    return streams, [streams[t].batch(0) for t in TASKS]


def build(prepared, cfg: TrainConfig) -> MultitaskBert:
    seed_everything(cfg.seed)
    return MultitaskBert(copy.deepcopy(prepared.encoder), cfg)


# ------------------------------------------------------------------ the report's configuration, unchanged

# Computed with the trainer as it was before the methods existed (commit 26a70c0), same tiny model and
# data, same torch: the default configuration must still compute these.
BEFORE = {"n_params": 31495, "n_tensors": 69, "head_abs_sum": 842.2564086914062,
          "losses": {"sst": 1.7196840047836304, "quora": 0.44101643562316895, "sts": 2.635045051574707},
          "train_loss": [8.10000483194987, 5.6966292063395185], "overall": [0.5078751996365453, 0.5266973071550124]}


def test_defaults_compute_what_the_trainer_computed_before_the_methods(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=2)
    prepared = prepare(cfg)
    model = build(prepared, cfg)
    assert len(list(model.parameters())) == BEFORE["n_tensors"]
    assert sum(p.numel() for p in model.parameters()) == BEFORE["n_params"]
    with torch.no_grad():
        assert float(sum(p.abs().sum() for p in model.head_parameters())) == pytest.approx(BEFORE["head_abs_sum"],
                                                                                          rel=1e-6)
        model.eval()
        streams, batches = first_batches(prepared, cfg)
        losses = task_losses(model, streams, batches, "per_piece")
    assert {t: float(v) for t, v in losses.items()} == pytest.approx(BEFORE["losses"], rel=1e-5)
    results = train(cfg, prepared, progress=False)
    assert [r.train_loss for r in results] == pytest.approx(BEFORE["train_loss"], rel=1e-5)
    assert [r.metrics["overall"] for r in results] == pytest.approx(BEFORE["overall"], rel=1e-5)


def test_bi_switch_is_the_report_model_and_loss(tiny_model, tiny_data):
    """At 'bi' (and every other default) the step's loss is the old formula: the sum over tasks of
    task.report_loss (the table's first loss) of task.outputs(..)."""
    cfg = tiny_cfg(tiny_model, tiny_data, hidden_dropout_prob=0.0)
    prepared = prepare(cfg)
    model = build(prepared, cfg).eval()
    names = {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    assert {n.split(".")[0] for n in names} == {"sst_head", "para_head", "sts_head"}
    explicit = build(prepared, cfg.replace(quora_encoding="bi", sts_encoding="bi"))
    for (a, p), (b, q) in zip(model.state_dict().items(), explicit.state_dict().items()):
        assert a == b and torch.equal(p, q)
    streams, batches = first_batches(prepared, cfg)
    with torch.no_grad():
        new = task_losses(model, streams, batches, "per_piece", cfg)
        vecs = iter(embed_pieces(model, [p for b in batches for p in batch_pieces(streams[b.task], b)], "per_piece"))
        for b in batches:
            task = TASK_TABLE[b.task]
            v = [next(vecs) for _ in task.sentence_columns]
            old = task.report_loss.fn(task.outputs(model, v), streams[b.task].data.labels[b.rows], v, DEFAULTS)
            assert torch.equal(new[b.task], old), b.task


# ------------------------------------------------------------------ pair encoding


def test_joint_pair_encoding_is_cls_s1_sep_s2_with_segments(tiny_model, tiny_data):
    _, tokenizer = load_pretrained(str(tiny_model))
    data = load_splits(tiny_data, tokenizer, ("dev",))["dev"]
    assert data["sst"].pair is None
    for t in ("quora", "sts"):
        pair = data[t].pair
        n = int(pair.lengths[0])
        ids, types = pair.ids[0, :n].tolist(), pair.type_ids[0, :n].tolist()
        first, second = (int(c.lengths[0]) for c in data[t].columns)  # each "[CLS] s [SEP]"
        assert n == first + second - 1  # [CLS] s1 [SEP] s2 [SEP]
        assert ids[:first] == data[t].columns[0].ids[0, :first].tolist()
        assert ids[first:] == data[t].columns[1].ids[0, 1:second].tolist()
        assert types == [0] * first + [1] * (second - 1)


@pytest.mark.parametrize("encoding", ["cross", "both"])
def test_cross_encoding_heads_forward_backward(tiny_model, tiny_data, encoding):
    cfg = tiny_cfg(tiny_model, tiny_data, quora_encoding=encoding, sts_encoding=encoding)
    prepared = prepare(cfg)
    model = build(prepared, cfg)
    heads = {n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    assert heads == {"sst_head", "para_joint_head", "sts_joint_head"}
    assert model.para_joint_head[0].in_features == 32  # one joint vector, not [u; v]
    streams, batches = first_batches(prepared, cfg)
    losses = task_losses(model, streams, batches, "per_piece", cfg)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    # segment B of the joint inputs reached the encoder: token type 1's embedding got a gradient
    assert model.encoder.embeddings.token_type_embeddings.weight.grad[1].abs().sum() > 0
    assert all(p.grad is not None for p in model.head_parameters())


def test_cross_encoding_trains_and_evaluates(tiny_model, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=3, quora_encoding="cross", sts_encoding="both")
    results = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert results[-1].train_loss < results[0].train_loss
    from mtbert.checkpoint import load_model
    from mtbert.evaluate import evaluate

    model, tokenizer, loaded = load_model(tmp_path / "run")  # the run folder rebuilds the cross heads
    assert loaded.quora_encoding == "cross" and hasattr(model, "para_joint_head")
    dev = load_splits(tiny_data, tokenizer, ("dev",))["dev"]
    metrics, _ = evaluate(model, dev, 32)
    assert metrics == pytest.approx(results[-1].metrics)


# ------------------------------------------------------------------ task sampling

SIZES = {"sst": 7544, "quora": 13999, "sts": 5340}  # the shared training sets
PASSES = {t: -(-n // 16) for t, n in SIZES.items()}


def counts(plan) -> dict[str, int]:
    out = dict.fromkeys(SIZES, 0)
    for step in plan:
        for t, _ in step:
            out[t] += 1
    return out


@pytest.mark.parametrize("mode", ["proportional", "sqrt"])
def test_sampled_task_proportions_match_their_definition(mode):
    alpha = {"proportional": 1.0, "sqrt": 0.5}[mode]
    expected = {t: n ** alpha / sum(m ** alpha for m in SIZES.values()) for t, n in SIZES.items()}
    assert sampling_probabilities(SIZES, mode, 0, 3) == pytest.approx(expected)
    plan = [s for e in range(3) for s in task_plan(SIZES, PASSES, mode, e, 3, seed=0)]
    assert all(len(step) == 1 for step in plan)
    assert len(plan) == 3 * 3 * max(PASSES.values())  # an epoch trains as many batches as the report's
    seen = counts(plan)
    chi2 = sum((seen[t] - len(plan) * expected[t]) ** 2 / (len(plan) * expected[t]) for t in SIZES)
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    uniform = sum((seen[t] - len(plan) / 3) ** 2 / (len(plan) / 3) for t in SIZES)
    assert uniform > 100  # and it is not uniform sampling


def test_round_robin_and_all_are_exact_schedules():
    n = max(PASSES.values())
    plan = task_plan(SIZES, PASSES, "round_robin", 1, 3, seed=0)
    assert [step[0][0] for step in plan] == list(TASKS) * n
    assert [step[0][1] for step in plan if step[0][0] == "sts"] == list(range(n, 2 * n))
    plan = task_plan(SIZES, PASSES, "all", 1, 3, seed=0)
    assert plan == [[(t, n + i) for t in TASKS] for i in range(n)]


def test_annealed_moves_from_proportional_to_uniform():
    epochs = 5
    probs = [sampling_probabilities(SIZES, "annealed", e, epochs) for e in range(epochs)]
    assert probs[0] == pytest.approx(sampling_probabilities(SIZES, "proportional", 0, epochs))
    for e, p in enumerate(probs):  # Stickland & Murray: alpha = 1 - 0.8 (e - 1) / (E - 1), e = 1..E
        alpha = 1 - 0.8 * e / (epochs - 1)
        assert p == pytest.approx({t: n ** alpha / sum(m ** alpha for m in SIZES.values()) for t, n in SIZES.items()})
    spread = [max(p.values()) / min(p.values()) for p in probs]
    assert spread == sorted(spread, reverse=True) and spread[0] > 2.5 and spread[-1] < 1.25
    seen = [counts(task_plan(SIZES, PASSES, "annealed", e, epochs, seed=0)) for e in range(epochs)]
    assert seen[0]["quora"] > seen[-1]["quora"] and seen[0]["sts"] < seen[-1]["sts"]


@pytest.mark.parametrize("mode", [m for m in TASK_SAMPLINGS if m != "all"])
def test_every_task_stream_continues_without_gaps_across_epochs(mode):
    steps = {t: [] for t in SIZES}
    for e in range(4):
        for step in task_plan(SIZES, PASSES, mode, e, 4, seed=3):
            for t, s in step:
                steps[t].append(s)
    for t in SIZES:  # each task's batches in order: no batch skipped or trained twice
        assert steps[t] == list(range(len(steps[t])))
    # an epoch's plan depends on (seed, epoch) alone: a resumed run rebuilds the same sequence
    assert task_plan(SIZES, PASSES, mode, 3, 4, seed=3) == task_plan(dict(SIZES), dict(PASSES), mode, 3, 4, seed=3)
    assert mode == "round_robin" or task_plan(SIZES, PASSES, mode, 3, 4, seed=4) != task_plan(SIZES, PASSES, mode, 3,
                                                                                                   4, seed=3)


def test_sampled_training_takes_one_task_per_step(tiny_model, tiny_data):
    results = train(tiny_cfg(tiny_model, tiny_data, task_sampling="round_robin"), progress=False)
    assert results[0].step == 3 * 6  # 3 tasks x the largest set's 6 batches, one task each step


# ------------------------------------------------------------------ loss weighting


def test_fixed_weights_scale_each_task_gradient_exactly(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, hidden_dropout_prob=0.0)
    weights = {"sst_weight": 2.0, "quora_weight": 0.5, "sts_weight": 3.0}
    prepared = prepare(cfg)
    grads = {}
    for name, c in (("sum", cfg), ("fixed", cfg.replace(loss_weighting="fixed", **weights))):
        model = build(prepared, c).eval()
        streams, batches = first_batches(prepared, c)
        sum(weigh_losses(task_losses(model, streams, batches, "per_piece", c), c).values()).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for head, w in (("sst_head", 2.0), ("para_head", 0.5), ("sts_head", 3.0)):
        for n in grads["sum"]:
            if n.startswith(head):
                torch.testing.assert_close(grads["fixed"][n], w * grads["sum"][n], rtol=1e-6, atol=1e-7)


def test_uncertainty_log_variances_move_toward_their_optimum():
    """Kendall et al.: s_t settles at log(2 L) for classification, log(L) for regression."""
    cfg = TrainConfig(loss_weighting="uncertainty")
    log_vars = torch.zeros(3, requires_grad=True)
    losses = {"sst": torch.tensor(5.0), "quora": torch.tensor(0.05), "sts": torch.tensor(0.1)}  # large, small, small
    optimizer = torch.optim.Adam([log_vars], lr=0.05)
    for step in range(600):
        optimizer.zero_grad()
        sum(weigh_losses(losses, cfg, log_vars).values()).backward()
        if step == 0:
            grad = log_vars.grad.clone()
        optimizer.step()
    assert grad[0] < 0 and grad[1] > 0 and grad[2] > 0  # large loss: s rises (weight falls); small: s falls
    assert log_vars.detach().tolist() == pytest.approx([math.log(10.0), math.log(0.1), math.log(0.1)], abs=0.02)


def test_uncertainty_weights_are_learned_in_training(tiny_model, tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=2, loss_weighting="uncertainty", uncertainty_lr=0.05)
    train(cfg, out_dir=tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    s = state["model"]["loss_log_vars"]
    assert s.abs().min() > 0.05  # learned (they start at 0), and saved with the model
    groups = state["optimizer"]["param_groups"]
    assert any(g["initial_lr"] == 0.05 and g["weight_decay"] == 0.0 and len(g["params"]) == 1 for g in groups)


# ------------------------------------------------------------------ PCGrad


def test_pcgrad_two_conflicting_gradients_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1: a conflict
    out = pcgrad_project(g, orders=[[1], [0]])
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert out[0] @ g[1] >= -1e-7 and out[1] @ g[0] >= -1e-7 and out[0] @ out[1] >= -1e-7
    same = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: unchanged
    assert torch.equal(pcgrad_project(same), same)


def test_pcgrad_projected_gradients_no_longer_conflict():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        g = torch.randn(3, 40, generator=gen)
        torch.manual_seed(1)
        out = pcgrad_project(g)
        torch.manual_seed(1)
        orders = [[j for j in torch.randperm(3).tolist() if j != i] for i in range(3)]
        for i in range(3):
            conflicts = [j for j in range(3) if j != i and g[i] @ g[j] < 0]
            if not conflicts:
                assert torch.equal(out[i], g[i])  # non-conflicting gradients unchanged
            else:  # no conflict with the last gradient it was projected against
                assert out[i] @ g[orders[i][-1]] >= -1e-5
        # two tasks: the projected pair itself no longer conflicts
        pair = pcgrad_project(g[:2])
        assert pair[0] @ pair[1] >= -1e-5 and pair[0] @ g[1] >= -1e-5 and pair[1] @ g[0] >= -1e-5
    # where the other tasks' gradients are orthogonal, the projected one conflicts with none of them
    g = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.5], [0.0, -3.0, 0.0]])
    assert g[0] @ g[1] < 0 and g[0] @ g[2] < 0 and g[1] @ g[2] == 0
    out = pcgrad_project(g)
    assert all(out[0] @ g[j] >= -1e-6 for j in (1, 2))


def test_pcgrad_step_uses_the_sum_of_projected_task_gradients(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, hidden_dropout_prob=0.0, pcgrad=True)
    prepared = prepare(cfg)
    model = build(prepared, cfg).eval()
    streams, batches = first_batches(prepared, cfg)
    shared = list(model.encoder.parameters())
    rest = model.head_parameters()
    per_task, heads = [], {}
    for t in TASKS:  # each task's gradient on its own
        model.zero_grad()
        task_losses(model, streams, batches, "per_piece", cfg)[t].backward()
        per_task.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                   for p in shared]))
        heads.update({id(p): p.grad.clone() for p in rest if p.grad is not None})
    conflicts = sum(float(per_task[i] @ per_task[j]) < 0 for i in range(3) for j in range(i + 1, 3))
    torch.manual_seed(5)
    expected = pcgrad_project(torch.stack(per_task)).sum(0)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    pcgrad_backward(task_losses(model, streams, batches, "per_piece", cfg), shared, rest)
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    if conflicts:  # then the projection changed the encoder's update
        assert not torch.allclose(got, torch.stack(per_task).sum(0), rtol=1e-3, atol=1e-6)
    for p in rest:  # each head: its own task's plain gradient
        torch.testing.assert_close(p.grad, heads[id(p)], rtol=1e-5, atol=1e-7)
    assert model.encoder.pooler.dense.weight.grad is None  # reached by no task: left alone, as backward() does


# ------------------------------------------------------------------ named losses


def test_cosent_by_hand():
    scores, labels = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([3.0, 1.0, 2.0])
    # ordered pairs (i, j) with y_i > y_j: (0, 1), (0, 2), (2, 1): exp of s_j - s_i = -0.8, -0.4, -0.4
    expected = math.log(1 + math.exp(-0.8) + 2 * math.exp(-0.4))
    assert float(cosent_loss(scores, labels, 1.0)) == pytest.approx(expected)
    assert float(cosent_loss(scores, labels, 20.0)) == pytest.approx(
        math.log(1 + math.exp(-16) + 2 * math.exp(-8)), rel=1e-4)  # float32
    assert float(cosent_loss(scores, torch.ones(3), 20.0)) == 0.0  # no ordered pair
    wrong = cosent_loss(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 0.0]), 20.0)
    assert float(wrong) == pytest.approx(math.log(1 + math.exp(16)))


def test_mnr_is_cross_entropy_over_in_batch_similarity_rows_of_duplicates():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    sims = 20.0 * torch.nn.functional.cosine_similarity(u.unsqueeze(1), v.unsqueeze(0), dim=-1)
    rows = [-torch.log_softmax(sims[i], 0)[i] for i in range(6) if labels[i] == 1]
    assert float(mnr_loss(u, v, labels, 20.0)) == pytest.approx(float(sum(rows) / len(rows)), rel=1e-5)
    u.requires_grad_(True)
    zero = mnr_loss(u, v, torch.zeros(6), 20.0)  # no duplicate in the batch
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.isfinite(u.grad).all() and not u.grad.any()


def test_named_losses_train(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, epochs=2, quora_loss="bce_mnr", sts_loss="cosent")
    results = train(cfg, progress=False)
    assert all(math.isfinite(r.train_loss) for r in results) and results[1].train_loss < results[0].train_loss


# ------------------------------------------------------------------ optimisation


def test_layer_decay_lrs_per_group(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, layer_decay=0.8, lr=1e-3)
    model = build(prepare(cfg), cfg)
    optimizer, _ = build_optimizer(model, cfg, torch.device("cpu"), 100)
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # before the schedule
    expected = {"embeddings": 1e-3 * 0.8 ** 2, "encoder.layer.0.": 1e-3 * 0.8, "encoder.layer.1.": 1e-3,
                "pooler": 1e-3}
    for name, p in model.encoder.named_parameters():
        (key,) = [k for k in expected if k in name]
        assert lr_of[id(p)] == pytest.approx(expected[key], rel=1e-12), name
    assert all(lr_of[id(p)] == cfg.head_lr for p in model.head_parameters())
    assert layer_depth("encoder.layer.11.output.dense.weight", 12) == 12
    # factor 1: the report's four groups (encoder/heads x decay/no decay), nothing split
    default = build_optimizer(model, cfg.replace(layer_decay=1.0), torch.device("cpu"), 100)[0]
    assert len(default.param_groups) == 4 and {g["initial_lr"] for g in default.param_groups} == {1e-3, cfg.head_lr}


def test_cosine_schedule_values(tiny_model, tiny_data):
    cfg = tiny_cfg(tiny_model, tiny_data, schedule="cosine", warmup_ratio=0.1, lr=1e-3)
    model = build(prepare(cfg), cfg)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"), 100)
    seen = {}
    for step in range(101):
        seen[step] = scheduler.get_last_lr()[0] / 1e-3
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1 / 11)  # warmup: 10 steps
    assert seen[10] == pytest.approx(1.0)
    assert seen[55] == pytest.approx(0.5)  # halfway through the decay
    assert seen[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert seen[100] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ resume with the methods

RESUME_CASES = {
    "annealed+uncertainty+cross+smart": dict(task_sampling="annealed", loss_weighting="uncertainty",
                                             quora_encoding="cross", sts_loss="cosent", smart_weight=1.0),
    "pcgrad+fixed+both+mnr+decay": dict(pcgrad=True, loss_weighting="fixed", sts_weight=0.5, sts_encoding="both",
                                        quora_loss="bce_mnr", layer_decay=0.8, schedule="cosine"),
}


@pytest.mark.parametrize("methods", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_with_methods_equals_an_uninterrupted_run(tiny_model, tmp_path, methods):
    data = write_data(tmp_path / "data", n_train=24, n_dev=8, malformed=False)  # small: 3 runs of 2 epochs
    cfg = tiny_cfg(tiny_model, data, epochs=2, hidden_dropout_prob=0.3, **methods)
    prepared = prepare(cfg)
    full = train(cfg, prepared, out_dir=tmp_path / "full", progress=False)
    train(cfg, prepared, out_dir=tmp_path / "part", callback=lambda r: r.epoch == 1, progress=False)
    resumed = train(cfg, prepared, out_dir=tmp_path / "part", progress=False)
    assert [r.metrics for r in resumed] == [r.metrics for r in full]
    assert [r.train_loss for r in resumed] == [r.train_loss for r in full]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ------------------------------------------------------------------ config, CLI and study files

BAD = [
    (dict(quora_encoding="siamese"), "quora_encoding must be one of 'bi', 'cross', 'both'"),
    (dict(task_sampling="random"), "task_sampling must be one of"),
    (dict(loss_weighting="gradnorm"), "loss_weighting must be one of"),
    (dict(sts_loss="huber"), "sts_loss must be one of 'mse', 'cosent', 'mse_cosent'"),
    (dict(quora_loss="bce_mnr", quora_encoding="cross"), "quora_loss 'bce_mnr' needs sentence vectors"),
    (dict(pcgrad=True, task_sampling="sqrt"), "pcgrad needs several tasks per step"),
    (dict(multitask=False, task_sampling="annealed"), "task_sampling other than 'all' needs multitask"),
    (dict(layer_decay=0.4), "layer_decay must be in [0.5, 1]"),
    (dict(sts_weight=0.0), "sts_weight must be > 0"),
    (dict(schedule="step"), "schedule must be one of 'linear', 'cosine', 'constant'"),
    (dict(smart_weight=-1.0), "smart_weight must be >= 0"),
    (dict(smart_epsilon=0.0), "smart_epsilon must be > 0"),
]


@pytest.mark.parametrize("values, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_method_values_are_one_clear_error(values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        TrainConfig(**values).validate()


def test_flags_come_from_the_config():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--quora-encoding", "cross", "--task-sampling", "annealed", "--pcgrad",
                              "--layer-decay", "0.9", "--sts-loss", "cosent", "--loss-weighting", "uncertainty"])
    assert (args.quora_encoding, args.task_sampling, args.pcgrad, args.layer_decay) == ("cross", "annealed", True, 0.9)
    assert parser.parse_args([]).quora_encoding == "bi" and parser.parse_args([]).pcgrad is False


STUDY = """description = "x"
direction = "maximize"
metric = "overall"
n_trials = 4
[train]
epochs = 2
{train}
[space]
{space}
"""


@pytest.mark.parametrize("train_line, space_line, field, fragment", [
    ("", 'task_sampling = { type = "categorical", choices = ["all", "bogus"] }', "space.task_sampling",
     "task_sampling must be one of"),
    ("", 'layer_decay = { type = "float", low = 0.3, high = 1.0 }', "space.layer_decay", "layer_decay must be in"),
    ("", 'sts_encoding = { type = "categorical", choices = ["bi", 3] }', "space.sts_encoding.choices", "expected str"),
    ('pcgrad = true\ntask_sampling = "sqrt"', 'lr = { type = "float", low = 1e-5, high = 1e-4 }', "train",
     "pcgrad needs several tasks per step"),
    ('quora_encoding = "cross"', 'quora_loss = { type = "categorical", choices = ["bce", "bce_mnr"] }',
     "space.quora_loss", "needs sentence vectors"),
])
def test_study_files_validate_method_dimensions(tmp_path, train_line, space_line, field, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.format(train=train_line, space=space_line))
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {field}: ") and fragment in str(info.value), str(info.value)


def test_method_dimensions_load_as_categorical_and_float(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(STUDY.format(train="", space="\n".join([
        'quora_encoding = { type = "categorical", choices = ["bi", "cross", "both"] }',
        'pcgrad = { type = "categorical", choices = [false, true] }',
        'layer_decay = { type = "float", low = 0.5, high = 1.0 }',
        'sts_weight = { type = "float", low = 0.25, high = 4.0, log = true }'])))
    spec = load_spec(path)
    assert spec.space["quora_encoding"].choices == ENCODINGS and spec.space["pcgrad"].choices == (False, True)
    assert (spec.space["layer_decay"].type, spec.space["sts_weight"].log) == ("float", True)


def test_methods_study_is_tpe_hyperband_full_data_and_every_trial_valid():
    spec = load_spec("methods")
    assert spec.sampler["type"] == "tpe" and spec.pruner["type"] == "hyperband"
    assert "max_examples" not in spec.train and "model" not in spec.train  # full data, default encoder
    searched = {k for p in spec.space.values() for k in p.controls()}
    assert {"lr", "hidden_dropout_prob", "batch_size", "quora_encoding", "sts_encoding", "task_sampling",
            "loss_weighting", "pcgrad", "quora_loss", "sts_loss", "layer_decay", "schedule"} <= searched
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):  # any point of the space is a valid configuration (no failed trials by design)
        trial = study.ask()
        TrainConfig().replace(**spec.suggest(trial)).validate()
        study.tell(trial, 0.0)


def test_methods_ablation_changes_one_method_per_row():
    spec = load_spec("methods_ablation")
    presets = spec.space["method"].presets
    assert presets["baseline"] == {} and spec.grid_size == len(presets) and spec.pruner["type"] == "none"
    defaults = TrainConfig()
    for name, bundle in presets.items():
        cfg = TrainConfig().replace(**spec.train, **bundle)
        cfg.validate()
        assert all(getattr(defaults, k) != v for k, v in bundle.items()), name  # each value is a change
    covered = {k for b in presets.values() for k in b}
    assert {"quora_encoding", "sts_encoding", "task_sampling", "loss_weighting", "pcgrad", "sts_loss",
            "quora_loss", "layer_decay", "schedule", "smart_weight"} <= covered
    assert {b.get("task_sampling") for b in presets.values()} >= set(TASK_SAMPLINGS) - {"all"}


def test_epoch_plan_passes_sampling_through(tiny_model, tiny_data):
    _, tokenizer = load_pretrained(str(tiny_model))
    data = load_splits(tiny_data, tokenizer, ("train",))["train"]
    streams = {t: TaskStream(data[t], 8, seed=0) for t in TASKS}
    plan = epoch_plan(streams, True, 1, "sqrt", 3, 7)
    assert plan == task_plan({t: 48 for t in TASKS}, {t: 6 for t in TASKS}, "sqrt", 1, 3, 7)
    assert np.all([len(s) == 1 for s in plan])


# ------------------------------------------------------------------ SMART


def test_smart_perturbation_is_bounded_and_ascends_the_divergence(tiny_model, tiny_data, monkeypatch):
    from mtbert import methods
    from mtbert.train import task_outputs

    cfg = tiny_cfg(tiny_model, tiny_data, hidden_dropout_prob=0.0, smart_weight=1.0, smart_epsilon=1e-2,
                   smart_step=1.0)
    prepared = prepare(cfg)
    model = build(prepared, cfg).eval()  # no dropout: outputs differ only by the perturbation
    streams, batches = first_batches(prepared, cfg)

    def forward():
        return {t: out for t, (out, _) in task_outputs(model, streams, batches, "per_piece").items()}

    clean = {t: out.detach() for t, out in forward().items()}
    replayed = []
    replay = methods.EmbeddingNoise.replay
    monkeypatch.setattr(methods.EmbeddingNoise, "replay", lambda self, d: (replayed.extend(d), replay(self, d)))
    torch.manual_seed(0)
    smart = methods.smart_regularizer(model, forward, clean, cfg)
    word_embeddings = model.encoder.get_input_embeddings()
    assert not word_embeddings._forward_hooks  # the noise hook is gone after the step
    assert len(replayed) == 5  # one perturbation per encoder call: five sentence columns, per piece
    assert all(d.abs().max() <= cfg.smart_epsilon for d in replayed)
    assert sum(int((d.abs() == cfg.smart_epsilon).sum()) for d in replayed) > 0  # the ascent reached the bound
    # the ascent step found a perturbation worse than random noise of the same size
    torch.manual_seed(0)
    noise = methods.EmbeddingNoise(word_embeddings, cfg.smart_epsilon)
    try:
        noisy = forward()
    finally:
        noise.remove()
    random_total = sum(float(TASK_TABLE[t].divergence(noisy[t], clean[t]).detach()) for t in TASKS)
    assert sum(float(v) for v in smart.values()) > 2 * random_total > 0


def test_smart_zero_perturbation_is_zero_and_training_runs(tiny_model, tiny_data):
    from mtbert.methods import smart_regularizer
    from mtbert.train import task_outputs

    cfg = tiny_cfg(tiny_model, tiny_data, hidden_dropout_prob=0.0, smart_weight=1.0, smart_epsilon=1e-30,
                   smart_step=1e-30)
    prepared = prepare(cfg)
    model = build(prepared, cfg).eval()
    streams, batches = first_batches(prepared, cfg)

    def forward():
        return {t: out for t, (out, _) in task_outputs(model, streams, batches, "per_piece").items()}

    clean = forward()
    smart = smart_regularizer(model, forward, clean, cfg)
    assert all(float(v.detach()) == pytest.approx(0.0, abs=1e-10) for v in smart.values())
    results = train(tiny_cfg(tiny_model, tiny_data, epochs=2, smart_weight=1.0), prepared, progress=False)
    assert all(math.isfinite(r.train_loss) for r in results)


def test_smart_divergences_by_hand():
    from mtbert.methods import symmetric_kl, symmetric_kl_binary

    a, b = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # p = (1/4, 3/4), q = (1/2, 1/2)
    kl = lambda p, q: sum(x * math.log(x / y) for x, y in zip(p, q))  # noqa: E731
    expected = kl([0.5, 0.5], [0.25, 0.75]) + kl([0.25, 0.75], [0.5, 0.5])
    assert float(symmetric_kl(a, b)) == pytest.approx(expected, rel=1e-6)
    assert float(symmetric_kl_binary(torch.tensor([math.log(3.0)]), torch.tensor([0.0]))) == pytest.approx(expected,
                                                                                                            rel=1e-6)


def test_report_step_tells_a_specialised_step_when_it_may_run():
    from mtbert.methods import STEP_FIELDS, report_step

    assert report_step(TrainConfig()) and report_step(TrainConfig(layer_decay=0.8, schedule="cosine"))
    assert not report_step(TrainConfig(multitask=False))
    changed = {"quora_encoding": "cross", "sts_encoding": "both", "task_sampling": "sqrt", "loss_weighting": "fixed",
               "pcgrad": True, "quora_loss": "bce_mnr", "sts_loss": "cosent", "smart_weight": 1.0}
    assert set(changed) == set(STEP_FIELDS)
    for field, value in changed.items():
        assert not report_step(TrainConfig(**{field: value})), field
