"""Dataset presets: names, normalisation, augmentation defaults, limits."""

from __future__ import annotations

import os



from ..options import SPLITS  # noqa: F401 (re-exported)


# Per-dataset normalisation (mean, std per channel). CIFAR values are the paper's; override with --mean/--std.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


NORMALISATION["cifar10-c"] = NORMALISATION["cifar10"]


NORMALISATION["cifar100-c"] = NORMALISATION["cifar100"]


AUGMENT_DEFAULTS = {
    "cifar10": "crop+flip", "cifar100": "crop+flip", "tiny-imagenet": "crop+flip", "imagefolder": "crop+flip",
    "fake": "crop+flip", "fashion-mnist": "crop+flip", "svhn": "crop", "mnist": "crop",
}


# AutoAugment policy per source for augment="autoaugment"; every other source: the CIFAR-10 policy (the
# paper used it for Tiny ImageNet too, at 32x32).
AUTOAUGMENT_POLICY = {"svhn": "svhn"}


TORCHVISION = {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"}


CORRUPTED = {
    "cifar10-c": ("CIFAR-10-C", "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"),
    "cifar100-c": ("CIFAR-100-C", "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"),
}


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


NAMES = ("digits", "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "tiny-imagenet", "cifar10-c",
         "cifar100-c", "fake")


ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
           "fashion_mnist": "fashion-mnist", "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
           "cifar-10-c": "cifar10-c", "cifar-100-c": "cifar100-c"}


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10, "fashion-mnist": 10, "digits": 10,
               "cifar10-c": 10, "cifar100-c": 100}


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


HOST_BYTES_ENV = "DEADSCAN_HOST_BYTES"  # decoded image sets above it (bytes) stay on disk, decoded batch by batch
HOST_BYTES_DEFAULT = 4 * 2**30


def host_bytes_limit() -> int:
    """``$DEADSCAN_HOST_BYTES``, read when a set of image files is loaded; a bad value is one Error line."""
    raw = os.environ.get(HOST_BYTES_ENV, "").strip()
    if not raw:
        return HOST_BYTES_DEFAULT
    if not raw.isdigit():
        from ..errors import DataError

        raise DataError(f"{HOST_BYTES_ENV}={raw!r}: expected a number of bytes (0: decode every set of image "
                        "files batch by batch)")
    return int(raw)


DEVICE_FRACTION = 0.5  # a dataset is kept on a GPU when it takes at most this share of its free memory


STREAM_WORKERS = min(8, os.cpu_count() or 1)  # DataLoader workers for data streamed to the device


LUMA = (0.299, 0.587, 0.114)
