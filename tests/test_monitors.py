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
