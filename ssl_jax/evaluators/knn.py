"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, InstDisc).

Cosine similarity between L2-normalised features; each of the k nearest training examples votes for its
class with weight exp(sim / T); the class scores are the summed votes. This is the monitor that
solo-learn and lightly report as "knn acc" (k=200, T=0.1).

Accuracy is that of the argmax of the scores: a class tied with the true one counts as predicted when its
index is lower (as argmax and top_k break ties), so a collapsed representation, whose equal features give
several classes equal scores, is not credited with every tied class. The weights it ranks by are
exp((sim - sim_nearest) / T), the same order as exp(sim / T) (one positive factor per test row) without
overflowing float32 at small T (exp(sim / T) is inf from sim / T > 88, e.g. T = 0.01 and sim > 0.89).
"""
import functools
import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax.parallel import DATA_AXIS as _DATA_AXIS


def _l2_normalize(x_NxD: jax.Array) -> jax.Array:
    """Returns x_NxD scaled to unit rows (zero rows, i.e. padding, stay zero)."""
    x_NxD = x_NxD.astype(jnp.float32)
    return x_NxD * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_NxD * x_NxD, axis=-1, keepdims=True), 1e-24))


def _chunk_scores(bank_NxD, bank_labels_N, test_SxD, num_classes, k, temperature, relative=False):
    """Returns class scores_SxC of one chunk of unit test rows against the unit training bank (relative: each
    row's weights divided by its nearest neighbour's, exp((sim - sim_nearest) / T), which cannot overflow)."""
    # HIGHEST: on GPU the default float32 matmul may use TF32, which reorders near-tied neighbours.
    sim_SxN = jnp.dot(test_SxD, bank_NxD.T, precision=jax.lax.Precision.HIGHEST)
    sim_SxK, idx_SxK = jax.lax.top_k(sim_SxN, k)
    if relative:  # top_k sorts descending: column 0 is the nearest neighbour
        sim_SxK = sim_SxK - sim_SxK[:, :1]
    weights_SxK = jnp.exp(sim_SxK / temperature)
    labels_SxK = bank_labels_N[idx_SxK]
    rows_Sx1 = jnp.arange(test_SxD.shape[0])[:, None]
    # Scatter-add instead of a one-hot einsum: a one-hot S x K x C tensor is 800 MB for ImageNet.
    return jnp.zeros((test_SxD.shape[0], num_classes), jnp.float32).at[rows_Sx1, labels_SxK].add(weights_SxK)


def _local_scores(bank_NxD, bank_labels_N, test_MxD, *, num_classes, k, temperature, chunk, relative):
    """Returns scores_MxC for this device's test rows (M a multiple of chunk), one chunk at a time."""
    bank_NxD = _l2_normalize(bank_NxD)
    test_GxSxD = _l2_normalize(test_MxD).reshape(-1, chunk, test_MxD.shape[-1])
    scores_GxSxC = jax.lax.map(
        lambda t_SxD: _chunk_scores(bank_NxD, bank_labels_N, t_SxD, num_classes, k, temperature, relative),
        test_GxSxD)
    return scores_GxSxC.reshape(-1, num_classes)


@functools.lru_cache(maxsize=32)
def _build_scores_fn(mesh, num_classes, k, temperature, chunk, relative=False):
    """Returns a jitted scores function, built once per (mesh, settings) so repeated calls do not retrace."""
    body = functools.partial(_local_scores, num_classes=num_classes, k=k, temperature=temperature,
                             chunk=chunk, relative=relative)
    if mesh is None:
        return jax.jit(body)
    # The bank is replicated; every device scores its own slice of the test rows.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(_DATA_AXIS)),
                                 out_specs=P(_DATA_AXIS)))


