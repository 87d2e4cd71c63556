"""Choosing a model's query-bank normalisation on the dev split.

The bank is built from the train split (``querybank.bank_from_split``); beta
and alpha are picked from a small grid by dual-encoder rsum on dev.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from ..encoders.querybank import QueryBank
from ..metrics import retrieval_report

BETAS = (10.0, 15.0, 20.0)
ALPHAS = (0.75, 1.0, 1.25)


def corrected_scores(bank: QueryBank | None, img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image->text scores, text->image scores) as ``[N_img, N_txt]`` matrices:
    the cosine minus the bias of the item being ranked."""
    sim = img @ txt.T
    if bank is None:
        return sim, sim
    return sim - bank.text_bias(txt)[None, :], sim - bank.image_bias(img)[:, None]


def score_settings(bank: QueryBank, img: np.ndarray, txt: np.ndarray, text_image: np.ndarray) -> list[dict]:
    """Dev rsum of every (beta, alpha) of the grid, best first; the first row is no bank."""
    rows = []
    for setting in [None] + list(product(BETAS, ALPHAS)):
        b = None if setting is None else bank.with_settings(*setting)
        s_i2t, s_t2i = corrected_scores(b, img, txt)
        rep = retrieval_report(s_i2t, text_image, sim_t2i=s_t2i)
        rows.append({"querybank": None if setting is None else {"beta": setting[0], "alpha": setting[1]},
                     "report": rep})
    return rows[:1] + sorted(rows[1:], key=lambda r: -r["report"]["rsum"])
