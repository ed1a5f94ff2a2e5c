"""Frozen-feature extraction: run an encoder over a batch iterator on the mesh, collect host arrays.

Multi-process: each process feeds only its part of every global batch (`pipeline.eval_batches(source, B,
jax.process_index(), jax.process_count())`), and every process gets back the features of all of them,
in global order, so a kNN or linear probe computed on the host gives the same numbers on every process.
"""
import functools
from typing import Callable, Iterable, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import metrics
from ssl_jax.parallel import DATA_AXIS as _DATA_AXIS


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
    """Returns the global array x_B... on `mesh`, batch axis split over "data", from this process's rows x_b...

    B = b x the number of processes (in one process x is the whole batch); x's rows must split evenly over
    this process's devices of the mesh.
    """
    n_local = len(mesh.local_devices)
    if x.shape[0] % n_local:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by this process's {n_local} devices of axis "
                         f"{_DATA_AXIS!r}; pad the batch to a multiple of it")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(_DATA_AXIS)), np.asarray(x))


@functools.lru_cache(maxsize=8)
def _replicator(mesh):
    """Returns a jitted identity whose outputs are replicated on every device of `mesh` (an all-gather)."""
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def extract_features(
    encode_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    desc: Optional[str] = None,
    progress: bool = True,
    total: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (features_NxD float32, labels_N int32) for the valid rows of all global batches, in order.

    `batches` yields this process's part of each global batch: (images_bxHxWx3 uint8, labels_b, valid_mask_b)
    with a static b divisible by this process's devices (in one process, the whole batch); rows whose mask is
    False (padding of the last batch) are dropped. With several processes the features, labels and masks
    of all processes are gathered, so every process returns the same arrays. `encode_fn(images) -> feats_BxD`
    is called as given: jit it in the caller with the parameters as arguments (e.g.
    `lambda x: encode_jit(params, batch_stats, x)`), never closed over, or they become compiled-in constants.
    """
    encode = encode_fn
    feats, labels = [], []

    def collect(out_BxD, labels_B, mask_B):
        keep_B = np.asarray(mask_B, dtype=bool)
        feats.append(np.asarray(out_BxD, dtype=np.float32)[keep_B])
        labels.append(np.asarray(labels_B, dtype=np.int32)[keep_B])

    try:
        _encode_all(encode, batches, mesh, collect, desc, progress, total)
    finally:  # an error or Ctrl-C midway: a generator's decode workers stop now, not when the traceback goes
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(feats), np.concatenate(labels)


def _encode_all(encode, batches, mesh, collect, desc, progress, total):
    """Encodes every batch, passing (features, labels, mask) of each to `collect` one batch behind."""
    pending = None
    for images_b, labels_b, mask_b in metrics.progress_bar(total, desc=desc, enabled=progress, unit="batch",
                                                           iterable=batches):
        out_BxD = encode(shard_batch(images_b, mesh))
        if out_BxD.is_fully_addressable:
            labels_B, mask_B = labels_b, mask_b
        else:  # other processes hold the rest of the batch: gather it (and its labels and mask) everywhere
            out_BxD, labels_B, mask_B = _replicator(mesh)(
                (out_BxD, shard_batch(np.asarray(labels_b, np.int32), mesh), shard_batch(np.asarray(mask_b), mesh)))
            labels_B.copy_to_host_async()
            mask_B.copy_to_host_async()
        # Start the device->host copy now and fetch the previous batch meanwhile, so the device always has
        # the next batch queued while the host waits on a result.
        out_BxD.copy_to_host_async()
        if pending is not None:
            collect(*pending)
        pending = (out_BxD, labels_B, mask_B)
    if pending is not None:
        collect(*pending)
