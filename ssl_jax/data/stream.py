"""Streamed images (data.stream=True): decoded from their files for every batch, by worker processes.

A dataset whose fixed-size uint8 cache would not fit on disk (ImageNet at data.image_size=256: 250 GB) is read
as a Source whose `images` is an `EncodedImages`: an array-like N x S x S x 3 uint8 that holds file references
only. The host pipeline (`pipeline.HostLoader`, `pipeline.eval_batches`) decodes each batch with a `DecodePool`:
spawned worker processes (forking a process that runs JAX threads can deadlock) each decode a contiguous part
of the batch with the cache's preprocessing (`imagefolder.decode_image`: JPEG draft downscaling, shorter side
resized to S, centre crop), with a few batches in flight so decoding overlaps the device step; batches come
back in order. Streamed batches therefore equal cached ones bit for bit, and the device-side augmentation
(random resized crop of the S x S image) is unchanged.

Decoded rows come back through shared memory (each worker writes its rows into the batch's buffer), the
default, or as pickled arrays. `python -m ssl_jax.data.bench_jpeg` measures both: the workers' cost is the same
(about 3 CPU ms per 500x375 JPEG decoded to 256 px), but collecting a batch costs the consuming process, which
is the training loop, 0.03 CPU ms per image from shared memory against 0.15-0.5 ms unpickling, a limit of some
2,000-7,000 images/s, below what one GPU consumes.
"""
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import tarfile
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np

from ssl_jax import data as data_lib
from ssl_jax.data import imagefolder

TRANSPORTS = ("shm", "pickle")
_IN_PROCESS_ROWS = 256  # reads of up to this many rows outside the pipeline decode here (no pool start-up)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def imagefolder_source(path, split, data_cfg, name):
    """Returns the streamed Source of `split` of the ImageFolder directory or uncompressed .tar at `path`."""
    image_size = int(data_cfg.get("image_size", 0))
    if image_size < 1:
        raise data_lib.DataError("data.stream=True needs data.image_size > 0: the size images are resized and "
                                 "centre-cropped to as they are read (e.g. 256 for ImageNet)")
    num_workers = int(data_cfg.get("num_workers", 0))
    if os.path.isdir(path):
        files, class_names = imagefolder.layout(imagefolder.list_dir(path)[0], split, path)
        images = EncodedImages(path, [p for p, _ in files], image_size, num_workers)
    else:
        members, files, class_names = _tar_layout(path, split)
        names = [p for p, _ in files]
        images = EncodedImages(path, names, image_size, num_workers, offsets=[members[n].offset_data for n in names],
                               sizes=[members[n].size for n in names])
    labels = np.asarray([y for _, y in files], np.int32)
    return data_lib.Source(images, labels, class_names, name, images.names)


def _tar_layout(path, split):
    with open(path, "rb") as f:
        magic = f.read(6)
    if any(magic.startswith(m) for m in _COMPRESSED_MAGIC):
        raise data_lib.DataError(f"data.stream=True reads directories and uncompressed .tar archives, but {path} is "
                                 f"compressed (readable only from its start): unpack it, or set data.stream=False "
                                 f"to decode it once into the cache")
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise data_lib.DataError(f"data.path {path} is a file but not a readable .tar archive: {e}") from e
    with tar:
        members, folders = imagefolder.archive_members(tar, path)
    files, class_names = imagefolder.layout(list(members) + folders, split, path)
    return members, files, class_names


