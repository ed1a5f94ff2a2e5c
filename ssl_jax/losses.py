"""Pure loss functions. Each takes `axis_name` (None = unsharded) and says what it averages over."""
import jax
import jax.numpy as jnp

from ssl_jax import parallel

_MASK = -1e9  # large negative, not -inf: keeps logsumexp and its gradient finite in fp32


def l2_normalize(x, axis=-1, eps=1e-12):
    """Returns x / max(||x||, eps) along `axis`."""
    norm_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(norm_sq, eps * eps))


def nt_xent(z1, z2, temperature, axis_name=None, chunk_size=0):
    """Returns SimCLR's NT-Xent loss: the mean over all 2N anchors of the global batch (both directions).

    z1_BxD, z2_BxD are this device's embeddings of the two views (B local rows); they are L2-normalised here.
    Each anchor z1[i] has one positive, z2[i], and 2(N-1) negatives: every other row of z1 and z2 gathered
    from all devices (N = global batch). Computed in float32. With `axis_name`, the result is the global
    mean (pmean over devices), so its gradient is the exact gradient of the full-batch loss.
    chunk_size > 0 computes the same value in blocks of that many candidate columns (`nt_xent_chunked`).
    """
    if chunk_size:
        return nt_xent_chunked(z1, z2, temperature, chunk_size, axis_name)
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


