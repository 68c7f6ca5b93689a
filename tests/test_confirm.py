"""Confirmation under fresh seeds (service/confirm.py, reports/confirmation.py, service/stats.py, search.py --confirm,
worker.py X:confirm)."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import storage as storage_lib
from helpers import ROOT, load, write_study
from reports import confirmation
from service import confirm
from service.confirm import ConfirmError, Request
from service.stats import mean_sd, paired_t, t_quantile, verdict
from service.study import open_study, study_uuid
from studies import StudySpecError, load_spec
from tiny import write_data
from service.worker import Worker

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (any t table: 4.303)


# ------------------------------------------------------------ statistics


def test_mean_and_sample_sd():
    assert mean_sd([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert mean_sd([0.4]) == (0.4, None) and mean_sd([]) == (None, None)


def test_t_quantiles_match_the_table():
    for dof, table in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, dof) == pytest.approx(table, abs=5e-4)


def test_paired_t_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half width t(0.975, 2) * 1 / sqrt(3)
    c = paired_t([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])
    half = T_975_2 / math.sqrt(3)
    assert (c.n, c.dof, c.difference) == (3, 2, pytest.approx(2.0))
    assert (c.low, c.high) == (pytest.approx(2 - half), pytest.approx(2 + half))  # [-0.484, 4.484]
    assert not c.excludes_zero()
    assert paired_t([0.5], [0.4]) is None
    with pytest.raises(ValueError):
        paired_t([0.5, 0.6], [0.4])


def test_the_verdict_sentence():
    # differences 0.012, 0.010, 0.014: mean 0.012, sd 0.002, half width 4.3027 * 0.002 / sqrt(3) = 0.00497
    better = paired_t([0.612, 0.610, 0.614], [0.6, 0.6, 0.6])
    assert verdict("configuration A", "B", better) == (
        "configuration A is better than B (difference +0.0120, 95% CI [+0.0070, +0.0170], paired t over 3 seeds).")
    assert verdict("A", "B", better, maximize=False) == (
        "B is better than A (difference +0.0120, 95% CI [+0.0070, +0.0170], paired t over 3 seeds).")
    noisy = paired_t([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])
    assert verdict("A", "B", noisy).startswith("A and B cannot be told apart with 3 seeds (difference +2.0000, "
                                               "95% CI [-0.4841, +4.4841]")
    assert verdict("A", "B", None) == "A and B cannot be compared: they share fewer than 2 completed seeds."


def test_fresh_seeds_skip_the_search_seed():
    assert confirm.fresh_seeds(3, {0}) == [1, 2, 3]
    assert confirm.fresh_seeds(3, {2}) == [1, 3, 4]
    assert confirm.fresh_seeds(2, {0}, base=0) == [1, 2]


# ------------------------------------------------------------ [confirm] and the request


def study_file(tmp_path: Path, extra: str = "", name: str = "cf", n_trials: int = 4, epochs: int = 2,
               model: Path | str = "m", data: Path | str = "d", pruner: str = 'type = "none"') -> Path:
    path = write_study(tmp_path, name, model, data, n_trials=n_trials, epochs=epochs, pruner=pruner)
    if extra:
        path.write_text(path.read_text() + extra)
    return path


def test_confirm_table_is_parsed_and_validated(tmp_path):
    spec = load_spec(study_file(tmp_path, "\n[confirm]\ntop = 2\nseeds = 5\nseed_base = 10\n"))
    assert spec.confirm == {"top": 2, "seeds": 5, "seed_base": 10}
    assert spec.to_dict()["confirm"] == spec.confirm
    assert load_spec(study_file(tmp_path)).confirm == {}
    for table, fragment in (("top = 2\nseeds = 1", "confirm.seeds: must be an integer >= 2"),
                            ("top = 0\nseeds = 3", "confirm.top: must be an integer >= 1"),
                            ("top = 2", "confirm.seeds: missing"),
                            ("top = 2\nseeds = 3\nrepeats = 2", "confirm.repeats: unknown key"),
                            ("top = 2\nseeds = 3.5", "confirm.seeds: must be an integer")):
        with pytest.raises(StudySpecError, match=fragment):
            load_spec(study_file(tmp_path, f"\n[confirm]\n{table}\n"))
    with pytest.raises(StudySpecError, match="confirm: space.seed searches the training seed"):
        load_spec(study_file(tmp_path, '\n[space.seed]\ntype = "int"\nlow = 0\nhigh = 3\n[confirm]\ntop = 2\nseeds = 3\n'))


def test_request_from_flags_and_table(tmp_path):
    plain = load_spec(study_file(tmp_path))
    table = load_spec(study_file(tmp_path, "\n[confirm]\ntop = 2\nseeds = 5\nseed_base = 10\n", name="t"))
    assert confirm.request_from(plain, None, None) is None
    assert confirm.request_from(plain, 3, None) == Request(3, 3, 1)
    assert confirm.request_from(table, None, None) == Request(2, 5, 10)
    assert confirm.request_from(table, 4, 3) == Request(4, 3, 10)
    assert confirm.request_from(table, 0, None) is None
    with pytest.raises(ConfirmError, match="--seeds needs --confirm K"):
        confirm.request_from(plain, None, 4)
    with pytest.raises(ConfirmError, match="--seeds with --confirm 0: no confirmation runs"):
        confirm.request_from(table, 0, 4)


# ------------------------------------------------------------ a synthetic study: creation, summary, export choice

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "hidden_dropout_prob": FloatDistribution(0.0, 0.3)}
# value, lr, dropout; the last one repeats #1's configuration (e.g. sampled again): it is confirmed once
SEARCH = [(0.70, 1e-2, 0.0), (0.65, 5e-3, 0.1), (0.60, 2e-3, 0.2), (0.50, 1e-3, 0.3), (0.66, 5e-3, 0.1)]
# confirmation values by parent trial, seeds 1, 2, 3. #4 - #0 = 0.02, 0.04, 0.03: mean 0.03, sd 0.01,
# 95% CI 0.03 -+ 4.3027 * 0.01 / sqrt(3) = [0.0052, 0.0548]; #2 has the single best run (0.70) but the worst mean
CONFIRMED = {0: [0.58, 0.60, 0.59], 4: [0.60, 0.64, 0.62], 2: [0.50, 0.70, 0.48]}


def synthetic_parent(tmp_path: Path, n_trials: int = 5, rows=SEARCH, config: dict | None = None,
                     url: str | None = None, pruner: str = 'type = "none"',
                     metric: str = "overall") -> tuple[optuna.Study, object, str]:
    """A finished search without training: complete trials with the given values and recorded configs
    (a confirmation re-trains from the configs; the search's own scores only rank them)."""
    # a confirmation re-trains from the spec and the params (never from the writable `config` attr): the
    # study file says what the recorded configs say
    where = {} if config is None else dict(model=config["model"], data=config["data_dir"], epochs=config["epochs"])
    path = study_file(tmp_path, n_trials=n_trials, pruner=pruner, **where)
    path.write_text(path.read_text().replace('metric = "overall"', f'metric = "{metric}"'))
    spec = load_spec(path)
    url = url or f"sqlite:///{tmp_path / 'c.db'}"
    study = open_study(spec, url, {})
    for value, lr, dropout in rows:
        recorded = {"epochs": 2, "seed": 0, "device": "cpu", **(config or {}), "lr": lr, "hidden_dropout_prob": dropout}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=value, params={"lr": lr, "hidden_dropout_prob": dropout},
            distributions=DISTRIBUTIONS, user_attrs={"config": recorded, "sst_acc": value - 0.1,
                                                     "quora_acc": value + 0.1, "sts_corr": value, "overall": value}))
    return study, spec, url


