"""The reranker, its losses, metrics and checkpoints; a training smoke test."""

import json

import numpy as np
import pytest
import torch

from reranker.base import rerank_order
from reranker.losses import matching_loss, mine_hard_negatives, ranking_loss, sample_negatives
from reranker.model import CrossModalReranker, RerankerConfig
from retrieval.metrics import apply_rerank, i2t_ranks, retrieval_report, t2i_ranks

from .conftest import _dataset


def _inputs(b=3, levels=(40, 12), n=9, words=5, d=16):
    torch.manual_seed(0)
    lv = [torch.randn(b, n, c) for c in levels]
    w = torch.randn(b, words, 24)
    mask = torch.ones(b, words, dtype=torch.long)
    mask[0, 3:] = 0
    e = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    return lv, w, mask, e


CFG = dict(level_dims=[40, 12], level_tokens=9, word_dim=24, global_dim=16, width=32, heads=4, layers=2, dropout=0.0)


@pytest.mark.parametrize("change", [{}, {"two_way": False}, {"use_region_level": False}, {"use_word_level": False},
                                    {"use_global_level": False}])
def test_reranker_variants_score_pairs(change):
    model = CrossModalReranker(RerankerConfig(**CFG, **change)).eval()
    lv, w, mask, e = _inputs()
    out = model(model.project_regions(lv), w, mask, e, e)
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_padding_words_do_not_change_the_score():
    model = CrossModalReranker(RerankerConfig(**CFG)).eval()
    lv, w, mask, e = _inputs()
    r = model.project_regions(lv)
    a = model(r, w, mask, e, e)
    w2 = w.clone()
    w2[0, 3:] = 100.0  # garbage in padded positions
    b = model(r, w2, mask, e, e)
    torch.testing.assert_close(a, b)


def test_attention_block_equals_torch_multihead_attention():
    """The block computes nn.MultiheadAttention's own result on its weights
    (written out to skip a slow import at the first query)."""
    from reranker.model import _Attention

    torch.manual_seed(1)
    block = _Attention(32, 4, dropout=0.0).eval()
    x, ctx = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    for mask in (None, pad):
        ref, _ = block.attn(block.norm_q(x), block.norm_kv(ctx), block.norm_kv(ctx), key_padding_mask=mask,
                            need_weights=False)
        torch.testing.assert_close(block(x, ctx, mask), x + ref, atol=1e-5, rtol=1e-5)


def test_batch_independence():
    model = CrossModalReranker(RerankerConfig(**CFG)).eval()
    lv, w, mask, e = _inputs()
    r = model.project_regions(lv)
    full = model(r, w, mask, e, e)
    one = model(r[1:2], w[1:2], mask[1:2], e[1:2], e[1:2])
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)


def test_all_levels_off_is_refused():
    with pytest.raises(ValueError):
        CrossModalReranker(RerankerConfig(**{**CFG, "use_global_level": False, "use_region_level": False,
                                             "use_word_level": False}))


def test_hard_negative_mining_excludes_positives():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.95, 0.7, 0.3]])
    pos = torch.tensor([[True, False, False, False], [False, True, False, False]])
    pools = mine_hard_negatives(sim, pos, 2)
    assert pools.tolist() == [[1, 3], [2, 3]]
    g = torch.Generator().manual_seed(0)
    picks = sample_negatives(pools, 2, g)
    assert sorted(picks[0].tolist()) == [1, 3]


def test_losses_prefer_correct_order():
    pos = torch.tensor([5.0, 4.0])
    neg = torch.tensor([[-5.0, -4.0], [-3.0, -6.0]])
    assert matching_loss(pos, neg.reshape(-1)) < matching_loss(-pos, -neg.reshape(-1))
    assert ranking_loss(pos, neg) < ranking_loss(-pos, -neg)


