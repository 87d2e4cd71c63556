"""GPU checks, run on the GPU machine (`pytest -m gpu`): CUDA results equal CPU results."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_encoder_and_reranker_on_cuda_match_cpu():
    import torch

    from reranker.base import ImageCandidate
    from retrieval.encoders import create_encoder
    from reranker.xmr import XmrReranker

    assert torch.cuda.is_available(), "no CUDA device"
    cpu = create_encoder("xmr-lite2", device="cpu")
    cpu.backend = "torch"
    gpu = create_encoder("xmr-lite2", device="cuda")
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (260, 260, 3), dtype=np.uint8) for _ in range(6)]
    e_cpu, t_cpu = cpu.encode_images_with_tokens(pixels)
    e_gpu, t_gpu = gpu.encode_images_with_tokens(pixels)
    assert (e_cpu * e_gpu).sum(1).min() > 0.99  # bf16 autocast on the GPU
    texts = ["a dog runs on the beach", "two children play football", "a man climbs a rock"]
    assert (cpu.encode_texts(texts) * gpu.encode_texts(texts)).sum(1).min() > 0.99
    cands_cpu = [ImageCandidate(i, e_cpu[i], t_cpu[i]) for i in range(6)]
    cands_gpu = [ImageCandidate(i, e_gpu[i], t_gpu[i]) for i in range(6)]
    q = texts[0]
    s_cpu = XmrReranker(cpu.reranker_model, cpu.text_states, cpu.fusion_weight).score_text_images(q, cpu.encode_texts([q])[0], cands_cpu)
    s_gpu = XmrReranker(gpu.reranker_model, gpu.text_states, gpu.fusion_weight).score_text_images(q, gpu.encode_texts([q])[0], cands_gpu)
    np.testing.assert_allclose(s_cpu, s_gpu, atol=0.5)
    assert np.argmax(s_cpu) == np.argmax(s_gpu)


def test_views_made_on_the_gpu_equal_the_cpu_views():
    import torch

    from retrieval.encoders.preprocess import VIEWS, view_batch

    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (16, 260, 260, 3), dtype=np.uint8)
    on_gpu = torch.from_numpy(batch).cuda()
    for view in VIEWS:
        assert np.array_equal(view_batch(batch, view), view_batch(on_gpu, view).cpu().numpy()), view


def test_query_bank_index_on_gpu_matches_cpu():
    from indexer.vectors import IndexSpec, VectorIndex, gpu_available
    from retrieval.encoders.querybank import augment_items, augment_queries

    assert gpu_available(), "faiss sees no GPU"
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = augment_items(x, rng.normal(0.8, 0.03, 5000))
    q = augment_queries(x[:20] + 0.1, corrected=True)
    cpu, gpu = (VectorIndex(257, IndexSpec("IDMap2,Flat"), use_gpu=flag) for flag in (False, True))
    for index in (cpu, gpu):
        index.add(np.arange(5000), items)
    s1, i1 = cpu.search(q, 10)
    s2, i2 = gpu.search(q, 10)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    assert (i1 == i2).mean() > 0.99
