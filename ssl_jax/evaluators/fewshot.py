"""Few-shot closed-form linear probe: ridge regression on frozen features (big_vision's fewshot evaluator).

For k shots per class: a class-balanced training subset (fixed seed, nested over k), features centred and
standardised with that subset's statistics, +-1 one-hot targets, W = (X^T X + l2 I)^-1 X^T Y solved on the
device, and test accuracy of argmax(X_test W). As big_vision, one fixed l2 (default 2^10): choosing it on
the test set would report an optimistic number.
"""
import functools
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.evaluators import subsets

# Standardisation floor: with one shot per class a feature can be constant over the subset.
_STD_EPS = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST  # TF32 matmuls on GPU would perturb the normal equations


def standardize(train_NxD, test_MxD):
    """Returns (train_NxD, test_MxD) centred and scaled per feature with the training rows' mean and std."""
    mean_D = train_NxD.mean(axis=0)
    std_D = jnp.sqrt(train_NxD.var(axis=0) + _STD_EPS)
    return (train_NxD - mean_D) / std_D, (test_MxD - mean_D) / std_D


def ridge_weights(x_NxD, y_N, num_classes, l2):
    """Returns W_DxC solving (X^T X + l2 I) W = X^T Y for +-1 one-hot targets Y_NxC."""
    targets_NxC = 2.0 * jax.nn.one_hot(y_N, num_classes, dtype=jnp.float32) - 1.0
    gram_DxD = jnp.dot(x_NxD.T, x_NxD, precision=_HIGHEST) + l2 * jnp.eye(x_NxD.shape[1], dtype=jnp.float32)
    return jnp.linalg.solve(gram_DxD, jnp.dot(x_NxD.T, targets_NxC, precision=_HIGHEST))


@functools.partial(jax.jit, static_argnames="num_classes")
def _ridge_top1(train_NxD, train_N, test_MxD, test_M, l2, *, num_classes):
    """Returns the test top-1 accuracy of the ridge probe fitted on standardised training features."""
    x_NxD, x_MxD = standardize(train_NxD.astype(jnp.float32), test_MxD.astype(jnp.float32))
    w_DxC = ridge_weights(x_NxD, train_N, num_classes, l2)
    predicted_M = jnp.argmax(jnp.dot(x_MxD, w_DxC, precision=_HIGHEST), axis=-1)
    return jnp.mean((predicted_M == test_M).astype(jnp.float32))


def fewshot_indices(train_labels_N, shots: Sequence[int], seed: int):
    """Returns {k: sorted indices of k examples per class}, nested over k (same seed)."""
    return {int(k): subsets.balanced_subset(train_labels_N, int(k), seed) for k in shots}


def short_classes_warnings(train_labels_N, shots: Sequence[int], num_classes: int):
    """Returns a warning for each k in `shots` that some class has fewer than k training examples of: the
    balanced subset takes all of such a class, so `fewshot_{k}shot_top1` is not a k-shot result for it."""
    counts = np.bincount(np.asarray(train_labels_N, np.int64), minlength=int(num_classes))
    out = []
    for k in sorted(set(int(k) for k in shots)):
        short = np.flatnonzero(counts < k)
        if short.size:
            out.append(f"warning: fewshot_{k}shot_top1: {short.size} of {len(counts)} classes have fewer than {k} "
                       f"training examples (the smallest has {counts.min()}); the probe takes all of theirs, so it "
                       f"is not a {k}-shot result (lower --config.eval.fewshot_shots)")
    return out


def fewshot_accuracy(train_feats_NxD, train_labels_N, test_feats_MxD, test_labels_M, num_classes: int, *,
                     shots: Sequence[int] = (1, 5, 10, 25), l2: float = 2.0 ** 10, seed: int = 0,
                     indices: Optional[Dict[int, np.ndarray]] = None) -> Dict[str, float]:
    """Returns {'fewshot_{k}shot_top1'} for each k in `shots`: ridge probes on k training examples per class.

    `indices` ({k: rows of train_feats_NxD}) replaces the seeded draw, e.g. when only the rows of the largest
    subset were encoded.
    """
    train_labels_N = np.asarray(train_labels_N)
    indices = indices if indices is not None else fewshot_indices(train_labels_N, shots, seed)
    test_x = jnp.asarray(test_feats_MxD, jnp.float32)
    test_y = jnp.asarray(np.asarray(test_labels_M), jnp.int32)
    result = {}
    for k, idx in sorted(indices.items()):
        top1 = _ridge_top1(jnp.asarray(np.asarray(train_feats_NxD)[idx], jnp.float32),
                           jnp.asarray(train_labels_N[idx], jnp.int32), test_x, test_y, jnp.float32(l2),
                           num_classes=int(num_classes))
        result[f"fewshot_{k}shot_top1"] = float(top1)
    return result
