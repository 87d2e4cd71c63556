"""`xmr train-heads`: heads trained on locked towers, end to end on a tiny
dataset made from the mini set, and the checkpoint it writes searched
through the engine."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from retrieval.cli import cli
from retrieval.encoders import checkpoint
from retrieval.encoders.xmr_model import XmrDualModel, XmrModelConfig
from retrieval.training.heads_job import extra_caption_pairs
from retrieval.training.locked import class_names

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_dataset(mini_dataset, tmp_path):
    """The 32 mini images as 20 train and 12 dev images, their own captions."""
    root = tmp_path / "tiny"
    shutil.copytree(mini_dataset / "Flicker8k_Dataset", root / "Flicker8k_Dataset")
    text = root / "Flickr8k_text"
    text.mkdir()
    shutil.copy(mini_dataset / "Flickr8k_text" / "Flickr8k.token.txt", text)
    names = sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir())
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:20]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[20:]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("")
    return root, names


def test_extra_captions_match_by_name_or_flickr_id(tmp_path):
    f = tmp_path / "extra.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows([["1000268201.jpg", "by id"], ["2_b.jpg", "by name"], ["999.jpg", "unknown"],
                     ["1000268201.jpg", ""]])
    pairs = extra_caption_pairs(["1000268201_693b08cb0e.jpg", "2_b.jpg"], [f])
    assert pairs == [(0, "by id"), (1, "by name")]


def test_class_names_are_the_thousand_imagenet_classes():
    names = class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"


def test_imagenet_channel_uses_the_stored_class_embeddings():
    cfg = XmrModelConfig(image_tower="efficientnet-lite0", image_size=224, embed_dim=8, text_trainable_layers=0,
                         image_tower_locked=True, imagenet_channel=True, image_head_hidden=4)
    model = XmrDualModel(cfg, pretrained=False).eval()
    pooled = torch.randn(3, model.level_dims[0])
    torch.nn.init.normal_(model.class_embed)
    a = model.project_image(pooled)
    torch.nn.init.normal_(model.class_embed)
    assert not torch.allclose(a, model.project_image(pooled))  # the channel counts
    model.class_gain.data.fill_(0.0)
    np.testing.assert_allclose(model.project_image(pooled).detach().numpy(),
                               torch.nn.functional.normalize(model.image_head(pooled), dim=-1).detach().numpy(),
                               atol=1e-6)


def test_train_heads_writes_a_searchable_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    root, names = tiny_dataset
    out, cache = tmp_path / "ckpt", tmp_path / "cache"
    args = ["train-heads", "--dataset", str(root), "--out", str(out), "--cache", str(cache), "--epochs", "2",
            "--image-head-hidden", "32"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    meta = checkpoint.read_config(out)
    assert meta["model"]["image_tower_locked"] and meta["model"]["imagenet_channel"]
    report = meta["heads_training"]
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2] and report["captions"] == 100
    assert all(np.isfinite(h["loss"]) for h in report["history"][1:])
    # the text side is the head alone: the frozen tower comes from its package
    assert (out / checkpoint.TEXT_FILE).stat().st_size < 1_000_000
    model = checkpoint.load_dual(out)
    assert float(model.class_embed.abs().sum()) > 0  # written with the checkpoint
    # features are cached: a second run reads them, and gives the same model
    out2 = tmp_path / "ckpt2"
    res = CliRunner().invoke(cli, [*args[:4], str(out2), *args[5:]])
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "config.json").read_text())["heads_training"]["history"] == report["history"]
    # the engine searches with it (XMR_BACKEND=torch: no int8 graph yet)
    monkeypatch.setenv("XMR_BACKEND", "torch")
    index = tmp_path / "index"
    res = CliRunner().invoke(cli, ["--index", str(index), "index", str(root / "Flicker8k_Dataset"), "--model", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["--index", str(index), "search", "a dog", "--json", "--no-rerank"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert len(hits) == 10 and {h["path"].rsplit("/", 1)[1] for h in hits} <= set(names)


# -- xmr wise-ft -----------------------------------------------------------------

def test_whitened_classes_decorrelate_shared_wording():
    from retrieval.training.wise import whitened_classes

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(16, generator=gen)
    emb = torch.nn.functional.normalize(3 * shared + torch.randn(50, 16, generator=gen), dim=-1)
    raw = emb @ emb.T
    w = torch.nn.functional.normalize(whitened_classes(emb, 0.1), dim=-1)
    white = w @ w.T
    off = ~torch.eye(50, dtype=torch.bool)
    # 16-d random directions have a mean |cos| of about 0.2: the shared part is gone
    assert raw[off].mean() > 0.5 and white[off].abs().mean() < 0.25


def test_choose_keeps_flickr_within_the_noise():
    from retrieval.training.wise import choose

    rows = [{"gain": 0.0, "dev_rsum": 350.0, "zeroshot_mean": 22.0},
            {"gain": 0.5, "dev_rsum": 347.0, "zeroshot_mean": 30.0},
            {"gain": 0.8, "dev_rsum": 340.0, "zeroshot_mean": 32.0}]
    assert choose(rows, 4.0)["gain"] == 0.5
    assert choose(rows, 20.0)["gain"] == 0.8
    assert choose(rows, 0.0)["gain"] == 0.0


def test_interpolate_tower_moves_halfway():
    from retrieval.encoders.xmr_model import build_image_tower
    from retrieval.training.wise import interpolate_tower

    cfg = XmrModelConfig(image_tower="efficientnet-lite0", image_size=224, embed_dim=8, imagenet_channel=True)
    model = XmrDualModel(cfg, pretrained=False)
    before = model.image_tower._conv_stem.weight.detach().clone()
    pretrained = build_image_tower("efficientnet-lite0").state_dict()["_conv_stem.weight"]
    interpolate_tower(model, 0.25)
    np.testing.assert_allclose(model.image_tower._conv_stem.weight.detach().numpy(),
                               (0.75 * pretrained + 0.25 * before).numpy(), rtol=1e-5, atol=1e-6)


def test_wise_ft_writes_a_model_with_the_class_channel(tiny_dataset, tmp_path, monkeypatch):
    root, names = tiny_dataset
    classes = tmp_path / "classes"
    for i, n in enumerate(names[:6]):  # two made-up classes of three photos each
        (classes / ("cats" if i < 3 else "dogs")).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "Flicker8k_Dataset" / n, classes / ("cats" if i < 3 else "dogs") / n)
    out = tmp_path / "open"
    res = CliRunner().invoke(cli, ["wise-ft", "xmr-lite2", "--dataset", str(root), "--out", str(out),
                                   "--cache", str(tmp_path / "cache"), "--classes", str(classes),
                                   "--gains", "0,0.5", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    meta = checkpoint.read_config(out)
    assert meta["model"]["imagenet_channel"] and "reranker" not in meta
    rows = meta["wise_ft"]["selection"]
    assert [r["gain"] for r in rows] == [0.0, 0.5] and all("classes" in r and "dev_rsum" in r for r in rows)
    model = checkpoint.load_dual(out)
    assert float(model.class_gain.detach()) == meta["wise_ft"]["chosen"]["gain"]
    assert (out / "querybank.safetensors").is_file()
    monkeypatch.setenv("XMR_BACKEND", "torch")
    index = tmp_path / "index"
    res = CliRunner().invoke(cli, ["--index", str(index), "index", str(classes), "--model", str(out)])
    assert res.exit_code == 0, res.output
