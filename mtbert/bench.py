"""Training-throughput benchmark: the project's step against a naive CS224N-style step.

    python -m mtbert.bench                                   # CPU, default MiniLM, batch 16/task
    python -m mtbert.bench --shapes bert-base --batch-sizes 16 32 --compile   # on a GPU

The naive reference (written here, same model, data and process): fp32, tokenises its sentences
every step, one encoder call per sentence list (5 per step), random batches, `.item()` every step.
The project's step: pre-tokenised length-bucketed batches, bf16 autocast and fused AdamW on CUDA,
no host sync per step; on CUDA one fused forward ("project") or sentences packed several to a row
("project+packing"), optionally compiled. Prints one JSON line per measurement, then a table.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__":  # answer --help and bad arguments before the torch import below (seconds)
    from mtbert.cli import bench_parser

    bench_parser(__doc__).parse_args()

import numpy as np
import torch

from .config import TrainConfig, resolve_data_dir, resolve_device
from .data import RawTask, TaskStream, load_splits, read_task, task_path
from .model import MultitaskBert, load_pretrained
from .inputs import batch_pieces, encoder_tokens, input_mode
from .tasks import TASK_TABLE, TASKS
from .train import build_optimizer, train_step

logger = logging.getLogger(__name__)

# dense bf16 peak, TFLOP/s (for MFU); unknown devices report no MFU
MODES = ("per_piece", "fused", "packed")  # mtbert.inputs: how a step's sentences reach the encoder
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Measurement:
    name: str
    batch_size: int
    steps: int
    seconds: float
    sentences: int
    tokens: int  # real (non-padding) tokens
    flops: float
    # project variants: token positions the encoder computed in each input mode, over the same steps
    encoder_tokens: dict[str, int] = field(default_factory=dict)

    def row(self, peak: float | None) -> dict:
        tflops = self.flops / self.seconds / 1e12
        return {"name": self.name, "batch_size": self.batch_size, "steps": self.steps,
                "sentences_per_s": round(self.sentences / self.seconds, 1),
                "tokens_per_s": round(self.tokens / self.seconds, 1),
                "model_tflops": round(tflops, 2), "mfu": round(tflops / peak, 4) if peak else None,
                **({"encoder_tokens_per_real_token": {m: round(n / self.tokens, 3)
                                                      for m, n in self.encoder_tokens.items()}}
                   if self.encoder_tokens else {})}


def flops_per_token(encoder, seq_len: float) -> float:
    """Training FLOPs per token: 6 x non-embedding params + attention (PaLM appendix B)."""
    cfg = encoder.config
    params = sum(p.numel() for n, p in encoder.named_parameters() if "embeddings" not in n)
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_step(model, optimizer, tokenizer, raw: dict[str, RawTask], rng: np.random.Generator,
                   batch_size: int, device: torch.device) -> tuple[float, int, int]:
    """The naive step: tokenise now, one forward per sentence list, fp32, sync on .item()."""
    losses, sentences, tokens = [], 0, 0
    for task in TASKS:
        idx = rng.integers(0, len(raw[task].ids), batch_size)
        vecs = []
        for column in raw[task].sentences:
            enc = tokenizer([column[i] for i in idx], padding=True, truncation=True, max_length=128,
                            return_tensors="pt").to(device)
            vecs.append(model.embed(enc["input_ids"], enc["attention_mask"]))
            sentences += len(idx)
            tokens += int(enc["attention_mask"].sum())
        spec = TASK_TABLE[task]
        y = torch.tensor([raw[task].labels[i] for i in idx], device=device,
                         dtype=torch.int64 if spec.integer_labels else torch.float32)
        losses.append(spec.loss(spec.outputs(model, vecs), y))
    loss = sum(losses)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), sentences, tokens


def run_reference(model, tokenizer, raw, cfg: TrainConfig, device, steps: int, warmup: int) -> Measurement:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(warmup):
        reference_step(model, optimizer, tokenizer, raw, rng, cfg.batch_size, device)
    sync(device)
    t0, sentences, tokens = time.perf_counter(), 0, 0
    for _ in range(steps):
        _, s, t = reference_step(model, optimizer, tokenizer, raw, rng, cfg.batch_size, device)
        sentences, tokens = sentences + s, tokens + t
    sync(device)
    seconds = time.perf_counter() - t0
    return Measurement("reference", cfg.batch_size, steps, seconds, sentences, tokens, 0.0)


def run_project(model, data, cfg: TrainConfig, device, steps: int, warmup: int, name: str) -> Measurement:
    round_to = 8 if device.type == "cuda" else 1
    streams = {t: TaskStream(data[t], cfg.batch_size, cfg.seed, round_to) for t in TASKS}
    optimizer, scheduler = build_optimizer(model, cfg, device, total_steps=10 ** 9)
    amp = cfg.amp and device.type == "cuda"
    mode = input_mode(device, cfg.packing)
    model.train()
    sentences = tokens = 0
    slots = dict.fromkeys(MODES, 0)
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        batches = [streams[t].batch(step) for t in TASKS]
        train_step(model, optimizer, scheduler, streams, batches, amp, cfg.max_grad_norm, mode)
        if step >= warmup:  # counted on the host, from host-side lengths: no sync
            pieces = [p for b in batches for p in batch_pieces(streams[b.task], b)]
            sentences += sum(len(p.host_lengths) for p in pieces)
            tokens += sum(int(p.host_lengths.sum()) for p in pieces)
            for m in MODES:  # padding each input mode would have cost on these very steps
                slots[m] += encoder_tokens(pieces, m)
    sync(device)
    return Measurement(name, cfg.batch_size, steps, time.perf_counter() - t0, sentences, tokens, 0.0, slots)


def main(argv: list[str] | None = None) -> None:
    from .cli import bench_parser

    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (100 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    encoder, tokenizer = load_pretrained(args.model)
    if args.shapes == "bert-base":
        from transformers import BertConfig, BertModel

        encoder = BertModel(BertConfig(vocab_size=len(tokenizer)))
    data_dir = resolve_data_dir(args.data_dir)
    train = load_splits(data_dir, tokenizer, ("train",))["train"]
    data = {t: d.to(device) for t, d in train.items()}
    raw = {t: read_task(task_path(data_dir, t, "train"), t) for t in TASKS}
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None
    mean_len = float(np.mean(np.concatenate([c.lengths.numpy() for d in train.values() for c in d.columns])))
    per_token = flops_per_token(encoder, mean_len)
    logger.info("device %s | encoder %.1fM params | %d timed steps after %d warm-up", name,
                sum(p.numel() for p in encoder.parameters()) / 1e6, steps, warmup)

    rows = []
    for bs in args.batch_sizes:
        variants = [] if args.no_reference else ["reference"]
        variants += ["project"] + (["project+packing"] if cuda and args.packing else [])
        if args.compile and cuda and bs == max(args.batch_sizes):  # compiling is slow: largest batch only
            variants += ["project+compile"] + (["project+packing+compile"] if args.packing else [])
        for variant in variants:
            cfg = TrainConfig(batch_size=bs, device=str(device), packing="packing" in variant)
            torch.manual_seed(0)
            model = MultitaskBert(copy.deepcopy(encoder), cfg).to(device)
            try:
                if variant == "reference":
                    m = run_reference(model, tokenizer, raw, cfg, device, steps, warmup)
                else:
                    compiled = variant.endswith("compile")
                    if compiled:
                        model.encoder.compile(dynamic=True)
                    m = run_project(model, data, cfg, device, steps, warmup + (30 if compiled else 0), variant)
            except Exception as exc:  # one broken variant must not lose the others' numbers
                logger.error("%s at batch %d failed: %s: %s", variant, bs, type(exc).__name__, exc)
                continue
            finally:
                del model
                if cuda:
                    torch.cuda.empty_cache()
            m.flops = m.tokens * per_token
            row = {"device": name, **m.row(peak)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'variant':<18}{'batch':>6}{'sent/s':>10}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'x ref':>7}")
    for r in rows:
        ref = next((x for x in rows if x["name"] == "reference" and x["batch_size"] == r["batch_size"]), None)
        ratio = r["sentences_per_s"] / ref["sentences_per_s"] if ref else float("nan")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['name']:<18}{r['batch_size']:>6}{r['sentences_per_s']:>10.0f}{r['tokens_per_s']:>11.0f}"
              f"{r['model_tflops']:>9.1f}{mfu:>7}{ratio:>7.2f}")
    for r in rows:
        if "encoder_tokens_per_real_token" in r:
            ratios = ", ".join(f"{m} {v:.2f}" for m, v in r["encoder_tokens_per_real_token"].items())
            print(f"encoder token positions per real token at batch {r['batch_size']} ({r['name']}'s steps): {ratios}")
    print(f"device: {name}; rerun: python -m mtbert.bench {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
