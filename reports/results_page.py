"""The results page: the source report's experiments (the grid studies) as run here, next to its numbers.

    python search.py --results [--out docs/results.md] [--storage URL]
    python -m reports.results_page [--out docs/results.md] [--storage URL]     # the same, standalone

Everything on the page comes from the storage (each COMPLETE trial's user attrs and the spec recorded
on its study) and from the study files' [reference] tables (the report's numbers); only the prose around
it is fixed. The findings are the report's claims checked by stated rules against our numbers, and, as
a check of the rules themselves, against the report's own numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import storage as storage_lib
from mtbert.tasks import TASK_TABLE
from service.markdown import markdown_table, number
from studies import StudySpec, StudySpecError, grid_key, load_spec, spec_from_dict

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
GRID_STUDIES = ("ablation", "seed_lr", "seed_dropout")
# our user attr -> the report's column ([reference] key)
SCORES = {**{t.metric: t.report_key for t in TASK_TABLE.values()}, "overall": "overall"}
HEADERS = {"sst": "SST acc", "para": "Paraphrase acc", "sts": "STS r", "overall": "Overall"}  # the report's names
DEFAULT_MODEL_NOTE = "`default`: the packaged all-MiniLM-L6-v2, or $MTBERT_DEFAULT_MODEL where a worker had it set"

Scores = dict[str, float]  # {"sst", "para", "sts", "overall"} -> score


# ------------------------------------------------------------ reading the storage


@dataclass
class Row:
    """One complete trial of a grid study."""

    key: str  # grid_key of its grid point
    number: int
    scores: Scores
    model: str
    max_examples: int
    epochs: int
    seed: int | None
    device: str
    seconds: float | None


@dataclass
class StudyResults:
    name: str
    spec: StudySpec
    in_storage: bool
    rows: list[Row] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # trial state name -> count
    overrides: dict[str, Any] = field(default_factory=dict)  # the latest recorded overrides of the study file

    @property
    def param(self) -> str:
        return next(iter(self.spec.space))

    @property
    def grid(self) -> list[str]:
        return [grid_key(v) for v in self.spec.space[self.param].grid_values() or ()]

    def ours(self) -> dict[str, Scores]:
        """Per grid point: the mean of its complete trials' scores (normally exactly one)."""
        out = {}
        for key in self.grid:
            rows = [r for r in self.rows if r.key == key]
            if rows:
                out[key] = {m: sum(r.scores[m] for r in rows) / len(rows) for m in SCORES.values()}
        return out

    def label(self, key: str) -> str:
        return key if self.spec.space[self.param].type == "preset" else f"{self.param} = {key}"


def shipped_spec(name: str) -> StudySpec | None:
    try:
        return load_spec(name)
    except StudySpecError:
        return None


def recorded_spec(study: optuna.Study, name: str) -> StudySpec | None:
    """The spec the study ran with; the shipped file's where the record is missing or unreadable."""
    data = study.user_attrs.get("spec")
    spec = None
    if isinstance(data, dict):
        try:
            spec = spec_from_dict(data)
        except (StudySpecError, KeyError, TypeError) as exc:
            logger.warning("study %s: recorded spec unreadable (%s); using the study file", name, exc)
    shipped = shipped_spec(name)
    if spec is None:
        return shipped
    if not spec.reference and shipped is not None and shipped.reference:  # recorded before [reference] existed
        spec = _with_reference(spec, shipped)
    return spec


def _with_reference(spec: StudySpec, source: StudySpec) -> StudySpec:
    return dataclasses.replace(spec, reference=source.reference, reference_source=source.reference_source)


def trial_row(spec: StudySpec, trial: FrozenTrial) -> Row | None:
    attrs = trial.user_attrs
    if any(not isinstance(attrs.get(k), (int, float)) for k in SCORES) or not set(spec.space) <= set(trial.params):
        return None
    cfg = attrs.get("config") or {}
    epoch_seconds = attrs.get("epoch_seconds")
    if epoch_seconds and "resumed_from_epoch" not in attrs:
        seconds = float(sum(epoch_seconds))
    elif trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    else:
        seconds = None
    return Row(key=spec.grid_key(trial.params), number=trial.number,
               scores={ref: float(attrs[ours]) for ours, ref in SCORES.items()},
               model=str(cfg.get("model", "?")), max_examples=int(cfg.get("max_examples") or 0),
               epochs=int(cfg.get("epochs") or attrs.get("epochs_done") or 0), seed=cfg.get("seed"),
               device=str(attrs.get("device", "?")), seconds=seconds)


