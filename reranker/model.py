"""The cross-modal attention reranker.

A concrete design of the matching model in "Advanced Multimodal Deep Learning
Architecture for Image-Text Matching" (Wang et al., 2024):

* image **region tokens** from two levels of the image tower's feature pyramid
  (the stride-32 head map and the stride-16 map, each pooled to a 7x7 grid),
  projected to a shared width (:meth:`CrossModalReranker.project_regions`; the
  engine stores this projection on disk so a query never re-decodes images);
* **word tokens**: the text tower's last hidden states;
* stacked **two-way cross-modal attention** (co-attention): in every layer the
  words attend to the regions and the regions attend to the words, each stream
  followed by self-attention and a feed-forward block;
* **hierarchical fusion** of matching evidence at three levels into one logit:
  global (the dual encoder's embeddings and their cosine similarity), region
  (attention-pooled region states and region->word alignment) and word
  (attention-pooled word states and word->region alignment).

The module is pure: it is handed tensors and returns logits; it knows nothing
of files, tokenizers or image towers. Every design choice that the ablation
table measures is a field of :class:`RerankerConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RerankerConfig:
    level_dims: list[int] = field(default_factory=lambda: [1280, 120])
    level_tokens: int = 49
    word_dim: int = 384
    global_dim: int = 256
    width: int = 256
    heads: int = 4
    layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.1
    two_way: bool = True
    use_global_level: bool = True
    use_region_level: bool = True
    use_word_level: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RerankerConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class _Attention(nn.Module):
    """Pre-norm multi-head attention block with a residual connection."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_pad: torch.Tensor | None) -> torch.Tensor:
        """``ctx_pad``: ``[B, S]``, true at context positions to ignore."""
        # nn.MultiheadAttention's own computation, written out on its parameters:
        # its mask check imports sympy (about half a second at the first query).
        mha = self.attn
        b, n, d = x.shape
        h = mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q = F.linear(self.norm_q(x), w_q, b_q)
        kv = self.norm_kv(ctx)
        k, v = F.linear(kv, w_k, b_k), F.linear(kv, w_v, b_v)

        def heads(t):
            return t.view(b, -1, h, d // h).transpose(1, 2)

        keep = None if ctx_pad is None else ~ctx_pad[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep,
                                             dropout_p=mha.dropout if self.training else 0.0)
        return x + mha.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _FeedForward(nn.Module):
    def __init__(self, width: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, width * mult),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width * mult, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class CoAttentionLayer(nn.Module):
    """One layer of two-way cross-modal attention.

    Both cross-attentions read the states the layer was given, so neither
    stream sees the other's update of the same layer (symmetric co-attention).
    With ``two_way=False`` only the words attend to the regions.
    """

    def __init__(self, width: int, heads: int, ffn_mult: int, dropout: float, two_way: bool):
        super().__init__()
        self.two_way = two_way
        self.word_cross = _Attention(width, heads, dropout)
        self.word_self = _Attention(width, heads, dropout)
        self.word_ffn = _FeedForward(width, ffn_mult, dropout)
        self.region_cross = _Attention(width, heads, dropout) if two_way else None
        self.region_self = _Attention(width, heads, dropout)
        self.region_ffn = _FeedForward(width, ffn_mult, dropout)

    def forward(self, words, regions, word_pad):
        new_words = self.word_cross(words, regions, None)
        if self.region_cross is not None:
            regions = self.region_cross(regions, words, word_pad)
        words = self.word_self(new_words, new_words, word_pad)
        regions = self.region_self(regions, regions, None)
        return self.word_ffn(words), self.region_ffn(regions)


class _AttentionPool(nn.Module):
    """Pools a token sequence with learned, input-dependent weights."""

    def __init__(self, width: int):
        super().__init__()
        self.score = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        logits = self.score(x).squeeze(-1).float()
        if pad is not None:
            logits = logits.masked_fill(pad, float("-inf"))
        weights = logits.softmax(dim=-1).to(x.dtype)
        return torch.einsum("bn,bnd->bd", weights, x)


def _alignment(queries, keys, query_pad, key_pad):
    """Mean over queries of the best cosine match among keys (SCAN-style)."""
    sim = torch.einsum("bqd,bkd->bqk", F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1))
    if key_pad is not None:
        sim = sim.masked_fill(key_pad[:, None, :], -1.0)
    best = sim.max(dim=-1).values
    if query_pad is None:
        return best.mean(dim=-1)
    valid = (~query_pad).float()
    return (best * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)


