"""Any Hugging Face CLIP-family dual encoder (CLIPModel, SiglipModel, ...)
by hub name or local folder."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading

import numpy as np
from PIL import Image

from ..errors import UnknownModel
from .base import DualEncoder, embed_by_length, text_batch_size

log = logging.getLogger(__name__)


class HFClipEncoder(DualEncoder):
    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoProcessor

        try:
            self.model = AutoModel.from_pretrained(name_or_path)
            self.processor = AutoProcessor.from_pretrained(name_or_path)
            self._tokenizer_lock = threading.Lock()
        except (OSError, ValueError) as exc:
            raise UnknownModel(
                f"cannot load Hugging Face model {name_or_path!r}: {str(exc).splitlines()[0]} "
                "(check the name, your network or HF_HUB_OFFLINE, or pass a local folder)"
            ) from None
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise UnknownModel(f"{name_or_path!r} is not a dual encoder (no get_image_features/get_text_features)")
        self.name = f"hf:{name_or_path}"
        self.version = hashlib.sha256(self.model.config.to_json_string().encode()).hexdigest()[:12]
        self.device = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        ip = self.processor.image_processor
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        self.input_size = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else 224
        with torch.inference_mode():
            self.dim = int(self._embed_texts(["probe"]).shape[1])

    def prepare(self, image: Image.Image) -> np.ndarray:
        return _pixels(self.processor.image_processor, image)

    @property
    def portable_prepare(self):
        return functools.partial(_pixels, self.processor.image_processor)

    @property
    def portable_factory(self):
        from . import create_encoder

        return functools.partial(create_encoder, self.name)

    @staticmethod
    def _as_tensor(out):
        # transformers 5 may return a model output instead of a tensor
        return out if hasattr(out, "shape") else out.pooler_output

    def _embed_images(self, prepared: list) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(prepared), self.batch_size):
            px = torch.from_numpy(np.stack(prepared[s : s + self.batch_size])).to(self.device)
            with torch.inference_mode():
                out.append(self._as_tensor(self.model.get_image_features(pixel_values=px)).float().cpu().numpy())
        return np.concatenate(out)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True

        def embed(part):
            with self._tokenizer_lock:  # a fast tokenizer refuses concurrent calls that set truncation
                enc = self.processor.tokenizer(part, padding=padding, truncation=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                return self._as_tensor(self.model.get_text_features(**enc)).float().cpu().numpy()

        return embed_by_length(texts, text_batch_size(self.device), embed)


def _pixels(image_processor, image: Image.Image) -> np.ndarray:
    """The model's input for one image (a module-level function, so that worker processes can run it)."""
    return image_processor(images=image, return_tensors="np")["pixel_values"][0]
