"""Host input pipeline: the data order is a pure function of (seed, step), so resuming is exact.

Every process computes the same global batch of indices for a step and loads only its contiguous slice;
`jax.make_array_from_process_local_data` then assembles the global batch on the mesh. Images are read from
the uint8 cache, or for a streamed source (data.stream=True) decoded by the worker processes of a
`stream.DecodePool`, in the same order.
"""
import functools
import itertools
import queue
import threading

import numpy as np

from ssl_jax.data import stream


@functools.lru_cache(maxsize=4)  # a training run asks for the same epoch's permutation every step
def _permutation(seed, epoch, n):
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    perm.flags.writeable = False
    return perm


def epoch_permutation(seed, epoch, n):
    """Returns perm_N int64: the shuffled order of the n examples in `epoch`, the same for the same (seed, epoch)."""
    return _permutation(int(seed), int(epoch), int(n)).copy()


def steps_per_epoch(n, batch_size):
    """Returns the number of full global batches in an epoch of n examples (the remainder is dropped)."""
    if batch_size < 1 or n < batch_size:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the number of examples ({n})")
    return n // batch_size


def batch_indices(seed, n, batch_size, step):
    """Returns indices_B int64: the examples of global batch `step` (epoch = step // steps_per_epoch)."""
    epoch, within = divmod(int(step), steps_per_epoch(n, batch_size))
    return _permutation(int(seed), epoch, int(n))[within * batch_size:(within + 1) * batch_size].copy()


def local_slice(indices, process_index, process_count):
    """Returns the contiguous 1/process_count part of the global batch `indices` that this process loads."""
    if not 0 <= process_index < process_count:  # past the end the slice would be empty, not an error
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if len(indices) % process_count:
        raise ValueError(f"global batch size {len(indices)} is not divisible by the process count {process_count}")
    per_process = len(indices) // process_count
    return indices[process_index * per_process:(process_index + 1) * per_process]


class _Failure:
    def __init__(self, error):
        self.error = error


class HostLoader:
    """Iterator over this process's part of global batches `start_step`, `start_step + 1`, ... (endless).

    Yields {'image': uint8 local_BxHxWx3, 'label': int32 local_B}, or with resident=True (images already on
    the device) {'index': int32 local_B, 'label': int32 local_B}. A background thread prepares up to
    `prefetch` batches ahead while the device computes; its exceptions are raised by `next`. For a streamed
    source (images a stream.EncodedImages) the thread feeds a pool of decoding processes, `prefetch + 1`
    batches in flight besides. Call `close()` (or use `with`) to stop the thread and the processes.
    """

    def __init__(self, source, batch_size, seed, start_step, process_index=0, process_count=1, prefetch=2,
                 resident=False):
        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by the process count {process_count}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.steps_per_epoch = steps_per_epoch(len(source), batch_size)
        self._source, self._batch_size, self._seed = source, batch_size, seed
        self._process_index, self._process_count, self._resident = process_index, process_count, resident
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._closed = False
        streamed = isinstance(source.images, stream.EncodedImages) and not resident
        self._in_flight = prefetch + 1
        self._thread = threading.Thread(target=self._produce_streamed if streamed else self._produce,
                                        args=(start_step,), name="HostLoader", daemon=True)
        self._thread.start()

    def _local_indices(self, step):
        global_B = batch_indices(self._seed, len(self._source), self._batch_size, step)
        return local_slice(global_B, self._process_index, self._process_count)

    def batch(self, step):
        """Returns the dict this loader yields for global step `step`, computed in the calling thread."""
        local_B = self._local_indices(step)
        labels = np.asarray(self._source.labels[local_B], np.int32)
        if self._resident:
            return {"index": local_B.astype(np.int32), "label": labels}
        # Sorted reads are much faster from a memory-mapped cache; the result keeps the batch's order.
        order = np.argsort(local_B)
        images = np.empty((len(local_B),) + self._source.images.shape[1:], np.uint8)
        images[order] = self._source.images[local_B[order]]
        return {"image": images, "label": labels}

    def _produce(self, step):
        try:
            while not self._stop.is_set():
                self._put(self.batch(step))
                step += 1
        except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
            self._put(_Failure(e))

    def _produce_streamed(self, step):
        try:
            with stream.DecodePool(self._source.images, in_flight=self._in_flight) as pool:
                rows = (self._local_indices(s) for s in itertools.count(step))
                for local_B, images in pool.map(rows, stop=self._stop):
                    self._put({"image": images, "label": np.asarray(self._source.labels[local_B], np.int32)})
        except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
            self._put(_Failure(e))

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self):
        """Stops the background thread (and decoding processes) and drops prefetched batches."""
        self._closed = True
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_batches(source, batch_size, process_index=0, process_count=1):
    """Yields (images_BxHxWx3 uint8, labels_B int32, valid_B bool) over all examples in order; the last batch
    is padded to batch_size with zeros and valid=False. With process_count > 1, B = batch_size / process_count
    and each process gets its contiguous part of every global batch."""
    n = len(source)
    index_batches = [local_slice(np.arange(start, start + batch_size), process_index, process_count)
                     for start in range(0, n, batch_size)]
    kept_batches = [index_B[index_B < n] for index_B in index_batches]  # contiguous runs of indices
    if isinstance(source.images, stream.EncodedImages):
        with stream.DecodePool(source.images) as pool:
            yield from _padded(source, index_batches, (x for _, x in pool.map(kept_batches)), n)
    else:
        yield from _padded(source, index_batches, (source.images[k[0]:k[-1] + 1] if len(k) else None
                                                   for k in kept_batches), n)


def _padded(source, index_batches, kept_images, n):
    for index_B, kept_images_K in zip(index_batches, kept_images):
        valid_B = index_B < n
        kept = index_B[valid_B]
        images = np.zeros((len(index_B),) + source.images.shape[1:], np.uint8)
        labels = np.zeros((len(index_B),), np.int32)
        if len(kept):
            images[:len(kept)] = kept_images_K
            labels[:len(kept)] = source.labels[kept[0]:kept[-1] + 1]
        yield images, labels, valid_B
