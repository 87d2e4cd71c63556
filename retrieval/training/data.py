"""Training data held in memory: every image of a split decoded once to the
model's input size (uint8), every caption tokenised once."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from indexer.decode import BadImage, decode_image

from ..datasets import ImageRecord
from ..encoders.preprocess import squash_resize

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    pixels: torch.Tensor  # uint8 [N, S, S, 3]
    input_ids: torch.Tensor  # long [T, L]
    attention_mask: torch.Tensor  # long [T, L]
    text_image: torch.Tensor  # long [T]: index of each caption's image
    captions: list[str]
    names: list[str]

    @property
    def n_images(self) -> int:
        return self.pixels.shape[0]

    @property
    def n_texts(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "SplitData":
        return SplitData(
            self.pixels.to(device), self.input_ids.to(device), self.attention_mask.to(device),
            self.text_image.to(device), self.captions, self.names,
        )


def load_pixels(paths, size: int, threads: int = 8, progress=None) -> np.ndarray:
    """Decode and squash-resize every path; a bad file raises (datasets must be clean)."""

    def one(path):
        try:
            return squash_resize(decode_image(path, draft_size=size).image, size)
        except BadImage as exc:
            raise RuntimeError(f"{path}: {exc}") from None

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, arr in enumerate(pool.map(one, paths)):
            out[i] = arr
            if progress is not None:
                progress(1)
    return out


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask, every row padded to ``max_len`` (a ``MiniLMTokenizer``)."""
    return tokenizer(texts, max_len, pad_to_max=True)


def build_split(
    records: list[ImageRecord], size: int, tokenizer, max_len: int, threads: int = 8, progress=None
) -> SplitData:
    pixels = load_pixels([r.path for r in records], size, threads, progress)
    captions, text_image = [], []
    for i, r in enumerate(records):
        for c in r.captions:
            captions.append(c)
            text_image.append(i)
    ids, mask = tokenize(tokenizer, captions, max_len)
    return SplitData(
        torch.from_numpy(pixels), ids, mask, torch.tensor(text_image, dtype=torch.long),
        captions, [r.filename for r in records],
    )


def retuning_splits(dataset: str, images: str | None, limit: int | None) -> dict[str, list[ImageRecord]]:
    """The train split (what a retuning learns on) and the dev split (what
    selects), each cut to its first ``limit`` images when given."""
    from ..datasets import load_dataset, split_records

    records = load_dataset(dataset, images)
    out = {}
    for split in ("train", "dev"):
        out[split] = split_records(records, split)[:limit] if limit else split_records(records, split)
        if len(out[split]) < 2:
            raise ValueError(f"the {split} split of {dataset} has {len(out[split])} images; retuning needs more")
    return out


class StepProgress:
    """A progress bar over the steps of a training loop, opened at its first
    step (after the evaluation of the starting weights); ``progress_factory``
    None shows nothing."""

    def __init__(self, progress_factory, label: str, epochs: int):
        self.factory, self.label, self.epochs, self.bar = progress_factory, label, epochs, None

    def __call__(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if self.factory is None:
            return
        if self.bar is None:
            self.bar = self.factory(self.label, steps * self.epochs)
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