def run_synthetic(study: optuna.Study, values: dict[int, list[float]]) -> None:
    """Complete every waiting confirmation trial with the given per-seed values (no training)."""
    seeds = study.user_attrs["confirm"]["seeds"]
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        value = values[trial.user_attrs["parent_trial"]][seeds.index(trial.user_attrs["seed"])]
        for key, v in (("sst_acc", value - 0.1), ("quora_acc", value + 0.1), ("sts_corr", value), ("overall", value)):
            trial.set_user_attr(key, v)
        trial.set_user_attr("epoch_seconds", [1.0, 1.0])
        study.tell(trial, value)


def test_create_enqueues_each_slot_exactly_once(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)
    study, cspec, added = confirm.create(parent, spec, url, Request(3, 3))
    assert (study.study_name, added, cspec.n_trials, cspec.pruner, cspec.keep_best) == (
        "cf:confirm", 9, 9, {"type": "none"}, 3)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.WAITING] * 9
    slots = [(t.user_attrs["parent_trial"], t.user_attrs["seed"]) for t in trials]
    assert slots == [(p, s) for s in (1, 2, 3) for p in (0, 4, 2)]  # the top 3 configurations, seed-major
    assert {t.system_attrs["fixed_params"]["lr"] for t in trials} == {1e-2, 5e-3, 2e-3}
    assert study.user_attrs["confirms"] == "cf" and parent.user_attrs["confirmed_by"] == "cf:confirm"
    assert [p["trial"] for p in study.user_attrs["confirm"]["parents"]] == [0, 4, 2]

    _, _, again = confirm.create(parent, spec, url, Request(3, 3))  # a rerun enqueues nothing
    _, _, fewer = confirm.create(parent, spec, url, Request(2, 3))
    assert (again, fewer, len(study.get_trials())) == (0, 0, 9)
    _, more_spec, more = confirm.create(parent, spec, url, Request(3, 4))  # one more seed: 3 more trials
    assert (more, len(study.get_trials()), more_spec.n_trials) == (3, 12, 12)
    assert study.user_attrs["confirm"]["seeds"] == [1, 2, 3, 4]


