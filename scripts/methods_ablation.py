"""Run every row of studies/methods_ablation.toml in one process (data and encoder loaded once) and
print a markdown table against the baseline row: a quick, storage-free ablation for CPU-sized runs.

    python scripts/methods_ablation.py --max-examples 1000 --epochs 1            # CPU, ~1-3 min a row
    python scripts/methods_ablation.py --rows baseline quora_cross --epochs 1   # a subset
    python scripts/methods_ablation.py --storage sqlite:///gpu-out/methods.db   # the table of a stored run

The GPU session (scripts/gpu_methods.sh) runs `search.py --study methods_ablation` instead (storage,
workers sharing the GPU) and prints its table with --storage.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtbert.config import TrainConfig  # noqa: E402
from mtbert.train import prepare, train  # noqa: E402
from studies import load_spec  # noqa: E402


HEADER = ["| row | SST | Quora | STS r | overall | Δ overall | train s |", "|---|---|---|---|---|---|---|"]


def table_row(row: str, m: dict, baseline: float | None, seconds: float) -> str:
    delta = "" if baseline is None or row == "baseline" else f"{m['overall'] - baseline:+.3f}"
    return (f"| {row} | {m['sst_acc']:.3f} | {m['quora_acc']:.3f} | {m['sts_corr']:.3f} | {m['overall']:.3f} "
            f"| {delta} | {seconds:.0f} |")


def stored_table(url: str, study_name: str = "methods_ablation") -> list[str]:
    """The table of the complete trials of the study in storage `url`, in the study file's row order."""
    import optuna

    from storage import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(url, heartbeat=False))
    order = list(load_spec("methods_ablation").space["method"].presets)
    done = {t.params["method"]: t for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])}
    baseline = done["baseline"].user_attrs["overall"] if "baseline" in done else None
    lines = list(HEADER)
    for row in sorted(done, key=lambda r: order.index(r) if r in order else len(order)):
        t = done[row]
        lines.append(table_row(row, t.user_attrs, baseline, sum(t.user_attrs.get("epoch_seconds", []))))
    missing = [r for r in order if r not in done]
    if missing:
        lines.append(f"\nnot complete: {', '.join(missing)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=1000, help="examples per task and split (default: 1000)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per row (default: 1)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' (default: auto)")
    parser.add_argument("--rows", nargs="*", help="rows of the study to run (default: all, baseline first)")
    parser.add_argument("--jsonl", default=None, help="also append one JSON line per row to this file")
    parser.add_argument("--storage", default=None, help="print the table of this storage's methods_ablation study "
                                                        "instead of training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.storage:
        print("\n".join(stored_table(args.storage)))
        return
    spec = load_spec("methods_ablation")
    presets = spec.space["method"].presets
    rows = args.rows or list(presets)
    unknown = [r for r in rows if r not in presets]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)} (rows: {', '.join(presets)})")
    base = TrainConfig().replace(**{**spec.train, "epochs": args.epochs, "max_examples": args.max_examples,
                                    "device": args.device})
    prepared = prepare(base)
    print("\n".join(HEADER))
    baseline = None
    for row in rows:
        cfg = base.replace(**presets[row])
        t0 = time.perf_counter()
        result = train(cfg, prepared, progress=False)[-1]
        seconds = time.perf_counter() - t0
        m = result.metrics
        baseline = m["overall"] if row == "baseline" else baseline
        print(table_row(row, m, baseline, seconds), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"row": row, "epochs": args.epochs, "max_examples": args.max_examples,
                                    **m, "seconds": round(seconds, 1)}) + "\n")


if __name__ == "__main__":
    main()