def nt_xent_chunked(z1, z2, temperature, chunk_size, axis_name=None):
    """Returns `nt_xent` computed over blocks of `chunk_size` candidates: no 2B x 2N matrix is ever held.

    The 2N candidates (z1 then z2 of the global batch) are visited in blocks with a running logsumexp
    (max and rescaled sum per anchor). The block body is rematerialised (jax.checkpoint), so the backward
    pass recomputes each 2B x chunk block instead of storing them all: memory is O(B * chunk_size + N * D)
    per device instead of O(B * N). For global batches whose similarity matrix does not fit on one device;
    the same value and gradient as the dense loss up to float32 summation order.
    """
    z1 = l2_normalize(z1.astype(jnp.float32))
    z2 = l2_normalize(z2.astype(jnp.float32))
    local_b, dim = z1.shape
    anchors_AxD = jnp.concatenate([z1, z2], axis=0) / temperature  # A = 2B anchors: view 1 rows, then view 2
    cands_MxD = jnp.concatenate([parallel.all_gather(z1, axis_name), parallel.all_gather(z2, axis_name)], axis=0)
    n = cands_MxD.shape[0] // 2
    # Each anchor's own column (masked, as in the dense loss); its positive is the other view's same row.
    own_B = parallel.global_example_index(local_b, axis_name)
    self_A = jnp.concatenate([own_B, own_B + n])
    positive_A = jnp.sum(z1 * z2, axis=1) / temperature
    positive_A = jnp.concatenate([positive_A, positive_A])
    n_blocks = -(-2 * n // chunk_size)
    pad = n_blocks * chunk_size - 2 * n
    cands_KxCxD = jnp.pad(cands_MxD, ((0, pad), (0, 0))).reshape(n_blocks, chunk_size, dim)

    @jax.checkpoint
    def block(carry, inputs):
        max_A, sum_A = carry
        cands_CxD, start = inputs
        column_C = start + jnp.arange(chunk_size)
        logits_AxC = anchors_AxD @ cands_CxD.T
        logits_AxC = logits_AxC + jnp.where(column_C[None, :] == self_A[:, None], _MASK, 0.0)
        logits_AxC = jnp.where(column_C[None, :] < 2 * n, logits_AxC, -jnp.inf)  # padding columns
        new_max_A = jnp.maximum(max_A, jnp.max(logits_AxC, axis=1))
        sum_A = sum_A * jnp.exp(max_A - new_max_A) + jnp.sum(jnp.exp(logits_AxC - new_max_A[:, None]), axis=1)
        return (new_max_A, sum_A), None

    starts = jnp.arange(n_blocks, dtype=jnp.int32) * chunk_size
    # Built from positive_A so that, inside shard_map, the carry is typed per-device like the blocks' output.
    init = (jnp.full_like(positive_A, -jnp.inf), jnp.zeros_like(positive_A))
    (max_A, sum_A), _ = jax.lax.scan(block, init, (cands_KxCxD, starts))
    loss_A = max_A + jnp.log(sum_A) - positive_A
    return parallel.pmean(jnp.mean(loss_A), axis_name)


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


def info_nce(q, k, queue, temperature, axis_name=None):
    """Returns MoCo's InfoNCE loss: the global mean over queries of the cross-entropy with the positive at 0.

    q_BxD are this device's queries, k_BxD their positive keys, queue_KxD the negatives (shared by all
    queries). All three are L2-normalised here (idempotent for the already-normalised keys MoCo stores).
    Logits are `[q.k, q.queue^T] / temperature` (B x (1 + K)), computed in float32; the loss is the
    cross-entropy of label 0, averaged over the B local queries, then pmean over devices (the global
    batch mean). No gradient flows into k or queue (stop_gradient here).
    """
    q_BxD = l2_normalize(q.astype(jnp.float32))
    k_BxD = jax.lax.stop_gradient(l2_normalize(k.astype(jnp.float32)))
    queue_KxD = jax.lax.stop_gradient(l2_normalize(queue.astype(jnp.float32)))
    pos_Bx1 = jnp.sum(q_BxD * k_BxD, axis=1, keepdims=True)
    neg_BxK = q_BxD @ queue_KxD.T
    logits_BxK1 = jnp.concatenate([pos_Bx1, neg_BxK], axis=1) / temperature
    ce_B = jax.nn.logsumexp(logits_BxK1, axis=1) - logits_BxK1[:, 0]
    return parallel.pmean(jnp.mean(ce_B), axis_name)


def _cosine_to_target(p, z):
    """Returns cos(p_i, stop_gradient(z_i)) for each row, shape B, in float32."""
    p_BxD = l2_normalize(p.astype(jnp.float32))
    z_BxD = jax.lax.stop_gradient(l2_normalize(z.astype(jnp.float32)))
    return jnp.sum(p_BxD * z_BxD, axis=1)


def byol_loss(p, z, axis_name=None):
    """Returns BYOL's normalised MSE: the global batch mean of `2 - 2 cos(p_i, z_i)` (one direction).

    p_BxD are online predictions, z_BxD target projections; z gets stop_gradient here. Averaged over the B
    local rows, then pmean over devices. Not symmetrised: the method adds the loss of the swapped views.
    """
    return parallel.pmean(jnp.mean(2.0 - 2.0 * _cosine_to_target(p, z)), axis_name)


def negative_cosine(p, z, axis_name=None):
    """Returns SimSiam's loss: minus the global batch mean of cos(p_i, stop_gradient(z_i)) (one direction).

    Averaged over the B local rows, then pmean over devices. Not symmetrised (and not halved): the method
    combines both directions, e.g. 0.5 * (D(p1, z2) + D(p2, z1)) as in the paper.
    """
    return parallel.pmean(-jnp.mean(_cosine_to_target(p, z)), axis_name)


def sinkhorn(scores, epsilon, iterations, axis_name=None):
    """Returns SwAV's codes B x P (rows sum to 1) from this device's scores_BxP: Sinkhorn-Knopp over all replicas.

    The official `distributed_sinkhorn`: Q = exp(scores / epsilon)^T (P x B_global, held as local columns)
    is divided by its total sum, then `iterations` times each prototype row is scaled to sum to 1/P (sums
    over all replicas) and each sample column to 1/B_global (local); finally Q * B_global, transposed.
    Before exp, each prototype's maximum score over the global batch is subtracted: that scales a row of Q
    by a constant, which the first row normalisation removes exactly, so the result is unchanged and exp
    cannot overflow (hence iterations >= 1). Float32; no gradient (stop_gradient on the scores).
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn needs iterations >= 1, got {iterations}")
    s_BxP = jax.lax.stop_gradient(scores.astype(jnp.float32)) / epsilon
    max_P = jnp.max(s_BxP, axis=0)
    if axis_name is not None:
        max_P = jax.lax.pmax(max_P, axis_name)
    q_PxB = jnp.exp(s_BxP - max_P).T
    n_protos = q_PxB.shape[0]
    global_b = q_PxB.shape[1] * parallel.axis_size(axis_name)
    q_PxB = q_PxB / parallel.psum(jnp.sum(q_PxB), axis_name)

    def one_iteration(_, q_PxB):
        q_PxB = q_PxB / parallel.psum(jnp.sum(q_PxB, axis=1, keepdims=True), axis_name) / n_protos
        return q_PxB / jnp.sum(q_PxB, axis=0, keepdims=True) / global_b

    q_PxB = jax.lax.fori_loop(0, iterations, one_iteration, q_PxB)
    return (q_PxB * global_b).T


def swav_loss(scores_per_crop, assignments, temperature, axis_name=None):
    """Returns SwAV's swapped-prediction loss, a scalar: global mean over samples, crops and assignments.

    scores_per_crop: sequence of V arrays B x P (prototype scores of each crop, local rows); assignments:
    sequence of codes B x P for crops 0..len(assignments)-1 (usually the two large crops), e.g. from
    `sinkhorn`; they get stop_gradient here. For code i and every crop v != i the term is the
    cross-entropy -sum_p q_i[b, p] log softmax(scores_v[b] / temperature)_p, averaged over the B local
    samples; the terms are averaged over the V - 1 crops of each code and then over the codes (the
    official `subloss / (sum(nmb_crops) - 1)` and `loss / len(crops_for_assign)`); pmean over devices.
    """
    n_crops = len(scores_per_crop)
    if n_crops < 2 or not 1 <= len(assignments) <= n_crops:
        raise ValueError(f"swav_loss needs at least 2 crops and 1 to {n_crops} assignments (codes of the first "
                         f"crops), got {n_crops} crops and {len(assignments)} assignments")
    log_probs = [jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=1) for s in scores_per_crop]
    total = 0.0
    for i, codes_BxP in enumerate(assignments):
        codes_BxP = jax.lax.stop_gradient(codes_BxP.astype(jnp.float32))
        subloss = 0.0
        for v in range(n_crops):
            if v != i:
                subloss += -jnp.mean(jnp.sum(codes_BxP * log_probs[v], axis=1))
        total += subloss / (n_crops - 1)
    return parallel.pmean(total / len(assignments), axis_name)


def _standardize(z_BxD, axis_name, eps=1e-5):
    """Returns z standardised per dimension over the global batch (biased variance, eps inside the sqrt)."""
    global_b = z_BxD.shape[0] * parallel.axis_size(axis_name)
    mean_D = parallel.psum(jnp.sum(z_BxD, axis=0), axis_name) / global_b
    centred_BxD = z_BxD - mean_D
    var_D = parallel.psum(jnp.sum(jnp.square(centred_BxD), axis=0), axis_name) / global_b
    return centred_BxD * jax.lax.rsqrt(var_D + eps)


def barlow_twins(z1, z2, lambd, axis_name=None):
    """Returns Barlow Twins' loss: sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 over the D x D matrix c.

    z1_BxD, z2_BxD are this device's embeddings of the two views. Each dimension is standardised over the
    global batch as BatchNorm without affine does (mean and biased variance summed over all replicas,
    eps = 1e-5 inside the square root); c = z1n^T z2n / B_global, the psum of each device's share.
    Float32. Nothing is averaged over the batch beyond what c is: the loss is a sum over the D x D entries.
    With `axis_name` the value is the same on every device (invariant), so a further pmean changes nothing.
    """
    z1n_BxD = _standardize(z1.astype(jnp.float32), axis_name)
    z2n_BxD = _standardize(z2.astype(jnp.float32), axis_name)
    global_b = z1n_BxD.shape[0] * parallel.axis_size(axis_name)
    # c is a psum, hence identical (invariant) on every device, and so is the loss computed from it. Under
    # vma-typed shard_map the transpose of psum hands each device the loss's cotangent once (no sum), so
    # the gradient w.r.t. replicated params is exact with no further pmean (tests/test_losses.py checks
    # 8 devices against 1).
    c_DxD = parallel.psum(z1n_BxD.T @ z2n_BxD, axis_name) / global_b
    diag_D = jnp.diagonal(c_DxD)
    on_diag = jnp.sum(jnp.square(1.0 - diag_D))
    # Masking (not total minus diagonal) keeps the small off-diagonal sum exact next to a diagonal near D.
    off_diag = jnp.sum(jnp.square(jnp.where(jnp.eye(c_DxD.shape[0], dtype=bool), 0.0, c_DxD)))
    return on_diag + lambd * off_diag
