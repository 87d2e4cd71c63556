"""`xmr retune-text-head`: the text head retrained against a fixed image side."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from retrieval.cli import cli
from retrieval.encoders.memory import MemorySettings, expand_tensors, expand_texts
from retrieval.training.text_head import crop_box, random_crops


def test_crop_boxes_stay_inside_the_image_and_within_their_size():
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (500, 333), (40, 900), (3, 2)]:
        for _ in range(200):
            x0, y0, x1, y1 = crop_box(width, height, rng, (0.5, 0.75))
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            # side fraction up to 0.75, aspect up to 4/3: never more than ~0.87 of a side
            assert (x1 - x0) <= 0.87 * width + 1 and (y1 - y0) <= 0.87 * height + 1
            if min(width, height) >= 40:
                assert (x1 - x0) >= 0.43 * width - 1 and (y1 - y0) >= 0.43 * height - 1


def test_random_crops_are_reproducible_and_differ():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    a = random_crops(img, 4, np.random.default_rng([0, 7]), (0.5, 0.75))
    b = random_crops(img, 4, np.random.default_rng([0, 7]), (0.5, 0.75))
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    assert len({np.asarray(x).tobytes() for x in a}) == 4


def test_training_memory_equals_the_engines_text_memory():
    """The head learns with the text memory the engine applies at query time:
    the tensor form it trains through gives memory.expand_texts' vectors, and
    gradients reach the texts."""
    rng = np.random.default_rng(0)

    def unit(n, d=16):
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    texts, keys, images = unit(30), unit(50), unit(12)
    key_owner = rng.integers(0, 12, 50)
    text_owner = rng.integers(0, 12, 30)
    memory = MemorySettings(0.3)
    want = expand_texts(texts, keys, images, key_owner, memory, exclude=text_owner)
    t = torch.from_numpy(texts).requires_grad_(True)
    got = expand_tensors(t, torch.from_numpy(keys), torch.from_numpy(images), torch.from_numpy(key_owner), memory,
                         torch.from_numpy(text_owner))
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-5)
    got.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_retune_text_head_keeps_the_image_side_and_can_be_upgraded_to(tmp_path, flickr8k):
    """A retuned copy of the default model: the image file is byte for byte
    the same (so the image side and the int8 graph hold and `xmr upgrade`
    applies), the word states the reranker reads are unchanged, and the text
    head and query bank are the ones the run chose."""
    from retrieval.encoders import builtin_models, checkpoint, create_encoder

    out = tmp_path / "retuned"
    res = CliRunner().invoke(cli, ["retune-text-head", "xmr-lite2", "--dataset", str(flickr8k), "--out", str(out),
                                   "--limit", "60", "--epochs", "3", "--crops", "2", "--lr", "3e-3"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [h["epoch"] for h in info["history"]] == [0, 1, 2, 3]
    assert info["dev_after"]["rsum"] == max(h["dev_rsum"] for h in info["history"])
    shipped_dir = builtin_models()["xmr-lite2"]
    assert (out / checkpoint.IMAGE_FILE).read_bytes() == (shipped_dir / checkpoint.IMAGE_FILE).read_bytes()
    assert checkpoint.image_side_digest(out) == checkpoint.image_side_digest(shipped_dir)
    meta = checkpoint.read_config(out)
    assert meta["text_head_retune"]["options"]["crops"] == 2

    shipped = create_encoder("xmr-lite2", device="cpu")
    new = create_encoder(str(out), device="cpu")
    assert new.image_side() == shipped.image_side() and new.version != shipped.version
    texts = ["a dog runs on the beach .", "two children play in the snow ."]
    _, words_a, _ = shipped.text_states(texts)
    _, words_b, _ = new.text_states(texts)
    torch.testing.assert_close(words_a, words_b)
    # the head the run kept is the one loaded (text.safetensors overrides the image file's copy)
    head = checkpoint.load_dual(out).text_head.weight
    if info["best_epoch"] > 0:
        assert not torch.equal(head, checkpoint.load_dual(shipped_dir).text_head.weight)
    # the bank's captions are embedded by the new head: the first train captions
    from retrieval.datasets import load_dataset, split_records

    train = split_records(load_dataset(str(flickr8k)), "train")[:60]
    first = [train[0].captions[0], train[0].captions[1]]
    np.testing.assert_allclose(new.querybank.texts[:2], new.tower_texts(first), atol=2e-3)
    assert len(new.querybank.images) == 60
