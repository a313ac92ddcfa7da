"""Data layer: robust image I/O, Fashion-MNIST and image-folder datasets, the stable split, flip augmentation.

Images leave this package as float32 tensors (C, H, W) / (B, C, H, W) in [-1, 1].
"""

from maetok.data.datasets import (
    DEFAULT_FASHION_MNIST_ROOT,
    DEFAULT_HOLDOUT_FRACTION,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    FashionMNIST,
    ImageDataset,
    ImageFolder,
    build_dataset,
    hash_split,
    is_fashion_mnist,
    random_hflip,
    read_idx,
    split_paths,
)
from maetok.data.images import (
    BadImageError,
    load_image,
    make_image_grid,
    resize_center_crop,
    save_image_grid,
    save_side_by_side,
    to_tensor,
    to_uint8_image,
)

__all__ = [
    "BadImageError",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_HOLDOUT_FRACTION",
    "DatasetNotFoundError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FashionMNIST",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageFolder",
    "build_dataset",
    "hash_split",
    "is_fashion_mnist",
    "load_image",
    "make_image_grid",
    "random_hflip",
    "read_idx",
    "resize_center_crop",
    "save_image_grid",
    "save_side_by_side",
    "split_paths",
    "to_tensor",
    "to_uint8_image",
]
