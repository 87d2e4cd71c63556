"""Query-bank normalisation: the bias math and its FAISS form."""

import numpy as np

from indexer.vectors import IndexSpec, VectorIndex, choose_spec, spec_still_fits
from retrieval.encoders.base import l2_normalize
from retrieval.encoders.querybank import QueryBank, augment_items, augment_queries, bank_from_split, log_sum_exp_bias


def test_bias_is_the_scaled_log_sum_exp_and_stable():
    rng = np.random.default_rng(1)
    items, bank = l2_normalize(rng.standard_normal((7, 8))), l2_normalize(rng.standard_normal((30, 8)))
    want = np.log(np.exp(20 * items @ bank.T).sum(1)) / 20
    assert np.allclose(log_sum_exp_bias(items, bank, 20.0, chunk=3), want, atol=1e-5)
    # a huge beta would overflow a naive exp; the stable form tends to the max similarity
    assert np.allclose(log_sum_exp_bias(items, bank, 1e4), (items @ bank.T).max(1), atol=1e-3)


def test_augmented_inner_product_is_cosine_minus_bias():
    rng = np.random.default_rng(2)
    items, queries = l2_normalize(rng.standard_normal((50, 8))), l2_normalize(rng.standard_normal((3, 8)))
    bias = rng.uniform(0, 0.5, 50).astype(np.float32)
    index = VectorIndex(9, IndexSpec("IDMap2,Flat"), use_gpu=False)
    index.add(np.arange(50), augment_items(items, bias))
    scores, ids = index.search(augment_queries(queries, corrected=True), 5)
    want = queries @ items.T - bias[None]
    assert np.array_equal(ids, np.argsort(-want, axis=1)[:, :5])
    assert np.allclose(scores, np.sort(want, axis=1)[:, ::-1][:, :5], atol=1e-5)
    plain, _ = index.search(augment_queries(queries, corrected=False), 1)
    assert np.allclose(plain[:, 0], (queries @ items.T).max(1), atol=1e-5)


def test_bank_roundtrip_and_split_selection(tmp_path):
    rng = np.random.default_rng(3)
    texts, images = l2_normalize(rng.standard_normal((12, 8))), l2_normalize(rng.standard_normal((4, 8)))
    owner = np.repeat(np.arange(4), 3)
    t, i = bank_from_split(texts, images, owner, captions_per_image=2)
    assert len(t) == 8 and np.array_equal(t[:2], texts[:2]) and np.array_equal(t[2:4], texts[3:5])
    bank = QueryBank(t, i, beta=12.0, alpha=0.5)
    bank.save(tmp_path)
    back = QueryBank.load(tmp_path, beta=12.0, alpha=0.5)
    assert np.allclose(back.image_bias(images), bank.image_bias(images), atol=2e-3)  # stored as fp16
    assert QueryBank.load(tmp_path / "nowhere", 1.0, 1.0) is None


def test_index_type_is_kept_while_it_fits_with_slack():
    assert spec_still_fits(choose_spec(1000), 1000)
    assert spec_still_fits(choose_spec(50_000), 60_000)  # exact search a little past the limit
    assert not spec_still_fits(choose_spec(50_000), 70_000)
    ivf = choose_spec(100_000)
    assert spec_still_fits(ivf, 100_000) and spec_still_fits(ivf, 150_000)
    assert not spec_still_fits(ivf, 1_000_000)  # nlist far below the ideal: rebuild
    assert not spec_still_fits(ivf, 30_000)  # shrunk: back to exact search
