"""Zero-shot classification through the engine (`xmr eval --classes`) and
class labels imported as prompt-ensembled captions, on the fake encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval import engine as engine_mod
from retrieval.cli import cli
from retrieval.engine import Engine
from retrieval.errors import DatasetError, QueryError
from retrieval.zeroshot import ClassSet, evaluate_classes

from .conftest import make_image
from .fakes import COLORS, FakeEncoder, TokenEncoder, TokenReranker


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(engine_mod, "create_encoder", lambda name, device=None: TokenEncoder())
    monkeypatch.setattr(engine_mod, "_own_reranker", lambda enc: TokenReranker())


def _class_dir(tmp_path, truth: dict[str, str]):
    """``folder name -> colour of its images``; three shades per folder."""
    root = tmp_path / "sets"
    for folder, colour in truth.items():
        (root / folder).mkdir(parents=True)
        for i in range(3):
            rgb = tuple(max(0, min(255, c + 10 * i)) for c in COLORS[colour])
            make_image(root / folder / f"{i}.png", rgb)
    (root / "empty_class").mkdir()
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_classes_are_the_folders_with_images(tmp_path):
    root = _class_dir(tmp_path, {"red": "red", "dark_blue": "blue"})
    data = ClassSet.from_folder(root)
    assert data.classes == ["dark blue", "red"]
    assert len(data.images) == 6


def test_a_folder_without_class_folders_is_refused(tmp_path):
    (tmp_path / "one").mkdir()
    make_image(tmp_path / "one" / "a.png", (1, 2, 3))
    with pytest.raises(DatasetError, match="at least two"):
        ClassSet.from_folder(tmp_path)


def test_accuracy_counts_right_and_wrong_labels(tmp_path, fake_model):
    right = evaluate_classes(_class_dir(tmp_path / "a", {"red": "red", "green": "green", "blue": "blue"}),
                             templates=["a photo of a {} thing"], rerank_ks=(0, 5))
    assert [r["top1"] for r in right] == [100.0, 100.0]
    assert right[0]["text_precision"] == 100.0 and right[1]["rerank_k"] == 5
    # folders named after the wrong colours: the same images now score zero
    wrong = evaluate_classes(_class_dir(tmp_path / "b", {"red": "green", "green": "blue", "blue": "red"}),
                             templates=["a photo of a {} thing"])
    assert wrong[0]["top1"] == 0.0 and wrong[0]["top5"] == 100.0
    assert wrong[0]["images"] == 9 and wrong[0]["classes"] == 3


def test_labels_average_their_templates(tmp_path):
    enc = FakeEncoder()
    eng = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=enc)
    templates = ["a photo of a {}.", "a {} thing"]
    out = eng.import_labels(["red", "blue"], templates)
    assert out["imported"] == 2 and out["templates"] == 2
    rows = eng.store.caption_rows([1, 2])
    got = {r.image_name: (r.text, np.frombuffer(r.embedding, np.float32)) for r in rows.values()}
    mean = enc.encode_texts(["a photo of a red.", "a red thing"]).sum(0)
    assert got["red"][0] == "a photo of a red."
    np.testing.assert_allclose(got["red"][1], mean / np.linalg.norm(mean), rtol=1e-5)
    assert eng.import_labels(["red"], templates)["imported"] == 0  # already there
    eng.close()


@pytest.mark.parametrize("bad", ["a photo", "a {} of {}", "{0} photo", "a {} {x}"])
def test_templates_must_hold_one_placeholder(tmp_path, bad):
    eng = Engine.open(tmp_path / "index", create=True, reranker="none", encoder=FakeEncoder())
    with pytest.raises(QueryError, match="exactly one"):
        eng.import_labels(["red"], [bad])
    eng.close()


def test_cli_eval_classes_json(tmp_path, fake_model):
    root = _class_dir(tmp_path, {"red": "red", "green": "green", "blue": "blue"})
    res = CliRunner().invoke(cli, ["eval", "--classes", str(root), "--model", "fake", "--json",
                                   "--template", "a photo of a {} thing", "--template", "a {} picture"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["top1"] == 100.0 and out["templates"] == 2 and out["rerank_k"] == 20
    assert set(out) >= {"top1", "top5", "text_precision", "classes", "images", "seconds"}


def test_cli_eval_wants_one_source(tmp_path, fake_model):
    res = CliRunner().invoke(cli, ["eval", "--json"])
    assert res.exit_code == 2 and "exactly one of --dataset" in res.output
    res = CliRunner().invoke(cli, ["eval", "--classes", str(tmp_path), "--template", "no slot", "--model", "fake"])
    assert res.exit_code != 0 and "exactly one {}" in res.output


def test_cli_labels_tag_photos(tmp_path, fake_model):
    photos = tmp_path / "photos"
    make_image(photos / "a.png", COLORS["blue"])
    labels = tmp_path / "labels.txt"
    labels.write_text("# colours\nred\n\ngreen\nblue\n" + "x" * 300 + "\n")
    idx = str(tmp_path / "index")
    args = ["--template", "a {} thing"]
    res = CliRunner().invoke(cli, ["--index", idx, "index", str(photos), "--model", "fake"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["--index", idx, "captions", "labels", str(labels), *args])
    assert res.exit_code == 0, res.output
    assert "imported 3 labels" in res.output and "1 lines skipped" in res.output
    res = CliRunner().invoke(cli, ["--index", idx, "captions", "labels", str(labels), *args])
    assert "imported 0 labels (3 already there" in res.output
    res = CliRunner().invoke(cli, ["--index", idx, "caption", str(photos / "a.png"), "-k", "1", "--json",
                                   "--no-rerank"])
    assert res.exit_code == 0, res.output
    hit = json.loads(res.output)[0]
    assert hit["image"] == "blue" and hit["caption"] == "a blue thing"