def test_a_worker_claims_a_confirmation_s_slots_only_and_a_search_s_samples_within_its_budget(tmp_path):
    from service.worker import SearchTrials, trial_source

    parent, spec, url = synthetic_parent(tmp_path)
    study, cspec, _ = confirm.create(parent, spec, url, Request(3, 3))
    source = trial_source(study)
    assert isinstance(source, confirm.ConfirmationTrials) and isinstance(trial_source(parent), SearchTrials)
    counts = {s: 0 for s in TrialState}
    assert source.claim(study, cspec, {**counts, TrialState.RUNNING: 1}) == "wait"  # one may die and be retried
    assert source.claim(study, cspec, {**counts, TrialState.COMPLETE: 8}) == "done"  # never a new sample
    trial = source.claim(study, cspec, {**counts, TrialState.WAITING: 9})
    assert trial.number == 0 and source.values(trial, cspec)["seed"] == 1  # the first enqueued slot
    # a search: new samples until its budget of 5 is met, waiting while the rest runs elsewhere
    search = SearchTrials()
    assert search.claim(parent, spec, {**counts, TrialState.COMPLETE: 5}) == "done"
    assert search.claim(parent, spec, {**counts, TrialState.COMPLETE: 3, TrialState.RUNNING: 2}) == "wait"
    ranked = sorted(parent.trials, key=lambda t: -t.value)
    assert search.kept(ranked, spec) == ranked[: spec.keep_best]


def test_create_refuses_an_unfinished_search_and_an_earlier_study_of_the_same_name(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path, n_trials=6)
    with pytest.raises(ConfirmError, match="has 5 of 6 trials finished and 0 running: its search must finish"):
        confirm.create(parent, spec, url, Request(3, 3))
    (tmp_path / "x").mkdir()
    parent, spec, url = synthetic_parent(tmp_path / "x")
    confirm.create(parent, spec, url, Request(2, 2))
    optuna.delete_study(study_name="cf", storage=url)
    parent, spec, url = synthetic_parent(tmp_path / "x")
    with pytest.raises(ConfirmError, match="cf:confirm confirms another study named cf"):
        confirm.create(parent, spec, url, Request(2, 2))


def test_summary_table_sentences_and_export_choice(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)
    study, _, _ = confirm.create(parent, spec, url, Request(3, 3))
    run_synthetic(study, CONFIRMED)
    summary = confirmation.summarize(study)
    assert [c.number for c in summary.configs] == [4, 0, 2]
    assert summary.configs[0].mean_sd() == pytest.approx((0.62, 0.02))
    assert summary.verdict() == ("Configuration #4 is better than configuration #0 (difference +0.0300, 95% CI "
                                 "[+0.0052, +0.0548], paired t over 3 seeds).")
    assert summary.search_best_sentence() == ("The search's single-seed best was #0; under fresh seeds #4 "
                                              "(search rank 2) is best.")
    text = confirmation.report_markdown(parent)
    assert "| #4 (search rank 2) | 0.6600 | 0.6200 ± 0.0200 | 0.5200 ± 0.0200 | 0.7200 ± 0.0200 | 0.6200 ± 0.0200 " \
           "| 3 of 3 | 2 (#4) |" in text
    assert "| #0 (search rank 1) | 0.7000 | 0.5900 ± 0.0100 |" in text
    assert "9 of 9 trials complete" in text and summary.verdict() in text
    assert "Compute: the confirmation trained 18 epochs in 9 trials" in text
    _, best, chosen, facts = confirmation.export_choice(parent, spec)
    # the best seed of the best configuration (#4, seed 2: 0.64), not the best single run (#2, seed 2: 0.70)
    assert (best.user_attrs["parent_trial"], best.user_attrs["seed"], best.value) == (4, 2, 0.64)
    assert chosen.startswith("the best confirmed configuration, #4 of cf (overall 0.6200 ± 0.0200 over 3 seeds)")
    assert facts["study"] == "cf:confirm" and facts["confirmed"]["parent_trial"] == 4


