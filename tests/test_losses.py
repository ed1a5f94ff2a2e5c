"""NT-Xent against a plain float64 NumPy version, and its cross-replica form against the unsharded one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import losses, parallel


def nt_xent_numpy(z1, z2, t):
    """SimCLR's loss written plainly: 2N anchors, each with one positive and 2N-2 negatives."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = z1.shape[0]
    sim = z @ z.T / t
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        total += -sim[i, pos] + np.log(np.sum(np.exp(sim[i, others])))
    return total / (2 * n)


def _data(n=16, d=8, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(n, d).astype(np.float32), rs.randn(n, d).astype(np.float32)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_numpy(t):
    z1, z2 = _data()
    got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)
    np.testing.assert_allclose(got, nt_xent_numpy(z1, z2, t), rtol=1e-5)


def test_nt_xent_perfect_alignment_is_low_and_collapse_is_log():
    z = np.eye(8, dtype=np.float32)
    assert float(losses.nt_xent(z, z, 0.1)) < 1e-3  # positives identical, negatives orthogonal
    ones = np.ones((8, 4), np.float32)  # full collapse: every pair equally similar -> log(2N - 1)
    np.testing.assert_allclose(losses.nt_xent(ones, ones, 0.5), np.log(15), rtol=1e-5)


def _sharded(fn, n_out=1):
    mesh = parallel.make_mesh()
    specs = (P(parallel.DATA_AXIS), P(parallel.DATA_AXIS))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P() if n_out == 1 else (P(),) * n_out))


def test_nt_xent_sharded_equals_unsharded_value_and_gradient():
    assert jax.device_count() == 8
    z1, z2 = _data(n=24, d=6, seed=1)
    w = np.random.RandomState(2).randn(6, 6).astype(np.float32)

    def loss_fn(w, a, b, axis_name):
        return losses.nt_xent(a @ w, b @ w, 0.2, axis_name=axis_name)

    ref_val, ref_grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(w, z1, z2, None)
    mesh = parallel.make_mesh()
    fn = jax.jit(jax.shard_map(
        lambda w, a, b: jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(w, a, b, parallel.DATA_AXIS),
        mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), (P(), P("data"), P("data")))))
    val, grads = fn(w, z1, z2)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(val, nt_xent_numpy(z1 @ w, z2 @ w, 0.2), rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        # Gradients w.r.t. replicated weights and w.r.t. each device's own embeddings: the all_gather's
        # transpose must route the negatives' gradient back to the device that produced them.
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_contrastive_accuracy_sharded():
    z = np.eye(16, dtype=np.float32)
    perm = np.roll(np.arange(16), 1)
    acc = _sharded(lambda a, b: losses.contrastive_accuracy(a, b, parallel.DATA_AXIS))(z, z[perm])
    assert float(acc) == 0.0
    acc = _sharded(lambda a, b: losses.contrastive_accuracy(a, b, parallel.DATA_AXIS))(z, z)
    assert float(acc) == 1.0
