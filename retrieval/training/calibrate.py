"""Choosing a model's query-bank normalisation on the dev split.

The bank is built from the train split (``querybank.bank_from_split``); beta,
alpha and the text memory's weight (``memory.py``; its temperature and k
stay at their defaults) are picked from a small grid by dual-encoder rsum on
dev.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from ..encoders.memory import MemorySettings
from ..encoders.querybank import QueryBank
from ..metrics import retrieval_report

BETAS = (10.0, 15.0, 20.0)
ALPHAS = (0.75, 1.0, 1.25)
MEMORY_WEIGHTS = (0.0, 0.2, 0.3)


def memory_settings(weight: float) -> MemorySettings | None:
    return MemorySettings(weight) if weight > 0 else None


def bank_grid(bank: QueryBank, memory_weights=MEMORY_WEIGHTS):
    """``((memory weight, beta, alpha), bank with those settings)`` for every
    point of the grid; a bank without caption owners gets no memory. The
    settings of one weight share one expansion of the bank's captions."""
    for weight in (memory_weights if bank.text_owner is not None else (0.0,)):
        with_memory = bank.with_memory(memory_settings(weight))
        for beta, alpha in product(BETAS, ALPHAS):
            yield (weight, beta, alpha), with_memory.with_settings(beta, alpha)


def setting_fields(weight: float, beta: float, alpha: float) -> dict:
    """A grid point as report rows spell it (as config.json does)."""
    memory = memory_settings(weight)
    return {"querybank": {"beta": beta, "alpha": alpha}, "text_memory": memory.as_dict() if memory else None}


def corrected_scores(bank: QueryBank | None, img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image->text scores, text->image scores) as ``[N_img, N_txt]`` matrices:
    the cosine minus the bias of the item being ranked. ``txt`` are the text
    tower's embeddings; the bank's text memory, if it has one, is applied here."""
    if bank is None:
        sim = img @ txt.T
        return sim, sim
    txt = bank.expand(txt)
    sim = img @ txt.T
    return sim - bank.text_bias(txt)[None, :], sim - bank.image_bias(img)[:, None]


def score_settings(bank: QueryBank, img: np.ndarray, txt: np.ndarray, text_image: np.ndarray,
                   memory_weights=MEMORY_WEIGHTS) -> list[dict]:
    """Dev rsum of every (memory weight, beta, alpha) of the grid, best first;
    the first row is no bank."""
    sim = img @ txt.T
    rows = [{"querybank": None, "text_memory": None, "report": retrieval_report(sim, text_image)}]
    for setting, banked in bank_grid(bank, memory_weights):
        s_i2t, s_t2i = corrected_scores(banked, img, txt)
        rows.append({**setting_fields(*setting), "report": retrieval_report(s_i2t, text_image, sim_t2i=s_t2i)})
    return rows[:1] + sorted(rows[1:], key=lambda r: -r["report"]["rsum"])
