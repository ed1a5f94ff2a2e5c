"""SwAV: multi-crop views, 8 devices = 1 device (loss, gradients, Sinkhorn codes, BatchNorm, queue) against
plain float64 NumPy, the prototype freeze, codes without gradient, and a smoke run through the CLI."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import config as config_lib, losses, parallel
from ssl_jax.methods import swav
from harness import cli_smoke_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_B = 16


def _config(*overrides):
    return config_lib.load_config(os.path.join(ROOT, "configs", "swav.py") + ":smoke",
                                  [f"batch_size={GLOBAL_B}", *overrides])


def _images(n, size=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3)).astype(np.uint8)


def _views(config, images, seed):
    return _views_fn(config_lib.to_json(config))(seed, images)


@functools.lru_cache(maxsize=None)
def _views_fn(config_json):
    """Returns jit(seed, images -> swav.views) for one config (cached: tests share the compiled views)."""
    config = config_lib.from_json_text(config_json)
    return jax.jit(lambda seed, x: swav.views(
        jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(x.shape[0])), x, config))


@functools.lru_cache(maxsize=None)
def _init():
    """Returns host (params, batch_stats) of the smoke config; the queue length does not change them."""
    params, stats, _ = jax.jit(lambda r: swav.init(r, _config(), _images(1)))(jax.random.PRNGKey(0))
    return jax.device_get((params, stats))


# ---------------------------------------------------------------- NumPy float64 references

def _np_sinkhorn(scores_NxP, epsilon, iterations):
    q = np.exp(np.asarray(scores_NxP, np.float64) / epsilon).T  # P x N, as the official code
    n_protos, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * n_protos
        q /= q.sum(axis=0, keepdims=True) * n
    return (q * n).T


def _np_swapped_loss(scores_VxBxP, codes_KxBxP, temperature):
    s = np.asarray(scores_VxBxP, np.float64) / temperature
    log_p = s - s.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    n_crops = s.shape[0]
    per_code = [np.mean([-np.mean(np.sum(q * log_p[v], axis=1)) for v in range(n_crops) if v != i])
                for i, q in enumerate(np.asarray(codes_KxBxP, np.float64))]
    return np.mean(per_code)


# ---------------------------------------------------------------- multi-crop views

def test_multicrop_views_have_the_configured_sizes_and_crop_scales():
    # Pixel values encode their column (red) and row (green), so each view shows which box it was cut from.
    n, side = 32, 64
    ramp = np.arange(side) * 4
    images = np.zeros((n, side, side, 3), np.uint8)
    images[..., 0], images[..., 1] = ramp[None, None, :], ramp[None, :, None]
    config = _config("augment.jitter_p=0.0", "augment.grayscale_p=0.0", "augment.flip_p=0.0")
    views = _views(config, images, seed=3)
    sw = config.swav
    assert len(views) == sw.num_large_crops + sw.num_small_crops == 4
    sizes = [config.augment.crop_size] * sw.num_large_crops + [sw.small_crop_size] * sw.num_small_crops
    assert [v.shape for v in views] == [(n, s, s, 3) for s in sizes]
    ranges = {"large": (config.augment.min_scale, config.augment.max_scale),
              "small": (sw.small_min_scale, sw.small_max_scale)}
    areas = {"large": [], "small": []}
    for i, view in enumerate(views):
        s = sizes[i]
        pix = (np.asarray(view, np.float64) * np.array(config.augment.std) + np.array(config.augment.mean)) * 255 / 4
        extent = []
        for channel, axis in ((0, 2), (1, 1)):
            spread = pix[..., channel].max(axis=(1, 2)) - pix[..., channel].min(axis=(1, 2))
            # Bilinear half-pixel sampling: a box of w >= s pixels spans w (s-1)/s; a smaller one is clamped.
            downsampled = spread * s / (s - 1)
            extent.append(np.round(np.where(downsampled >= s - 1e-6, downsampled, spread + 1)))
        w, h = extent
        kind = "large" if i < sw.num_large_crops else "small"
        lo, hi = ranges[kind]
        # The box sides are rounded to whole pixels, so its area is only within half a pixel per side.
        assert np.all((h + 0.5) * (w + 0.5) >= lo * side * side), (kind, h, w)
        assert np.all((h - 0.5) * (w - 0.5) <= hi * side * side), (kind, h, w)
        areas[kind].append(h * w / side**2)
    small, large = np.concatenate(areas["small"]), np.concatenate(areas["large"])
    assert small.min() < 0.08 and small.max() > 0.11 and large.max() > 0.6  # the ranges are really sampled
    # Different crops of one image are different views: each crop has its own key.
    assert not np.allclose(np.asarray(views[0]), np.asarray(views[1]))


# ---------------------------------------------------------------- the sharded step against one device and NumPy

def _sharded_step(config, mesh, steps_per_epoch):
    """jit(shard_map) of loss + gradient (w.r.t. replicated params, as the trainer) + update_extras."""

    def step(params, stats, extras, step_idx, views):
        progress = {"step": step_idx, "steps_per_epoch": steps_per_epoch, "total_steps": 100}

        def loss_fn(p):
            return swav.loss(p, stats, extras, views, None, progress, config=config, axis_name="data")

        (value, (new_stats, m, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_extras = swav.update_extras(params, extras, aux, progress, config)
        local = {k: aux[k] for k in ("assignments", "scores", "embeddings")}
        return value, grads, new_stats, new_extras, m, local

    local_specs = {"assignments": P(None, "data"), "scores": P(None, "data"), "embeddings": P("data")}
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(), P("data")),
                                 out_specs=(P(), P(), P(), P(), P(), local_specs)))


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _close_to_scale(a, b):
    """Float32 sums over devices in another order: equal to a small fraction of the leaf's largest entry
    (a conv kernel's small gradient entries are differences of large per-example terms)."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-9)


def _run(config, devices, params, stats, extras, batches, steps_per_epoch):
    mesh = parallel.make_mesh(devices)
    fn = _sharded_step(config, mesh, steps_per_epoch)
    history = []
    for i, views in enumerate(batches):
        queue_before = extras.get("queue")
        views = parallel.put_batch(tuple(np.asarray(v) for v in views), mesh)
        value, grads, stats, extras, m, local = jax.device_get(fn(params, stats, extras, jnp.int32(i), views))
        history.append(dict(loss=value, grads=grads, stats=stats, queue_before=queue_before,
                            queue=extras["queue"], metrics=m, **local))
    return history


def test_eight_devices_equal_one_device_and_numpy():
    # Queue of two global batches from step 0, prototypes frozen for one epoch of 2 steps: step 0 and 1
    # are frozen and fill the queue, step 2 trains the prototypes and uses the queue in Sinkhorn.
    config = _config("swav.queue_length=32", "swav.queue_start_epoch=0", "swav.freeze_prototypes_epochs=1")
    params, stats = _init()
    extras = {"queue": np.zeros((config.swav.num_large_crops, 32, config.head.out_dim), np.float32)}
    batches = [_views(_config(), _images(GLOBAL_B, seed=s), seed=s) for s in range(3)]
    one = _run(config, jax.devices()[:1], params, stats, extras, batches, steps_per_epoch=2)
    eight = _run(config, jax.devices(), params, stats, extras, batches, steps_per_epoch=2)

    sw = config.swav
    protos_dxP = np.asarray(params["prototypes"]["kernel"], np.float64)
    protos_dxP /= np.linalg.norm(protos_dxP, axis=0, keepdims=True)
    for step, (h1, h8) in enumerate(zip(one, eight)):
        np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5)
        jax.tree.map(_close_to_scale, h8["grads"], h1["grads"])
        jax.tree.map(_close, h8["stats"], h1["stats"])
        _close(h8["assignments"], h1["assignments"])
        _close(h8["queue"], h1["queue"])
        assert h8["metrics"]["prototypes_frozen"] == (step < 2)
        assert h8["metrics"]["queue_active"] == (step == 2)

        # Codes: Sinkhorn over the global batch (and the queue's rows at step 2), from the scores.
        for i in range(sw.num_large_crops):
            scores = h8["scores"][i]
            if step == 2:
                queue_scores = np.asarray(h8["queue_before"][i], np.float64) @ protos_dxP
                expected = _np_sinkhorn(np.concatenate([queue_scores, scores]), sw.epsilon,
                                        sw.sinkhorn_iterations)[len(queue_scores):]
                without_queue = _np_sinkhorn(scores, sw.epsilon, sw.sinkhorn_iterations)
                assert np.abs(expected - without_queue).max() > 1e-3  # the queue does change the codes
            else:
                expected = _np_sinkhorn(scores, sw.epsilon, sw.sinkhorn_iterations)
            np.testing.assert_allclose(h8["assignments"][i], expected, atol=2e-5)
        np.testing.assert_allclose(h8["loss"], _np_swapped_loss(h8["scores"], h8["assignments"], sw.temperature),
                                   rtol=1e-5)

        # The prototypes get exactly zero gradient while frozen, a real one afterwards.
        g_protos = h8["grads"]["prototypes"]["kernel"]
        if step < 2:
            assert np.all(g_protos == 0.0)
        else:
            assert np.abs(g_protos).max() > 1e-5
        assert np.abs(h8["grads"]["backbone"]["conv1"]["kernel"]).max() > 1e-6

    # Queue order: newest global batch first, rows in global example order (device 0's examples first).
    b = GLOBAL_B
    np.testing.assert_array_equal(one[0]["queue_before"], 0.0)
    np.testing.assert_allclose(eight[1]["queue"][0, :b], eight[1]["embeddings"], rtol=1e-6)
    np.testing.assert_allclose(eight[0]["queue"][0, :b], eight[0]["embeddings"], rtol=1e-6)
    np.testing.assert_array_equal(eight[1]["queue"][:, b:], eight[0]["queue"][:, :b])
    np.testing.assert_array_equal(eight[0]["queue"][:, b:], 0.0)


