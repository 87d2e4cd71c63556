"""Hugging Face BLIP image-text matching models (BlipForImageTextRetrieval) as
rerankers, by hub name or local folder. They score pixels, so candidates are
decoded from their files."""

from __future__ import annotations

import numpy as np

from .base import ImageCandidate, Reranker


class BlipReranker(Reranker):
    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 16):
        import torch
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.model = BlipForImageTextRetrieval.from_pretrained(name_or_path).eval()
        self.processor = BlipProcessor.from_pretrained(name_or_path)
        self.device = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.name = f"hf:{name_or_path}"

    def _itm(self, images: list, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.processor(images=images[s : s + self.batch_size], text=texts[s : s + self.batch_size],
                                 return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                logits = self.model(**enc, use_itm_head=True).itm_score
            out.append(logits.float().softmax(-1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score_text_images(self, text, text_emb, images: list[ImageCandidate]) -> np.ndarray:
        pixels = [c.load() for c in images]
        return self._itm(pixels, [text] * len(pixels))

    def score_image_texts(self, image: ImageCandidate, texts, text_embs) -> np.ndarray:
        pil = image.load()
        return self._itm([pil] * len(texts), list(texts))
