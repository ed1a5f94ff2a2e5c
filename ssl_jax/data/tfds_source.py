"""tensorflow-datasets catalog sources (cifar10, cifar100, stl10, imagenet2012, ...) without TensorFlow.

Examples are read through `tfds.data_source` (array_record files, random access, no TensorFlow) with the
images left encoded, decoded in parallel by `imagefolder.decode_images` and kept in the uint8 cache of
`ssl_jax.data`, with the records' `file_name` feature (imagenet2012: `n01440764_10026.JPEG`) as the Source's
file_names where the dataset has one. Preparing a dataset (the first download) may need TensorFlow for some
builders; reading a prepared one never does.
"""
import os
import sys

import numpy as np

from ssl_jax import data as data_lib, metrics
from ssl_jax.data import imagefolder

_TEST_SPLITS = ("test", "validation")  # 'test' means the first of these that exists and has labels
_DEFAULT_DATA_DIR = "~/tensorflow_datasets"
# Random-access records, prepared without TensorFlow. tfds.data_source picks them itself only when no data_dir is
# given: with data.tfds_data_dir it would prepare TFRecords (TensorFlow needed), which it then cannot read.
_ARRAY_RECORD = {"file_format": "array_record"}


def load(name, split, data_cfg):
    """Returns the Source of `split` ('train' | 'test') of the tfds catalog dataset `name` (e.g. 'cifar10')."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy, optional path)
    except ImportError as e:
        raise data_lib.DataError(f"data.name={name!r} needs tensorflow-datasets (pip install tensorflow-datasets), "
                                 f"or set data.path to an ImageFolder directory or archive") from e
    data_dir = data_cfg.get("tfds_data_dir", "") or None
    image_size = int(data_cfg.get("image_size", 0))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise data_lib.DataError(f"unknown dataset data.name={name!r}: not 'synthetic', 'imagefolder' or a "
                                 f"tensorflow-datasets catalog name (and data.path is empty)") from e
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    image_shape = info.features[image_key].shape
    if not image_size and None in image_shape[:2]:
        raise data_lib.DataError(f"{name} images have different sizes; set data.image_size (e.g. 224 for "
                                 f"imagenet2012) to store them resized and center-cropped")
    cache = data_lib.cache_path(data_cfg, name.replace("/", "_"), "tfds", name, str(info.version),
                                os.path.abspath(os.path.expanduser(data_dir or _DEFAULT_DATA_DIR)), image_size)
    source = data_lib.load_cache(cache, split, name)
    if source is not None:
        return source

    if not metrics.progress_shown():
        tfds.disable_progress_bar()  # its download and preparation bars obey --no-progress too
    try:  # prepares (downloads) the dataset on first use; a no-op once prepared
        all_splits = tfds.data_source(name, split=None, data_dir=data_dir, download=True, builder_kwargs=_ARRAY_RECORD)
    except Exception as e:  # pylint: disable=broad-except  (re-raised with what to do about it)
        raise data_lib.DataError(_prepare_error(name, data_dir, e)) from e
    tfds_split = resolve_split(name, split, all_splits, label_key)
    ds = _open_split(tfds, name, tfds_split, data_dir, image_key)
    # Read after preparing: some builders (cifar10) learn their class names from the downloaded files.
    class_names = list(ds.dataset_info.features[label_key].names)
    count = len(ds)
    if count == 0:
        raise data_lib.DataError(f"tfds dataset {name} split {tfds_split!r} is empty")
    origin = f"tfds:{name}[{tfds_split}]"
    print(f"decoding {count} images from {origin} into cache {cache}", file=sys.stderr)
    # Filled while the records are read for decoding, so the records are read once.
    file_names = [None] * count if "file_name" in ds.dataset_info.features else None
    items = examples_to_items(ds, image_key, label_key, origin, file_names)
    decoded = imagefolder.decode_images(items, count, image_size, data_cfg.get("num_workers", 0),
                                        desc=f"decode {split}")
    return data_lib.write_cache(cache, split, decoded, count, class_names, name, origin, file_names)


def resolve_split(name, split, all_splits, label_key):
    """Returns the tfds split name for 'train' | 'test': 'test' is tfds's test split, or its validation split
    when there is no test split or its labels are withheld (-1, as in imagenet2012)."""
    if not all_splits:  # split names unknown (e.g. under tfds.testing.mock_data): ask for the name as is
        return split
    candidates = ("train",) if split == "train" else _TEST_SPLITS
    for candidate in candidates:
        ds = all_splits.get(candidate)
        if ds is not None and len(ds) and int(ds[0][label_key]) >= 0:
            return candidate
    raise data_lib.DataError(f"tfds dataset {name} has no labelled split for {split!r} (looked for "
                             f"{', '.join(candidates)}; it has {', '.join(sorted(all_splits))})")


def _open_split(tfds, name, tfds_split, data_dir, image_key):
    raw = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False, builder_kwargs=_ARRAY_RECORD,
                           decoders={image_key: tfds.decode.SkipDecoding()})
    try:
        raw[0]
        return raw
    except Exception:  # pylint: disable=broad-except
        # Records that cannot be read undecoded (tfds.testing.mock_data encodes its fake images on the fly,
        # which needs TensorFlow): read decoded images instead, decoded here rather than in the workers.
        return tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False, builder_kwargs=_ARRAY_RECORD)


def examples_to_items(examples, image_key, label_key, origin, file_names=None):
    """Yields decoder items (index, name, encoded bytes | HxWx3 array, label) of a sequence of example dicts;
    stores each example's 'file_name' in file_names[index] when file_names (a list of len(examples)) is given."""
    for index in range(len(examples)):
        example = examples[index]
        image = _unwrap(example[image_key])
        name = f"{origin}[{index}]"
        if file_names is not None:
            file_name = _unwrap(example["file_name"])
            file_names[index] = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
            name = f"{name} ({file_names[index]})"
        yield index, name, image, int(example[label_key])


def _unwrap(value):
    if isinstance(value, np.ndarray) and value.dtype == object:  # a 0-d array holding bytes
        value = value.item()
    return bytes(value) if isinstance(value, np.bytes_) else value


def _prepare_error(name, data_dir, error):
    where = data_dir or _DEFAULT_DATA_DIR
    text = f"tensorflow-datasets could not prepare {name!r} in {where}: {type(error).__name__}: {error}"
    if "No module named 'tensorflow'" in str(error):
        text += ("\nThis dataset's builder needs TensorFlow to prepare it (once): pip install 'ssl-jax[tf]', "
                 "or prepare it on another machine and set data.tfds_data_dir.")
    elif "importlib_resources" in str(error):
        text += "\ntensorflow-datasets needs importlib_resources to prepare datasets: pip install importlib_resources"
    return text + "\nOr set data.path to an ImageFolder directory or .tar/.tar.gz archive of the same data."