# ---------------------------------------------------------------- gradients: codes and prototypes

def test_codes_carry_no_gradient():
    config = _config("swav.queue_length=0", "swav.num_small_crops=1")
    views = _views(_config(), _images(GLOBAL_B), seed=1)[:3]  # two large crops and one small one
    params, stats = _init()
    extras = {}
    progress = {"step": jnp.int32(5), "steps_per_epoch": 1, "total_steps": 10}  # after the freeze

    def method_loss(p):
        value, (_, _, aux) = swav.loss(p, stats, extras, views, None, progress, config=config, axis_name=None)
        return value, aux["assignments"]

    def loss_with_constant_codes(p, codes):
        _, z, _ = swav._embed(p, stats, views, config, None)  # pylint: disable=protected-access
        scores = z @ swav.prototype_matrix(p, progress, config)
        b = views[0].shape[0]
        per_crop = [scores[v * b:(v + 1) * b] for v in range(len(views))]
        return losses.swav_loss(per_crop, list(codes), config.swav.temperature)

    @jax.jit
    def grads(p):
        (_, codes), g_method = jax.value_and_grad(method_loss, has_aux=True)(p)
        return g_method, jax.grad(loss_with_constant_codes)(p, codes)

    # The method's gradient is that of the swapped cross-entropy with the codes held constant.
    g_method, g_constant = grads(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_method, g_constant)
    assert np.abs(g_method["prototypes"]["kernel"]).max() > 1e-5