def test_recall_metrics_against_hand_computed():
    # 2 images, 4 captions (2 each); image 0 finds its caption first, image 1 third.
    text_image = np.array([0, 0, 1, 1])
    sim = np.array([[0.9, 0.1, 0.5, 0.2], [0.8, 0.7, 0.3, 0.6]])
    assert i2t_ranks(sim, text_image).tolist() == [0, 2]
    assert t2i_ranks(sim, text_image).tolist() == [0, 1, 1, 0]
    rep = retrieval_report(sim, text_image)
    assert rep["i2t"]["R@1"] == 50.0 and rep["i2t"]["R@5"] == 100.0 and rep["t2i"]["R@1"] == 50.0
    lifted = apply_rerank(sim, np.array([1]), np.array([3]), np.array([-2.0]))
    assert i2t_ranks(lifted, text_image).tolist() == [0, 0]


def test_rerank_order_breaks_ties_by_first_stage():
    assert rerank_order(np.array([0.1, 0.9, 0.5]), np.array([1.0, 1.0, 2.0])).tolist() == [2, 1, 0]


def test_checkpoint_roundtrip(tmp_path):
    from retrieval.encoders import checkpoint

    model = CrossModalReranker(RerankerConfig(**CFG)).eval()
    checkpoint.save_checkpoint(tmp_path, {"fusion_weight": 3.0}, reranker=model)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "xmr-checkpoint" and meta["fusion_weight"] == 3.0
    loaded = checkpoint.load_reranker(tmp_path)
    lv, w, mask, e = _inputs()
    a = model(model.project_regions(lv), w, mask, e, e)
    b = loaded(loaded.project_regions(lv), w, mask, e, e)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # large tensors are stored in fp16


