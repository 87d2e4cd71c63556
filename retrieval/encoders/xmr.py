"""The default encoder: xmr's own trained dual model (see xmr_model.py)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CheckpointError
from .base import DualEncoder, embed_by_length, l2_normalize, text_batch_size
from .preprocess import VIEWS, squash_resize, view_batches

log = logging.getLogger(__name__)

BACKENDS = ("auto", "int8", "onnx", "torch")


def _pick_device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class XmrEncoder(DualEncoder):
    def __init__(self, model, name: str, version: str, reranker_model=None, fusion_weight: float = 0.0,
                 device=None, batch_size: int | None = None, backend: str | None = None,
                 views: tuple[str, ...] = ("full",), weights_key: str | None = None, querybank=None,
                 checkpoint_dir: str | None = None, default_rerank_k: int = 20):
        self.model = model
        self.name = name
        self.version = version
        self.dim = model.config.embed_dim
        self.input_size = model.config.image_size
        self.reranker_model = reranker_model
        self.fusion_weight = fusion_weight
        # how many candidates a search reranks by default (0 where the reranker measured no gain)
        self.default_rerank_k = default_rerank_k
        self.device = _pick_device(device)
        # Forward-pass micro-batch. On a small CPU, tiny batches keep the
        # activations of these depthwise-conv towers in cache: batch 2 ran 3.5x
        # faster than batch 32 on the 2-core dev machine (benchmarks/RESULTS.md).
        self.batch_size = batch_size or (128 if self.device.type == "cuda" else 2)
        # Image side on the CPU: "int8" (the checkpoint's quantized ONNX graph),
        # "onnx" (fp32 ONNX Runtime), "torch", or "auto": int8 where the
        # checkpoint ships a current one, else onnx when onnxruntime is
        # installed, else torch. Env XMR_BACKEND overrides. On a GPU: torch.
        self.backend = backend or os.environ.get("XMR_BACKEND", "auto")
        self.backend_setting = self.backend  # as asked for; ``backend`` settles on what runs
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose {', '.join(BACKENDS)}")
        self.checkpoint_dir = checkpoint_dir
        self._onnx = None
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; choose from {', '.join(VIEWS)}")
        self.views = tuple(views)
        # identifies the weights alone (variants with other views share it)
        self.weights_key = weights_key or f"{name}-{version}"
        self.querybank = querybank
        self.model.to(self.device).eval()
        if self.reranker_model is not None:
            self.reranker_model.to(self.device).eval()
        self._tokenizer = None
        self._last_text = None  # (texts, states) of the last short call: a query is embedded, then reranked
        self._earlier = None  # the checkpoint's earlier_versions record (see the property)

    @classmethod
    def from_checkpoint(cls, path: str, name: str | None = None, device: str | None = None,
                        overrides: dict | None = None, backend: str | None = None) -> "XmrEncoder":
        """Load a checkpoint folder; ``overrides`` (a registered variant's
        settings: ``views``, ``fusion_weight``, ``querybank``) replace the checkpoint's."""
        import json

        from . import checkpoint
        from .memory import MemorySettings
        from .querybank import QueryBank

        meta = checkpoint.read_config(path)
        settings = {"views": meta.get("views", ["full"]), "fusion_weight": meta.get("fusion_weight", 0.0)}
        for key in ("querybank", "text_memory"):
            if meta.get(key):
                settings[key] = meta[key]
        settings.update(overrides or {})
        model = checkpoint.load_dual(path)
        reranker = checkpoint.load_reranker(path) if "reranker" in meta else None
        bank = None
        if settings.get("querybank"):
            memory = MemorySettings(**settings["text_memory"]) if settings.get("text_memory") else None
            try:
                bank = QueryBank.load(path, **settings["querybank"], memory=memory)
            except ValueError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
        h = hashlib.sha256(checkpoint.version_bytes(path))
        weights_key = h.hexdigest()[:12]
        h.update(json.dumps(settings, sort_keys=True).encode())
        if bank is not None:  # the bank changes every bias, so it is part of the version
            h.update(bank.texts.tobytes())
            h.update(bank.images.tobytes())
            if bank.memory is not None:
                h.update(bank.text_owner.tobytes())
        label = name if name and "/" not in name else Path(path).name
        enc = cls(model, label, h.hexdigest()[:12], reranker, float(settings["fusion_weight"]), device,
                  backend=backend, views=tuple(settings["views"]), weights_key=f"{Path(path).name}-{weights_key}",
                  querybank=bank, checkpoint_dir=str(path), default_rerank_k=int(meta.get("default_rerank_k", 20)))
        enc._earlier = meta.get("earlier_versions")
        return enc

    @property
    def earlier_versions(self) -> tuple[str, ...]:
        """Earlier releases of this model (by full version) with the same image
        side, from the checkpoint's ``earlier_versions``: ``{"image_side": the
        checkpoint.image_side_digest they share, "versions": {model name:
        [versions]}}``. Ignored once the checkpoint's image side has changed
        since the list was written (a retrained image tower keeps the old
        config keys)."""
        listed = self._earlier
        if not listed or self._checkpoint_side is None or listed.get("image_side") != self._checkpoint_side:
            return ()
        return tuple(listed.get("versions", {}).get(self.name, ()))

    @functools.cached_property
    def _checkpoint_side(self) -> str | None:
        """``checkpoint.image_side_digest`` of the checkpoint folder, read once
        (it hashes the image weights and the int8 graph: about 40 ms)."""
        if self.checkpoint_dir is None:
            return None
        from . import checkpoint

        return checkpoint.image_side_digest(self.checkpoint_dir)

    def image_side(self) -> str:
        """The checkpoint's image weights, int8 graph and image config
        (:attr:`_checkpoint_side`), and the views."""
        if self._checkpoint_side is None:
            return self.version
        import json

        h = hashlib.sha256(self._checkpoint_side.encode())
        h.update(json.dumps({"views": list(self.views)}).encode())
        return h.hexdigest()[:12]

    # -- preprocessing ----------------------------------------------------------
    def prepare(self, image: Image.Image) -> np.ndarray:
        return squash_resize(image, self.input_size)

    @property
    def portable_prepare(self):
        return functools.partial(squash_resize, size=self.input_size)

    @property
    def portable_factory(self):
        from . import create_encoder

        return functools.partial(create_encoder, self.name, backend=self.backend_setting)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .minilm import MiniLMTokenizer

            self._tokenizer = MiniLMTokenizer()
        return self._tokenizer

    # -- forward passes -----------------------------------------------------------
    def _onnx_path(self):
        """The ONNX Runtime image path (int8 or fp32), or None where the backend is torch."""
        if self._onnx is None and self.device.type == "cpu" and self.backend != "torch":
            from . import onnx_runtime

            if onnx_runtime.available():
                try:
                    self._onnx = self._shipped_int8() if self.backend in ("auto", "int8") else None
                    if self._onnx is None:
                        self._onnx = onnx_runtime.OnnxImagePath.for_model(
                            self.model, self.reranker_model, self.weights_key, self.batch_size)
                        self.backend = "onnx"
                except CheckpointError:
                    raise
                except Exception as exc:  # export problems must not stop indexing
                    log.warning("ONNX Runtime path unavailable (%s); using PyTorch", exc)
                    self.backend = "torch"
            elif self.backend in ("onnx", "int8"):
                raise ImportError(f"backend {self.backend} needs onnxruntime and onnxscript: "
                                  "pip install onnxruntime onnxscript")
            else:
                self.backend = "torch"
        return self._onnx

    def _shipped_int8(self):
        from . import checkpoint
        from .onnx_runtime import OnnxImagePath

        runner = None
        if self.checkpoint_dir is not None:
            runner = OnnxImagePath.shipped_int8(self.checkpoint_dir,
                                                checkpoint.image_weights_digest(self.checkpoint_dir))
        if runner is None and self.backend == "int8":
            raise CheckpointError(f"{self.name} has no current int8 image graph "
                                  f"({checkpoint.INT8_FILE}); make one with `xmr quantize`, or use XMR_BACKEND=onnx")
        if runner is not None:
            self.backend = "int8"
        return runner

    @property
    def image_backend(self) -> str:
        """What runs the image side: int8, onnx or torch (settled by the first batch)."""
        if self.device.type != "cpu":
            return f"torch ({self.device.type})"
        return self.backend

    def _images(self, prepared: list, with_tokens: bool, views: tuple[str, ...] | None = None):
        """Sum of the views' normalised embeddings; tokens of the first view."""
        batch = np.stack(prepared)
        views = views or self.views
        runner = self._onnx_path()
        if runner is not None:
            total, tokens = None, None
            for n, (_, pixels) in enumerate(view_batches(batch, views)):
                emb, tok = runner(pixels)
                emb = l2_normalize(emb)
                total = emb if total is None else total + emb
                if n == 0 and with_tokens:
                    tokens = tok
            return total, tokens
        return self._torch_images(batch, with_tokens, views)

    def _torch_images(self, batch: np.ndarray, with_tokens: bool, views: tuple[str, ...]):
        """The PyTorch path: each micro-batch crosses to the device once (from
        pinned memory on CUDA); its views are made there."""
        import torch
        import torch.nn.functional as F

        embs, toks = [], []
        cuda = self.device.type == "cuda"
        for s in range(0, len(batch), self.batch_size):
            px = torch.from_numpy(batch[s : s + self.batch_size])
            if cuda:
                px = px.pin_memory().to(self.device, non_blocking=True)
            total = None
            with torch.inference_mode(), self._autocast():
                for n, (_, pixels) in enumerate(view_batches(px, views)):
                    want_tokens = with_tokens and n == 0
                    emb, levels = self.model.image_forward(self.model.normalize_pixels(pixels),
                                                           with_regions=want_tokens)
                    emb = F.normalize(emb.float(), dim=-1)
                    total = emb if total is None else total + emb
                    if want_tokens:
                        toks.append(self.reranker_model.project_regions([lv.float() for lv in levels])
                                    .half().cpu().numpy())
            embs.append(total.cpu().numpy())
        return np.concatenate(embs), (np.concatenate(toks) if with_tokens else None)

    def _autocast(self):
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _embed_images(self, prepared: list) -> np.ndarray:
        return self._images(prepared, False)[0]

    def encode_as_is(self, prepared: list) -> np.ndarray:
        """Normalised embeddings of prepared squares as they are: one view,
        not the model's test-time views (training targets of random crops)."""
        return l2_normalize(self._images(prepared, False, views=("full",))[0]) if prepared else \
            np.zeros((0, self.dim), np.float32)

    def encode_images_with_tokens(self, prepared: list):
        if self.reranker_model is None:
            return super().encode_images_with_tokens(prepared)
        emb, tokens = self._images(prepared, True)
        return l2_normalize(emb), tokens

    def text_states(self, texts: list[str]):
        """(normalised embeddings, word states ``[B, L, H]``, mask ``[B, L]``) as torch tensors."""
        import torch
        import torch.nn.functional as F

        key = tuple(texts)
        last = self._last_text
        if last is not None and last[0] == key:
            return last[1]
        ids, mask = self.tokenizer(texts, self.model.config.text_max_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode(), self._autocast():
            emb, hidden = self.model.text_forward(ids, mask)
        out = F.normalize(emb.float(), dim=-1), hidden.float(), mask
        if len(texts) <= 4:
            self._last_text = (key, out)
        return out

    def tower_texts(self, texts: list[str]) -> np.ndarray:
        """The text tower's normalised embeddings, before any text memory (what
        a query bank stores), in input order, computed in batches of similar
        length: less padding, and on a CPU small batches stay in cache (2,000
        Flickr8k captions: 9.7 s -> 4.9 s on 2 cores, equal within 1e-6)."""
        return embed_by_length(texts, text_batch_size(self.device),
                               lambda part: self.text_states(part)[0].cpu().numpy())

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        # the text memory moves what recall ranks by; the reranker keeps the
        # tower's own embedding (text_states), as it was trained on
        emb = self.tower_texts(texts)
        return emb if self.querybank is None else self.querybank.expand(emb)

    @property
    def token_shape(self) -> tuple[int, int] | None:
        if self.reranker_model is None:
            return None
        cfg = self.reranker_model.config
        return (cfg.level_tokens * len(cfg.level_dims), cfg.width)
