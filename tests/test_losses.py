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


@pytest.mark.parametrize("chunk", [7, 16, 48])  # ragged last block, exact blocks, one block of all 2N
def test_nt_xent_chunked_equals_dense_value_and_gradient_sharded(chunk):
    z1, z2 = _data(n=24, d=6, seed=3)
    w = np.random.RandomState(4).randn(6, 6).astype(np.float32)

    def loss_fn(w, a, b, axis_name, chunk_size):
        return losses.nt_xent(a @ w, b @ w, 0.1, axis_name=axis_name, chunk_size=chunk_size)

    ref_val, ref_grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(w, z1, z2, None, 0)
    np.testing.assert_allclose(ref_val, nt_xent_numpy(z1 @ w, z2 @ w, 0.1), rtol=1e-4)
    val, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(w, z1, z2, None, chunk)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    mesh = parallel.make_mesh()
    fn = jax.jit(jax.shard_map(
        lambda w, a, b: jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(w, a, b, parallel.DATA_AXIS, chunk),
        mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), (P(), P("data"), P("data")))))
    val, grads = fn(w, z1, z2)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_nt_xent_chunked_never_holds_the_full_similarity_matrix():
    z1, z2 = _data(n=64, d=8, seed=5)
    hlo = jax.jit(jax.grad(lambda a: losses.nt_xent(a, z2, 0.1, chunk_size=16))).lower(z1).as_text()
    # 2B x 2N = 128 x 128 logits in the dense loss; the chunked one only ever builds 128 x 16 blocks.
    assert "128x128xf32" not in hlo and "128x16xf32" in hlo
    dense = jax.jit(jax.grad(lambda a: losses.nt_xent(a, z2, 0.1))).lower(z1).as_text()
    assert "64x64xf32" in dense  # the check above would see a full matrix if there were one


def test_contrastive_accuracy_sharded():
    z = np.eye(16, dtype=np.float32)
    perm = np.roll(np.arange(16), 1)
    acc = _sharded(lambda a, b: losses.contrastive_accuracy(a, b, parallel.DATA_AXIS))(z, z[perm])
    assert float(acc) == 0.0
    acc = _sharded(lambda a, b: losses.contrastive_accuracy(a, b, parallel.DATA_AXIS))(z, z)
    assert float(acc) == 1.0


# ---------------------------------------------------------------------------------------------------------
# The method family's losses: plain float64 NumPy versions, written from the papers' official code.

def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def info_nce_numpy(q, k, queue, t):
    q, k, queue = _unit(q), _unit(k), _unit(queue)
    total = 0.0
    for i in range(q.shape[0]):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / t
        total += -logits[0] + np.log(np.sum(np.exp(logits)))
    return total / q.shape[0]


def sinkhorn_numpy(scores, eps, iterations):
    """SwAV's distributed_sinkhorn on one replica, without any stabilisation, in float64."""
    q = np.exp(np.asarray(scores, np.float64) / eps).T  # P x B
    n_protos, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_protos
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def swav_numpy(scores_per_crop, codes, t):
    total = 0.0
    for i, q in enumerate(codes):
        subloss = 0.0
        for v, s in enumerate(scores_per_crop):
            if v == i:
                continue
            x = np.asarray(s, np.float64) / t
            log_p = x - np.log(np.sum(np.exp(x), axis=1, keepdims=True))
            subloss += -np.mean(np.sum(q * log_p, axis=1))
        total += subloss / (len(scores_per_crop) - 1)
    return total / len(codes)


def barlow_numpy(z1, z2, lambd, parts=False):
    def bn(z):
        z = np.asarray(z, np.float64)
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # np.var is the biased variance
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on = sum((1 - c[i, i]) ** 2 for i in range(c.shape[0]))
    off = sum(c[i, j] ** 2 for i in range(c.shape[0]) for j in range(c.shape[1]) if i != j)
    return (on, off) if parts else on + lambd * off


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _eight_vs_one(loss_fn, w, replicated, sharded):
    """Returns (value, grads) of loss_fn(w, replicated, sharded, axis_name) on 8 devices and on 1 device.

    grads are w.r.t. the replicated weight w and the batch-sharded inputs (gathered back in global order).
    """
    vg = jax.value_and_grad(loss_fn, argnums=(0, 2))
    ref = jax.jit(lambda w, r, s: vg(w, r, s, None))(w, replicated, sharded)
    fn = jax.jit(jax.shard_map(
        lambda w, r, s: vg(w, r, s, parallel.DATA_AXIS), mesh=parallel.make_mesh(),
        in_specs=(P(), P(), P("data")), out_specs=(P(), (P(), P("data")))))
    return fn(w, replicated, sharded), ref