def test_dual_checkpoint_with_a_partial_image_tower_is_refused(tmp_path):
    """The image tower is built without its ImageNet weights when a checkpoint
    loads, so a checkpoint lacking some of them must not load half random."""
    import shutil

    from safetensors.torch import load_file, save_file

    from retrieval.encoders import builtin_models, checkpoint
    from retrieval.errors import CheckpointError

    src = builtin_models()["xmr-lite2"]
    for name in ("config.json", "image.safetensors", "text.safetensors"):
        shutil.copy(src / name, tmp_path / name)
    model = checkpoint.load_dual(tmp_path)
    ref = checkpoint.load_dual(src)
    key = "image_tower._conv_stem.weight"
    torch.testing.assert_close(model.state_dict()[key], ref.state_dict()[key], atol=0, rtol=0)
    state = load_file(str(tmp_path / "image.safetensors"))
    del state[key]
    save_file(state, str(tmp_path / "image.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load_dual(tmp_path)


@pytest.mark.parametrize("name", ["xmr-lite2", "xmr-lite2-open"])
def test_shipped_models_fit_the_budget_and_load_offline(name):
    from retrieval.encoders import builtin_models, create_encoder

    assert name in builtin_models()
    size = sum(f.stat().st_size for f in builtin_models()[name].iterdir())
    assert size < 40 * 1024 * 1024
    enc = create_encoder(name, device="cpu")
    v = enc.encode_texts(["a dog", "a dog", "two people climbing a mountain"])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.999 and v[0] @ v[2] < 0.9


def test_open_model_names_imagenet_classes_better_than_the_flickr_model(tmp_path):
    """The class channel at work: Imagenette photos of four ImageNet classes
    Flickr8k barely shows, classified through the engine by each model."""
    from retrieval.encoders import create_encoder
    from retrieval.engine import Engine

    root = _dataset("zeroshot") / "imagenette"
    classes = ("church", "golf_ball", "gas_pump", "parachute")
    photos = [(p, c.replace("_", " ")) for c in classes for p in sorted((root / c).iterdir())[:4]]
    right = {}
    for name in ("xmr-lite2-open", "xmr-lite2"):
        eng = Engine.open(tmp_path / name, create=True, reranker="none", encoder=create_encoder(name, device="cpu"))
        eng.index([str(p) for p, _ in photos])
        eng.import_labels([c.replace("_", " ") for c in classes])
        right[name] = sum(eng.caption(str(p), k=1, rerank=False)[0].image == c for p, c in photos)
        eng.close()
    assert right["xmr-lite2-open"] >= 12 and right["xmr-lite2-open"] > right["xmr-lite2"], right


def test_text_memory_moves_recall_embeddings_but_not_the_rerankers(mini_dataset):
    """The default model's text memory changes what recall ranks by (and helps
    on the 32 mini test photos), while the reranker keeps the tower's own
    embedding, as it was trained."""
    from indexer.decode import decode_image
    from retrieval.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.training.calibrate import corrected_scores

    def rsum(bank):
        s_i2t, s_t2i = corrected_scores(bank, img, raw)
        return retrieval_report(s_i2t, text_image, sim_t2i=s_t2i)["rsum"]

    enc = create_encoder("xmr-lite2", device="cpu")
    bank = enc.querybank
    assert bank.memory is not None and bank.memory.weight > 0 and len(bank.text_owner) == len(bank.texts)
    assert bank.text_owner.max() < len(bank.images)
    recs = load_dataset(mini_dataset)
    captions = [c for r in recs for c in r.captions]
    text_image = np.array([i for i, r in enumerate(recs) for _ in r.captions])
    raw = enc.tower_texts(captions)
    moved = enc.encode_texts(captions)
    cos = (raw * moved).sum(1)
    assert cos.max() < 0.9999 and cos.min() > 0.8  # every caption moves, none far
    np.testing.assert_allclose(enc.text_states(captions[:3])[0].numpy(), raw[:3], atol=1e-5)
    img = enc.encode_images([enc.prepare(decode_image(r.path, enc.input_size).image) for r in recs])
    with_memory, without = rsum(bank), rsum(bank.with_memory(None))
    # measured 569.4 against 566.9 (32 photos: one caption moves rsum by 0.6)
    assert with_memory > without, (with_memory, without)


def test_batched_text_embeddings_keep_input_order():
    """Captions are embedded in batches sorted by length; each row must still
    be its own caption's embedding, as when embedded alone."""
    from retrieval.encoders import create_encoder

    enc = create_encoder("xmr-lite2", device="cpu")
    texts = [("a dog " * (i % 7 + 1)) + f"number {i}" for i in range(150)] + ["x", "two people climbing a mountain"]
    together = enc.encode_texts(texts)
    for i in (0, 1, 6, 77, 149, 150, 151):
        np.testing.assert_allclose(together[i], enc.encode_texts([texts[i]])[0], atol=1e-5)


@pytest.mark.slow
def test_full_size_photos_score_like_the_224_copies(mini_dataset, flickr8k):
    """The mini set holds full-size originals of 32 test photos; their squashed
    224-pixel copies are in flickr8k. Embeddings and retrieval must agree."""
    from indexer.decode import decode_image
    from retrieval.datasets import load_dataset
    from retrieval.encoders import create_encoder

    enc = create_encoder("xmr-lite2", device="cpu")
    recs = load_dataset(mini_dataset)
    full = enc.encode_images([enc.prepare(decode_image(r.path).image) for r in recs])
    small = enc.encode_images([enc.prepare(decode_image(flickr8k / "Flicker8k_Dataset" / r.filename).image)
                               for r in recs])
    cos = (full * small).sum(1)
    assert np.median(cos) > 0.9 and cos.min() > 0.8, cos
    assert ((full @ small.T).argmax(1) == np.arange(len(recs))).all()  # each original finds its own copy
    captions = [c for r in recs for c in r.captions]
    text_image = np.array([i for i, r in enumerate(recs) for _ in r.captions])
    txt = enc.encode_texts(captions)
    on_full = retrieval_report(full @ txt.T, text_image)
    on_small = retrieval_report(small @ txt.T, text_image)
    for d in ("i2t", "t2i"):
        assert on_full[d]["R@5"] >= on_small[d]["R@5"] - 5.0, (on_full, on_small)


@pytest.mark.slow
def test_training_smoke(tmp_path, flickr8k):
    from click.testing import CliRunner

    from retrieval.cli import cli
    from retrieval.training.views import VIEW_SETS

    out = tmp_path / "ckpt"
    res = CliRunner().invoke(cli, ["train", "--dataset", str(flickr8k), "--out", str(out), "--image-tower",
                                   "efficientnet-lite0", "--limit", "8", "--epochs", "1", "--batch-size", "8",
                                   "--rerank-epochs", "1", "--rerank-width", "32", "--rerank-layers", "1",
                                   "--threads", "2", "--device", "cpu"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["image_tower"] == "efficientnet-lite0" and "reranker" in meta
    report = json.loads((out / "report.json").read_text())
    assert report["job"]["limit"] == 8 and "dual_dev" in report and "full" in report["rerank"]
    rows = report["querybank_dev"]
    assert rows[0]["querybank"] is None and len(rows) == 1 + 3 * 9  # no bank; 3 memory weights x 9 (beta, alpha)
    assert {r["text_memory"]["weight"] if r["text_memory"] else 0.0 for r in rows[1:]} == {0.0, 0.2, 0.3}
    # the checkpoint is usable as an engine model
    from retrieval.encoders import create_encoder

    enc = create_encoder(str(out), device="cpu")
    assert enc.dim == 256 and enc.reranker_model is not None
    # the int8 stage ran (whether 8 calibration images make a graph worth keeping is its own check)
    assert report["int8"] is None or set(report["int8"]["agreement_vs_fp32"]) >= {"embedding_median", "images"}
    # the views stage chose the best of its candidates on dev and wrote them (and their bank, if any)
    sel = report["views"]
    assert sel["rows"][0]["views"] == sel["chosen"] and sel["rows"][0]["dev_rsum"] == max(r["dev_rsum"] for r in sel["rows"])
    assert meta_after_stages(out)["views"] == list(VIEW_SETS[sel["chosen"]]) and len(sel["rows"]) == len(VIEW_SETS)
    assert list(enc.views) == list(VIEW_SETS[sel["chosen"]])
    # the retune and text_head stages ran on the checkpoint the earlier stages wrote, and it records them
    for stage, key in (("retune", "reranker_retune"), ("text_head", "text_head_retune")):
        # the epoch kept is the best of the history (the starting weights are epoch 0) and its dev figure is reported
        kept = next(h for h in report[stage]["history"] if h["epoch"] == report[stage]["best_epoch"])
        assert kept["dev_rsum"] == max(h["dev_rsum"] for h in report[stage]["history"]), report[stage]
        assert report[stage]["dev_after"]["rsum"] == kept["dev_rsum"]
        assert meta_after_stages(out)[key]["best_epoch"] == report[stage]["best_epoch"]
        assert meta_after_stages(out)[key]["source"] == str(out) and meta_after_stages(out)[key]["limit"] == 8
    assert (out / "text.safetensors").exists()
    assert json.loads(res.stdout)["text_head"]["best_epoch"] == report["text_head"]["best_epoch"]


def test_view_set_embeddings_are_the_encoders(mini_dataset):
    """The views stage computes each view once and sums them; that is what the
    encoder embeds for the set."""
    from retrieval.encoders import create_encoder
    from retrieval.training.views import VIEW_SETS, set_embedding, view_embeddings

    enc = create_encoder("xmr-lite2", device="cpu")
    pixels = np.stack(_mini_pixels(enc, mini_dataset, 6))
    per_view = view_embeddings(enc, pixels, ("full", "flip", "crop85", "crop85flip"), batch=4)
    assert enc.views == ("crop85", "crop85flip")  # put back
    for views in VIEW_SETS.values():
        enc.views = views
        np.testing.assert_allclose(set_embedding(per_view, views), enc.encode_images(list(pixels)), atol=1e-5)


def meta_after_stages(out):
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("stages, message", [
    ("dual,shuffle", "unknown stage(s) ['shuffle']"),
    ("dual,retune", "add rerank to --stages"),
    (",", "no stage to run"),
])
def test_train_refuses_stages_it_cannot_run(tmp_path, flickr8k, stages, message):
    from click.testing import CliRunner

    from retrieval.cli import cli

    out = tmp_path / "ckpt"
    res = CliRunner().invoke(cli, ["train", "--dataset", str(flickr8k), "--out", str(out), "--stages", stages])
    assert res.exit_code != 0 and message in res.output, res.output
    assert not out.exists()  # refused before any work


def test_onnx_image_path_equals_pytorch(tmp_path, monkeypatch):
    """The CPU fast path (ONNX Runtime) gives the eager model's outputs."""
    from retrieval.encoders import builtin_models, onnx_runtime
    from retrieval.encoders.xmr import XmrEncoder

    if not onnx_runtime.available():
        pytest.skip("onnxruntime/onnxscript not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = str(builtin_models()["xmr-lite2"])
    fast = XmrEncoder.from_checkpoint(path, device="cpu")
    fast.backend = "onnx"  # the fp32 graph; the int8 one is tested below
    slow = XmrEncoder.from_checkpoint(path, device="cpu")
    slow.backend = "torch"
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (260, 260, 3), dtype=np.uint8) for _ in range(3)]  # odd count: padded batch
    e1, t1 = fast.encode_images_with_tokens(pixels)
    e2, t2 = slow.encode_images_with_tokens(pixels)
    assert fast._onnx is not None and slow._onnx is None
    np.testing.assert_allclose(e1, e2, atol=1e-4)
    np.testing.assert_allclose(t1.astype(np.float32), t2.astype(np.float32), atol=2e-2)  # fp16 tokens
    assert list(tmp_path.glob("xmr/onnx/*.onnx"))


def _mini_pixels(enc, mini_dataset, n=None):
    from indexer.decode import decode_image
    from retrieval.datasets import load_dataset

    recs = load_dataset(mini_dataset)[:n]
    return [enc.prepare(decode_image(r.path, enc.input_size).image) for r in recs]


def _cos(a, b):
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_shipped_int8_image_path_agrees_with_pytorch(mini_dataset):
    """On real photos the shipped int8 graph gives the eager model's embeddings
    within the tolerance stated in retrieval/training/quantize.py."""
    from retrieval.encoders import builtin_models, onnx_runtime
    from retrieval.encoders.xmr import XmrEncoder

    if not onnx_runtime.available():
        pytest.skip("onnxruntime/onnxscript not installed")
    path = str(builtin_models()["xmr-lite2"])
    fast = XmrEncoder.from_checkpoint(path, device="cpu")
    slow = XmrEncoder.from_checkpoint(path, device="cpu", overrides={})
    slow.backend = "torch"
    pixels = _mini_pixels(fast, mini_dataset)
    e1, t1 = fast.encode_images_with_tokens(pixels)
    e2, t2 = slow.encode_images_with_tokens(pixels)
    assert fast.image_backend == "int8" and slow.image_backend == "torch"
    cos = _cos(e1, e2)
    assert np.median(cos) >= 0.995 and cos.min() >= 0.98, cos
    assert np.median(_cos(t1, t2)) >= 0.99
    # and it is the int8 graph, not an fp32 one: outputs differ from fp32 beyond float noise
    assert np.abs(e1 - e2).max() > 1e-3


def test_int8_graph_of_other_weights_is_not_used(tmp_path, caplog):
    """A graph made from other weights (a retrained checkpoint) is ignored with a
    warning; asking for int8 explicitly then fails with a fix in the message."""
    import onnx

    from retrieval.encoders import builtin_models, checkpoint, onnx_runtime
    from retrieval.encoders.xmr import XmrEncoder
    from retrieval.errors import CheckpointError

    if not onnx_runtime.available():
        pytest.skip("onnxruntime/onnxscript not installed")
    src = builtin_models()["xmr-lite2"]
    for f in src.iterdir():
        if f.name != checkpoint.INT8_FILE:
            (tmp_path / f.name).symlink_to(f)
    graph = onnx.load(str(src / checkpoint.INT8_FILE))
    for prop in graph.metadata_props:
        if prop.key == onnx_runtime.DIGEST_KEY:
            prop.value = "0" * 64
    onnx.save(graph, str(tmp_path / checkpoint.INT8_FILE))

    enc = XmrEncoder.from_checkpoint(str(tmp_path), device="cpu")
    assert enc._shipped_int8() is None and "other weights" in caplog.text
    strict = XmrEncoder.from_checkpoint(str(tmp_path), device="cpu", backend="int8")
    with pytest.raises(CheckpointError, match="xmr quantize"):
        strict._onnx_path()


@pytest.mark.slow
def test_quantize_a_checkpoint(tmp_path, mini_dataset, monkeypatch):
    """`xmr quantize`'s core: calibrate, check against fp32, stamp the weights,
    record it in config.json; the encoder then runs it."""
    from retrieval.encoders import builtin_models, checkpoint, onnx_runtime
    from retrieval.encoders.preprocess import view_batch
    from retrieval.encoders.xmr import XmrEncoder
    from retrieval.training.quantize import quantize_checkpoint

    if not onnx_runtime.available():
        pytest.skip("onnxruntime/onnxscript not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    src = builtin_models()["xmr-lite2"]
    for f in src.iterdir():
        if f.name == "config.json":
            (folder / f.name).write_text(f.read_text())
        elif f.name != checkpoint.INT8_FILE:
            (folder / f.name).symlink_to(f)
    enc = XmrEncoder.from_checkpoint(str(folder), device="cpu")
    pixels = np.stack(_mini_pixels(enc, mini_dataset))
    calib, check = view_batch(pixels[:16], "crop85"), pixels[16:]
    info = quantize_checkpoint(folder, calib, check)
    assert info["kept"] and info["agreement_vs_fp32"]["images"] == 16
    assert info["agreement_vs_fp32"]["embedding_median"] >= 0.995
    assert checkpoint.read_config(folder)["int8"]["calibration_images"] == 16
    runner = onnx_runtime.OnnxImagePath.shipped_int8(folder, checkpoint.image_weights_digest(folder))
    assert runner is not None and runner.batch == 2
    fresh = XmrEncoder.from_checkpoint(str(folder), device="cpu")
    fresh.encode_images(list(check[:3]))
    assert fresh.image_backend == "int8"


def test_views_on_tensors_equal_pillow_bit_for_bit():
    """The GPU path makes views on device tensors; they must be the CPU's (Pillow's) pixels."""
    import torch

    from retrieval.encoders.preprocess import VIEWS, view_batch

    rng = np.random.default_rng(0)
    for size in (260, 224, 31):
        batch = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
        for view in VIEWS:
            on_cpu = view_batch(batch, view)
            on_tensor = view_batch(torch.from_numpy(batch), view).numpy()
            assert on_cpu.shape == batch.shape and np.array_equal(on_cpu, on_tensor), (size, view)


def test_shipped_variants_share_weights_but_not_versions():
    from retrieval.encoders import builtin_variants, create_encoder
    from retrieval.encoders.preprocess import VIEWS, view_batch, view_batches

    assert {"xmr-lite2-fast", "xmr-lite2-flip", "xmr-lite2-tta"} <= set(builtin_variants())
    base = create_encoder("xmr-lite2", device="cpu")
    fast = create_encoder("xmr-lite2-fast", device="cpu")
    tta = create_encoder("xmr-lite2-tta", device="cpu")
    assert base.views == ("crop85", "crop85flip") and fast.views == ("crop85",) and len(tta.views) == 4
    assert len({base.version, fast.version, tta.version}) == 3  # an index built with one refuses the others
    a = np.random.default_rng(0).integers(0, 255, (1, 260, 260, 3), dtype=np.uint8)
    np.testing.assert_array_equal(view_batch(view_batch(a, "flip"), "flip"), a)
    for order in (VIEWS, tuple(reversed(VIEWS)), ("crop85flip",)):  # shared crop = separate views
        for view, got in view_batches(a, order):
            np.testing.assert_array_equal(got, view_batch(a, view))
    assert view_batch(a, "crop85").shape == a.shape
    with pytest.raises(ValueError, match="unknown view"):
        view_batch(a, "zoom")


def test_image_side_is_shared_by_text_side_changes_only_and_earlier_releases_follow_it(tmp_path):
    """What `xmr upgrade` relies on: the image side ignores the text side and
    the reranker past its region projection, follows the image weights, the
    int8 graph and the views; the list of earlier releases counts only while
    the image side it was written for is still the checkpoint's."""
    import shutil

    from retrieval.encoders import builtin_models, checkpoint, create_encoder
    from retrieval.encoders.xmr import XmrEncoder

    base = create_encoder("xmr-lite2", device="cpu")
    assert base.earlier_versions and base.version not in base.earlier_versions
    assert create_encoder("xmr-lite2-fast", device="cpu").image_side() != base.image_side()  # other views
    folder = tmp_path / "xmr-lite2"
    shutil.copytree(builtin_models()["xmr-lite2"], folder)
    meta = checkpoint.read_config(folder)
    meta["text_memory"] = {**meta["text_memory"], "weight": 0.2}  # a text-side change
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    text_side = XmrEncoder.from_checkpoint(str(folder), name="xmr-lite2", device="cpu")
    assert text_side.version != base.version and text_side.image_side() == base.image_side()
    assert text_side.earlier_versions == base.earlier_versions
    (folder / checkpoint.INT8_FILE).write_bytes(b"another graph")  # an image-side change
    image_side = XmrEncoder.from_checkpoint(str(folder), name="xmr-lite2", device="cpu", backend="torch")
    assert image_side.image_side() != base.image_side() and image_side.earlier_versions == ()


def test_bootstrap_rsum_delta():
    from retrieval.metrics import bootstrap_rsum_delta, rsum_of_ranks

    rng = np.random.default_rng(0)
    text_image = np.repeat(np.arange(200), 5)
    a = (rng.integers(0, 30, 200), rng.integers(0, 30, 1000))
    same = bootstrap_rsum_delta(a, a, text_image, n_boot=200)
    assert same["delta"] == same["low"] == same["high"] == 0.0 and same["p_not_better"] == 1.0
    # B finds every item at rank 0: better by exactly the rsum it adds, and surely so
    b = (np.zeros(200, int), np.zeros(1000, int))
    out = bootstrap_rsum_delta(a, b, text_image, n_boot=200)
    assert out["delta"] == pytest.approx(rsum_of_ranks(*b) - rsum_of_ranks(*a))
    assert 0 < out["low"] <= out["delta"] <= out["high"] and out["p_not_better"] == 0.0
    # one image found at rank 0 instead of 50: better, but inside the noise
    a[0][0] = 50
    c = (a[0].copy(), a[1])
    c[0][0] = 0
    near = bootstrap_rsum_delta(a, c, text_image, n_boot=500)
    assert near["delta"] == pytest.approx(300 / 200)
    assert near["low"] == 0.0 and near["p_not_better"] > 0.2


def test_top1_changes():
    from retrieval.metrics import top1_changes

    before = np.array([0, 0, 3, 1, 0])
    after = np.array([0, 2, 0, 0, 0])
    assert top1_changes(before, after) == {"worse": 20.0, "better": 40.0}
    assert top1_changes(after, after) == {"worse": 0.0, "better": 0.0}
    with pytest.raises(ValueError):
        top1_changes(before, after[:2])
