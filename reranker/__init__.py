"""Rerankers: the cross-modal attention model (model.py), its losses, and
adapters to the :class:`~reranker.base.Reranker` interface."""

from .base import ImageCandidate, Reranker, rerank_order

__all__ = ["ImageCandidate", "Reranker", "rerank_order"]