def test_the_confirmed_best_against_a_search_best_ranked_lower_than_runner_up(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)
    study, _, _ = confirm.create(parent, spec, url, Request(3, 3))
    run_synthetic(study, {0: [0.50, 0.52, 0.51], 4: [0.60, 0.64, 0.62], 2: [0.55, 0.57, 0.56]})
    summary = confirmation.summarize(study)
    assert [c.number for c in summary.configs] == [4, 2, 0]
    assert summary.verdict().startswith("Configuration #4 is better than configuration #2 (difference +0.0600")
    # #4 - #0 = 0.10, 0.12, 0.11: mean 0.11, sd 0.01, 95% CI 0.11 -+ 0.0248
    assert summary.search_best_sentence() == (
        "The search's single-seed best was #0; under fresh seeds #4 (search rank 2) is best. Against the search's "
        "best: configuration #4 is better than configuration #0 (difference +0.1100, 95% CI [+0.0852, +0.1348], "
        "paired t over 3 seeds).")


def test_without_a_confirmation_export_takes_the_search_best(tmp_path):
    parent, spec, _ = synthetic_parent(tmp_path)
    _, best, chosen, facts = confirmation.export_choice(parent, spec)
    assert best.number == 0 and "single seed; no confirmation" in chosen and facts == {"study": "cf"}
    assert confirmation.report_markdown(parent) is None


def test_a_search_with_one_complete_configuration_says_why_there_is_nothing_to_compare(tmp_path, caplog):
    """Hyperband on a small budget can prune all but one trial (the CPU quickstart with sampler seed 2 did)."""
    parent, spec, url = synthetic_parent(tmp_path, n_trials=3, rows=SEARCH[:1])
    for value in (0.55, 0.52):
        parent.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={0: value},
                                                   params={"lr": 1e-3, "hidden_dropout_prob": value - 0.5},
                                                   distributions=DISTRIBUTIONS))
    with caplog.at_level("WARNING", logger="service.confirm"):
        study, _, added = confirm.create(parent, spec, url, Request(3, 3))
    assert added == 3 and "1 distinct complete configuration(s) (2 trial(s) pruned, 0 failed): confirming those, " \
        "not 3; a larger budget (--n-trials) completes more" in caplog.text
    run_synthetic(study, {0: [0.68, 0.70, 0.72]})
    summary = confirmation.summarize(study)
    assert summary.verdict().startswith("The search completed one distinct configuration (its other trials were "
                                        "pruned, failed or repeated it): there is no runner-up to compare it with.")
    assert summary.search_best_sentence() == "Under fresh seeds #0 scores 0.7000 on average against 0.7000 in the search."


def test_one_configuration_asked_for_is_not_blamed_on_pruning(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)  # 4 distinct complete configurations
    study, _, _ = confirm.create(parent, spec, url, Request(1, 3))
    run_synthetic(study, {0: [0.68, 0.70, 0.72]})
    assert confirmation.summarize(study).verdict() == ("One configuration was asked for (--confirm 1): there is no "
                                                  "runner-up to compare it with.")


def test_one_configuration_s_sentence_under_a_metric_that_is_not_a_recorded_score(tmp_path):
    """overall_normalized is a study metric, not a user attr of the trials: the mean comes from the values."""
    parent, spec, url = synthetic_parent(tmp_path, n_trials=1, rows=SEARCH[:1], metric="overall_normalized")
    assert spec.metric == "overall_normalized"
    study, _, _ = confirm.create(parent, spec, url, Request(3, 3))
    run_synthetic(study, {0: [0.68, 0.70, 0.72]})
    assert confirmation.summarize(study).search_best_sentence() == (
        "Under fresh seeds #0 scores 0.7000 on average against 0.7000 in the search.")


