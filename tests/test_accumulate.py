"""Gradient accumulation: 1 device x k chunks equals the large-batch step with the same BatchNorm groups.

The reference for "the large-batch step whose BatchNorm statistics are taken over the same sub-batches" is
the real sharded step on k devices with unsynchronised BatchNorm: device d normalises rows d*c .. (d+1)*c-1,
exactly the rows of chunk d on one device. Loss, gradients, parameters, optimizer state, BatchNorm statistics
and method extras (EMA targets, queues) must agree to float tolerance after two steps, for every method.
"""
import os

import jax
import numpy as np
import pytest

from harness import assert_trees_close, random_source, rbg_initial_state
from ssl_jax import accumulate, config as config_lib, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16
# Per method: config file and overrides that keep it small (MoCo: shuffled BN draws a permutation per batch,
# which chunks cannot reproduce, so it is off here; its key encoder then uses per-chunk BatchNorm too).
METHODS = {
    "simclr": ("simclr.py", []),
    "simclr_chunked_loss": ("simclr.py", ["loss.chunk_size=5"]),
    "moco_v2": ("moco_v2.py", ["moco.shuffle_bn=false", "moco.queue_size=48"]),
    "byol": ("byol.py", []),
    "simsiam": ("simsiam.py", []),
    "swav": ("swav.py", ["swav.queue_length=32", "swav.queue_start_epoch=0"]),
    "barlow_twins": ("barlow_twins.py", []),
}


def _config(name, *overrides):
    path, extra = METHODS[name]
    return config_lib.load_config(os.path.join(ROOT, "configs", path) + ":smoke",
                                  [f"batch_size={BATCH}", "model.sync_bn=false", "data.num_examples=64",
                                   *extra, *overrides])


def _views(setup, n_steps, seed=0):
    """Returns n_steps tuples of ready views (random floats shaped like the method's views)."""
    keys = parallel.example_keys(jax.random.PRNGKey(0), BATCH, None)
    images = np.zeros((BATCH, 16, 16, 3), np.uint8)
    shapes = [v.shape for v in jax.eval_shape(lambda k, x: setup.method.views(k, x, setup.config), keys, images)]
    rs = np.random.RandomState(seed)
    return [tuple(rs.randn(*s).astype(np.float32) for s in shapes) for _ in range(n_steps)]


def _run_views(config, devices, initial, views, labels):
    setup = train.build(config, random_source(64), devices=devices)
    state = parallel.put_replicated(initial, setup.mesh)
    history = []
    for step_views in views:
        state, m = setup.views_step_fn(state, parallel.put_batch(step_views, setup.mesh),
                                       parallel.put_batch(labels, setup.mesh))
        history.append(jax.device_get(m))
    return jax.device_get(state), history


@pytest.mark.parametrize("name", sorted(METHODS))
def test_accumulated_step_equals_large_batch_step_with_the_same_batchnorm_groups(name):
    reference_config = _config(name)
    setup = train.build(reference_config, random_source(64), devices=jax.devices()[:4])
    initial = rbg_initial_state(setup)
    views = _views(setup, n_steps=2)
    labels = np.arange(BATCH, dtype=np.int32) % 4
    ref_state, ref_hist = _run_views(reference_config, jax.devices()[:4], initial, views, labels)
    # 2 devices x 2 chunks as well where the loss gathers over devices (all methods' losses do; three suffice).
    layouts = ((1, 4), (2, 2)) if name in ("simclr_chunked_loss", "moco_v2", "barlow_twins") else ((1, 4),)
    for devices, chunks in layouts:
        state, hist = _run_views(_config(name, f"grad_accum_steps={chunks}"), jax.devices()[:devices], initial,
                                 views, labels)
        for m, ref in zip(hist, ref_hist):
            for key in ("loss", "probe_loss", "grad_norm"):
                np.testing.assert_allclose(m[key], ref[key], rtol=1e-4, atol=5e-6, err_msg=f"{key}, {devices}x{chunks}")
        assert int(state["step"]) == 2
        for part in ("params", "opt_state", "batch_stats", "extras"):
            _assert_leaves_close(state[part], ref_state[part], f"{part}, {devices}x{chunks}")