class CrossModalReranker(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.level_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(c, w), nn.LayerNorm(w)) for c in config.level_dims
        )
        n_regions = config.level_tokens * len(config.level_dims)
        self.region_pos = nn.Parameter(torch.zeros(1, n_regions, w))
        nn.init.normal_(self.region_pos, std=0.02)
        self.word_proj = nn.Sequential(nn.Linear(config.word_dim, w), nn.LayerNorm(w))
        self.layers = nn.ModuleList(
            CoAttentionLayer(w, config.heads, config.ffn_mult, config.dropout, config.two_way)
            for _ in range(config.layers)
        )
        self.word_norm = nn.LayerNorm(w)
        self.region_norm = nn.LayerNorm(w)
        self.word_pool = _AttentionPool(w)
        self.region_pool = _AttentionPool(w)
        self.global_proj = nn.Linear(config.global_dim, w)
        n_vectors = sum([config.use_global_level, config.use_region_level, config.use_word_level])
        if n_vectors == 0:
            raise ValueError("RerankerConfig: at least one of the global, region and word levels must be used")
        # Pairwise features of the pooled streams (product and difference) need
        # both region and word levels; otherwise each level contributes its vector.
        fuse_in = n_vectors * w + (2 * w if config.use_region_level and config.use_word_level else 0)
        self.fuse = nn.Sequential(nn.Linear(fuse_in, w), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(w, 1))
        # One learned weight per scalar evidence (global cosine, region and word alignment).
        self.evidence_weight = nn.Parameter(torch.tensor([5.0, 1.0, 1.0]))

    # -- the part the engine runs once per image at indexing time ----------------
    def project_regions(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Raw tower levels ``[B, N, C_l]`` -> region tokens ``[B, sum N, width]``."""
        if len(levels) != len(self.level_proj):
            raise ValueError(f"expected {len(self.level_proj)} feature levels, got {len(levels)}")
        return torch.cat([proj(x) for proj, x in zip(self.level_proj, levels)], dim=1)

    # -- scoring -----------------------------------------------------------------
    def forward(
        self,
        regions: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
    ) -> torch.Tensor:
        """Matching logits for a batch of image-text pairs.

        regions: ``[B, R, width]`` from :meth:`project_regions`;
        words: ``[B, L, word_dim]`` text-tower states; word_mask: ``[B, L]``,
        true for real tokens; image_emb, text_emb: ``[B, D]`` normalised dual
        encoder embeddings of the same pairs.
        """
        cfg = self.config
        word_pad = ~word_mask.bool()
        r = regions.to(self.region_pos.dtype) + self.region_pos
        w = self.word_proj(words)
        for layer in self.layers:
            w, r = layer(w, r, word_pad)
        w = self.word_norm(w)
        r = self.region_norm(r)

        vectors = []
        evidence = []
        pooled_w = self.word_pool(w, word_pad) if cfg.use_word_level else None
        pooled_r = self.region_pool(r, None) if cfg.use_region_level else None
        if cfg.use_global_level:
            vectors.append(self.global_proj(image_emb.to(w.dtype) * text_emb.to(w.dtype)))
            evidence.append(self.evidence_weight[0] * (image_emb.float() * text_emb.float()).sum(-1))
        if cfg.use_region_level:
            vectors.append(pooled_r)
            evidence.append(self.evidence_weight[1] * _alignment(r, w, None, word_pad))
        if cfg.use_word_level:
            vectors.append(pooled_w)
            evidence.append(self.evidence_weight[2] * _alignment(w, r, word_pad, None))
        if pooled_w is not None and pooled_r is not None:
            vectors += [pooled_w * pooled_r, (pooled_w - pooled_r).abs()]
        logit = self.fuse(torch.cat(vectors, dim=-1)).squeeze(-1).float()
        return logit + torch.stack(evidence, dim=0).sum(0)
