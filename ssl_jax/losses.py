"""Pure loss functions. Each takes `axis_name` (None = unsharded) and says what it averages over."""
import jax
import jax.numpy as jnp

from ssl_jax import parallel

_MASK = -1e9  # large negative, not -inf: keeps logsumexp and its gradient finite in fp32


def l2_normalize(x, axis=-1, eps=1e-12):
    """Returns x / max(||x||, eps) along `axis`."""
    norm_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(norm_sq, eps * eps))


def nt_xent(z1, z2, temperature, axis_name=None):
    """Returns SimCLR's NT-Xent loss: the mean over all 2B anchors of the global batch (both directions).

    z1_BxD, z2_BxD are this device's embeddings of the two views (B local rows); they are L2-normalised here.
    Each anchor z1[i] has one positive, z2[i], and 2(N-1) negatives: every other row of z1 and z2 gathered
    from all devices (N = global batch). Computed in float32. With `axis_name`, the result is the global
    mean (pmean over devices), so its gradient is the exact gradient of the full-batch loss.
    """
    z1 = l2_normalize(z1.astype(jnp.float32))
    z2 = l2_normalize(z2.astype(jnp.float32))
    local_b = z1.shape[0]
    z1_all_NxD = parallel.all_gather(z1, axis_name)
    z2_all_NxD = parallel.all_gather(z2, axis_name)
    n = z1_all_NxD.shape[0]
    # The positive of local row i sits at global row (device index * B + i).
    labels_B = parallel.global_example_index(local_b, axis_name)
    self_mask_BxN = jax.nn.one_hot(labels_B, n, dtype=jnp.float32) * _MASK

    logits_aa_BxN = z1 @ z1_all_NxD.T / temperature + self_mask_BxN
    logits_bb_BxN = z2 @ z2_all_NxD.T / temperature + self_mask_BxN
    logits_ab_BxN = z1 @ z2_all_NxD.T / temperature
    logits_ba_BxN = z2 @ z1_all_NxD.T / temperature

    def cross_entropy(logits_Bx2N):
        positives_B = jnp.take_along_axis(logits_Bx2N, labels_B[:, None], axis=1)[:, 0]
        return jax.nn.logsumexp(logits_Bx2N, axis=1) - positives_B

    loss_a_B = cross_entropy(jnp.concatenate([logits_ab_BxN, logits_aa_BxN], axis=1))
    loss_b_B = cross_entropy(jnp.concatenate([logits_ba_BxN, logits_bb_BxN], axis=1))
    local_mean = 0.5 * (jnp.mean(loss_a_B) + jnp.mean(loss_b_B))
    return parallel.pmean(local_mean, axis_name)


def contrastive_accuracy(z1, z2, axis_name=None):
    """Returns the fraction of anchors in z1 whose nearest z2 (over the global batch) is their positive."""
    z1 = l2_normalize(z1.astype(jnp.float32))
    z2_all_NxD = parallel.all_gather(l2_normalize(z2.astype(jnp.float32)), axis_name)
    labels_B = parallel.global_example_index(z1.shape[0], axis_name)
    hits = jnp.argmax(z1 @ z2_all_NxD.T, axis=1) == labels_B
    return parallel.pmean(jnp.mean(hits.astype(jnp.float32)), axis_name)


def softmax_cross_entropy(logits_BxC, labels_B, axis_name=None):
    """Returns the global mean cross-entropy of integer labels (pmean over devices)."""
    logits = logits_BxC.astype(jnp.float32)
    ce_B = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels_B[:, None], axis=-1)[:, 0]
    return parallel.pmean(jnp.mean(ce_B), axis_name)
