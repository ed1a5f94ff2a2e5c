"""Offline linear evaluation on frozen, precomputed features (the fast path of the linear protocol).

A softmax classifier trained with SGD (Nesterov momentum 0.9, cosine-decayed learning rate) on features
standardised with the training mean and variance, the equivalent of the affine-free BatchNorm that the
SimCLR and MoCo linear protocols put before the classifier. Features stay on one device: even ImageNet's
1.28M x 2048 float32 features (10 GB) fit, and the classifier is tiny, so sharding would buy nothing.
"""
import functools
import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

# BatchNorm's default epsilon, as in the standardisation it stands in for.
_BN_EPS = 1e-5
# Rows scored per step at evaluation time: bounds the logits buffer for ImageNet-sized sets.
_EVAL_CHUNK = 8192


def _logits(params, x_BxD):
    """Returns logits_BxC of the linear classifier."""
    return x_BxD @ params["w"] + params["b"]


def _loss(params, x_BxD, labels_B):
    """Returns the mean softmax cross-entropy of the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x_BxD), labels_B).mean()


@functools.partial(jax.jit, static_argnames="topk")
def _topk_correct(params, x_NxD, labels_N, topk):
    """Returns bool_NxK: whether the true class is among the j+1 highest logits (ties: lower index first)."""
    num_rows = x_NxD.shape[0]
    chunk = min(_EVAL_CHUNK, num_rows)
    padded = math.ceil(num_rows / chunk) * chunk
    x_GxSxD = jnp.pad(x_NxD, ((0, padded - num_rows), (0, 0))).reshape(-1, chunk, x_NxD.shape[1])
    labels_GxS = jnp.pad(labels_N, (0, padded - num_rows)).reshape(-1, chunk)

    def correct(args):
        x_SxD, labels_S = args
        _, top_SxK = jax.lax.top_k(_logits(params, x_SxD), topk)
        return jnp.cumsum(top_SxK == labels_S[:, None], axis=1) > 0

    return jax.lax.map(correct, (x_GxSxD, labels_GxS)).reshape(padded, topk)[:num_rows]


def _make_tx(hparams) -> optax.GradientTransformation:
    """Returns SGD (Nesterov 0.9, cosine decay) with L2 on the weights; hparams may be traced scalars."""
    def cosine_lr(count):
        # optax.cosine_decay_schedule checks decay_steps in Python, so it cannot take a traced length.
        progress = jnp.minimum(count, hparams["total_steps"]) / hparams["total_steps"]
        return hparams["lr"] * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

    return optax.chain(
        optax.add_decayed_weights(hparams["weight_decay"], mask={"w": True, "b": False}),
        optax.sgd(cosine_lr, momentum=0.9, nesterov=True),
    )


# Module level, hyperparameters traced: repeated evaluations (every few pretraining epochs) compile once.
@functools.partial(jax.jit, static_argnames="batch_size", donate_argnums=(0, 1))
def _run_epoch(params, opt_state, hparams, key, x_NxD, labels_N, *, batch_size):
    """Returns (params, opt_state) after one shuffled pass of full mini-batches over the training features."""
    steps = x_NxD.shape[0] // batch_size
    order_SxB = jax.random.permutation(key, x_NxD.shape[0])[: steps * batch_size].reshape(steps, batch_size)
    tx = _make_tx(hparams)

    def step(carry, idx_B):
        params, opt_state = carry
        grads = jax.grad(_loss)(params, x_NxD[idx_B], labels_N[idx_B])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order_SxB)
    return params, opt_state


def train_linear(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    normalize: bool = True,
    seed: int = 0,
) -> Dict[str, float]:
    """Returns {'linear_top1', 'linear_top5', 'linear_train_top1'} fractions; top-5 only if num_classes >= 5.

    Each epoch is one jitted `lax.scan` over shuffled mini-batches of `batch_size` rows (clamped to N; the
    last partial batch of each epoch is dropped, a different one every epoch). `weight_decay` is an L2
    penalty on the weights only, added to the gradient before momentum as in PyTorch's SGD.
    """
    x_tr_NxD = jnp.asarray(train_feats, jnp.float32)
    x_te_MxD = jnp.asarray(test_feats, jnp.float32)
    y_tr_N = jnp.asarray(train_labels, jnp.int32)
    y_te_M = jnp.asarray(test_labels, jnp.int32)
    if normalize:
        mean_D = x_tr_NxD.mean(axis=0)
        inv_std_D = jax.lax.rsqrt(x_tr_NxD.var(axis=0) + _BN_EPS)
        x_tr_NxD = (x_tr_NxD - mean_D) * inv_std_D
        x_te_MxD = (x_te_MxD - mean_D) * inv_std_D

    num_train, dim = x_tr_NxD.shape
    batch_size = min(batch_size, num_train)
    hparams = {"lr": lr, "weight_decay": weight_decay,
               "total_steps": max(1, epochs * (num_train // batch_size))}
    # Zero init: the problem is convex, and zeros make the run depend on the seed only through shuffling.
    params = {"w": jnp.zeros((dim, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    opt_state = _make_tx(hparams).init(params)
    key = jax.random.PRNGKey(seed)
    for epoch in range(epochs):
        params, opt_state = _run_epoch(params, opt_state, hparams, jax.random.fold_in(key, epoch),
                                       x_tr_NxD, y_tr_N, batch_size=batch_size)

    if not all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params)):
        # top_k of NaN logits picks the first classes: a chance-like accuracy, not an error, would be reported.
        cause = "the training features hold NaN or inf" if not bool(jnp.isfinite(x_tr_NxD).all()) else \
            "try a lower learning rate (eval.linear_lr)"
        raise ValueError(f"the linear classifier's weights are not finite after {epochs} epochs at learning rate "
                         f"{lr:g}: {cause}")
    topk = min(5, num_classes)
    correct_te_MxK = np.asarray(_topk_correct(params, x_te_MxD, y_te_M, topk))
    correct_tr_NxK = np.asarray(_topk_correct(params, x_tr_NxD, y_tr_N, topk))
    result = {"linear_top1": float(correct_te_MxK[:, 0].mean()),
              "linear_train_top1": float(correct_tr_NxK[:, 0].mean())}
    if num_classes >= 5:
        result["linear_top5"] = float(correct_te_MxK[:, 4].mean())
    return result
