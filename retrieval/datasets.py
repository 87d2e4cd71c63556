"""Readers for image-caption datasets: the Flickr8k folder layout and the
Karpathy-split JSON (Flickr8k, Flickr30k, COCO)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError

SPLITS = ("train", "dev", "test")
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


@dataclass
class ImageRecord:
    filename: str
    path: Path
    split: str
    captions: list[str] = field(default_factory=list)


def load_dataset(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[ImageRecord]:
    """Records of a dataset in Flickr8k layout (a folder) or Karpathy JSON (a file)."""
    path = Path(path)
    if path.is_dir():
        return _load_flickr_folder(path, images_dir)
    if path.is_file() and path.suffix.lower() == ".json":
        if images_dir is None:
            images_dir = _guess_images_dir(path.parent)
        return _load_karpathy(path, Path(images_dir))
    raise DatasetError(
        f"{path}: expected a Flickr8k-layout folder or a Karpathy-split .json file"
    )


def split_records(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    out = [r for r in records if r.split == split]
    if not out:
        raise DatasetError(f"the dataset has no images in the {split!r} split")
    return out


def _guess_images_dir(root: Path) -> Path:
    for name in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images"):
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"cannot find the image folder next to the JSON in {root}; pass --images DIR")


def _load_flickr_folder(root: Path, images_dir) -> list[ImageRecord]:
    text_dir = root / "Flickr8k_text"
    token_file = text_dir / "Flickr8k.token.txt"
    if not token_file.is_file():
        json_file = root / "dataset_flickr8k.json"
        if json_file.is_file():
            return _load_karpathy(json_file, Path(images_dir) if images_dir else _guess_images_dir(root))
        raise DatasetError(f"{root}: no Flickr8k_text/Flickr8k.token.txt and no dataset_flickr8k.json")
    img_dir = Path(images_dir) if images_dir else _guess_images_dir(root)
    from .captions import parse_flickr_token_lines

    captions: dict[str, list[str]] = {}
    with open(token_file, encoding="utf-8", errors="replace") as f:
        for name, caption in parse_flickr_token_lines(f):
            captions.setdefault(name, []).append(caption)
    records = []
    for split, fname in _FLICKR_SPLIT_FILES.items():
        split_file = text_dir / fname
        if not split_file.is_file():
            continue
        for line in split_file.read_text(encoding="utf-8").split():
            name = line.strip()
            if name and name in captions:
                records.append(ImageRecord(name, img_dir / name, split, captions[name]))
    if not records:
        raise DatasetError(f"{root}: no split lists (Flickr_8k.*Images.txt) name captioned images")
    return records


def _load_karpathy(json_path: Path, img_dir: Path) -> list[ImageRecord]:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        images = data["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{json_path}: not a Karpathy-split JSON ({exc})") from None
    records = []
    for item in images:
        split = item.get("split", "train")
        split = {"val": "dev", "restval": "train"}.get(split, split)
        sub = item.get("filepath", "")
        path = img_dir / sub / item["filename"] if sub and (img_dir / sub).is_dir() else img_dir / item["filename"]
        caps = [s["raw"].strip() for s in item.get("sentences", []) if s.get("raw", "").strip()]
        records.append(ImageRecord(item["filename"], path, split, caps))
    return records
