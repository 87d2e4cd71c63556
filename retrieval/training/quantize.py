"""int8 image path for CPUs: static post-training quantization of the
exported ONNX graph, calibrated on training images, checked against fp32.

Measured on the shipped model (benchmarks/RESULTS.md): quantizing every
convolution moves embeddings by a median cosine of 0.991 and costs about 6
dev rsum; almost all of that error comes from the first few convolutions,
the stem at full resolution and the first depthwise block. Keeping the first
``KEEP_FLOAT_CONVS`` convolutions and the projection heads in float gives
embeddings at cosine 0.997 to fp32, dev rsum equal within noise, and about
1.5x the images/s of the fp32 graph on the 2-core dev machine.

Needs ``onnx`` and ``onnxruntime`` (both in the package's dependencies).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encoders import checkpoint
from ..encoders.base import l2_normalize

log = logging.getLogger(__name__)

KEEP_FLOAT_CONVS = 8  # the stem and the first blocks, in graph order
CALIBRATION_IMAGES = 256
MIN_MEDIAN_COSINE = 0.995  # below this the graph is not kept


@dataclass
class Agreement:
    """Cosine between int8 and fp32 outputs on held-out images."""

    images: int
    embedding_median: float
    embedding_min: float
    tokens_median: float | None

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def calibration_sample(records: list, n: int = CALIBRATION_IMAGES, seed: int = 0) -> list:
    """A fixed random sample of ``n`` records (use the train split)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(records), size=min(n, len(records)), replace=False)
    return [records[i] for i in sorted(pick)]


def view_pixels(records: list, size: int, threads: int = 4) -> np.ndarray:
    """Prepared squares of ``records``, each in one test-time view taken in
    turn from VIEWS, so the ranges cover every view a variant may use."""
    from concurrent.futures import ThreadPoolExecutor

    from indexer.decode import BadImage, decode_image

    from ..encoders.preprocess import VIEWS, squash_resize, view_batch

    def load(record):
        try:
            return squash_resize(decode_image(record.path, size).image, size)
        except BadImage as exc:
            log.warning("skipped %s: %s", record.path, exc)
            return None

    with ThreadPoolExecutor(threads) as pool:
        squares = [sq for sq in pool.map(load, records) if sq is not None]
    if not squares:
        raise ValueError("none of the images could be decoded")
    squares = np.stack(squares)
    out = np.empty_like(squares)
    for n, view in enumerate(VIEWS):
        out[n :: len(VIEWS)] = view_batch(squares[n :: len(VIEWS)], view)
    return out