def _assert_same(got, ref, rtol=1e-4, atol=1e-6):
    (val, grads), (ref_val, ref_grads) = got, ref
    np.testing.assert_allclose(val, ref_val, rtol=rtol)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


# --- info_nce --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.07, 0.2])
def test_info_nce_matches_numpy(t):
    q, k, queue = _rand(8, 6, seed=0), _rand(8, 6, seed=1), _rand(20, 6, seed=2)
    # Unnormalised inputs on purpose: info_nce normalises all three itself.
    np.testing.assert_allclose(losses.info_nce(q, k, queue, t), info_nce_numpy(q, k, queue, t), rtol=1e-5)


def test_info_nce_collapse_is_log_k_plus_1_and_alignment_is_low():
    ones = np.ones((4, 3), np.float32)
    np.testing.assert_allclose(losses.info_nce(ones, ones, np.ones((10, 3), np.float32), 0.2), np.log(11),
                               rtol=1e-6)
    e = np.eye(8, dtype=np.float32)  # keys equal their queries, queue orthogonal to every query
    assert float(losses.info_nce(e[:4], e[:4], e[4:], 0.07)) < 1e-5


def test_info_nce_no_gradient_into_keys_or_queue():
    q, k, queue = _rand(8, 6, seed=0), _rand(8, 6, seed=1), _rand(20, 6, seed=2)
    gq, gk, gqueue = jax.grad(losses.info_nce, argnums=(0, 1, 2))(q, k, queue, 0.2)
    assert np.all(np.asarray(gk) == 0) and np.all(np.asarray(gqueue) == 0)
    assert np.abs(np.asarray(gq)).max() > 1e-3


def test_info_nce_sharded_equals_unsharded():
    q, k, queue, w = _rand(16, 6, seed=0), _rand(16, 6, seed=1), _rand(24, 6, seed=2), _rand(6, 6, seed=3)

    def loss_fn(w, queue, qk, axis_name):
        return losses.info_nce(qk[0] @ w, qk[1] @ w, queue, 0.2, axis_name=axis_name)

    got, ref = _eight_vs_one(loss_fn, w, queue, (q, k))
    _assert_same(got, ref)
    np.testing.assert_allclose(ref[0], info_nce_numpy(q @ w, k @ w, queue, 0.2), rtol=1e-5)


# --- byol_loss, negative_cosine --------------------------------------------------------------------------

def test_byol_and_negative_cosine_match_numpy():
    p, z = _rand(10, 5, seed=0), _rand(10, 5, seed=1)
    cos = np.sum(_unit(p) * _unit(z), axis=1)
    np.testing.assert_allclose(losses.byol_loss(p, z), np.mean(2 - 2 * cos), rtol=1e-5)
    np.testing.assert_allclose(losses.negative_cosine(p, z), -np.mean(cos), rtol=1e-5)
    np.testing.assert_allclose(losses.byol_loss(p, 3.0 * p), 0.0, atol=1e-6)  # scale-free: aligned is 0
    np.testing.assert_allclose(losses.negative_cosine(p, -p), 1.0, rtol=1e-6)


def test_byol_and_negative_cosine_no_gradient_into_target():
    p, z = _rand(10, 5, seed=0), _rand(10, 5, seed=1)
    for fn in (losses.byol_loss, losses.negative_cosine):
        gp, gz = jax.grad(fn, argnums=(0, 1))(p, z)
        assert np.all(np.asarray(gz) == 0), fn.__name__
        assert np.abs(np.asarray(gp)).max() > 1e-3, fn.__name__


@pytest.mark.parametrize("fn", [losses.byol_loss, losses.negative_cosine])
def test_byol_and_negative_cosine_sharded_equal_unsharded(fn):
    p, z, w = _rand(16, 5, seed=0), _rand(16, 5, seed=1), _rand(5, 5, seed=2)

    def loss_fn(w, _, pz, axis_name):
        return fn(pz[0] @ w, pz[1] @ w, axis_name=axis_name)

    _assert_same(*_eight_vs_one(loss_fn, w, (), (p, z)))