def latest_overrides(study: optuna.Study) -> dict[str, Any]:
    """The overrides recorded by the latest run (user attrs "overrides <UTC stamp> <role>@<host>:<pid>")."""
    recorded = sorted((k, v) for k, v in study.user_attrs.items() if k.startswith("overrides ") and isinstance(v, dict))
    return dict(recorded[-1][1]) if recorded else {}


def read_study(storage: optuna.storages.BaseStorage, name: str) -> StudyResults | None:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        spec = shipped_spec(name)
        return StudyResults(name, spec, in_storage=False) if spec is not None else None
    spec = recorded_spec(study, name)
    if spec is None or spec.grid_size is None or len(spec.space) != 1:
        logger.warning("study %s is not a one-parameter grid study; left off the results page", name)
        return None
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    rows = [r for t in trials if t.state == TrialState.COMPLETE and (r := trial_row(spec, t)) is not None]
    order = {k: i for i, k in enumerate(StudyResults(name, spec, True).grid)}
    rows.sort(key=lambda r: (order.get(r.key, len(order)), r.number))
    return StudyResults(name, spec, True, rows, counts, latest_overrides(study))


# ------------------------------------------------------------ formatting


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def short_model(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def data_text(max_examples: int) -> str:
    return f"{max_examples} per task/split" if max_examples > 0 else "full"


def study_table(res: StudyResults) -> str:
    header = ["configuration", *(f"{HEADERS[m]} (ours / report)" for m in SCORES.values()),
              "model", "data", "epochs", "device", "wall time"]
    rows = []
    for key in res.grid:
        ref = res.spec.reference.get(key, {})
        ours = [r for r in res.rows if r.key == key]
        for r in ours:
            rows.append([f"{res.label(key)} (#{r.number})",
                         *(f"{number(r.scores[m], '.3f', '–')} / {number(ref.get(m), '.3f', '–')}" for m in SCORES.values()),
                         short_model(r.model), data_text(r.max_examples), str(r.epochs), r.device,
                         fmt_seconds(r.seconds)])
        if not ours:
            rows.append([f"{res.label(key)} (not run)", *(f"– / {number(ref.get(m), '.3f', '–')}" for m in SCORES.values()),
                         "–", "–", "–", "–", "–"])
    return markdown_table(header, rows)


# ------------------------------------------------------------ findings


@dataclass
class Finding:
    claim: str
    rule: str
    check: Callable[[dict[str, dict[str, Scores]]], tuple[str, str]] | None  # (verdict, numbers used)
    why_not: str = ""  # for claims these grids cannot check


def _need(data: dict[str, dict[str, Scores]], study: str, keys: list[str]) -> list[str]:
    have = data.get(study, {})
    return [f"{study}/{k}" for k in keys if k not in have]


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def _missing(missing: list[str]) -> tuple[str, str]:
    return "cannot tell (missing rows)", "missing: " + ", ".join(missing)


def check_cosine(data):
    if missing := _need(data, "ablation", ["baseline", "cosine"]):
        return _missing(missing)
    a = data["ablation"]
    gain = {m: a["cosine"][m] - a["baseline"][m] for m in ("sst", "para", "sts")}
    ok = all(gain[m] > 0 and gain[m] > gain["sst"] for m in ("para", "sts"))
    return _verdict(ok), "cosine − baseline: " + ", ".join(f"{HEADERS[m]} {gain[m]:+.3f}" for m in gain)


def check_stack(data):
    if missing := _need(data, "ablation", ["baseline", "stack", "cosine", "stack_cosine"]):
        return _missing(missing)
    a = data["ablation"]
    alone = a["stack"]["overall"] - a["baseline"]["overall"]
    with_cosine = a["stack_cosine"]["overall"] - a["cosine"]["overall"]
    return (_verdict(alone > 0 and with_cosine > alone),
            f"overall: stack − baseline {alone:+.3f}; stack_cosine − cosine {with_cosine:+.3f}")


def _single_gain(name: str):
    def check(data):
        if missing := _need(data, "ablation", ["baseline", name]):
            return _missing(missing)
        a = data["ablation"]
        gain = a[name]["overall"] - a["baseline"]["overall"]
        return _verdict(gain > 0), f"overall: {name} − baseline {gain:+.3f}"
    return check


def check_everything(data):
    have = data.get("ablation", {})
    if "everything" not in have or len(have) < 2:
        return _missing(_need(data, "ablation", ["everything"]) or ["ablation/<any other row>"])
    best = max(have, key=lambda k: have[k]["overall"])
    others = max(v["overall"] for k, v in have.items() if k != "everything")
    return (_verdict(have["everything"]["overall"] > others),
            f"overall: everything {have['everything']['overall']:.3f}; best other row {others:.3f}"
            f" (best: {best}; {len(have)} rows)")


def _numeric(rows: dict[str, Scores]) -> list[tuple[float, float]]:
    return sorted((float(k), v["overall"]) for k, v in rows.items())


def check_lr(data):
    rows = data.get("seed_lr", {})
    if len(rows) < 2:
        return "cannot tell (missing rows)", f"{len(rows)} learning rate(s) run"
    points = _numeric(rows)
    ok = all(y < points[0][1] for _, y in points[1:])
    monotone = all(b[1] < a[1] for a, b in zip(points, points[1:]))
    return (_verdict(ok), "overall by lr: " + ", ".join(f"{grid_key(x)} {y:.3f}" for x, y in points)
            + f"; strictly decreasing: {'yes' if monotone else 'no'}")


def check_dropout(data):
    rows = data.get("seed_dropout", {})
    if len(rows) < 2:
        return "cannot tell (missing rows)", f"{len(rows)} dropout value(s) run"
    points = _numeric(rows)
    top = max(y for _, y in points)
    best = [x for x, y in points if y == top]
    return (_verdict(set(best) <= {0.35, 0.4}), f"best dropout {', '.join(grid_key(x) for x in best)}; "
            "overall by dropout: "
            + ", ".join(f"{grid_key(x)} {y:.3f}" for x, y in points))


FINDINGS = [
    Finding("Cosine similarity helps the two pair tasks most.",
            "ablation: cosine − baseline is > 0 on Paraphrase and on STS, and each of those gains is larger "
            "than the gain on SST.", check_cosine),
    Finding("The dropout+LayerNorm stack helps, and matters more as the heads grow.",
            "ablation: stack − baseline (overall) > 0, and the stack's gain on top of cosine "
            "(stack_cosine − cosine) is larger than its gain alone (stack − baseline). That it reduces "
            "*overfitting* is not checked: we record dev scores only, not train scores.", check_stack),
    Finding("Multitask loss summing gives a small but definite gain.",
            "ablation: multitask − baseline (overall) > 0. One seed per row: 'definite' is not tested.",
            _single_gain("multitask")),
    Finding("ReLU gives a small but definite gain.",
            "ablation: relu − baseline (overall) > 0. One seed per row: 'definite' is not tested.",
            _single_gain("relu")),
    Finding("All extensions together make the best model.",
            "ablation: everything has a higher overall than every other row run.", check_everything),
    Finding("Higher learning rates hurt.",
            "seed_lr: the lowest learning rate has a higher overall than every higher one "
            "(a strict decrease across the grid is reported, not required).", check_lr),
    Finding("Dropout has a sweet spot near 0.4.",
            "seed_dropout: the best overall (every value tied for it) is at dropout 0.35 or 0.4.", check_dropout),
    Finding("Larger batches are faster with little change in score.", "", None,
            why_not="cannot be checked by these grids: every one of them trains at batch size 16."),
]


def shown(rows: dict[str, Scores]) -> dict[str, Scores]:
    """Scores at the 3 decimals the page shows: the findings compare what a reader sees (a tie is a tie)."""
    return {k: {m: round(x, 3) for m, x in v.items()} for k, v in rows.items()}


def findings_section(results: list[StudyResults]) -> str:
    ours = {r.name: shown(r.ours()) for r in results}
    report = {r.name: shown({k: v for k, v in r.spec.reference.items() if set(SCORES.values()) <= set(v)})
              for r in results}
    lines = ["## Findings", "",
             "Each of the report's claims, checked by a fixed rule against our numbers (dev set, mean of the "
             "complete trials of each grid point, compared at the 3 decimals shown) and, to show the rule is "
             "fair, against the report's own numbers (test set, as published). Each grid point runs once with "
             "one training seed, so a difference of a few thousandths may be noise.", ""]
    verdicts: dict[str, list[str]] = {}
    details = []
    for f in FINDINGS:
        if f.check is None:
            verdicts.setdefault("cannot be checked by these grids", []).append(f.claim)
            details += [f"- **{f.claim}** — {f.why_not}", ""]
            continue
        verdict, numbers = f.check(ours)
        ref_verdict, ref_numbers = f.check(report)
        verdicts.setdefault(verdict, []).append(f.claim)
        details += [f"- **{f.claim}** — ours: **{verdict}**.",
                    f"  - rule: {f.rule}",
                    f"  - ours: {numbers}",
                    f"  - the report's numbers: {ref_verdict} ({ref_numbers})", ""]
    lines += ["In our runs:", ""]
    for verdict in ("holds", "does not hold", "cannot tell (missing rows)", "cannot be checked by these grids"):
        if verdict in verdicts:
            claims = " ".join(c for c in verdicts[verdict])
            lines.append(f"- **{verdict}** ({len(verdicts[verdict])}): {claims}")
    return "\n".join(lines + [""] + details)


# ------------------------------------------------------------ the page


def profile(results: list[StudyResults]) -> tuple[str, list[str]]:
    """(label, detail lines) of where the runs came from."""
    rows = [r for res in results for r in res.rows]
    if not rows:
        return "no runs yet", ["No grid study has a complete trial in this storage."]
    devices = sorted({r.device for r in rows})
    full_epochs = max((s.epochs for res in results if (s := shipped_spec(res.name))), default=10)
    epochs = sorted({r.epochs for r in rows})
    capped = sorted({r.max_examples for r in rows if r.max_examples > 0})
    scaled = bool(capped) or min(epochs) < full_epochs
    on_cpu = all(d == "cpu" for d in devices)
    cuts = ([f"epochs reduced to {', '.join(map(str, epochs))}"] if min(epochs) < full_epochs else []) + (
        [f"data capped at {', '.join(map(str, capped))} examples"] if capped else [])
    if not scaled:
        label = "full-size runs"
    elif on_cpu:
        label = f"CPU-scaled profile ({'; '.join(cuts)})"
    else:
        label = f"GPU-scaled ({'; '.join(cuts)})"
    seeds = sorted({str(r.seed) for r in rows})
    lines = [f"- devices: {', '.join(devices)}",
             f"- models: {', '.join(sorted({short_model(r.model) for r in rows}))}"
             + (f" ({DEFAULT_MODEL_NOTE})" if any(r.model == "default" for r in rows) else ""),
             f"- epochs per trial: {', '.join(map(str, epochs))} (the study files and the report: {full_epochs})",
             "- data: " + (f"capped at {', '.join(map(str, capped))} examples per task and split" if capped else "full")
             + (" in some rows, full in others" if capped and any(r.max_examples == 0 for r in rows) else ""),
             f"- training seed: {', '.join(seeds)}",
             f"- complete trials: {len(rows)}; total wall time {fmt_seconds(sum(r.seconds or 0 for r in rows))}"]
    if scaled:
        lines.insert(0, f"**{label}**: these runs are scaled down from the report's setting (see below); "
                        "compare directions, not sizes, with the report's numbers.")
    return label, lines


def reproduce_section(results: list[StudyResults], url: str, out: Path) -> str:
    secret = storage_lib.redact(url) != url  # never print a password: point at $MTBERT_STORAGE instead
    storage_flag = "" if url == storage_lib.DEFAULT_URL or secret else f" --storage {shlex.quote(url)}"
    lines = ["## Reproduce", ""]
    if secret:
        lines += [f"With MTBERT_STORAGE set to the storage URL ({storage_lib.redact(url)}):", ""]
    lines += ["```bash"]
    for res in results:
        flags = "".join(f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in res.overrides.items())
        lines.append(f"python search.py --study {res.name}{flags}{storage_flag}")
    try:
        shown = out.resolve().relative_to(ROOT)
    except ValueError:
        shown = out
    lines += [f"python search.py --results --out {shlex.quote(str(shown))}{storage_flag}", "```", "",
              "The study commands carry the overrides recorded on each study by its latest run; the data folder "
              "is --data-dir, else $MTBERT_DATA_DIR, else ./data. Re-running a finished grid runs nothing.", ""]
    return "\n".join(lines)


def study_section(res: StudyResults) -> str:
    spec = res.spec
    lines = [f"## {res.name}", ""]
    if spec.description:
        lines += [" ".join(spec.description.split()), ""]
    if not res.in_storage:
        lines += [f"Not run yet in this storage: `python search.py --study {res.name}` runs it "
                  "(add `--epochs N --max-examples M` for a scaled profile). The report's numbers:", ""]
    else:
        states = ", ".join(f"{n.lower()} {c}" for n, c in sorted(res.counts.items()))
        done = len({r.key for r in res.rows})
        lines += [f"Ours: **dev set**, last epoch, {done} of {len(res.grid)} grid points complete "
                  f"(trials: {states}). Report: **test set** — {spec.reference_source or 'no source given'}.", ""]
    lines += [study_table(res), ""]
    if odd := reference_overall_mismatches(res):
        lines += ["Note: the report's overall " + "; ".join(odd) + " — shown as published.", ""]
    return "\n".join(lines)


def reference_overall_mismatches(res: StudyResults) -> list[str]:
    """Rows whose published overall is not the mean of their three published scores (beyond rounding)."""
    out = []
    for key in res.grid:
        ref = res.spec.reference.get(key, {})
        if set(SCORES.values()) <= set(ref):
            mean = (ref["sst"] + ref["para"] + ref["sts"]) / 3
            if abs(mean - ref["overall"]) > 0.0015:
                out.append(f"for {res.label(key)} ({ref['overall']:.3f}) is not the mean of its three scores "
                           f"({mean:.3f})")
    return out


def render(results: list[StudyResults], url: str, out: Path) -> str:
    label, lines = profile(results)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ["# Results: the source report's experiments as Optuna grid studies", "",
            f"Generated from the storage `{storage_lib.redact(url)}` on {stamp} by "
            f"`python search.py --results`; nothing below is typed by hand except the fixed prose around the "
            "numbers. Do not edit: regenerate (see Reproduce).", "",
            f"## Profile: {label}", "", *lines, "",
            "Our scores are on the **dev** split (the data's test split has no labels); the report's are on its "
            "**test** set with bert-base. Overall is the plain mean of SST accuracy, paraphrase accuracy and "
            "STS Pearson r, as in the report.", ""]
    body = [study_section(res) for res in results]
    return "\n".join(head + body + [findings_section(results), reproduce_section(results, url, out)])


def write_results_page(storage_url: str | None, out: Path,
                       studies: tuple[str, ...] = GRID_STUDIES) -> Path:
    """Write the results page for `studies` (one-parameter grid studies) from the storage to `out`."""
    return update_results_page(storage_url, out, studies)[0]


def update_results_page(storage_url: str | None, out: Path,
                        studies: tuple[str, ...] = GRID_STUDIES) -> tuple[Path, bool]:
    """write_results_page, but a page whose only change would be its "Generated ... on <time>" stamp is left
    untouched (docs/results.md is tracked: rerunning must not dirty it); returns (path, written)."""
    url = storage_lib.resolve_url(storage_url)
    rdb = storage_lib.open_storage(url, heartbeat=False)
    try:
        results = [res for name in studies if (res := read_study(rdb, name)) is not None]
    finally:
        rdb.engine.dispose()
    out = Path(out)
    text = render(results, url, out)
    if out.is_file() and _without_stamp(out.read_text(encoding="utf-8")) == _without_stamp(text):
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out, True


def _without_stamp(page: str) -> str:
    return re.sub(r" on \d{4}-\d\d-\d\d \d\d:\d\d UTC by ", " on <time> by ", page, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    storage_lib.add_storage_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md", help="page to write")
    parser.add_argument("--studies", nargs="+", default=list(GRID_STUDIES), help="grid studies on the page")
    args = parser.parse_args(argv)
    try:
        path, written = update_results_page(storage_lib.resolve_url(args.storage, args.storage_file), args.out,
                                            tuple(args.studies))
    except storage_lib.StorageUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"results page written to {path}" if written else f"results page unchanged: {path} (only its timestamp "
                                                             f"would change)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
