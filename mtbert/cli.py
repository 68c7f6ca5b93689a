"""The command lines of `python -m mtbert.train`, `mtbert.evaluate` and `mtbert.bench`.

Kept free of torch (and of everything that imports it) so that each command answers `--help` and
bad arguments in a fraction of a second: each module parses its arguments with these parsers at
the top of its `__main__` run, before its own torch imports.
"""
from __future__ import annotations

import argparse

from .config import add_config_arguments

DEVICE_HELP = "'auto' (the first GPU if there is one, else the CPU), 'cpu', 'cuda', 'cuda:1', ... (default: auto)"
DATA_HELP = "folder of the CS224N-format files (default: $MTBERT_DATA_DIR, else ./data)"


def at_least(low: int):
    """An argparse type: a whole number >= low (a usage error naming the flag otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return value
    return parse


def barrier_arg(text: str) -> tuple[str, int]:
    """--barrier DIR:N -> (DIR, N), N >= 1."""
    folder, _, n = text.rpartition(":")
    if not folder or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected DIR:N (a folder and a process count >= 1), got {text!r}")
    return folder, int(n)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtbert.train",
        description="Fine-tune one BERT encoder on SST-5, Quora and STS-B at once; evaluate on dev after every "
                    "epoch. The last line on stdout is the final metrics as JSON.")
    add_config_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="run folder for the checkpoint, config and metrics; the same command with the same "
                             "--out resumes from its last finished epoch (default: no folder, nothing saved)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch, replacing the checkpoint in --out (default: resume it if it is this "
                             "run's; refuse another run's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# what mtbert.bench can measure (here so that --help needs no torch)
BENCH_VARIANTS = ("reference", "eager", "eager-fp32", "fused", "packed", "static", "graphs", "compile",
                  "graphs+compile", "eager+compile", "hf-trainer")


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtbert.evaluate",
                                     description="Score a saved run on dev and write CS224N prediction files, "
                                                 "or predict given files.")
    parser.add_argument("--checkpoint", required=True, help="run folder written by mtbert.train (--out)")
    parser.add_argument("--data-dir", default=None,
                        help=DATA_HELP + "; its dev and test-student files are scored and predicted (not with --predict)")
    parser.add_argument("--predict", nargs="+", metavar="FILE", default=None,
                        help="predict these CS224N-format files instead (task from columns and name; e.g. "
                             "../shared/data/holdout/*-holdout-student.csv -> {sst,para,sts}-holdout-output.csv)")
    parser.add_argument("--out", default=None, help="where to write the CSVs (default: CHECKPOINT/predictions)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="sentences per evaluation forward pass (default: %(default)s)")
    return parser


def bench_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtbert.bench", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="encoder whose tokenizer (and weights) to use (default: the packaged all-MiniLM-L6-v2, "
                             "or $MTBERT_DEFAULT_MODEL)")
    parser.add_argument("--shapes", choices=["model", "bert-base"], default="model",
                        help="'bert-base': a randomly initialised bert-base-sized encoder, for speed only "
                             "(default: model)")
    parser.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[16],
                        help="examples per task per step (default: 16)")
    parser.add_argument("--steps", type=at_least(1), default=None,
                        help="timed steps (default: 20 on CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=at_least(0), default=None,
                        help="untimed steps first, eager-like variants (default: 3 CPU, 20 CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="CUDA: also measure compile and graphs+compile, at the largest batch size (compiling is slow)")
    parser.add_argument("--packing", action="store_true", help="CUDA: also measure the packed-input step")
    parser.add_argument("--variants", nargs="+", choices=BENCH_VARIANTS + ("all",), default=None,
                        help="what to measure (default: reference eager static, and graphs on CUDA)")
    parser.add_argument("--no-reference", action="store_true", help="skip the naive reference")
    parser.add_argument("--no-check-sync", dest="check_sync", action="store_false",
                        help="CUDA: do not count host syncs in the timed steps")
    parser.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                        help="the project variants' autocast, as TrainConfig.amp (eager-fp32 and reference are "
                             "always fp32): 'auto' = bf16 on CUDA and on CPUs with native bf16, else fp32 "
                             "(default: auto)")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--jsonl", default=None, help="append every row, with its environment, to this file")
    parser.add_argument("--barrier", type=barrier_arg, default=None, metavar="DIR:N",
                        help="packing runs: wait until N processes have warmed up (files in DIR) before timing")
    parser.add_argument("--data-dir", default=None, help=DATA_HELP + "; the train files are read")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser
