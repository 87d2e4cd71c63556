"""The image side of xmr's model (tower, projection head, region tokens) run
by ONNX Runtime on the CPU: 2.5x the images/s of eager PyTorch on the 2-core
dev machine, equal within 1e-4 (benchmarks/RESULTS.md, tests/test_models.py).

Two graphs:

- fp32, exported once per model version and batch size into the user's
  cache directory and reused;
- int8, shipped inside a checkpoint folder (``image-int8.onnx``, made by
  ``xmr quantize`` from training images, retrieval/training/quantize.py),
  about 1.5x faster again. It names the weights it was made from in its
  metadata and is only used while they match.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xmr" / "onnx"


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        return False
    return True


def _wrapper(model, reranker_model):
    import torch

    class ImagePath(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.reranker = reranker_model

        def forward(self, pixels):
            emb, levels = self.model.image_forward(self.model.normalize_pixels(pixels),
                                                   with_regions=self.reranker is not None)
            if self.reranker is None:
                return (emb,)
            return emb, self.reranker.project_regions(levels)

    return ImagePath().eval()


def export(model, reranker_model, path: Path, batch: int) -> Path:
    import torch

    size = model.config.image_size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    names = ["embedding"] + (["tokens"] if reranker_model is not None else [])
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _wrapper(model, reranker_model), (torch.zeros(batch, size, size, 3, dtype=torch.uint8),), None,
            input_names=["pixels"], output_names=names, opset_version=18, dynamo=True, verbose=False,
        )
        program.save(str(tmp))
    exporter_log.setLevel(level)
    os.replace(tmp, path)
    log.info("exported the image tower to %s", path)
    return path


DIGEST_KEY = "xmr_image_weights_sha256"  # metadata of an int8 graph: the weights it was made from


class OnnxImagePath:
    """Runs fixed-size batches; a short last batch is padded and trimmed."""

    def __init__(self, path: Path, batch: int | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        static = self.session.get_inputs()[0].shape[0]
        self.batch = batch or (static if isinstance(static, int) else 1)
        self.has_tokens = len(self.session.get_outputs()) > 1
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @classmethod
    def shipped_int8(cls, folder: str | Path, digest: str) -> "OnnxImagePath | None":
        """The int8 graph of a checkpoint folder, or None where it has none or it
        was made from other weights than ``digest`` names (then it says so)."""
        from .checkpoint import INT8_FILE

        path = Path(folder) / INT8_FILE
        if not path.is_file():
            return None
        runner = cls(path)
        if runner.metadata.get(DIGEST_KEY) != digest:
            log.warning("%s was made from other weights than %s holds now; ignoring it "
                        "(run `xmr quantize` to remake it)", path, folder)
            return None
        return runner

    @classmethod
    def for_model(cls, model, reranker_model, key: str, batch: int = 2) -> "OnnxImagePath":
        path = cache_dir() / f"{key}-b{batch}{'-tok' if reranker_model is not None else ''}.onnx"
        if not path.is_file():
            export(model, reranker_model, path, batch)
        return cls(path, batch)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        embs, toks = [], []
        for s in range(0, len(pixels), self.batch):
            chunk = pixels[s : s + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            out = self.session.run(None, {"pixels": np.ascontiguousarray(chunk, dtype=np.uint8)})
            embs.append(out[0][:n])
            if self.has_tokens:
                toks.append(out[1][:n].astype(np.float16))
        return np.concatenate(embs), (np.concatenate(toks) if self.has_tokens else None)
