"""Draw the quick-start sample (sample_data/) from the full CS224N-format data, deterministically.

    python scripts/make_sample_data.py --source ../shared/data --out sample_data     # what was run

For each task, TRAIN rows of its train file, DEV rows of its dev file and TEST rows of its
test-student file (where there is one) are drawn with numpy's default_rng(SEED), among the rows
the loader reads as they are (one physical line each, no field the csv module would unquote,
every field present, the label a number in range), and written in their file order, byte for
byte, under the same file names and header: mtbert reads the sample as it reads the full data.
The same source files and arguments give the same bytes (tests/test_quickstart.py checks the
committed sample against ../shared/data when that folder exists).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert.tasks import TASK_TABLE, TASKS  # noqa: E402  (no torch: mtbert.tasks imports none)

SPLITS = ("train", "dev", "test-student")


def usable_lines(path: Path, task: str, labelled: bool) -> tuple[str, list[str]]:
    """The header line and every data line the loader would read unchanged, in file order."""
    spec = TASK_TABLE[task]
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0]
    names = header.split("\t")
    wanted = ("id",) + spec.sentence_columns + ((spec.label_column,) if labelled else ())
    keep = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(names) or '"' in line:  # a quote could make csv join or unquote fields
            continue
        row = dict(zip(names, fields))
        values = [row.get(c, "").strip() for c in wanted]
        if not all(values) or (labelled and spec.parse_label(values[-1]) is None):
            continue
        keep.append(line)
    return header, keep


def draw(lines: list[str], n: int, seed: int) -> list[str]:
    """n lines chosen by default_rng(seed), kept in file order."""
    import numpy as np

    if n >= len(lines):
        return list(lines)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(lines))[:n])
    return [lines[i] for i in chosen]


def check_readable(path: Path, task: str, labelled: bool, expected: int) -> None:
    """The written file parses with the csv module into exactly `expected` rows (what mtbert's reader does)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if len(rows) != expected or any(None in r for r in rows):
        raise SystemExit(f"{path}: wrote {expected} rows but csv reads {len(rows)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/make_sample_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="folder of the full CS224N-format files")
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data", help="where to write (default: sample_data/)")
    parser.add_argument("--train", type=int, default=120, help="rows per task from each train file (default: 120)")
    parser.add_argument("--dev", type=int, default=120, help="rows per task from each dev file (default: 120)")
    parser.add_argument("--test", type=int, default=100,
                        help="rows per task from each test-student file that exists (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="numpy default_rng seed (default: 0)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.train, "dev": args.dev, "test-student": args.test}
    print("| file | rows drawn | usable rows in the source | source sha1 |")
    print("|---|---|---|---|")
    for task in TASKS:
        for split in SPLITS:
            source = args.source / TASK_TABLE[task].file_name(split)
            if not source.is_file():
                if split == "test-student":
                    continue  # e.g. no Quora test-student file in the shared data
                raise SystemExit(f"{source}: file not found")
            labelled = split != "test-student"
            header, lines = usable_lines(source, task, labelled)
            chosen = draw(lines, sizes[split], args.seed)
            target = args.out / source.name
            target.write_text("\n".join([header, *chosen]) + "\n", encoding="utf-8")
            check_readable(target, task, labelled, len(chosen))
            digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
            print(f"| {source.name} | {len(chosen)} | {len(lines)} | {digest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
