"""What the static step's fixed widths cost in padding, on real data (the +8.5% claim in README, "Speed").

    python scripts/padding_widths.py                        # full data ($MTBERT_DATA_DIR), batch 8..40
    python scripts/padding_widths.py --batch-sizes 16 --max-examples 1000

For one epoch of the training plan at each batch size (the static step's own plan and staging:
`train.epoch_plan`, `static_step.stage_epoch`) it counts the token positions the encoder computes,
5 x batch sentences per step, when each step is padded to
  exact    its longest sentence,
  round8   its longest sentence rounded up to 8 (the eager step's padding on CUDA),
  widths   the static step's bucket (static_step.WIDTHS, then max_length),
and prints the widths' overhead over round8 (what the static step pays over the eager step) and over exact. Tokenises with the default encoder's tokenizer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtbert.cli import at_least  # noqa: E402 - argparse types only: --help stays fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[8, 16, 24, 32, 40],
                        help="batch sizes to measure (default: 8 16 24 32 40, the lr_dropout space)")
    parser.add_argument("--max-examples", type=at_least(0), default=0,
                        help="examples per task, 0 = all (default: 0)")
    parser.add_argument("--data-dir", default=None, help="CS224N data folder (default: $MTBERT_DATA_DIR, else ./data)")
    parser.add_argument("--seed", type=int, default=0, help="the plan's seed (default: 0)")
    args = parser.parse_args(argv)

    from mtbert.config import TrainConfig, resolve_data_dir
    from mtbert.data import DataError, TaskStream, load_splits
    from mtbert.model import ModelLoadError, load_pretrained
    from mtbert.static_step import bucket_widths, sentences_per_example, stage_epoch
    from mtbert.tasks import TASKS
    from mtbert.train import epoch_plan

    cfg = TrainConfig(data_dir=args.data_dir, max_examples=args.max_examples)
    data_dir = resolve_data_dir(cfg.data_dir)
    try:
        _, tokenizer = load_pretrained(cfg.model)
        train = load_splits(data_dir, tokenizer, ("train",), cfg.max_length, cfg.max_examples)["train"]
    except (DataError, ModelLoadError) as exc:
        parser.exit(2, f"padding_widths.py: {exc}\n")
    widths = bucket_widths(cfg.max_length)
    print(f"data {data_dir}, max_examples {args.max_examples or 'all'}, widths {widths}, seed {args.seed}")
    print("| batch | steps | exact positions | round8 | widths | widths over round8 | widths over exact |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batch_sizes:
        streams = {t: TaskStream(train[t], b, args.seed, 1) for t in TASKS}
        plan = epoch_plan(streams, True, 0, "all", 1, args.seed)
        _, _, step_widths = stage_epoch(plan, streams, b, widths)
        longest = [max(max(streams[t].batch(s).lengths) for t, s in tasks) for tasks in plan]
        rows = sentences_per_example() * b  # every step runs this many rows (short batches are padded)
        exact = sum(longest) * rows
        round8 = sum(-(-n // 8) * 8 for n in longest) * rows
        bucketed = sum(step_widths) * rows
        print(f"| {b} | {len(plan)} | {exact:,} | {round8:,} | {bucketed:,} | {bucketed / round8 - 1:+.1%} "
              f"| {bucketed / exact - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