def quantize_from_dataset(folder: str | Path, dataset: str, images: str | None = None,
                          n_calibration: int = CALIBRATION_IMAGES, n_check: int = 200,
                          keep_float_convs: int = KEEP_FLOAT_CONVS) -> dict:
    """:func:`quantize_checkpoint` calibrated on the dataset's train split and
    checked on its dev split."""
    from ..datasets import load_dataset, split_records

    size = checkpoint.read_config(folder)["model"]["image_size"]
    records = load_dataset(dataset, images)
    calibration = view_pixels(calibration_sample(split_records(records, "train"), n_calibration), size)
    check = view_pixels(split_records(records, "dev")[:n_check], size)
    return quantize_checkpoint(folder, calibration, check, keep_float_convs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (l2_normalize(a) * l2_normalize(b)).sum(-1)


def agreement(reference, candidate, pixels: np.ndarray) -> Agreement:
    """Compare two image paths (callables ``pixels -> (emb, tokens)``)."""
    e0, t0 = reference(pixels)
    e1, t1 = candidate(pixels)
    cos = _cosines(e0, e1)
    tok = float(np.median(_cosines(t0, t1))) if t0 is not None and t1 is not None else None
    return Agreement(len(pixels), float(np.median(cos)), float(cos.min()), tok)


LARGE_MATRIX = 1_000_000  # weights of a matrix product that is quantized rather than kept float


def quantize_graph(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch: int,
                   keep_float_convs: int = KEEP_FLOAT_CONVS) -> Path:
    """Write a QDQ int8 graph of ``fp32_path`` (per-channel int8 weights, uint8
    activations, min/max ranges from ``calibration``, a uint8 batch of images)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns through the root logger, dumping whole tensor protos
    try:
        with tempfile.TemporaryDirectory(prefix="xmr-quant-") as tmp:
            return _quantize(fp32_path, out_path, calibration, batch, keep_float_convs, Path(tmp))
    finally:
        root.setLevel(level)


def _quantize(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch: int, keep_float_convs: int,
              tmp: Path) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._starts = iter(range(0, len(calibration) - batch + 1, batch))

        def get_next(self):
            s = next(self._starts, None)
            return None if s is None else {"pixels": np.ascontiguousarray(calibration[s : s + batch])}

    pre = Path(tmp) / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    graph = onnx.load(str(pre))
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    # the projection heads stay float (small, and every score passes through
    # them); a classifier as large as ImageNet's (1.3M weights) is quantized
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.graph.initializer}
    heads = [n.name for n in graph.graph.node if n.op_type in ("Gemm", "MatMul")
             and max((sizes.get(i, 0) for i in n.input), default=0) < LARGE_MATRIX]
    staged = Path(tmp) / "int8.onnx"
    quantize_static(str(pre), str(staged), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=convs[:keep_float_convs] + heads)
    shutil.move(str(staged), out_path)
    return out_path


def _stamp(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    kept = [(e.key, e.value) for e in graph.metadata_props if e.key not in metadata]
    del graph.metadata_props[:]
    for key, value in kept + list(metadata.items()):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def quantize_checkpoint(folder: str | Path, calibration: np.ndarray, check: np.ndarray,
                        keep_float_convs: int = KEEP_FLOAT_CONVS, batch: int = 2) -> dict:
    """Make ``image-int8.onnx`` in a checkpoint folder and record it in its config.

    ``calibration`` and ``check`` are uint8 image batches ``[N, S, S, 3]``
    already in test-time views (training images and held-out images;
    :func:`view_pixels` makes them). The
    graph is kept only when its embeddings agree with fp32 (median cosine
    >= MIN_MEDIAN_COSINE); returns what was measured and whether it was kept.
    """
    from ..encoders.onnx_runtime import DIGEST_KEY, OnnxImagePath, export

    folder = Path(folder)
    model = checkpoint.load_dual(folder)
    meta = checkpoint.read_config(folder)
    reranker = checkpoint.load_reranker(folder) if "reranker" in meta else None
    digest = checkpoint.image_weights_digest(folder)
    target = folder / checkpoint.INT8_FILE
    with tempfile.TemporaryDirectory(prefix="xmr-quant-") as tmp:
        fp32 = export(model, reranker, Path(tmp) / "fp32.onnx", batch)
        staged = quantize_graph(fp32, Path(tmp) / "int8.onnx", calibration, batch, keep_float_convs)
        _stamp(staged, {DIGEST_KEY: digest, "xmr_keep_float_convs": str(keep_float_convs),
                        "xmr_calibration_images": str(len(calibration))})
        agree = agreement(OnnxImagePath(fp32, batch), OnnxImagePath(staged, batch), check)
        kept = agree.embedding_median >= MIN_MEDIAN_COSINE
        info = {"file": checkpoint.INT8_FILE, "keep_float_convs": keep_float_convs,
                "calibration_images": len(calibration), "agreement_vs_fp32": agree.to_dict(), "kept": kept}
        if kept:
            tmp_target = target.with_name(target.name + ".tmp")
            shutil.copyfile(staged, tmp_target)
            tmp_target.replace(target)
            checkpoint.save_checkpoint(folder, {"int8": info})
        else:
            log.warning("int8 graph not kept: median cosine to fp32 %.4f < %.3f", agree.embedding_median,
                        MIN_MEDIAN_COSINE)
    return info