# --- sinkhorn, swav_loss ---------------------------------------------------------------------------------

def test_sinkhorn_matches_numpy_and_is_stable_for_large_scores():
    scores = _rand(12, 5, seed=0)
    got = np.asarray(losses.sinkhorn(scores, 0.5, 3))
    np.testing.assert_allclose(got, sinkhorn_numpy(scores, 0.5, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    # scores / epsilon around 100: a plain float32 exp overflows; subtracting each prototype's max does not.
    big = 5.0 + 0.5 * scores
    got = np.asarray(losses.sinkhorn(big, 0.05, 3))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, sinkhorn_numpy(big, 0.05, 3), rtol=1e-3, atol=1e-5)


def test_sinkhorn_equipartition_and_no_gradient():
    scores = _rand(32, 4, seed=1)
    q = np.asarray(losses.sinkhorn(scores, 0.5, 100))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q.sum(axis=0), 32 / 4, rtol=1e-3)  # every prototype gets B/K samples
    g = jax.grad(lambda s: jnp.sum(losses.sinkhorn(s, 0.5, 3) * jnp.arange(4.0)))(scores)
    assert np.all(np.asarray(g) == 0)


def test_sinkhorn_sharded_equals_unsharded():
    scores = _rand(32, 6, seed=2)
    fn = jax.jit(jax.shard_map(lambda s: losses.sinkhorn(s, 0.05, 3, axis_name=parallel.DATA_AXIS),
                               mesh=parallel.make_mesh(), in_specs=P("data"), out_specs=P("data")))
    got = np.asarray(fn(scores))
    np.testing.assert_allclose(got, losses.sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, sinkhorn_numpy(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    fn = jax.jit(jax.shard_map(lambda s: losses.sinkhorn(s, 0.5, 100, axis_name=parallel.DATA_AXIS),
                               mesh=parallel.make_mesh(), in_specs=P("data"), out_specs=P("data")))
    np.testing.assert_allclose(np.asarray(fn(scores)).sum(axis=0), 32 / 6, rtol=1e-3)


def test_swav_loss_matches_numpy():
    crops = [_rand(6, 5, seed=s) for s in range(4)]  # 2 large crops (with codes) + 2 small ones
    codes = [sinkhorn_numpy(c, 0.05, 3) for c in crops[:2]]
    got = losses.swav_loss(crops, [c.astype(np.float32) for c in codes], 0.1)
    np.testing.assert_allclose(got, swav_numpy(crops, codes, 0.1), rtol=1e-5)
    # Collapse check: uniform scores and uniform codes give log(P) for every term.
    flat = [np.zeros((6, 5), np.float32)] * 3
    np.testing.assert_allclose(losses.swav_loss(flat, [np.full((6, 5), 0.2, np.float32)] * 2, 0.1), np.log(5),
                               rtol=1e-6)


def test_swav_loss_with_too_few_crops_or_codes_says_so():
    crops = [_rand(6, 5, seed=s) for s in range(2)]
    codes = [np.full((6, 5), 0.2, np.float32)]
    for scores, assignments in ((crops[:1], codes), (crops, []), (crops, codes * 3)):
        with pytest.raises(ValueError, match="swav_loss needs at least 2 crops and 1 to"):
            losses.swav_loss(scores, assignments, 0.1)


def test_swav_loss_no_gradient_into_codes():
    crops = [_rand(6, 5, seed=s) for s in range(3)]
    codes = [np.asarray(losses.sinkhorn(c, 0.05, 3)) for c in crops[:2]]
    g_crops, g_codes = jax.grad(losses.swav_loss, argnums=(0, 1))(crops, codes, 0.1)
    assert all(np.all(np.asarray(g) == 0) for g in g_codes)
    assert all(np.abs(np.asarray(g)).max() > 1e-4 for g in g_crops)


def l2_rows(x):
    return losses.l2_normalize(jnp.asarray(x))


def test_swav_sinkhorn_and_loss_sharded_equal_unsharded():
    crops, w = tuple(_rand(16, 6, seed=s) for s in range(3)), _rand(6, 4, seed=9)

    def loss_fn(w, _, crops, axis_name):
        scores = [l2_rows(c) @ w for c in crops]
        codes = [losses.sinkhorn(s, 0.05, 3, axis_name=axis_name) for s in scores[:2]]
        return losses.swav_loss(scores, codes, 0.1, axis_name=axis_name)

    got, ref = _eight_vs_one(loss_fn, w, (), crops)
    _assert_same(got, ref)
    scores = [np.asarray(l2_rows(c)) @ w for c in crops]
    np.testing.assert_allclose(ref[0], swav_numpy(scores, [sinkhorn_numpy(s, 0.05, 3) for s in scores[:2]], 0.1),
                               rtol=1e-4)


# --- barlow_twins ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_twins_matches_numpy(lambd):
    z1, z2 = _rand(12, 5, seed=0) * 3 + 1, _rand(12, 5, seed=1)
    np.testing.assert_allclose(losses.barlow_twins(z1, z2, lambd), barlow_numpy(z1, z2, lambd), rtol=1e-5)


def test_barlow_twins_perfect_twins_is_zero_and_lambda_scales_off_diagonal():
    # Columns of a Hadamard matrix (without the all-ones one): zero mean, unit variance, uncorrelated.
    h = np.array([[1]], np.float32)
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    z = 2.0 * h[:, 1:7] + 5.0  # any per-dimension affine map is undone by the standardisation
    assert float(losses.barlow_twins(z, z, 0.0051)) < 1e-8
    z1, z2 = _rand(16, 4, seed=0), _rand(16, 4, seed=1)
    on, off = barlow_numpy(z1, z2, None, parts=True)
    base = float(losses.barlow_twins(z1, z2, 0.0))
    np.testing.assert_allclose(base, on, rtol=1e-5)
    np.testing.assert_allclose(float(losses.barlow_twins(z1, z2, 2.0)) - base, 2.0 * off, rtol=1e-4)


def test_barlow_twins_sharded_equals_unsharded_value_and_gradient():
    # c is a psum and the loss is computed from it identically on every device: the gradient w.r.t. the
    # replicated weights must be the global gradient, not 8 times it.
    z1, z2, w = _rand(32, 6, seed=0), _rand(32, 6, seed=1) + 2, _rand(6, 6, seed=2)

    def loss_fn(w, _, zz, axis_name):
        return losses.barlow_twins(zz[0] @ w, zz[1] @ w, 0.0051, axis_name=axis_name)

    got, ref = _eight_vs_one(loss_fn, w, (), (z1, z2))
    _assert_same(got, ref)
    np.testing.assert_allclose(ref[0], barlow_numpy(z1 @ w, z2 @ w, 0.0051), rtol=1e-4)
    # And the one-device gradient is the float64 finite-difference gradient.
    e = np.zeros_like(w)
    e[1, 2] = 1e-3
    w64 = w.astype(np.float64)
    fd = (barlow_numpy(z1 @ (w64 + e), z2 @ (w64 + e), 0.0051)
          - barlow_numpy(z1 @ (w64 - e), z2 @ (w64 - e), 0.0051)) / 2e-3
    np.testing.assert_allclose(ref[1][0][1, 2], fd, rtol=1e-3)


# --- bfloat16 inputs -------------------------------------------------------------------------------------

def test_losses_compute_in_float32_under_bfloat16_inputs():
    # A bfloat16 network hands over bfloat16 embeddings: only that rounding may reach the loss, which runs in
    # float32 (logits up to 1 / 0.05, sums over D x D entries: bfloat16's 3 digits would show at once).
    x = [jnp.asarray(_rand(16, 8, seed=s), jnp.bfloat16) for s in range(3)]
    cases = {
        "nt_xent": lambda a, b, c: losses.nt_xent(a, b, 0.1),
        "nt_xent chunked": lambda a, b, c: losses.nt_xent(a, b, 0.1, chunk_size=12),
        "info_nce": lambda a, b, c: losses.info_nce(a, b, c, 0.07),
        "byol_loss": lambda a, b, c: losses.byol_loss(a, b),
        "negative_cosine": lambda a, b, c: losses.negative_cosine(a, b),
        "sinkhorn": lambda a, b, c: losses.sinkhorn(a, 0.05, 3),
        "swav_loss": lambda a, b, c: losses.swav_loss([a, b, c], [losses.sinkhorn(s, 0.05, 3) for s in (a, b)], 0.1),
        "barlow_twins": lambda a, b, c: losses.barlow_twins(a, b, 0.0051),
    }
    for name, fn in cases.items():
        got = fn(*x)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, fn(*(v.astype(jnp.float32) for v in x)), rtol=1e-6, atol=1e-7, err_msg=name)
