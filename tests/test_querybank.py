"""Query-bank normalisation: the bias math and its FAISS form."""

import numpy as np
import pytest

from indexer.vectors import IndexSpec, VectorIndex, choose_spec, spec_still_fits
from retrieval.encoders.base import l2_normalize
from retrieval.encoders.memory import MemorySettings, expand_texts
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
    t, i, o = bank_from_split(texts, images, owner, captions_per_image=2)
    assert len(t) == 8 and np.array_equal(t[:2], texts[:2]) and np.array_equal(t[2:4], texts[3:5])
    assert o.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    bank = QueryBank(t, i, beta=12.0, alpha=0.5, text_owner=o)
    bank.save(tmp_path)
    back = QueryBank.load(tmp_path, beta=12.0, alpha=0.5, memory=MemorySettings(0.3, k=2))
    assert back.text_owner.tolist() == o.tolist() and back.memory.weight == 0.3
    assert np.allclose(back.with_memory(None).image_bias(images), bank.image_bias(images), atol=2e-3)  # fp16
    assert QueryBank.load(tmp_path / "nowhere", 1.0, 1.0) is None
    # a bank saved without owners loads, but cannot carry a memory
    QueryBank(t, i).save(tmp_path)
    assert QueryBank.load(tmp_path, 12.0, 0.5).text_owner is None
    with pytest.raises(ValueError, match="--write-bank"):
        QueryBank.load(tmp_path, 12.0, 0.5, memory=MemorySettings(0.3))


def test_text_memory_moves_a_text_towards_the_images_of_similar_bank_captions():
    # bank: captions 0-1 belong to image 0, 2-3 to image 1; images are far from the captions
    e = np.eye(6, dtype=np.float32)
    keys = np.stack([e[0], e[0] + 0.1 * e[1], e[2], e[2] + 0.1 * e[3]])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    images, owner = np.stack([e[4], e[5]]), np.array([0, 0, 1, 1])
    text = (e[0] + 0.2 * e[2])[None] / np.linalg.norm(e[0] + 0.2 * e[2])
    settings = MemorySettings(0.5, temperature=20.0, k=2)
    out = expand_texts(text, keys, images, owner, settings)
    assert np.isclose(np.linalg.norm(out), 1.0, atol=1e-5)
    assert out[0, 4] > 0.3 and out[0, 5] < 0.05  # pulled to image 0, whose captions it resembles
    assert np.allclose(expand_texts(text, keys, images, owner, MemorySettings(0.0)), text)
    # a bank caption does not vote for its own image when excluded
    own = expand_texts(keys[:1], keys, images, owner, settings, exclude=np.array([0]))
    assert own[0, 5] > own[0, 4]
    # chunking changes nothing
    many = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    assert np.allclose(expand_texts(many, keys, images, owner, settings, chunk=2),
                       expand_texts(many, keys, images, owner, settings), atol=1e-6)
    with pytest.raises(ValueError):
        MemorySettings(0.3, k=0)


def test_the_bank_with_a_memory_normalises_against_expanded_bank_captions():
    rng = np.random.default_rng(4)
    texts, images = l2_normalize(rng.standard_normal((20, 8))), l2_normalize(rng.standard_normal((10, 8)))
    owner = np.repeat(np.arange(10), 2)
    plain = QueryBank(texts, images, 15.0, 1.0, owner)
    mem = plain.with_memory(MemorySettings(0.3, k=3))
    queries = l2_normalize(rng.standard_normal((4, 8)))
    assert np.allclose(plain.expand(queries), queries)
    moved = mem.expand(queries)
    assert not np.allclose(moved, queries) and np.allclose(np.linalg.norm(moved, axis=1), 1, atol=1e-5)
    bank_queries = expand_texts(texts, texts, images, owner, mem.memory, exclude=owner)
    want = log_sum_exp_bias(images[:3], bank_queries, 15.0) - log_sum_exp_bias(images[:1000], bank_queries, 15.0).mean()
    assert np.allclose(mem.image_bias(images[:3]), want, atol=1e-5)
    assert mem.with_settings(20.0, 0.5).memory == mem.memory


def test_index_type_is_kept_while_it_fits_with_slack():
    assert spec_still_fits(choose_spec(1000), 1000)
    assert spec_still_fits(choose_spec(50_000), 60_000)  # exact search a little past the limit
    assert not spec_still_fits(choose_spec(50_000), 70_000)
    ivf = choose_spec(100_000)
    assert spec_still_fits(ivf, 100_000) and spec_still_fits(ivf, 150_000)
    assert not spec_still_fits(ivf, 1_000_000)  # nlist far below the ideal: rebuild
    assert not spec_still_fits(ivf, 30_000)  # shrunk: back to exact search
