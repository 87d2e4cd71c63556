"""The reranking stage's interface: score a few candidate pairs well."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class ImageCandidate:
    """An image as the reranker sees it. ``tokens`` are stored region tokens
    (when the index has them); ``load`` decodes the image when a reranker needs pixels."""

    id: int | None
    embedding: np.ndarray
    tokens: np.ndarray | None = None
    load: Callable[[], object] | None = None


class Reranker(ABC):
    """Scores candidate pairs; the engine fuses them with the recall scores as
    ``final = score + fusion_weight * recall_score`` (:func:`fuse`)."""

    name: str
    #: weight of the first-stage (recall) score in the final score, chosen on dev
    fusion_weight: float = 0.0
    #: how many recalled candidates a search reranks unless asked otherwise;
    #: 0 for a reranker that measured no gain over recall on dev
    default_k: int = 20

    @abstractmethod
    def score_text_images(self, text: str, text_emb: np.ndarray, images: list[ImageCandidate]) -> np.ndarray:
        """Matching scores (higher is better) of one text against each image."""

    @abstractmethod
    def score_image_texts(self, image: ImageCandidate, texts: list[str], text_embs: np.ndarray) -> np.ndarray:
        """Matching scores of one image against each text."""


def fuse(rerank_scores: np.ndarray, recall_scores: np.ndarray, fusion_weight: float) -> np.ndarray:
    """The final score of reranked pairs."""
    return np.asarray(rerank_scores, np.float64) + fusion_weight * np.asarray(recall_scores, np.float64)


def rerank_order(first_stage: np.ndarray, rerank_scores: np.ndarray) -> np.ndarray:
    """Order of the reranked head: by rerank score, ties broken by the first stage."""
    return np.lexsort((-first_stage, -rerank_scores))
