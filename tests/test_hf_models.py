"""Hugging Face CLIP-family encoders and BLIP rerankers, with tiny random
models saved by the test itself (no network)."""

import numpy as np
import pytest

from retrieval.engine import Engine

from .conftest import make_image
from .fakes import COLORS

# on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.databases


def _tokenizer():
    from transformers import AutoTokenizer

    from retrieval.encoders.minilm import package_dir

    return AutoTokenizer.from_pretrained(str(package_dir()))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = _tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, projection_dim=24),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=15, projection_dim=24),
        projection_dim=24,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 30},
                                                            crop_size={"height": 30, "width": 30}), tokenizer=tok)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tok = _tokenizer()
    cfg = BlipConfig(
        text_config=dict(vocab_size=tok.vocab_size + 2, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=15),
        projection_dim=24, image_text_hidden_size=24,
    )
    path = tmp_path_factory.mktemp("tiny-blip")
    BlipForImageTextRetrieval(cfg).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 30, "width": 30}), tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture
def photos(tmp_path):
    for name, color in COLORS.items():
        make_image(tmp_path / "photos" / f"{name}.jpg", color, size=(50, 40))
    return tmp_path / "photos"


def test_hf_clip_by_local_path(tmp_path, tiny_clip, photos):
    eng = Engine.open(tmp_path / "index", model=str(tiny_clip), reranker="none")
    assert eng.encoder.dim == 24 and eng.encoder.name.startswith("hf:")
    s = eng.index([photos])
    assert s.added == 4
    hits = eng.search("a red square", k=4)
    assert len(hits) == 4
    # The engine's ranking equals a direct computation with the model.
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip)
    paths = sorted(photos.iterdir())
    with torch.no_grad():
        pixels = proc.image_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        im = model.get_image_features(**pixels)
        tx = model.get_text_features(**proc.tokenizer(["a red square"], return_tensors="pt", padding=True))
    im = getattr(im, "pooler_output", im)
    tx = getattr(tx, "pooler_output", tx)
    sims = torch.nn.functional.normalize(im, dim=-1) @ torch.nn.functional.normalize(tx, dim=-1).T
    want = [str(paths[i]) for i in sims[:, 0].argsort(descending=True).tolist()]
    assert [h.path for h in hits] == want
    np.testing.assert_allclose([h.score for h in hits], sorted(sims[:, 0].tolist(), reverse=True), atol=1e-4)
    # texts embedded together (batched by length) equal each text embedded alone, in input order
    texts = ["a red square"] + [f"a {'very ' * (i % 9)}long caption number {i}" for i in range(90)]
    together = eng.encoder.encode_texts(texts)
    for i in (0, 5, 44, 90):
        np.testing.assert_allclose(together[i], eng.encoder.encode_texts([texts[i]])[0], atol=1e-5)
    eng.close()
    # reopening without --model uses the recorded one
    eng = Engine.open(tmp_path / "index", reranker="none")
    assert eng.encoder.name == f"hf:{tiny_clip}"


@pytest.mark.sqlite_only
def test_hf_clip_travels_to_other_processes(tiny_clip, photos):
    """What Ray workers and decoding processes get: a pickled preprocessing
    function and a pickled recipe that rebuilds the same model."""
    import pickle

    from PIL import Image

    from retrieval.encoders import create_encoder

    enc = create_encoder(str(tiny_clip))
    image = Image.open(photos / "red.jpg").convert("RGB")
    prepare = pickle.loads(pickle.dumps(enc.portable_prepare))
    np.testing.assert_array_equal(prepare(image), enc.prepare(image))
    rebuilt = pickle.loads(pickle.dumps(enc.portable_factory))()
    assert (rebuilt.name, rebuilt.version) == (enc.name, enc.version)
    np.testing.assert_allclose(rebuilt.encode_images([prepare(image)]), enc.encode_images([enc.prepare(image)]),
                               atol=1e-6)


def test_blip_reranker_by_local_path(tmp_path, tiny_clip, tiny_blip, photos):
    eng = Engine.open(tmp_path / "index", model=str(tiny_clip), reranker=str(tiny_blip))
    eng.index([photos])
    hits = eng.search("a green field", k=3, rerank=True, rerank_k=4)
    assert len(hits) == 3 and all(h.reranked for h in hits)
    assert all(0.0 <= h.score <= 1.0 for h in hits)  # ITM probabilities
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    cap = tmp_path / "c.txt"
    cap.write_text("red\ngreen\nblue\n")
    eng.import_captions(cap)
    caps = eng.caption(photos / "blue.jpg", k=2, rerank=True, rerank_k=3)
    assert len(caps) == 2 and all(c.reranked for c in caps)
