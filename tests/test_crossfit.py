"""Cross-fitted image embeddings (retrieval/training/crossfit.py)."""

import numpy as np
import pytest
import torch

from retrieval.encoders.xmr_model import XmrDualModel, XmrModelConfig
from retrieval.metrics import retrieval_report
from retrieval.training.crossfit import crossfit_embeddings, fold_ids
from retrieval.training.locked import head_state, image_embeddings
from retrieval.training.wise import WiseOptions, fit_image_head


def test_fold_ids():
    f = fold_ids(11, 3, seed=1)
    assert sorted(np.bincount(f)) == [3, 4, 4]
    assert not np.array_equal(f, fold_ids(11, 3, seed=2))
    with pytest.raises(ValueError):
        fold_ids(5, 1)


@pytest.mark.slow
def test_a_held_out_image_is_not_memorised():
    """Random features with random captions: nothing to learn but the pairs
    themselves. A head trained on every image ranks them all well; the
    cross-fitted embeddings, made by heads that never saw their image, rank
    near chance, and the model keeps the heads it came with."""
    torch.manual_seed(0)
    model = XmrDualModel(XmrModelConfig("efficientnet-lite0", 224, embed_dim=32), pretrained=False).eval()
    n, caps = 60, 2
    pooled = torch.randn(n, 1, 1280)
    text = torch.nn.functional.normalize(torch.randn(n * caps, 32), dim=-1)
    owner = np.repeat(np.arange(n), caps)
    opts = WiseOptions(epochs=60, lr=1e-2, batch_size=32)
    before = head_state(model)
    cf = crossfit_embeddings(model, pooled, text, owner, folds=3, opts=opts)
    assert cf.shape == (n, 32) and np.allclose(np.linalg.norm(cf, axis=1), 1, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in head_state(model).items())
    fit_image_head(model, pooled, text, owner, opts)
    with torch.no_grad():
        seen = image_embeddings(model, pooled).numpy()
    fitted = retrieval_report(seen @ text.numpy().T, owner)["t2i"]["R@1"]
    held_out = retrieval_report(cf @ text.numpy().T, owner)["t2i"]["R@1"]
    assert fitted > 50 and held_out < 15, (fitted, held_out)