def test_two_configurations_that_cannot_be_told_apart(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)
    study, _, _ = confirm.create(parent, spec, url, Request(2, 3))
    run_synthetic(study, {0: [0.60, 0.62, 0.58], 4: [0.61, 0.59, 0.59]})
    summary = confirmation.summarize(study)
    assert summary.verdict().startswith("Configuration #0 and configuration #4 cannot be told apart with 3 seeds")
    assert summary.search_best_sentence() == "The search's single-seed best, #0, is also the best under fresh seeds."


def test_the_dashboard_lists_the_confirmation_and_its_trials_parent_numbers(tmp_path):
    from optuna_dashboard import wsgi

    parent, spec, url = synthetic_parent(tmp_path)
    study, _, _ = confirm.create(parent, spec, url, Request(2, 2))
    run_synthetic(study, {0: [0.6, 0.61], 4: [0.59, 0.6]})
    app = wsgi(storage_lib.open_storage(url, heartbeat=False))

    def get(path: str) -> dict:
        from wsgiref.util import setup_testing_defaults

        environ, status = {"PATH_INFO": path, "wsgi.errors": io.StringIO()}, []
        setup_testing_defaults(environ)
        body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
        assert status[0].startswith("200"), environ["wsgi.errors"].getvalue()
        return json.loads(body)

    summaries = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    assert {"cf", "cf:confirm"} <= set(summaries)
    detail = get(f"/api/studies/{summaries['cf:confirm']}")
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in detail["trials"]]
    assert sorted((a["parent_trial"], a["seed"]) for a in attrs) == [("0", "1"), ("0", "2"), ("4", "1"), ("4", "2")]


