"""MultitaskBert: one BERT encoder, three task heads (the source report's architecture)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelLoadError, TrainConfig, resolve_model_name  # noqa: F401 - ModelLoadError is ours
from .tasks import TASK_TABLE, TASKS

logger = logging.getLogger(__name__)

N_SENTIMENT_CLASSES = 5


def load_pretrained(model: str) -> tuple[nn.Module, "object"]:
    """Load (encoder, tokenizer) from a local folder or, when the hub is reachable, a model id.

    A local folder is read directly. An id is first looked up in the local HF cache only; the hub
    is asked once more only when HF_HUB_OFFLINE is not set. Any failure is one ModelLoadError.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = resolve_model_name(model)
    local = Path(name).expanduser()
    if local.exists():
        attempts = [dict()]
        name = str(local)
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {name!r} does not exist")
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        attempts = [dict(local_files_only=True)] + ([] if offline else [dict()])
    errors = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "loading weights" chatter is not ours to show
    hf_logging.disable_progress_bar()
    try:
        for kwargs in attempts:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
                encoder = AutoModel.from_pretrained(name, **kwargs)
                # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps an fp16
                # checkpoint in fp16); autocast decides the compute dtype
                return encoder.float(), tokenizer
            except Exception as exc:  # transformers raises many types: OSError, ValueError, HTTP errors
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    raise ModelLoadError(
        f"cannot load model {name!r}: not a local folder, not in the Hugging Face cache"
        f"{'' if len(attempts) > 1 else ' (HF_HUB_OFFLINE is set)'} or not loadable "
        f"({'; '.join(errors)}). Pass --model with a local folder or a cached model id."
    ) from None


