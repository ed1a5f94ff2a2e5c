"""Frozen-feature extraction: run an encoder over a batch iterator on the mesh, collect host arrays."""
from typing import Callable, Iterable, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ssl_jax.parallel import DATA_AXIS as _DATA_AXIS


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
    """Returns host array x_B... on `mesh`, its leading (batch) axis split over "data" (single process)."""
    n_shards = mesh.shape[_DATA_AXIS]
    if x.shape[0] % n_shards:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n_shards} devices of axis "
                         f"{_DATA_AXIS!r}; pad the batch to a multiple of it")
    return jax.device_put(x, NamedSharding(mesh, P(_DATA_AXIS)))


def extract_features(
    encode_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    desc: Optional[str] = None,
    progress: bool = True,
    total: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (features_NxD float32, labels_N int32) for the valid rows of all `batches`, in order.

    `batches` yields (images_BxHxWx3 uint8, labels_B, valid_mask_B) with a static B divisible by the mesh
    size; rows whose mask is False (padding of the last batch) are dropped. `encode_fn(images) -> feats_BxD`
    is called as given: jit it in the caller with the parameters as arguments (e.g.
    `lambda x: encode_jit(params, batch_stats, x)`), never closed over, or they become compiled-in constants.
    """
    encode = encode_fn
    feats, labels = [], []

    def collect(out_BxD, labels_B, mask_B):
        keep_B = np.asarray(mask_B, dtype=bool)
        feats.append(np.asarray(out_BxD, dtype=np.float32)[keep_B])
        labels.append(np.asarray(labels_B, dtype=np.int32)[keep_B])

    pending = None
    for images_B, labels_B, mask_B in tqdm(batches, desc=desc, total=total, disable=not progress):
        out_BxD = encode(shard_batch(images_B, mesh))
        # Start the device->host copy now and fetch the previous batch meanwhile, so the device always has
        # the next batch queued while the host waits on a result.
        out_BxD.copy_to_host_async()
        if pending is not None:
            collect(*pending)
        pending = (out_BxD, labels_B, mask_B)
    if pending is not None:
        collect(*pending)

    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(feats), np.concatenate(labels)
