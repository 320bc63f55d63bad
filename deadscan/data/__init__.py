"""Datasets by name or path, the paper's seeded splits, normalisation, device-resident batches.

Sources (``--data``, i.e. ``load_data(spec, ...)``); named sets live under ``--data-root`` (default
``$DEADSCAN_DATA``, else ``~/.cache/deadscan/data``):

- ``digits``: sklearn's 8x8 digits, bundled with deadscan (float (N, 1, 8, 8), labels 0-9). No download.
- ``cifar10``, ``cifar100``: torchvision's layout, ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` and
  ``cifar-100-python/{train,test}``. These are python pickles: they are read by an unpickler that admits only
  integer arrays (type, shape and byte count checked before one exists), ints and strings, and refuses every
  other global (``read_cifar_batch``), so a doctored batch cannot run code or crash deadscan.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is the digit 0; ``extra`` is not used).
- ``mnist``, ``fashion-mnist``: ``MNIST/raw/`` and ``FashionMNIST/raw/`` holding ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (plain or ``.gz``).
  These five are fetched by torchvision with ``--download``. Nothing is downloaded without it.
- ``tiny-imagenet``: ``tiny-imagenet-200/`` as distributed (``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` + ``val/val_annotations.txt``). Labels follow the sorted wnids (as an image folder
  of ``train/`` would); the official val folder is the test split (the test folder has no labels).
- ``cifar10-c``, ``cifar100-c``: the corrupted test sets (Hendrycks & Dietterich), ``CIFAR-10-C/`` or
  ``CIFAR-100-C/`` with ``<corruption>.npy`` (uint8 (50000, 32, 32, 3): severities 1 to 5 of the 10000 test
  images, stacked) and ``labels.npy``. ``--corruption NAME[,NAME...]`` and ``--severity S[,S...]`` pick
  blocks (default: every corruption file present, every severity). Test-only: use ``--split test``.
- ``imagefolder:PATH`` (or just a folder path): ImageNet-style class folders ``PATH/<class>/**/<image>``
  (nested folders are searched, so Tiny ImageNet's ``train/`` works); labels are the sorted class names. If
  PATH holds only ``train/`` and ``val/`` or ``test/`` folders, ``train/`` is the training set and ``val/``
  (else ``test/``) the test split. Images are decoded once (PIL) into memory; a set bigger than
  ``$DEADSCAN_HOST_BYTES`` (default 4 GiB) stays on disk, decoded batch by batch by DataLoader workers.
- ``fake[:CxHxW[:K[:N]]]``: torchvision ``FakeData``, N images (default 1000) of shape C x H x W (default
  3x32x32; C is 1 or 3) in K classes (default 10), e.g. ``fake:1x28x28:10:500``. No files: smoke tests.
- ``FILE.npz`` / ``FILE.h5``: ``x`` the inputs, shaped as the model takes them ((N, C, H, W) or (N, D)),
  uint8 (scaled to [0, 1]) or float; ``y`` the integer labels (N,). Anything else is refused, naming the
  keys found; HDF5 links, external and virtual datasets are refused (the data must be in the file).

Hostile files: every reader opens regular files only (a FIFO or device would block), and checks the sizes a
header declares (npz members, HDF5 datasets, idx, .npy, .mat variables) against the bytes the file stores
before allocating: at most ``DEFAULTS.max_expand_ratio`` times more if compressed, never more than
``DEFAULTS.max_decoded_bytes`` (``$DEADSCAN_MAX_BYTES``). Images are decoded only by raster formats
(``RASTER_FORMATS``), and one above PIL's pixel limit is refused as a decompression bomb.

Token data for language models (``deadscan.data.tokens``): ``FILE.npz``/``FILE.h5`` holding ``input_ids``
(N, T) and optionally ``attention_mask`` (N, T) of 0/1, or a text corpus (``.txt``, ``.jsonl`` with
``--text-field``, ``.parquet``) tokenised with the model folder's tokenizer (or ``--tokenizer DIR``) and
packed into ``--seq-len`` blocks. A :class:`TokenDataset` yields ``{"input_ids", "attention_mask"}`` batches;
padded positions are never scanned.

Splits (``--split``): ``test`` is the official test set where there is one; ``train`` and ``val`` cut the
training set by a seeded permutation, ``val`` being ``--val-fraction`` of it (default 10%). A set without
its own test split (digits, arrays, fake, a single image folder) is cut 80/10/10 train/val/test. ``all`` is
the whole training set (or file). The same seed gives the same indices on every run, and
``Dataset.describe()`` records the seed, the fractions and a sha256 fingerprint of the indices used.

Transforms: images stay uint8 until a batch is on the device; then ``x / 255`` and ``(x - mean) / std``
with the dataset's preset (``NORMALISATION``; CIFAR's are the paper's) or ``--mean``/``--std``, exactly as
torchvision's ToTensor + Normalize compute it. ``--resize N`` (bilinear, antialiased, to N x N) and
``--channels 1|3`` (PIL's luma, or the grey channel repeated) are applied at load time, only when asked.

Training augmentation (``Dataset.train_batches(..., augment=)``): ``random_crop_flip`` (zero padding of
round(H / 8) pixels, 4 on 32x32, then a horizontal flip, both drawn per sample, one gather on the device)
and per-sample ``AutoAugment`` with torchvision's CIFAR-10 / SVHN / ImageNet policies on uint8 batches on
the device. Defaults (``AUGMENT_DEFAULTS``): crop+flip for natural images (CIFAR, Tiny ImageNet, image
folders, fake), crop only for digits photographed or drawn (SVHN, MNIST: a mirrored digit is another symbol
or none), nothing for the bundled digits, array files and the corrupted test sets.

Speed: a dataset that fits in half the device's free memory is copied there once as uint8 and batched
there: randperm, crop/flip, AutoAugment and normalisation are tensor ops on the device, with no host sync in
the batch loop. A larger one streams through a DataLoader with workers and pinned memory.
"""

from .augment import Augment, AutoAugment, default_padding, parse_augment, random_crop_flip
from .dataset import Dataset, fingerprint
from .fit import check_fits, model_input
from .images import LazyImages
from .load import SOURCES, SourceRequest, load_data, parse_spec, resource_path, split_indices
from .presets import AUGMENT_DEFAULTS, NAMES, NORMALISATION, SPLITS
from .tokens import TokenDataset, load_tokens
from .sources import Adapt, Pool, Source, adapt_images, default_root, read_cifar_batch, read_idx

__all__ = [
    "Augment", "AutoAugment", "default_padding", "parse_augment", "random_crop_flip", "Dataset", "fingerprint",
    "check_fits", "model_input", "LazyImages", "load_data", "parse_spec", "resource_path", "split_indices",
    "AUGMENT_DEFAULTS", "NAMES", "NORMALISATION", "SPLITS", "adapt_images", "default_root", "read_cifar_batch",
    "read_idx", "TokenDataset", "load_tokens", "SOURCES", "SourceRequest", "Source", "Pool", "Adapt",
]