def test_prototypes_get_the_full_gradient_not_its_tangent_projection():
    # Official SwAV renormalises the prototypes in place and then uses the raw weights, so their gradient
    # is d loss / d W; differentiating through the normalisation would remove each column's radial part.
    config = _config("swav.queue_length=0", "swav.num_small_crops=0")
    progress = {"step": jnp.int32(5), "steps_per_epoch": 1, "total_steps": 10}  # after the freeze
    params, _ = _init()
    z = losses.l2_normalize(jax.random.normal(jax.random.PRNGKey(3), (16, config.head.out_dim)))
    codes = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), (16, config.swav.num_prototypes)), axis=1)
    loss_of = lambda w: jnp.sum(jax.nn.log_softmax(z @ w / 0.1, axis=1) * codes)  # noqa: E731
    ours = jax.grad(lambda p: loss_of(swav.prototype_matrix(p, progress, config)))(params)["prototypes"]["kernel"]
    w = np.asarray(params["prototypes"]["kernel"])  # unit columns, as after every project_params
    full = np.asarray(jax.grad(loss_of)(jnp.asarray(w)))
    # float32 round-off of the renormalisation: up to 3e-7 under jax 0.12 (Python 3.12), gradients up to 1.6
    np.testing.assert_allclose(ours, full, rtol=1e-5, atol=1e-6)
    radial_P = np.sum(full * w, axis=0)  # the part a gradient through the norm would have removed
    assert np.abs(radial_P).max() > 1e-3