def knn_predict(
    train_feats_NxD,
    train_labels_N,
    test_feats_MxD,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    mesh: Optional[jax.sharding.Mesh] = None,
    relative: bool = False,
) -> jax.Array:
    """Returns kNN class scores_MxC (summed exp(cos / T) weights of the k nearest training rows per class).

    k is clamped to N. Test rows are processed `chunk_size` at a time (peak memory chunk_size x N floats
    per device); with `mesh`, test rows are split over its "data" axis and the bank is replicated.
    relative: weights exp((cos - cos_nearest) / T) instead, each row's scores divided by exp(cos_nearest / T):
    the same ranking, never inf (exp(cos / T) overflows float32 for T below about 1/88); a vote more than
    about 87 T below the nearest one's similarity then underflows to 0.
    """
    num_test = test_feats_MxD.shape[0]
    k = min(int(k), train_feats_NxD.shape[0])
    n_shards = 1 if mesh is None else mesh.shape[_DATA_AXIS]
    rows_per_shard = max(1, math.ceil(num_test / n_shards))
    chunk = min(int(chunk_size), rows_per_shard)
    padded_rows = n_shards * math.ceil(rows_per_shard / chunk) * chunk
    test_MxD = jnp.pad(jnp.asarray(test_feats_MxD, jnp.float32), ((0, padded_rows - num_test), (0, 0)))
    bank_NxD = jnp.asarray(train_feats_NxD, jnp.float32)
    bank_labels_N = jnp.asarray(train_labels_N, jnp.int32)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        bank_NxD = jax.device_put(bank_NxD, replicated)
        bank_labels_N = jax.device_put(bank_labels_N, replicated)
        test_MxD = jax.device_put(test_MxD, NamedSharding(mesh, P(_DATA_AXIS)))
    scores_fn = _build_scores_fn(mesh, int(num_classes), k, float(temperature), chunk, bool(relative))
    return scores_fn(bank_NxD, bank_labels_N, test_MxD)[:num_test]


def class_rank(logits_NxC, labels_N):
    """Returns rank_N: how many classes rank above the true one, ties going to the lower index (argmax's order);
    a row with a non-finite logit gets rank C (never correct). Counting only strictly higher logits would
    credit every class of a tie: an untrained zero output layer, NaN logits, or a collapsed representation's
    equal kNN scores would score 100%. In jnp: the kNN scores may be sharded over the devices of several
    processes."""
    true_N = jnp.take_along_axis(logits_NxC, labels_N[:, None], axis=1)
    lower_NxC = jnp.arange(logits_NxC.shape[1])[None, :] < labels_N[:, None]
    rank_N = jnp.sum((logits_NxC > true_N) | ((logits_NxC == true_N) & lower_NxC), axis=1)
    return jnp.where(jnp.isfinite(logits_NxC).all(axis=1), rank_N, logits_NxC.shape[1])


def _topk_correct(scores_MxC: jax.Array, labels_M: jax.Array, topk: int) -> jax.Array:
    """Returns bool_M: the true class has a positive score and fewer than `topk` classes rank above it
    (class_rank: argmax's tie-breaking, so tied classes are not all credited)."""
    true_M = jnp.take_along_axis(scores_MxC, labels_M[:, None], axis=1)[:, 0]
    # Zero-score classes got no neighbour's vote; counting them among the top 5 would reward ties at 0.
    return (class_rank(scores_MxC, labels_M) < topk) & (true_M > 0)


def knn_accuracy(
    train_feats_NxD,
    train_labels_N,
    test_feats_MxD,
    test_labels_M,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Dict[str, float]:
    """Returns {'knn_top1', 'knn_top5'} as fractions in [0, 1]; top-5 only when num_classes >= 5."""
    scores_MxC = knn_predict(train_feats_NxD, train_labels_N, test_feats_MxD, num_classes, k=k,
                             temperature=temperature, chunk_size=chunk_size, mesh=mesh, relative=True)
    # Through NumPy: a label array committed to one device cannot meet scores sharded over a mesh.
    labels_M = jnp.asarray(np.asarray(test_labels_M), jnp.int32)
    result = {"knn_top1": float(jnp.mean(_topk_correct(scores_MxC, labels_M, 1)))}
    if num_classes >= 5:
        result["knn_top5"] = float(jnp.mean(_topk_correct(scores_MxC, labels_M, 5)))
    return result
