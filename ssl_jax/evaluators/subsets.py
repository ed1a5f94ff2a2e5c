"""Class-balanced labelled subsets (semi-supervised and few-shot protocols), written to files for reproducibility.

A subset file holds one example a line: a training-set index (what `write_subset` writes), or a file name
as in the standard SimCLR ImageNet lists (`1percent.txt`, `10percent.txt`: `n01440764_10026.JPEG`), matched
against the source's `file_names` by base name (a line with folders, `cat/1.jpg`, also matches the folders,
for datasets whose base names repeat across classes).
"""
import collections
import os
import uuid

import numpy as np

from ssl_jax import data as data_lib
from ssl_jax.data import stream

_SHOWN = 5  # missing or ambiguous names quoted in an error


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
        raise ValueError(f"subset file {path} lists file names, but the {source.name!r} source has no file names "
                         f"(ImageFolder directories and archives and tfds datasets with a file_name feature, such "
                         f"as imagenet2012, have them); give training-set indices, one a line, instead")
    return np.unique(_match_names(lines, np.asarray(names).tolist(), path))


def _match_names(lines, names, path):
    by_base = collections.defaultdict(list)
    for i, name in enumerate(names):
        by_base[name.rsplit("/", 1)[-1]].append(i)
    found, missing, ambiguous = [], [], []
    for line in lines:
        line = line.replace(os.sep, "/")
        line = line[2:] if line.startswith("./") else line
        candidates = by_base.get(line.rsplit("/", 1)[-1], [])
        if "/" in line:
            candidates = [i for i in candidates if names[i] == line or names[i].endswith("/" + line)]
        if len(candidates) == 1:
            found.append(candidates[0])
        else:
            (ambiguous if candidates else missing).append(line)
    if missing:
        raise ValueError(f"subset file {path}: {len(missing)} of {len(lines)} names are not in the training set "
                         f"({len(names)} files, e.g. {names[0]!r}): {_quote(missing)}")
    if ambiguous:
        raise ValueError(f"subset file {path}: {len(ambiguous)} names match several training files (give their "
                         f"folders too, e.g. class/name.jpg): {_quote(ambiguous)}")
    return np.asarray(found, np.int64)


def _quote(names):
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


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
    """Returns a Source of the examples at `indices` whose images are read from `source` only when indexed
    (a streamed source's stay encoded, so the host pipeline decodes them in its worker processes)."""
    indices = np.asarray(indices, np.int64)
    images = source.images.take(indices) if isinstance(source.images, stream.EncodedImages) else \
        _Rows(source.images, indices)
    return data_lib.Source(images, np.asarray(source.labels[indices], np.int32), list(source.class_names),
                           source.name, data_lib.take_names(source.file_names, indices))
