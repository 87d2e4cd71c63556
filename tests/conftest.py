import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# XMR_DATASETS: where the datasets are when not beside the checkout (the GPU machine stages them elsewhere)
DATASETS = Path(os.environ.get("XMR_DATASETS", ROOT.parent / "shared" / "datasets"))


def _dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI needs ../shared/datasets beside the checkout")
        pytest.skip(f"{path} not found (clone the project beside ../shared/datasets to run this test)")
    return path


@pytest.fixture(scope="session")
def mini_dataset() -> Path:
    return _dataset("flickr8k-mini")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return _dataset("flickr8k")


@pytest.fixture
def mini_images(mini_dataset, tmp_path) -> Path:
    """A private copy of the 32 full-size mini images (tests may move or delete them)."""
    dst = tmp_path / "photos"
    shutil.copytree(mini_dataset / "Flicker8k_Dataset", dst)
    return dst


def make_image(path: Path, color=(200, 30, 30), size=(64, 48), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((color, size))) % 2**32)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path