class EncodedImages:
    """Array-like images_NxSxSx3 uint8, decoded from image files on every read (S = image_size).

    `root` is a directory (row i is the file root/names[i]) or an uncompressed .tar archive (row i is its bytes
    offsets[i] : offsets[i] + sizes[i]). Indexing decodes in the calling process (in a DecodePool when more
    than a few hundred rows are read); the host pipeline decodes its batches in a DecodePool.
    """
    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, root, names, image_size, num_workers=0, offsets=None, sizes=None):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root, self.names = root, np.asarray(names, dtype=str)
        self.image_size, self.num_workers = int(image_size), int(num_workers)
        self._offsets = None if offsets is None else np.asarray(offsets, np.int64)
        self._sizes = None if sizes is None else np.asarray(sizes, np.int64)
        self.shape = (len(self.names), self.image_size, self.image_size, 3)

    def __len__(self):
        return self.shape[0]

    def take(self, rows):
        """Returns the EncodedImages of `rows` (int indices), in that order."""
        rows = np.asarray(rows, np.int64)
        in_tar = self._offsets is not None
        return EncodedImages(self.root, self.names[rows], self.image_size, self.num_workers,
                             self._offsets[rows] if in_tar else None, self._sizes[rows] if in_tar else None)

    def refs(self, rows):
        """Returns [(display name, path | (archive, offset, size))] of `rows`: what a worker needs to decode."""
        rows = np.asarray(rows, np.int64)
        if self._offsets is None:
            return [(p, p) for p in (os.path.join(self.root, n) for n in self.names[rows])]
        return [(f"{self.root}:{n}", (self.root, int(o), int(s)))
                for n, o, s in zip(self.names[rows], self._offsets[rows], self._sizes[rows])]

    def __getitem__(self, key):
        rows = np.arange(len(self))[key]  # an int, slice, index array or mask over the first axis
        return self._decode(rows.reshape(-1)).reshape(rows.shape + self.shape[1:])

    def _decode(self, rows):
        if len(rows) <= _IN_PROCESS_ROWS:
            out = np.empty((len(rows),) + self.shape[1:], np.uint8)
            _raise_if(_decode_refs(self.refs(rows), self.image_size, out))
            return out
        with DecodePool(self) as pool:
            parts = np.array_split(rows, -(-len(rows) // 1024))
            return np.concatenate([images for _, images in pool.map(parts)])

    def __array__(self, dtype=None, copy=None):
        images = self[:]
        return images if dtype is None else images.astype(dtype)

    def __repr__(self):
        return f"EncodedImages({self.root!r}, {len(self)} images, {self.image_size}x{self.image_size})"


# ----------------------------------------------------------------------------------------------------------
# Worker side: plain functions, pickled by reference into the spawned processes.
# ----------------------------------------------------------------------------------------------------------

def _read(ref):
    if isinstance(ref, str):
        return ref  # a path: PIL opens it (and reads only what the JPEG draft needs)
    path, offset, size = ref
    with open(path, "rb") as f:
        f.seek(offset)
        payload = f.read(size)
    if len(payload) != size:
        raise EOFError(f"{path} ends before byte {offset + size}")
    return payload


def _decode_refs(refs, image_size, out_RxSxSx3):
    """Decodes refs into out row by row; returns None, or the error message naming the file that failed."""
    for row, (name, ref) in enumerate(refs):
        try:
            out_RxSxSx3[row] = imagefolder.decode_image(_read(ref), image_size)
        except Exception as e:  # pylint: disable=broad-except  (raised as DataError naming the file by the parent)
            return f"cannot decode image {name}: {type(e).__name__}: {e}"
    return None


def _raise_if(error):
    if error is not None:
        raise data_lib.DataError(error)


_ATTACHED = collections.OrderedDict()  # this worker's handles on the pool's shared buffers, by name


def _decode_to_shared(buffer_name, capacity, start, refs, image_size):
    buffer = _ATTACHED.get(buffer_name)
    if buffer is None:
        buffer = _ATTACHED[buffer_name] = shared_memory.SharedMemory(name=buffer_name)
        while len(_ATTACHED) > 16:  # buffers replaced by larger ones are never written again
            _ATTACHED.popitem(last=False)[1].close()
    rows = np.ndarray((capacity, image_size, image_size, 3), np.uint8, buffer=buffer.buf)[start:start + len(refs)]
    return _decode_refs(refs, image_size, rows)


def _decode_to_array(refs, image_size):
    out = np.empty((len(refs), image_size, image_size, 3), np.uint8)
    return _decode_refs(refs, image_size, out), out


# ----------------------------------------------------------------------------------------------------------
# The pool.
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    count: int
    slot: object  # the shared buffer's slot, or None
    futures: list


class DecodePool:
    """Spawned worker processes that decode batches of rows of an EncodedImages, each batch split over all of
    them; `in_flight` batches may be submitted and not yet collected. Use as a context manager (or close())."""
    DEFAULT_IN_FLIGHT = 3

    def __init__(self, images, num_workers=0, transport="shm", in_flight=DEFAULT_IN_FLIGHT):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.num_workers = num_workers or images.num_workers or data_lib.default_num_workers()
        self.in_flight = in_flight
        self._images, self._transport = images, transport
        self._free_slots = list(range(in_flight))
        self._buffers = [None] * in_flight
        self._executor = concurrent.futures.ProcessPoolExecutor(self.num_workers,
                                                                mp_context=multiprocessing.get_context("spawn"),
                                                                initializer=imagefolder.init_decode_worker)

    def submit(self, rows):
        """Starts decoding `rows` (int indices) and returns the job to pass to `result`."""
        rows = np.asarray(rows, np.int64)
        refs, size = self._images.refs(rows), self._images.image_size
        bounds = np.linspace(0, len(rows), min(self.num_workers, len(rows)) + 1).round().astype(int)
        parts = [(int(a), refs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if self._transport == "pickle" or not len(rows):
            return _Job(len(rows), None,
                        [imagefolder.submit(self._executor, _decode_to_array, r, size) for _, r in parts])
        if not self._free_slots:
            raise RuntimeError(f"more than in_flight={self.in_flight} jobs submitted and not collected")
        slot = self._free_slots.pop()
        buffer, row_bytes = self._buffers[slot], size * size * 3
        if buffer is None or buffer.size < len(rows) * row_bytes:
            if buffer is not None:
                buffer.close()
                buffer.unlink()
            buffer = self._buffers[slot] = shared_memory.SharedMemory(create=True, size=len(rows) * row_bytes)
        capacity = buffer.size // row_bytes
        futures = [imagefolder.submit(self._executor, _decode_to_shared, buffer.name, capacity, a, r, size)
                   for a, r in parts]
        return _Job(len(rows), slot, futures)

    def result(self, job, timeout=None):
        """Returns images_BxSxSx3 uint8 of `job` in row order, or None if it is not done within `timeout` s.
        Raises DataError naming the file that failed to decode."""
        _, not_done = concurrent.futures.wait(job.futures, timeout)
        if not_done:
            return None
        try:
            outputs = [f.result() for f in job.futures]
        except BrokenProcessPool as e:
            raise data_lib.DataError(imagefolder.WORKER_DIED) from e
        size = self._images.image_size
        if job.slot is None:
            for error, _ in outputs:
                _raise_if(error)
            arrays = [a for _, a in outputs]
            return np.concatenate(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        for error in outputs:
            _raise_if(error)  # the slot stays taken: the pool is closed after an error
        buffer = self._buffers[job.slot]
        images = np.ndarray((job.count, size, size, 3), np.uint8, buffer=buffer.buf).copy()
        self._free_slots.append(job.slot)
        return images

    def map(self, rows_iterable, stop=None):
        """Yields (rows, images_BxSxSx3) for each `rows` of the iterable, in order, with up to `in_flight` batches
        decoding ahead; returns early once the threading.Event `stop` is set."""
        rows_iterator, pending = iter(rows_iterable), collections.deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.in_flight:
                rows = next(rows_iterator, None)
                if rows is None:
                    exhausted = True
                else:
                    pending.append((rows, self.submit(rows)))
            if not pending or (stop is not None and stop.is_set()):
                return
            images = self.result(pending[0][1], timeout=None if stop is None else 0.1)
            if images is not None:
                yield pending.popleft()[0], images

    def close(self):
        """Stops the workers (each finishes the part of a batch it is decoding) and frees the shared buffers."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for buffer in self._buffers:
            if buffer is not None:
                buffer.close()
                buffer.unlink()
        self._buffers = [None] * self.in_flight

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