def _assert_leaves_close(got, want, what, rel=5e-4):
    """Asserts ||got - want|| <= rel * ||want|| (+ a float32 floor) for every leaf: summation order differs
    between chunks and devices, and BatchNorm over 4 rows amplifies it in the gradients of the BN scales
    (BYOL's momentum traces differ by up to 1.3e-4 relative between the reference and 1x4 chunks, and by
    as much between 1x4 and 2x2 chunks; parameters agree to 1e-6). The float32 floor is 1e-6 of the part's
    largest leaf: a gradient that is zero in exact arithmetic (a bias that a standardisation cancels, as Barlow
    Twins' projector output's) is rounding noise of the other gradients' size, which momentum traces of raw
    gradients (LARS in BYOL's style) keep unscaled by the learning rate."""
    paths = jax.tree_util.tree_flatten_with_path(got)[0]
    floor = 1e-6 * max([1.0] + [float(np.linalg.norm(np.asarray(w, np.float64))) for w in jax.tree.leaves(want)])
    for (path, g), w in zip(paths, jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        error, scale = np.linalg.norm(g - w), np.linalg.norm(w)
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert error <= rel * scale + floor, f"{where}: |diff| {error:.3g}, |ref| {scale:.3g}"


def test_accumulation_on_images_with_synchronised_batchnorm_matches_autodiff(threefry):
    """The image path (augmentation inside both passes), 2 devices x 2 chunks, synchronised BatchNorm: the
    reference is autodiff through "embed every chunk, concatenate, embedding_loss" in one graph."""
    del threefry
    config = _config("simclr", "model.sync_bn=true")
    source = random_source(64)
    setup = train.build(config, source, devices=jax.devices()[:2])
    method = setup.method
    initial = rbg_initial_state(setup)
    progress = {"step": jax.numpy.zeros((), jax.numpy.int32), "steps_per_epoch": 4, "total_steps": 8}
    make_views = lambda keys, x: method.views(keys, x, config)  # noqa: E731
    axis = parallel.DATA_AXIS

    def both(params, stats, rng, images):
        keys = parallel.example_keys(rng, images.shape[0], axis)
        got = accumulate.value_and_grad(method, params, stats, {}, images, keys, make_views, rng, progress,
                                        config=config, axis_name=axis, chunks=2)

        def reference(p):
            half, outputs = images.shape[0] // 2, []
            for j in range(2):
                rows = slice(j * half, (j + 1) * half)
                outputs.append(method.embed(p, stats, {}, make_views(keys[rows], images[rows]),
                                            jax.random.fold_in(rng, j), progress, config=config, axis_name=axis))
            emb = jax.tree.map(lambda *x: jax.numpy.concatenate(x), *[o[0] for o in outputs])
            new_stats = jax.tree.map(lambda *s: sum(s) / 2, *[o[1][0] for o in outputs])
            value, (metrics, _) = method.embedding_loss(p, emb, {}, {}, rng, progress, config=config, axis_name=axis)
            return value, (new_stats, metrics)

        want = jax.value_and_grad(reference, has_aux=True)(params)
        (g_value, (g_stats, g_metrics, _)), g_grads = got
        return (g_value, g_stats, g_metrics, g_grads), (want[0][0], want[0][1][0], want[0][1][1], want[1])

    fn = parallel.shard_step(both, setup.mesh, n_replicated=3, n_sharded=1, donate=())
    images = source.images[:BATCH]
    got, want = jax.device_get(fn(initial["params"]["model"], initial["batch_stats"], jax.random.PRNGKey(3),
                                  images))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert_trees_close(got[1:], want[1:], rtol=1e-5, atol=1e-6)  # gradients are O(0.1); jax 0.12 differs by 2e-7
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(got[3])) > 1e-3  # a real gradient


def test_grad_accum_steps_must_divide_the_per_device_batch():
    with pytest.raises(ValueError, match="grad_accum_steps=3 does not divide the per-device batch of 4"):
        train.build(_config("simclr", "grad_accum_steps=3"), random_source(64), devices=jax.devices()[:4])