def test_bn_per_crop_is_one_network_call_per_crop():
    # swav.bn_per_crop (the cifar10 preset, as lightly's benchmark): every crop normalised with its own
    # statistics in the backbone and the head, running averages updated crop after crop; still one backbone
    # pass per resolution and one head pass.
    config = _config("swav.queue_length=0", "swav.num_small_crops=2", "swav.bn_per_crop=true")
    views = _views(config, _images(GLOBAL_B), seed=2)
    assert [v.shape[1] for v in views] == [16, 16, 8, 8]
    params, stats = _init()
    h, z, new_stats = jax.jit(lambda p, s, v: swav._embed(p, s, v, config, None))(  # pylint: disable=protected-access
        params, stats, views)

    pooled = _config("swav.queue_length=0", "swav.num_small_crops=2")
    backbone, head = swav.networks(pooled)
    want_h, want_z, s_backbone, s_head = [], [], stats["backbone"], stats["head"]
    for view in views:  # the network called once per crop
        f, m = backbone.apply({"params": params["backbone"], "batch_stats": s_backbone}, jnp.asarray(view, jnp.float32),
                              train=True, mutable=["batch_stats"])
        y, n = head.apply({"params": params["head"], "batch_stats": s_head}, f, train=True, mutable=["batch_stats"])
        s_backbone, s_head = m["batch_stats"], n["batch_stats"]
        want_h.append(f)
        want_z.append(losses.l2_normalize(y))
    np.testing.assert_allclose(h, np.concatenate(want_h), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, np.concatenate(want_z), rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_stats,
                 {"backbone": s_backbone, "head": s_head})
    # The official grouping (crops of one resolution together, all crops in the head) is another function.
    _, z_pooled, _ = jax.jit(lambda p, s, v: swav._embed(p, s, v, pooled, None))(  # pylint: disable=protected-access
        params, stats, views)
    assert np.abs(np.asarray(z_pooled) - np.asarray(z)).max() > 1e-3


def test_project_params_renormalises_prototype_columns():
    config = _config()
    params, _ = _init()
    kernel = np.asarray(params["prototypes"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)  # unit columns at init
    scaled = {**params, "prototypes": {"kernel": kernel * np.linspace(0.5, 3.0, kernel.shape[1])}}
    out = swav.project_params(scaled, None, config)["prototypes"]["kernel"]
    np.testing.assert_allclose(out, kernel, rtol=1e-6)
    assert out.shape == (config.head.out_dim, config.swav.num_prototypes)


def test_queue_length_not_a_multiple_of_the_batch_is_an_error():
    with pytest.raises(ValueError, match=r"swav.queue_length=40 must be 0 \(no queue\) or a multiple of the "
                                         r"global batch_size=16, e.g. --config.swav.queue_length=32"):
        swav.init(jax.random.PRNGKey(0), _config("swav.queue_length=40"), _images(1))


def test_docstrings_batch_256_command_is_the_official_batch_256_script():
    # configs/swav.py's docstring gives the overrides for facebookresearch/swav scripts/swav_200ep_bs256_pretrain.sh:
    # --epochs 200, 4 GPUs x --batch_size 64, --base_lr 0.6 (the peak, not scaled in main_swav.py), --final_lr
    # 0.0006, --warmup_epochs 0, --queue_length 3840, --epoch_queue_starts 15, --freeze_prototypes_niters 5005
    # (one epoch at batch 256).
    from ssl_jax import optim  # pylint: disable=import-outside-toplevel
    path = os.path.join(ROOT, "configs", "swav.py")
    with open(path, encoding="utf-8") as f:
        doc = " ".join(f.read().split('"""')[1].split())
    command = doc.split("swav_200ep_bs256_pretrain.sh", 1)[1].split("`")[1]
    overrides = [o.replace("--config.", "", 1) for o in command.split()]
    c = config_lib.load_config(path + ":imagenet", overrides)
    assert (c.num_epochs, c.batch_size) == (200, 256)
    steps_per_epoch = 1_281_167 // c.batch_size
    schedule = optim.make_schedule(c.optim, c.batch_size, steps_per_epoch, c.num_epochs)
    assert float(schedule(0)) == pytest.approx(0.6)  # no warm-up
    assert float(schedule(steps_per_epoch * c.num_epochs)) == pytest.approx(0.0006)
    assert (c.swav.queue_length, c.swav.queue_start_epoch) == (3840, 15)
    assert swav.freeze_steps(c, steps_per_epoch) == steps_per_epoch == 5004  # the official 5005 iterations

# ---------------------------------------------------------------- the command line

def test_smoke_run_through_the_cli(tmp_path):
    _, rows = cli_smoke_rows("configs/swav.py:smoke", str(tmp_path / "swav"),
                             ("loss", "grad_norm", "embedding_std_ratio", "effective_rank", "collapsed"),
                             "--config.eval.knn_every_epochs=0")
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    # Prototypes frozen in epoch 1 (steps 0-7); the queue of 2 batches, filled from step 8, is used from step 10.
    assert [r["prototypes_frozen"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["queue_active"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all(r["effective_rank"] > 1.0 for r in rows)
