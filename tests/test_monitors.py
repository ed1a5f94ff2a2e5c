"""The collapse monitor flags a collapsed representation and passes a healthy one, on 1 and 8 devices."""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from ssl_jax import monitors, parallel


def _sharded(z):
    fn = jax.shard_map(lambda x: monitors.collapse_metrics(x, parallel.DATA_AXIS), mesh=parallel.make_mesh(),
                       in_specs=P("data"), out_specs=P())
    return jax.device_get(jax.jit(fn)(z))


def test_healthy_embeddings_are_not_flagged():
    z = np.random.RandomState(0).randn(256, 32).astype(np.float32)
    m = jax.device_get(monitors.collapse_metrics(z))
    assert 0.8 < m["embedding_std_ratio"] < 1.2 and m["effective_rank"] > 20 and m["collapsed"] == 0.0
    # The same numbers on 8 devices (sums over all replicas; the rank sample is the same 256 rows).
    s = _sharded(z)
    for key in ("embedding_std", "embedding_std_ratio", "effective_rank"):
        np.testing.assert_allclose(s[key], m[key], rtol=1e-4)


def test_std_matches_numpy():
    z = np.random.RandomState(1).randn(64, 8)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    m = monitors.collapse_metrics(z.astype(np.float32))
    np.testing.assert_allclose(m["embedding_std"], zn.std(axis=0).mean(), rtol=1e-5)


def test_collapsed_embeddings_are_flagged():
    rs = np.random.RandomState(2)
    point = np.tile(rs.randn(1, 32), (256, 1)) + 1e-4 * rs.randn(256, 32)  # complete collapse
    m = jax.device_get(monitors.collapse_metrics(point.astype(np.float32)))
    assert m["embedding_std_ratio"] < 0.01 and m["collapsed"] == 1.0
    line = rs.randn(256, 1) * rs.randn(1, 32) + 1e-3 * rs.randn(256, 32)  # dimensional collapse onto a line
    m = _sharded(line.astype(np.float32))
    assert m["effective_rank"] < 2.0 and m["collapsed"] == 1.0


def _roy_vetterli(x):
    """Effective rank in float64 NumPy: exp of the entropy of the singular values normalised to sum to 1."""
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    p = s[s > 1e-9 * s.max()] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def test_effective_rank_of_a_known_spectrum():
    """Rows +-e1 (8 each) and +-e2 (2 each): centred already, singular values 4 and 2, so p = (2/3, 1/3) and the
    effective rank is exp(H) = 1.8899 (the squared values, p = (0.8, 0.2), would give 1.6494)."""
    e1, e2 = np.eye(16)[0], np.eye(16)[1]
    z = np.stack([e1] * 8 + [-e1] * 8 + [e2] * 2 + [-e2] * 2).astype(np.float32)
    expected = float(np.exp(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))))
    np.testing.assert_allclose(monitors.collapse_metrics(z)["effective_rank"], expected, rtol=1e-5)
    np.testing.assert_allclose(monitors.effective_rank(z), expected, rtol=1e-5)


def test_effective_rank_matches_numpy_on_the_centred_normalised_sample():
    rs = np.random.RandomState(3)
    z = (rs.randn(96, 5) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])) @ rs.randn(5, 24)  # five directions, unequal
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    m = jax.device_get(monitors.collapse_metrics(z.astype(np.float32)))
    np.testing.assert_allclose(m["effective_rank"], _roy_vetterli(zn - zn.mean(axis=0)), rtol=1e-4)
    np.testing.assert_allclose(_sharded(z.astype(np.float32))["effective_rank"], m["effective_rank"], rtol=1e-4)


def test_a_zero_matrix_has_effective_rank_one():
    np.testing.assert_allclose(monitors.effective_rank(np.zeros((8, 4), np.float32)), 1.0)