@pytest.fixture
def one_thread():
    """In-process training on one thread: a shared, busy 2-core machine makes OpenMP threads spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_failed_confirmation_trial_is_not_replaced_by_a_new_sample(tmp_path, tiny_model, tiny_data, monkeypatch,
                                                                     one_thread):
    import mtbert.train
    from mtbert.train import NonFiniteLossError

    real_train = mtbert.train.train

    def nan_with_seed_2(cfg, *args, **kwargs):
        if cfg.seed == 2:
            raise NonFiniteLossError(step=3, epoch=1)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(mtbert.train, "train", nan_with_seed_2)
    parent, spec, url = synthetic_parent(tmp_path, n_trials=2, rows=[(0.6, 1e-2, 0.0), (0.5, 5e-3, 0.1)],
                                         config=tiny_config(tiny_model, tiny_data, epochs=1))
    study, cspec, _ = confirm.create(parent, spec, url, Request(2, 2))
    Worker(study, cspec, progress=False, checkpoint_root=tmp_path / "ck").run()
    trials = study.get_trials()
    assert len(trials) == 4 and all("parent_trial" in t.user_attrs for t in trials)  # no fifth, sampled trial
    assert [(t.user_attrs["seed"], t.state) for t in trials] == [
        (1, TrialState.COMPLETE), (1, TrialState.COMPLETE), (2, TrialState.FAIL), (2, TrialState.FAIL)]
    for t in trials[:2]:
        p = parent.trials[t.user_attrs["parent_trial"]]
        assert t.user_attrs["config"] == {**p.user_attrs["config"], "seed": 1}
    text = confirmation.report_markdown(parent)
    assert "2 of 4 trials complete, 0 running, 0 waiting, 2 failed" in text and "| 1 of 2 |" in text
    assert "cannot be compared: they share fewer than 2 completed seeds" in text


# ------------------------------------------------------------ real workers (tiny model)


def start(study_arg: str, url: str, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--study", study_arg, "--no-progress",
                             "--poll-seconds", "0.5", *extra], cwd=ROOT, env={**env, "MTBERT_STORAGE": url},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tiny_config(model: Path, data: Path, epochs: int) -> dict:
    """The recorded config of a search trial on the tiny model (lr and dropout come from its params)."""
    from mtbert.config import TrainConfig

    return TrainConfig().replace(model=str(model), data_dir=str(data), epochs=epochs, batch_size=8, device="cpu",
                                 eval_batch_size=64).to_dict()


@pytest.mark.slow
def test_two_workers_run_the_confirmation_exactly_unpruned_with_the_parents_configs(tmp_path, tiny_model, tiny_data,
                                                                                     storage_url, env):
    # an aggressive pruner on the search: applied to the confirmation, it would stop the hopeless
    # lr = 1e-4 configuration (next to nothing learnt) after its first epoch
    rows = [(0.70, 1e-2, 0.0), (0.65, 1e-4, 0.0), (0.60, 5e-3, 0.3)]  # search value, lr, dropout
    parent, spec, _ = synthetic_parent(tmp_path, n_trials=3, rows=rows,
                                       config=tiny_config(tiny_model, tiny_data, epochs=2), url=storage_url,
                                       pruner='type = "median"\nn_startup_trials = 3\nn_warmup_steps = 0')
    path = spec.path
    study, _, added = confirm.create(parent, spec, storage_url, Request(3, 2))
    assert added == 6
    procs = [start(f"{path}:confirm", storage_url, env) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load(storage_url, "cf:confirm")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6  # budget exact, none pruned or failed
    parents = {t.number: t for t in parent.trials}
    for t in trials:
        p, seed = parents[t.user_attrs["parent_trial"]], t.user_attrs["seed"]
        assert sorted(t.intermediate_values) == [1, 2]  # full epochs
        assert t.params == p.params
        assert t.user_attrs["config"] == {**p.user_attrs["config"], "seed": seed}  # the parent's config, new seed
        assert seed in (1, 2) and seed != p.user_attrs["config"]["seed"]
    assert sorted((t.user_attrs["parent_trial"], t.user_attrs["seed"]) for t in trials) == [
        (p, s) for p in (0, 1, 2) for s in (1, 2)]
    # the seeds change the result (a fresh seed is a real retraining)
    assert len({t.value for t in trials if t.user_attrs["parent_trial"] == 0}) == 2
    # one checkpoint per configuration is kept: its best seed's
    from service.study import trial_dir, trial_root

    kept = sorted(q.name for q in (Path(env["MTBERT_CHECKPOINT_DIR"]) / study_uuid(study)).iterdir())
    best = confirm.best_seed_per_configuration(sorted(trials, key=lambda t: -t.value))
    assert kept == sorted(trial_dir(study, trial_root(t)).name for t in best) and len(kept) == 3
    assert confirm.create(parent, spec, storage_url, Request(3, 2))[2] == 0  # a rerun adds nothing

    # what search.py shows and exports: the table, the sentence, the confirmed best seed's checkpoint
    cli_env = {**env, "MTBERT_STORAGE": storage_url}
    status = subprocess.run([sys.executable, "search.py", "--study", str(path), "--status"], cwd=ROOT, env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    summary = confirmation.summarize(study)
    assert "confirmation (cf:confirm):" in status.stdout and summary.verdict() in status.stdout
    report = subprocess.run([sys.executable, "search.py", "--study", str(path), "--report", "--out",
                             str(tmp_path / "rep")], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Confirmation under fresh seeds" in text and confirmation.confirmation_table(summary) in text
    out = tmp_path / "best"
    export = subprocess.run([sys.executable, "search.py", "--study", str(path), "--export-best", str(out)], cwd=ROOT,
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "exported the best confirmed configuration, #" in export.stdout
    exported = json.loads((out / "best_trial.json").read_text())
    chosen = summary.configs[0].best_run(maximize=True)
    assert (exported["study"], exported["trial"]) == ("cf:confirm", chosen.number)
    assert json.loads((out / "checkpoint" / "config.json").read_text())["seed"] == chosen.user_attrs["seed"]


@pytest.mark.slow
def test_a_killed_confirmation_worker_s_trial_is_retried_and_resumes(tmp_path, tiny_model, env):
    data = write_data(tmp_path / "data", n_train=1200, n_dev=24, malformed=False)  # ~1 s epochs
    url = f"sqlite:///{tmp_path / 'study.db'}"
    parent, spec, _ = synthetic_parent(tmp_path, n_trials=1, rows=[(0.7, 1e-2, 0.0)],
                                       config=tiny_config(tiny_model, data, epochs=5), url=url)
    path = spec.path
    confirm.create(parent, spec, url, Request(1, 2))
    victim = start(f"{path}:confirm", url, env)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.3)
        running = load(url, "cf:confirm").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running and running[0].user_attrs.get("epochs_done", 0) >= 2:
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    helpers = [start(f"{path}:confirm", url, env) for _ in range(2)]
    for p in helpers:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out
    study = load(url, "cf:confirm")
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number)
    assert retry.state == TrialState.COMPLETE
    for key in ("parent_trial", "seed"):
        assert retry.user_attrs[key] == failed.user_attrs[key]
    assert retry.user_attrs["config"]["seed"] == failed.user_attrs["seed"]
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 2 and len(retry.user_attrs["epoch_seconds"]) == 5 - resumed
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.user_attrs["seed"] for t in complete) == [1, 2]  # each slot once: the budget is exact


@pytest.mark.slow  # a subprocess (search.py, mtbert.train) or real training: ~8-25 s
def test_confirmation_cli_errors_are_one_line(tmp_path):
    path = study_file(tmp_path)
    env_ = {**os.environ, "MTBERT_STORAGE": f"sqlite:///{tmp_path / 'none.db'}"}
    worker = subprocess.run([sys.executable, "worker.py", "--study", f"{path}:confirm"], cwd=ROOT, env=env_,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and "no study 'cf:confirm'" in worker.stderr and f"search.py --study {path} --confirm" \
        in worker.stderr  # the file's path: `--study cf` would look in studies/ and "Traceback" not in worker.stderr
    worker = subprocess.run([sys.executable, "worker.py", "--study", f"{path}:confirm", "--epochs", "3"], cwd=ROOT,
                            env=env_, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and "--epochs: a confirmation re-trains the recorded configurations" in worker.stderr
    for args, fragment in ((["--seeds", "3"], "--seeds needs --confirm K"),
                           (["--confirm", "3", "--seeds", "1"], "argument --seeds: must be a whole number >= 2"),
                           (["--confirm", "3", "--status"], "not with --status")):
        proc = subprocess.run([sys.executable, "search.py", "--study", str(path), *args], cwd=ROOT, env=env_,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_search_py_confirm_runs_the_search_then_its_confirmation_once(tmp_path, tiny_model, tiny_data,
                                                                      env):
    path = write_study(tmp_path, "e2e", tiny_model, tiny_data, n_trials=2, epochs=1, pruner='type = "none"')
    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    command = [sys.executable, "search.py", "--study", str(path), "--confirm", "2", "--seeds", "2"]
    first = subprocess.run(command, cwd=ROOT, env={**env, "MTBERT_STORAGE": url}, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    assert "e2e:confirm: 2 configuration(s) x 2 seed(s) = 4 trials; 4 enqueued now" in first.stderr
    study = load(url, "e2e:confirm")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert confirmation.summarize(study).verdict() in first.stdout  # the summary ends with the confirmation
    again = subprocess.run(command, cwd=ROOT, env={**env, "MTBERT_STORAGE": url}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert "4 trials; 0 enqueued now" in again.stderr
    assert len(load(url, "e2e:confirm").trials) == 4 and len(load(url, "e2e").trials) == 2


def test_no_verdict_on_the_search_best_until_every_slot_is_settled(tmp_path):
    parent, spec, url = synthetic_parent(tmp_path)
    study, _, _ = confirm.create(parent, spec, url, Request(2, 2))
    # one configuration, one seed done; another attempt handed back by a stopped worker (FAIL, then retried)
    trial = study.ask()
    study.tell(trial, 0.6)
    handed_back = study.ask()
    study.tell(handed_back, state=TrialState.FAIL)
    study.enqueue_trial(handed_back.params, user_attrs=dict(handed_back.user_attrs))  # its retry
    summary = confirmation.summarize(study)
    assert summary.search_best_sentence() == ("So far 1 of 4 confirmation trials are complete: no verdict on the "
                                              "search's best until all are.")
    assert summary.failed == 0  # a handed-back attempt whose slot was retried is no failure
    assert "0 failed" in confirmation.report_markdown(parent)
    run_synthetic(study, {0: [0.6, 0.62], 4: [0.5, 0.52]})
    summary = confirmation.summarize(study)
    assert summary.search_best_sentence() == "The search's single-seed best, #0, is also the best under fresh seeds."
    # a slot whose only attempt failed (NaN loss, say) counts as failed and settles
    assert confirmation.failed_slots([study.trials[handed_back.number]]) == 1
