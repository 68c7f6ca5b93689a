"""What many workers cost the database: N concurrent CPU workers on one PostgreSQL study (tiny model).

    python scripts/bench_pg_workers.py --storage-file ~/.mtbert-storage            # 12 workers, 36 trials
    python scripts/bench_pg_workers.py --storage-file F --workers 24 --n-trials 72

Starts N worker processes (service.worker's Worker, as SLURM array tasks run it) on a fresh study of a tiny random
BERT and tiny data (tests/tiny.py), and measures:
- connections the workers hold: pg_stat_activity sampled every 0.2 s, per worker (each worker sets its own
  application_name through PGAPPNAME), peak and mean over the run;
- time to claim a trial: every Worker.claim call timed in the worker, split into the wait for the study's
  advisory lock and the work under it (fail stale trials, count, ask);
- nothing lost or duplicated: finished trials == budget, trial numbers 0..n-1, nothing left running.
The study is deleted afterwards (--keep keeps it). The URL comes from --storage-file/--storage/$MTBERT_STORAGE/
$MTBERT_STORAGE_FILE like every command, and reaches the workers as a mode-600 file, never in argv.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------ one worker (a child process)


def run_child(study_file: Path, out: Path, checkpoints: Path) -> None:
    """One worker with Worker.claim and the slot lock timed; timings written to `out` as JSON."""
    import storage as storage_lib
    import service.worker as worker_mod
    from service.study import configure_logging, open_study
    from studies import load_spec

    url = storage_lib.resolve_url()
    configure_logging(url, quiet=True)
    spec = load_spec(study_file)
    study = open_study(spec, url, {})
    claims: list[dict] = []
    last_wait: list[float] = []
    real_lock, real_claim = storage_lib.trial_slot_lock, worker_mod.Worker.claim

    @contextlib.contextmanager
    def timed_lock(*args, **kwargs):
        t0 = time.perf_counter()
        with real_lock(*args, **kwargs):
            last_wait.append(time.perf_counter() - t0)
            yield

    def timed_claim(self):
        t0 = time.perf_counter()
        result = real_claim(self)
        claims.append({"seconds": time.perf_counter() - t0, "lock_wait": last_wait[-1] if last_wait else None,
                       "outcome": result if isinstance(result, str) else "trial"})
        return result

    storage_lib.trial_slot_lock = timed_lock  # service/worker.py calls it as storage_lib.trial_slot_lock
    worker_mod.Worker.claim = timed_claim
    w = worker_mod.Worker(study, spec, device="cpu", progress=False, poll_seconds=1.0, checkpoint_root=checkpoints)
    ran = w.run()
    out.write_text(json.dumps({"ran": ran, "claims": claims}))


# ------------------------------------------------------------ the run


def sample_connections(engine, prefix: str, stop: threading.Event, samples: list[dict]) -> None:
    from sqlalchemy import text

    query = text("SELECT application_name, state, count(*) FROM pg_stat_activity "
                 "WHERE application_name LIKE :p GROUP BY application_name, state")
    # autocommit: pg_stat_activity is a snapshot per transaction, so each sample needs its own
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while not stop.is_set():
            rows = conn.execute(query, {"p": f"{prefix}%"}).all()
            samples.append({"t": time.time(), "rows": [tuple(r) for r in rows]})
            stop.wait(0.2)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    import storage as storage_lib

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    storage_lib.add_storage_arguments(parser)
    parser.add_argument("--workers", type=int, default=12, help="concurrent worker processes (default: %(default)s)")
    parser.add_argument("--n-trials", type=int, default=36, help="the study's budget (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the study in the storage afterwards")
    parser.add_argument("--child", nargs=3, metavar=("STUDY_FILE", "OUT", "CHECKPOINTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(*map(Path, args.child))
        return 0

    import optuna
    from optuna.trial import TrialState
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.engine import make_url

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_study  # the tests' study of the tiny model (tests/ is on the path above)
    from tiny import write_data, write_tiny_model

    url = storage_lib.resolve_url(args.storage, args.storage_file)
    if make_url(url).get_backend_name() != "postgresql":
        print(f"needs a PostgreSQL storage, not {storage_lib.redact(url)}", file=sys.stderr)
        return 2
    storage_lib.install_secret_filter(url)
    run = uuid.uuid4().hex[:8]
    name, prefix = f"bench-pg-{run}", f"mtbert-bench-{run}-"
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg2"), poolclass=pool.NullPool)
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        max_conn = int(conn.execute(text("SHOW max_connections")).scalar())
        reserved = int(conn.execute(text("SHOW superuser_reserved_connections")).scalar())
        in_use = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")).scalar()

    with tempfile.TemporaryDirectory(prefix="mtbert-bench-") as tmp:
        tmp = Path(tmp)
        model, data = write_tiny_model(tmp / "model"), write_data(tmp / "data")
        study_file = write_study(tmp, name, model, data, n_trials=args.n_trials, epochs=args.epochs,
                                 sampler_extra="constant_liar = true\nn_startup_trials = 4",
                                 pruner='type = "median"\nn_startup_trials = 4', description="bench_pg_workers")
        url_file = tmp / "storage-url"
        url_file.write_text(url + "\n")
        url_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("MTBERT_STORAGE", "MTBERT_STORAGE_FILE")}
        env.update(MTBERT_STORAGE_FILE=str(url_file), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   MTBERT_CACHE_DIR=str(tmp / "cache"), MTBERT_ARTIFACT_DIR=str(tmp / "artifacts"),
                   HF_HUB_OFFLINE="1")
        # the study exists before the workers start, as with search.py (which creates it, then submits)
        from service.study import open_study
        from studies import load_spec

        open_study(load_spec(study_file), url, {}, role="search")
        samples: list[dict] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_connections, args=(engine, prefix, stop, samples), daemon=True)
        sampler.start()
        t0 = time.time()
        procs = []
        for i in range(args.workers):
            out = tmp / f"w{i}.json"
            procs.append((subprocess.Popen([sys.executable, __file__, "--child", str(study_file), str(out),
                                            str(tmp / "ckpt")], env={**env, "PGAPPNAME": f"{prefix}{i}"},
                                           cwd=ROOT, stderr=subprocess.PIPE, text=True), out))
        print(f"{args.workers} workers started on study {name} ({args.n_trials} trials x {args.epochs} epochs)",
              file=sys.stderr)
        errors = [(p.wait(), p.stderr.read()) for p, _ in procs]
        wall = time.time() - t0
        stop.set()
        sampler.join()
        failed = [(i, code, err.strip().splitlines()[-1:]) for i, (code, err) in enumerate(errors) if code != 0]
        results = [json.loads(out.read_text()) for _, out in procs if out.exists()]

        st = storage_lib.open_storage(url, heartbeat=False)
        study = optuna.load_study(study_name=name, storage=st)
        trials = study.get_trials(deepcopy=False)
        numbers = sorted(t.number for t in trials)
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        finished = states["COMPLETE"] + states["PRUNED"]
        epochs_ok = all(sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
                        and (t.state != TrialState.COMPLETE or len(t.intermediate_values) == args.epochs)
                        for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
        if not args.keep:
            optuna.delete_study(study_name=name, storage=st)
        st.engine.dispose()

    claims = [c for r in results for c in r["claims"]]
    started = [c for c in claims if c["outcome"] == "trial"]
    waits = [c for c in claims if c["outcome"] == "wait"]
    live = [s for s in samples if s["rows"]]
    totals = [sum(r[2] for r in s["rows"]) for s in live]
    per_worker_peak = max((max(sum(r[2] for r in s["rows"] if r[0] == app) for app in {r[0] for r in s["rows"]})
                           for s in live), default=0)
    peak_sample = live[totals.index(max(totals))] if totals else {"rows": []}
    by_state: dict[str, int] = {}
    for app, state, n in peak_sample["rows"]:
        by_state[state or "?"] = by_state.get(state or "?", 0) + n
    ok = finished == args.n_trials and numbers == list(range(len(trials))) and not states["RUNNING"] \
        and not states["WAITING"] and epochs_ok and not failed

    def secs(values: list[float]) -> str:
        if not values:
            return "-"
        return (f"median {statistics.median(values) * 1000:.0f} ms, p95 {pct(values, 0.95) * 1000:.0f} ms, "
                f"max {max(values) * 1000:.0f} ms")

    print(f"\nPostgreSQL {version}: max_connections {max_conn} ({reserved} reserved for superusers), "
          f"{in_use} client connections open before the run")
    print(f"{args.workers} workers, budget {args.n_trials} trials x {args.epochs} epochs (tiny model, CPU, "
          f"{os.cpu_count()} cores here): {wall:.0f} s")
    print(f"trials: {states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed, "
          f"{states['RUNNING']} running, {states['WAITING']} waiting; numbers "
          f"{'0..%d contiguous, none duplicated' % (len(trials) - 1) if numbers == list(range(len(trials))) else numbers}; "
          f"per-epoch values {'complete' if epochs_ok else 'MISSING'}; budget {'exact' if finished == args.n_trials else 'MISSED'}")
    print(f"claims that started a trial: {len(started)}; time in Worker.claim: {secs([c['seconds'] for c in started])}")
    print(f"  of which waiting for the study lock: {secs([c['lock_wait'] for c in started if c['lock_wait'] is not None])}")
    print(f"claims that found every remaining slot running (worker waits 1 s, retries): {len(waits)}; "
          f"{secs([c['seconds'] for c in waits])}")
    if totals:
        print(f"connections held by the workers: peak {max(totals)} ({max(totals) / args.workers:.1f} per worker; "
              f"one worker at most {per_worker_peak}), mean {statistics.mean(totals):.1f} over {len(live)} samples; "
              f"at the peak: {', '.join(f'{k} {v}' for k, v in sorted(by_state.items()))}")
    print(f"per-worker pool (storage/engines.py): pool_size 4 + max_overflow 4 = at most 8 connections; "
          f"{args.workers} workers could open {8 * args.workers} of the {max_conn - reserved} available")
    for i, code, last in failed:
        print(f"worker {i} exited {code}: {last}", file=sys.stderr)
    print("OK: nothing lost or duplicated" if ok else "PROBLEM: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