def _head(in_dim: int, hidden: int, out_dim: int, dropout: float, norm: bool, relu: bool) -> nn.Sequential:
    """Two hidden layers then the output layer; with neither norm nor relu, one Linear.

    norm: each hidden layer is Linear -> LayerNorm -> Dropout (the report's stack);
    relu: each hidden layer ends in ReLU.
    """
    if not (norm or relu):
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = []
    for i in range(2):
        layers.append(nn.Linear(in_dim if i == 0 else hidden, hidden))
        if norm:
            layers += [nn.LayerNorm(hidden), nn.Dropout(dropout)]
        if relu:
            layers.append(nn.ReLU())
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class MultitaskBert(nn.Module):
    """BERT encoder + sentiment (5-way), paraphrase (logit) and similarity (0-5) heads.

    The sentence vectors go through dropout, then each head. Switches (TrainConfig): `stack` (two
    Linear -> LayerNorm -> Dropout layers before each head's output layer), `relu` (ReLU after each
    hidden layer of the pair heads; without `stack` that makes them Linear -> ReLU twice),
    `cosine` (add cos(u, v) to the paraphrase logit and 5*cos(u, v) to the similarity score),
    `pooling` ("cls" or "mean"). With every switch off each head is one Linear layer.
    """

    def __init__(self, encoder: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.encoder = encoder
        self.pooling = cfg.pooling
        self.cosine = cfg.cosine
        # pair encoding per pair task (docs/methods.md): "bi" builds the report's head on
        # [u; v]; "cross"/"both" instead a head on the joint vector of "[CLS] s1 [SEP] s2". At "bi"
        # the modules (and so the initialisation's random draws) are exactly the report's.
        self.encodings = {t.name: getattr(cfg, t.encoding_option) for t in TASK_TABLE.values() if t.encoding_option}
        hidden = encoder.config.hidden_size
        p = cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        for task in TASK_TABLE.values():  # in table order: sst_head, para_head, sts_head (the report's)
            if not task.pair:
                classes = int(task.label_high - task.label_low) + 1 if task.integer_labels else 1
                setattr(self, f"{task.head}_head", _head(hidden, hidden, classes, p, norm=cfg.stack, relu=False))
            elif self.encodings[task.name] == "bi":
                setattr(self, f"{task.head}_head", _head(2 * hidden, hidden, 1, p, norm=cfg.stack, relu=cfg.relu))
            else:
                setattr(self, f"{task.head}_joint_head", _head(hidden, hidden, 1, p, norm=cfg.stack, relu=cfg.relu))
        if cfg.loss_weighting == "uncertainty":  # s_t = log sigma_t^2 per task (TASKS order), start at weight 1
            self.loss_log_vars = nn.Parameter(torch.zeros(len(TASKS)))

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the encoder and the loss weights: the task heads."""
        return [p for name, p in self.named_parameters()
                if not name.startswith("encoder.") and name != "loss_log_vars"]

    def loss_parameters(self) -> list[nn.Parameter]:
        """The learned loss weights (uncertainty weighting), if any."""
        return [self.loss_log_vars] if hasattr(self, "loss_log_vars") else []

    def uses_vectors(self, task: str) -> bool:
        """Whether `task` needs the sentence vector of each of its sentences (bi-encoding)."""
        return self.encodings.get(task, "bi") in ("bi", "both")

    def uses_joint(self, task: str) -> bool:
        """Whether `task` needs the joint vector of its sentence pair (cross-encoding)."""
        return self.encodings.get(task, "bi") in ("cross", "both")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence vectors (before dropout) of a padded batch; with token_type_ids (segment A/B of a
        joint "[CLS] s1 [SEP] s2" input, mtbert.data.joint_inputs) the joint pair vectors."""
        mask = attention_mask
        if self.encoder.config._attn_implementation == "sdpa":
            # a ready 4D mask is used as is; from a 2D one transformers first checks mask.all(),
            # which waits for the GPU every forward pass
            mask = attention_mask[:, None, None, :].bool()
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed_packed(self, packed) -> torch.Tensor:
        """Sentence vectors of a packed batch (mtbert.inputs.pack): same values as embed().

        Needs SDPA attention (the default), which takes the block-diagonal boolean mask as is."""
        hidden = self.encoder(input_ids=packed.ids, attention_mask=packed.mask,
                              position_ids=packed.position_ids).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.pooling == "cls":
            return flat[packed.first_slots]
        sums = torch.zeros(len(packed.lengths), flat.shape[-1], dtype=torch.float32, device=flat.device)
        sums.index_add_(0, packed.token_sentence, flat[packed.token_slots].float())
        return (sums / packed.lengths.unsqueeze(1)).to(flat.dtype)

    def sentiment_logits(self, u: torch.Tensor) -> torch.Tensor:
        return self.sst_head(self.dropout(u))

    def _pair(self, head: nn.Module, u: torch.Tensor, v: torch.Tensor, cos_scale: float) -> torch.Tensor:
        out = head(torch.cat([self.dropout(u), self.dropout(v)], dim=-1)).squeeze(-1)
        if self.cosine:
            out = out + cos_scale * F.cosine_similarity(u.float(), v.float(), dim=-1).to(out.dtype)
        return out

    def paraphrase_logit(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._pair(self.para_head, u, v, 1.0)

    def similarity_score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._pair(self.sts_head, u, v, 5.0)

    def _joint(self, head: nn.Module, joint: torch.Tensor, vecs: list[torch.Tensor] | None,
               cos_scale: float) -> torch.Tensor:
        """Cross-encoding head on the joint vector; with `vecs` ("both") plus cos_scale * cos(u, v)."""
        out = head(self.dropout(joint)).squeeze(-1)
        if vecs is not None:
            u, v = vecs
            out = out + cos_scale * F.cosine_similarity(u.float(), v.float(), dim=-1).to(out.dtype)
        return out

    def paraphrase_logit_joint(self, joint: torch.Tensor, vecs: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self._joint(self.para_joint_head, joint, vecs, 1.0)

    def similarity_score_joint(self, joint: torch.Tensor, vecs: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self._joint(self.sts_joint_head, joint, vecs, 5.0)
