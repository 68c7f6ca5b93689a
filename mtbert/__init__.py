"""mtbert: multitask BERT fine-tuning on SST-5, Quora and STS-B (knows nothing of Optuna).

Entry points: `mtbert.train.train` / `python -m mtbert.train`, `python -m mtbert.evaluate`,
`python -m mtbert.bench`.
"""
from .config import TrainConfig

__all__ = ["TrainConfig"]
