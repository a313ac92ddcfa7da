import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # tiny models run fastest on one thread; pytest -n 2 uses both cores


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Memoised Inception features go to a temporary folder, never into the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("inception-features")
        patch.setenv("MAETOK_FEATURE_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Two classes of small RGB images, plus a truncated JPEG and a text file posing as a PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir()
        for i in range(10):
            pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / "cats" / "broken.jpg")
    data = (root / "cats" / "broken.jpg").read_bytes()
    (root / "cats" / "broken.jpg").write_bytes(data[: len(data) // 3])
    (root / "dogs" / "notes.png").write_text("not an image")
    return root
