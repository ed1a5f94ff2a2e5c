"""Data sources: uint8 image arrays with labels, from ImageFolder dirs/archives, tfds or synthetic data.

`get_source(config.data, split)` is the one entry point. Keys of config.data it reads:
  name           'synthetic', 'imagefolder' or a tfds catalog name ('cifar10', 'stl10', 'imagenet2012', ...)
  path           an ImageFolder directory or .tar/.tar.gz archive; when set, it is read whatever `name` says
  image_size     size images are stored at (shorter side resized, centre crop); 0 = native, must be uniform
  cache_dir      '' = $SSL_JAX_CACHE or ~/.cache/ssl_jax
  stream         False: decode once into the cache below; True (ImageFolder directories and .tar archives):
                 keep only file references and decode every batch in worker processes (ssl_jax.data.stream),
                 for datasets whose cache would not fit on disk (ImageNet at 256 px: 250 GB)
  num_workers    decoding processes, 0 = all CPUs of this process
  num_examples, num_classes   synthetic data only (0 = defaults)
  tfds_data_dir  '' = tfds's default
Decoded images are kept in an on-disk uint8 cache (`<cache_dir>/<key>/<split>_images.npy`, memory-mapped on
load), so a dataset is decoded once per machine. The examples' file names (where the data has them) are kept
beside it (`<split>_file_names.npy`), so subset lists naming files (SimCLR's ImageNet 1% / 10%) can be matched.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "test")
_CACHE_FORMAT = 3  # bump when the cache layout, the decoding (resize, crop) or the files an ImageFolder reads change


class DataError(ValueError):
    """A dataset is missing, malformed or cannot be decoded; the message names the file or setting at fault."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset path does not exist (catchable as DataError or FileNotFoundError)."""


def moved_data_error(error, config_path):
    """Returns a MissingDataError for `error` raised with a run's recorded config: the data may have moved."""
    return MissingDataError(f"{error}; {config_path} records where the run's data was: if it has moved, give "
                            f"--config.data.path=NEW_PATH")


@dataclasses.dataclass
class Source:
    """A labelled image set: images_NxHxWx3 uint8 (ndarray, read-only memmap or stream.EncodedImages), labels_N
    int32, and file_names_N (str: the path relative to the dataset's root, or the record's file name) or None
    where the data has no file names (synthetic, in-memory, most tfds datasets)."""
    images: np.ndarray
    labels: np.ndarray
    class_names: list
    name: str
    file_names: Optional[Sequence[str]] = None

    @property
    def num_classes(self):
        return len(self.class_names)

    def __len__(self):
        return len(self.labels)


def subset(source, indices):
    """Returns a Source holding the examples of `source` at `indices`, in that order: read into memory, or
    still encoded for a streamed source."""
    indices = np.asarray(indices, dtype=np.int64)
    from ssl_jax.data import stream  # pylint: disable=import-outside-toplevel  (stream imports this module)
    images = source.images
    images = images.take(indices) if isinstance(images, stream.EncodedImages) else np.asarray(images[indices])
    return Source(images, np.asarray(source.labels[indices], np.int32), list(source.class_names), source.name,
                  take_names(source.file_names, indices))


def take_names(file_names, indices):
    """Returns the file names at `indices` (a str ndarray), or None when there are none."""
    return None if file_names is None else np.asarray(file_names)[np.asarray(indices, np.int64)]


