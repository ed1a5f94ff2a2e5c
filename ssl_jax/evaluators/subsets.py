"""Class-balanced labelled subsets (semi-supervised and few-shot protocols), written to files for reproducibility.

A subset file holds one example a line: a training-set index (what `write_subset` writes), or a file name
as in the standard SimCLR ImageNet lists (`1percent.txt`, `10percent.txt`: `n01440764_10026.JPEG`), matched
against the source's `file_names` by base name.
"""
import os
import uuid

import numpy as np

from ssl_jax import data as data_lib


def per_class_count(labels, fraction_or_per_class):
    """Returns the examples to take per class: an int >= 1 as is, a fraction in (0, 1) of N spread over C."""
    labels = np.asarray(labels)
    if isinstance(fraction_or_per_class, (int, np.integer)) and fraction_or_per_class >= 1:
        return int(fraction_or_per_class)
    fraction = float(fraction_or_per_class)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a subset is a fraction in (0, 1) or a per-class count >= 1, got {fraction_or_per_class}")
    num_classes = len(np.unique(labels))
    # Rounded per class, at least one: 1% of CIFAR-10 is 50 per class, of ImageNet ~13 (SimCLR's lists: 12-13).
    return max(1, int(round(fraction * len(labels) / num_classes)))


def balanced_subset(labels, fraction_or_per_class, seed):
    """Returns sorted int64 indices: the same number of examples of every class (all of a smaller class).

    Each class draws from its own generator seeded by (seed, class), so the subset is a pure function of
    (labels, size, seed), and subsets of the same seed are nested: 5 shots per class contain the 1-shot ones.
    """
    labels = np.asarray(labels)
    count = per_class_count(labels, fraction_or_per_class)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([int(seed), int(c)]).permutation(len(members))
        chosen.append(members[order[:count]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def write_subset(path, indices):
    """Writes one index a line to `path` atomically (a temporary file renamed into place); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.writelines(f"{int(i)}\n" for i in indices)
    os.replace(tmp, path)
    return path


def read_subset(path, source):
    """Returns sorted int64 indices into `source` listed in `path` (indices, or file names matched by base name)."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"subset file {path} is empty")
    if all(line.isdigit() for line in lines):
        indices = np.asarray([int(line) for line in lines], np.int64)
        if indices.max() >= len(source):
            raise ValueError(f"subset file {path} lists index {indices.max()} but the training set has "
                             f"{len(source)} examples: was it written for another dataset?")
        return np.unique(indices)
    names = getattr(source, "file_names", None)
    if names is None:
        raise ValueError(f"subset file {path} lists file names, but the {source.name!r} source does not record "
                         f"its file names; give training-set indices, one a line, instead")
    position = {os.path.basename(str(n)): i for i, n in enumerate(names)}
    missing = [line for line in lines if os.path.basename(line) not in position]
    if missing:
        raise ValueError(f"subset file {path}: {len(missing)} of {len(lines)} names are not in the training set, "
                         f"e.g. {missing[0]!r}")
    return np.unique(np.asarray([position[os.path.basename(line)] for line in lines], np.int64))


class _Rows:
    """Array-like rows `indices` of `images`, read on access (a 10% ImageNet subset need not fit in memory)."""

    def __init__(self, images, indices):
        self._images, self._indices = images, np.asarray(indices, np.int64)
        self.shape = (len(self._indices),) + tuple(images.shape[1:])
        self.dtype = images.dtype

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, key):
        rows = self._indices[key]
        if np.ndim(rows) == 0:
            return np.asarray(self._images[rows])
        order = np.argsort(rows)  # sorted reads are much faster from a memory-mapped cache
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        out[order] = self._images[rows[order]]
        return out


def lazy_subset(source, indices):
    """Returns a Source of the examples at `indices` whose images are read from `source` only when indexed."""
    indices = np.asarray(indices, np.int64)
    return data_lib.Source(_Rows(source.images, indices), np.asarray(source.labels[indices], np.int32),
                           list(source.class_names), source.name)
