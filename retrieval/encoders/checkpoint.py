"""Checkpoints: safetensors weights plus one JSON file with the configs, the
training arguments and the metrics. Large tensors are stored in fp16."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError

FORMAT = "xmr-checkpoint"
VERSION = 1
CONFIG = "config.json"
IMAGE_FILE = "image.safetensors"
TEXT_FILE = "text.safetensors"
RERANKER_FILE = "reranker.safetensors"
INT8_FILE = "image-int8.onnx"  # the image path quantized for ONNX Runtime (retrieval/training/quantize.py)
_FP16_MIN_NUMEL = 4096


def _pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.numel() >= _FP16_MIN_NUMEL:
            v = v.half()
        out[k] = v.contiguous().clone()
    return out


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(out_dir: str | os.PathLike, config: dict, dual=None, reranker=None) -> Path:
    """Write the given parts and ``config`` (merged into an existing config.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_config(out) if (out / CONFIG).is_file() else {"format": FORMAT, "version": VERSION}
    meta.update(config)
    if dual is not None:
        state = dual.state_dict()
        keys = dual.checkpoint_keys()
        _atomic_save(_pack({k: state[k] for k in keys if not is_text_key(k)}), out / IMAGE_FILE)
        _atomic_save(_pack({k: state[k] for k in keys if is_text_key(k)}), out / TEXT_FILE)
        meta["model"] = dual.config.to_dict()
    if reranker is not None:
        _atomic_save(_pack(reranker.state_dict()), out / RERANKER_FILE)
        meta["reranker"] = reranker.config.to_dict()
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG)
    return out


def require_new_folder(out: str | os.PathLike) -> None:
    """Refuse a checkpoint folder that already holds anything."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder")


def copy_checkpoint(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Copy the files of checkpoint ``src`` into the new folder ``out`` (refused
    if it holds anything) and return the source's config."""
    import shutil

    src, out = Path(src), Path(out)
    require_new_folder(out)
    meta = read_config(src)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return meta


def is_text_key(key: str) -> bool:
    """Whether a dual-encoder weight belongs to the text side (text.safetensors).

    Checkpoints written before the text head counted as text side keep it in
    image.safetensors; a later text.safetensors that carries one (`xmr
    retune-text-head`) replaces it at load time, so the image file, and with
    it the image side's digest, stays byte for byte the same."""
    return key.startswith(("text_tower.", "text_head.", "text_mlp."))


def save_text_side(out_dir: str | os.PathLike, dual, config: dict) -> Path:
    """Rewrite only text.safetensors (top text layers and the text head) and
    merge ``config`` into config.json; the image file is not touched."""
    out = Path(out_dir)
    state = dual.state_dict()
    _atomic_save(_pack({k: state[k] for k in dual.checkpoint_keys() if is_text_key(k)}), out / TEXT_FILE)
    return save_checkpoint(out, config)


REGION_PROJECTION = "level_proj."  # the reranker's part that makes the region tokens an index stores
# config.json keys that change nothing an index stores (left out of the model version)
UNVERSIONED_KEYS = ("reranker_retune", "earlier_versions", "default_rerank_k")
# the model config keys that shape the image side (the rest is the text side)
IMAGE_CONFIG_KEYS = ("image_tower", "image_size", "embed_dim", "region_grid")


def image_weights_digest(ckpt_dir: str | os.PathLike) -> str:
    """sha256 of the weights the image path is made of (image tower + head, and the
    reranker's region projection): a derived file such as the int8 graph names
    it, so a retrained checkpoint never runs a stale graph. Retuning the rest
    of the reranker (`xmr retune-reranker`) leaves it unchanged."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    image = Path(ckpt_dir) / IMAGE_FILE
    if image.is_file():
        h.update(IMAGE_FILE.encode())
        h.update(image.read_bytes())
    reranker = Path(ckpt_dir) / RERANKER_FILE
    if reranker.is_file():
        with safe_open(str(reranker), "pt") as f:
            for key in sorted(k for k in f.keys() if k.startswith(REGION_PROJECTION)):
                h.update(key.encode())
                h.update(f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_side_digest(ckpt_dir: str | os.PathLike) -> str:
    """sha256 of what an index's stored image vectors and region tokens depend
    on inside a checkpoint: the image weights (:func:`image_weights_digest`),
    the shipped int8 graph that computes them on a CPU, and the image keys of
    the model config. Checkpoints that differ only on the text side (text
    tower, query bank, text memory, the rest of the reranker) share it."""
    import hashlib

    h = hashlib.sha256(image_weights_digest(ckpt_dir).encode())
    int8 = Path(ckpt_dir) / INT8_FILE
    if int8.is_file():
        h.update(INT8_FILE.encode())
        h.update(int8.read_bytes())
    model = read_config(ckpt_dir).get("model", {})
    h.update(json.dumps({k: model.get(k) for k in IMAGE_CONFIG_KEYS}, sort_keys=True).encode())
    return h.hexdigest()


def version_bytes(ckpt_dir: str | os.PathLike) -> bytes:
    """The bytes of config.json that name the model: the file as written,
    less the keys that change nothing an index stores (so retuning the
    reranker does not invalidate indexes)."""
    raw = (Path(ckpt_dir) / CONFIG).read_bytes()
    meta = json.loads(raw)
    if not any(k in meta for k in UNVERSIONED_KEYS):
        return raw
    kept = {k: v for k, v in meta.items() if k not in UNVERSIONED_KEYS}
    return (json.dumps(kept, indent=2, sort_keys=True) + "\n").encode()


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not an xmr checkpoint (no {CONFIG})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xmr checkpoint (format {meta.get('format')!r})")
    return meta


def _load_into(module: torch.nn.Module, files: list[Path]) -> set[str]:
    """Load the files' tensors into ``module``; returns the keys loaded."""
    from safetensors.torch import load_file

    state = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint is incomplete, retrain or copy it again")
        state.update(load_file(str(f)))
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"checkpoint keys do not fit the model: {unexpected[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    # assign: the converted tensors become the parameters (no second copy)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    return set(state)


def load_dual(ckpt_dir: str | os.PathLike, pretrained_towers: bool = True):
    from .xmr_model import XmrDualModel, XmrModelConfig

    meta = read_config(ckpt_dir)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt_dir}: holds no dual encoder")
    # Every checkpoint stores the whole image tower (checkpoint_keys), so its
    # ImageNet weights are not loaded first only to be overwritten.
    model = XmrDualModel(XmrModelConfig.from_dict(meta["model"]), pretrained=pretrained_towers,
                         pretrained_image=False)
    image_file = Path(ckpt_dir) / IMAGE_FILE
    loaded = _load_into(model, [image_file, Path(ckpt_dir) / TEXT_FILE])
    missing = sorted(k for k in model.checkpoint_keys() if not k.startswith("text_tower.") and k not in loaded)
    if missing:
        raise CheckpointError(f"{image_file}: the image tower is incomplete (no {missing[:3]}); "
                              "retrain or copy the checkpoint again")
    return model.eval()


def load_reranker(ckpt_dir: str | os.PathLike):
    from reranker.model import CrossModalReranker, RerankerConfig

    meta = read_config(ckpt_dir)
    if "reranker" not in meta:
        raise CheckpointError(f"{ckpt_dir}: holds no reranker")
    model = CrossModalReranker(RerankerConfig.from_dict(meta["reranker"]))
    _load_into(model, [Path(ckpt_dir) / RERANKER_FILE])
    return model.eval()