def default_num_workers():
    """Returns the number of CPUs this process may run on (its affinity mask, which containers limit)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def get_source(data_cfg, split):
    """Returns the Source for `split` ('train' | 'test') described by data_cfg (keys: see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name, path = data_cfg.name, data_cfg.get("path", "")
    if path:  # a path always means ImageFolder, whatever the name says (e.g. name=cifar10 + a local archive, or
        # the smoke preset's name=synthetic: real images through the smoke settings)
        from ssl_jax.data import imagefolder
        return imagefolder.load(path, split, data_cfg)
    if name == "synthetic":
        from ssl_jax.data import synthetic
        num_examples = data_cfg.get("num_examples", 0) or synthetic.DEFAULT_NUM_EXAMPLES
        if split == "test":  # a smaller, independently drawn test set from the same class patterns
            num_examples = max(num_examples // 4, 1)
        return synthetic.make_synthetic(num_examples, data_cfg.get("num_classes", 0) or 10,
                                        data_cfg.get("image_size", 0) or synthetic.DEFAULT_IMAGE_SIZE,
                                        seed=SPLITS.index(split))
    if name == "imagefolder":
        raise DataError("data.name='imagefolder' needs data.path (a directory or .tar/.tar.gz archive)")
    if data_cfg.get("stream", False):
        raise DataError(f"data.stream=True reads ImageFolder directories and .tar archives (data.path); the tfds "
                        f"dataset {name!r} is read through the cache: set data.stream=False, or point data.path "
                        f"at an ImageFolder copy (train/<class>/<image>, val/<class>/<image>)")
    from ssl_jax.data import tfds_source
    return tfds_source.load(name, split, data_cfg)


# ----------------------------------------------------------------------------------------------------------
# The uint8 cache shared by ImageFolder and tfds sources.
# ----------------------------------------------------------------------------------------------------------

def cache_root(data_cfg):
    """Returns the cache directory: data.cache_dir, else $SSL_JAX_CACHE, else ~/.cache/ssl_jax."""
    root = data_cfg.get("cache_dir", "") or os.environ.get("SSL_JAX_CACHE") or "~/.cache/ssl_jax"
    return os.path.abspath(os.path.expanduser(root))


def cache_path(data_cfg, label, *key_parts):
    """Returns <cache_root>/<label>-<hash of key_parts>: one folder per dataset version and image size."""
    digest = hashlib.sha256(json.dumps([_CACHE_FORMAT, *key_parts], sort_keys=True).encode()).hexdigest()
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:48] or "data"
    return os.path.join(cache_root(data_cfg), f"{label}-{digest[:16]}")


def _files(path, split):
    return {k: os.path.join(path, f"{split}_{k}") for k in ("images.npy", "labels.npy", "file_names.npy", "meta.json")}


def load_cache(path, split, name):
    """Returns the cached Source of `split` under `path` (images memory-mapped), or None if not complete."""
    files = _files(path, split)
    try:
        with open(files["meta.json"]) as f:
            meta = json.load(f)
        images = np.load(files["images.npy"], mmap_mode="r")
        labels = np.load(files["labels.npy"])
    except (OSError, ValueError):
        return None
    # The meta file is written last, so its presence means the arrays were complete; this check only guards
    # against files edited or truncated by hand.
    if images.shape != (meta["count"], meta["height"], meta["width"], 3) or labels.shape != (meta["count"],):
        return None
    file_names = None
    if meta.get("file_names"):
        try:
            file_names = np.load(files["file_names.npy"], mmap_mode="r")
        except (OSError, ValueError):
            return None
        if file_names.shape != (meta["count"],):
            return None
    return Source(images, labels.astype(np.int32, copy=False), list(meta["class_names"]), name, file_names)


_STALE_AFTER_S = 3600  # a temporary cache file of another host untouched this long belongs to a writer that died
_DEAD_WRITER_GRACE_S = 300  # ... and one of this host whose process is gone, untouched this long


def remove_stale_temporaries(path):
    """Removes the temporary files of cache writes that died (killed, preempted) in the cache folder `path`.

    A decode killed before it finished leaves its temporaries behind (ImageNet's can be tens of GB); each
    restart would add its own. Removed: those of this host whose process is gone (and not modified for five
    minutes), and any not modified for an hour (another host's, or an older ssl_jax's); a live writer's (several
    hosts may share one cache) stay.
    """
    host, now = socket.gethostname(), time.time()
    for name in os.listdir(path):
        if ".tmp-" not in name:
            continue
        full = os.path.join(path, name)
        owner = name.split(".tmp-", 1)[1].rsplit("-", 2)  # [host, pid, random]
        try:
            idle = now - os.path.getmtime(full)
            if len(owner) == 3 and owner[0] == host and owner[1].isdigit():
                # Its process is gone. The few minutes' grace covers a writer in another PID namespace that
                # shares the host name (containers with host networking), whose pid means nothing here.
                stale = idle > _DEAD_WRITER_GRACE_S and not _process_alive(int(owner[1]))
            else:
                stale = idle > _STALE_AFTER_S
            if stale:
                os.remove(full)
        except OSError:  # removed meanwhile by another process
            pass


def check_free_space(path, needed):
    """Raises DataError when the file system of `path` has less than `needed` bytes free.

    The cache is written through a memory map, and a memory-mapped write that finds the disk full kills the
    process with SIGBUS ("Bus error", no message), possibly hours into decoding ImageNet.
    """
    free = shutil.disk_usage(path).free
    if free < needed:
        raise DataError(f"the cache needs {needed / 1e9:.2f} GB in {path} but its disk has {free / 1e9:.2f} GB free; "
                        f"set data.cache_dir to a folder on a larger disk, or data.stream=true to decode the images "
                        f"for every batch instead of caching them")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def write_cache(path, split, decoded, count, class_names, name, origin, file_names=None):
    """Writes `decoded` items (index, item_name, image_HxWx3 uint8, label) to the cache and returns the Source.

    `file_names` (N str, by index, or None) are stored beside the images; a sequence that is filled while
    `decoded` runs (tfds records carry their names) is read after the last item.

    The arrays go to temporary files that are renamed into place (meta last), so an interrupted decode never
    leaves a cache that `load_cache` accepts; concurrent writers (several hosts, one cache) are harmless.
    Every image must have the size of the first one (DataError naming the item otherwise).
    """
    os.makedirs(path, exist_ok=True)
    files = _files(path, split)
    remove_stale_temporaries(path)
    tmp = {k: f"{v}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}" for k, v in files.items()}
    images, labels, seen = None, np.full((count,), -1, np.int32), np.zeros((count,), bool)
    try:
        for index, item_name, image, label in decoded:
            if images is None:
                height, width = image.shape[:2]
                check_free_space(path, count * height * width * 3)
                images = np.lib.format.open_memmap(tmp["images.npy"], mode="w+", dtype=np.uint8,
                                                   shape=(count, height, width, 3))
            if image.shape != images.shape[1:]:
                raise DataError(f"{item_name} is {image.shape[1]}x{image.shape[0]} but the first image was "
                                f"{images.shape[2]}x{images.shape[1]}; set data.image_size to resize all images")
            images[index], labels[index], seen[index] = image, label, True
        if images is None or not seen.all():
            raise DataError(f"{origin}: expected {count} images for split {split!r}, got {int(seen.sum())}")
        images.flush()
        shape = images.shape
        del images  # close the memmap before renaming it
        with open(tmp["labels.npy"], "wb") as f:  # a file object, so np.save adds no ".npy" suffix
            np.save(f, labels)
        keys = ["images.npy", "labels.npy"]
        if file_names is not None:
            with open(tmp["file_names.npy"], "wb") as f:
                np.save(f, np.asarray([str(n) for n in file_names], dtype=str))
            keys.append("file_names.npy")
        with open(tmp["meta.json"], "w") as f:
            json.dump(dict(count=count, height=shape[1], width=shape[2], class_names=list(class_names),
                           origin=origin, format=_CACHE_FORMAT, file_names=file_names is not None), f)
        for key in keys + ["meta.json"]:
            os.replace(tmp[key], files[key])
    finally:
        images = None  # noqa: F841  (drops the memmap before its temporary file is removed)
        if hasattr(decoded, "close"):  # stops the decoder (and its worker pool) on error
            decoded.close()
        for f in tmp.values():
            if os.path.exists(f):
                os.remove(f)
    source = load_cache(path, split, name)
    if source is None:
        raise DataError(f"cache {path} for split {split!r} was written but cannot be read back")
    return source
