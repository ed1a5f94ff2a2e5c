"""Collapse monitor: is the representation spreading over its dimensions or collapsing to a point?

Logged for every method from the embeddings the method returns in aux["embeddings"] (the output the loss
sees). For L2-normalised d-dimensional embeddings, the per-dimension standard deviation is about
1/sqrt(d) when they spread over the sphere and 0 when they collapse (SimSiam, Sec. 4.1), so
`embedding_std_ratio` = mean std x sqrt(d) is about 1 when healthy and near 0 when collapsed. The effective
rank (Roy & Vetterli, 2007: exp of the entropy of the normalised singular values) of a subset of the
batch, centred, catches dimensional collapse as well.
"""
import jax
import jax.numpy as jnp

from ssl_jax import losses, parallel

COLLAPSE_STD_RATIO = 0.1  # below this fraction of the isotropic value, the representation has collapsed
COLLAPSE_RANK = 2.0       # an effective rank below 2: all embeddings lie (nearly) on one line


def collapse_metrics(z_BxD, axis_name=None, max_rows=256):
    """Returns {'embedding_std', 'embedding_std_ratio', 'effective_rank', 'collapsed'} over the global batch.

    The rank uses at most `max_rows` rows of the global batch (a Gram matrix eigendecomposition, cheap
    whatever the embedding width); the standard deviations use every row.
    """
    z = losses.l2_normalize(z_BxD.astype(jnp.float32))
    d = z.shape[1]
    mean_D = parallel.pmean(jnp.mean(z, axis=0), axis_name)
    var_D = parallel.pmean(jnp.mean(jnp.square(z - mean_D), axis=0), axis_name)
    std = jnp.mean(jnp.sqrt(jnp.maximum(var_D, 0.0)))
    rows = max(1, max_rows // parallel.axis_size(axis_name))  # per device, so the sample has <= max_rows
    sample_RxD = parallel.all_gather_invariant(z[:rows], axis_name) - mean_D
    rank = effective_rank(sample_RxD)
    ratio = std * jnp.sqrt(d)
    collapsed = jnp.logical_or(ratio < COLLAPSE_STD_RATIO, rank < COLLAPSE_RANK)
    return {"embedding_std": std, "embedding_std_ratio": ratio, "effective_rank": rank,
            "collapsed": collapsed.astype(jnp.float32)}


def effective_rank(x_RxD):
    """Returns the effective rank of a matrix (Roy & Vetterli, 2007): exp of the entropy of its singular values
    normalised to sum to 1, p_i = s_i / sum_j s_j (not of the squared ones, the Gram matrix's eigenvalues).

    The singular values are the square roots of the eigenvalues of the R x R Gram matrix (float32, full precision
    on every backend: TF32 or bf16 passes would add spurious directions). Eigenvalues below the Gram matrix's own
    rounding, R x eps x the largest, are zero: their square roots would otherwise add noise directions to the
    entropy. A zero matrix has rank 1 (exp of an empty entropy)."""
    x = x_RxD.astype(jnp.float32)
    gram_RxR = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    eig_R = jnp.linalg.eigvalsh(gram_RxR)
    tol = jnp.max(eig_R) * x.shape[0] * jnp.finfo(jnp.float32).eps
    s_R = jnp.sqrt(jnp.where(eig_R > tol, eig_R, 0.0))
    p_R = s_R / jnp.maximum(jnp.sum(s_R), 1e-30)
    return jnp.exp(-jnp.sum(jnp.where(p_R > 0, p_R * jnp.log(jnp.maximum(p_R, 1e-30)), 0.0)))
