"""GPU checks, run on the GPU machine (`pytest -m gpu`): CUDA results equal CPU results."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_encoder_and_reranker_on_cuda_match_cpu():
    import torch

    from reranker.base import ImageCandidate
    from reranker.xmr import XmrReranker
    from retrieval.encoders import create_encoder

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
    s_cpu = XmrReranker(cpu.reranker_model, cpu.text_states, cpu.fusion_weight).score_text_images(
        q, cpu.encode_texts([q])[0], cands_cpu)
    s_gpu = XmrReranker(gpu.reranker_model, gpu.text_states, gpu.fusion_weight).score_text_images(
        q, gpu.encode_texts([q])[0], cands_gpu)
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


def test_engine_on_cuda_indexes_and_answers_like_the_cpu(mini_images, tmp_path, monkeypatch):
    """The whole engine on CUDA (decoding threads, pinned batches, views made
    on the GPU, bf16 towers, FAISS on the GPU, reranking) ranks the 32
    full-size photos of flickr8k-mini as the CPU's PyTorch path does."""
    from retrieval.engine import Engine

    monkeypatch.setenv("XMR_BACKEND", "torch")  # the CPU side in float, as on the GPU (no int8 graph there)
    queries = ["a dog runs through the grass", "children playing outside", "a man riding a bike",
               "people standing in the snow", "a girl in a pink dress"]
    answers, similar, status = {}, {}, None
    for device in ("cpu", "cuda"):
        engine = Engine.open(tmp_path / device, device=device)
        summary = engine.index([mini_images], batch_size=16)
        assert summary.added == 32 and not summary.skipped
        answers[device] = [[hit.path.rsplit("/", 1)[-1] for hit in engine.search(q, k=5)] for q in queries]
        first = sorted(mini_images.iterdir())[0]
        similar[device] = [hit.path.rsplit("/", 1)[-1] for hit in engine.similar(first, k=5)]
        status = engine.status()
        engine.close()
    assert status["gpu"] is True, "FAISS did not search on the GPU"
    overlap = [len(set(a) & set(b)) for a, b in zip(answers["cpu"], answers["cuda"])]
    assert min(overlap) >= 3 and sum(overlap) >= 4 * len(queries), (answers, overlap)
    assert all(b[0] in a[:3] for a, b in zip(answers["cpu"], answers["cuda"])), answers
    assert len(set(similar["cpu"]) & set(similar["cuda"])) >= 4, similar
