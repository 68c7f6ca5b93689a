"""Tiny fixtures the tests write themselves: a CS224N-format data folder and a random tiny BERT."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("good great fine bad awful poor movie film plot actor scene story dog cat man woman plays "
         "runs eats what how is are the a an of to why who where can do does best worst fun dull").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


def write_data(folder: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0,
               malformed: bool = True) -> Path:
    """Write all eight CS224N files; train files get a few malformed rows (counted in MALFORMED)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n: int, kind: str, labelled: bool) -> list[str]:
        out = []
        for i in range(n):
            uid = f"{kind}{i:05d}x"
            if kind == "sst":
                label = i % 5
                words = ["awful", "bad", "fine", "good", "great"][label]
                line = [str(i), uid, f"{words} {_sentence(rng)}"] + ([str(label)] if labelled else [])
            else:
                s1 = _sentence(rng)
                same = i % 2 == 0
                s2 = s1 if same else _sentence(rng)
                label = ("1.0" if same else "0.0") if kind == "quora" else f"{(5.0 if same else rng.uniform(0, 2)):.1f}"
                line = [str(i), uid, s1, s2] + ([label] if labelled else [])
            out.append("\t".join(line))
        return out

    header = {"sst": ["", "id", "sentence", "sentiment"], "quora": ["", "id", "sentence1", "sentence2", "is_duplicate"],
              "sts": ["", "id", "sentence1", "sentence2", "similarity"]}
    names = {"sst": "ids-sst-{}.csv", "quora": "quora-{}.csv", "sts": "sts-{}.csv"}
    for task in ("sst", "quora", "sts"):
        for split, n in (("train", n_train), ("dev", n_dev), ("test-student", n_dev)):
            if task == "quora" and split == "test-student":
                continue  # like the shared data: no Quora test file
            labelled = split != "test-student"
            cols = header[task] if labelled else header[task][:-1]
            lines = ["\t".join(cols)] + rows(n, task, labelled)
            if malformed and split == "train":
                lines += MALFORMED_ROWS[task]
            (folder / names[task].format(split)).write_text("\n".join(lines) + "\n")
    return folder


# rows every loader must skip: missing sentence, missing label, non-numeric or out-of-range label
MALFORMED_ROWS = {
    "sst": ["900\tbad1\t\t3", "901\tbad2\tgood movie\t", "902\tbad3\tgood movie\tseven", "903\tbad4\tgood movie\t9"],
    "quora": ["900\tbad1\twhat is\t\t1.0", "901\tbad2\twhat is\thow is\t", "902\tbad3\twhat is\thow is\t0.5"],
    "sts": ["900\tbad1\tthe dog\t\t2.0", "901\tbad2\tthe dog\tthe cat\tn/a", "902\tbad3\tthe dog\tthe cat\t7.5"],
}


def write_tiny_model(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised tiny BERT and a WordPiece tokenizer over WORDS, as a local HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))  # positional: `vocab_file` in transformers 4, `vocab` in 5
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
