"""BYOL: 8 devices equal 1 device (loss, updates, EMA target, BN statistics), no gradient into the target,
the loss pairs each prediction with the other view's target projection, the EMA and tau schedule, a CLI smoke run."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import config as config_lib
from ssl_jax.methods import byol
from harness import assert_trees_close as _assert_trees_close, random_source as _source
from harness import cli_smoke_rows, delta, largest, one_and_all_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "byol.py")


def _config(*overrides):
    # tau_base 0.5: the target moves visibly in two steps, so comparing it across device counts means something.
    return config_lib.load_config(f"{CONFIG}:smoke", ["batch_size=16", "optim.lr=0.5", "byol.tau_base=0.5",
                                                      *overrides])


def test_eight_devices_equal_one_device(threefry):  # pylint: disable=unused-argument
    # Colour jitter off: its per-example, device-count-independent draws are test_augment's to check, and it
    # costs seconds of compile here; crop, flip, grayscale and solarize still use the per-example keys.
    before, after1, after8, hist1, _ = one_and_all_devices(
        _config("augment.jitter_p=0.0"), _source(), ("loss", "grad_norm", "param_norm", "probe_loss", "tau"),
        rbg_init=True)
    assert hist1[1]["tau"] > hist1[0]["tau"] == np.float32(0.5)
    # Equal parameter updates after two SGD steps mean equal gradients.
    delta1, delta8 = delta(after1["params"], before["params"]), delta(after8["params"], before["params"])
    assert largest(delta1) > 1e-4
    _assert_trees_close(delta8, delta1, rtol=1e-4, atol=1e-6)
    # The EMA target moved, and identically; so did both networks' BatchNorm statistics.
    target_delta1, target_delta8 = delta(after1["extras"], before["extras"]), delta(after8["extras"], before["extras"])
    assert largest(target_delta1) > 1e-3
    _assert_trees_close(target_delta8, target_delta1, rtol=1e-4, atol=1e-6)
    assert set(after1["batch_stats"]) == {"backbone", "projector", "predictor", "target"}
    _assert_trees_close(after8["batch_stats"], after1["batch_stats"], rtol=1e-4, atol=1e-6)


def _cos_np(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_loss_pairs_views_and_the_target_gets_no_gradient():
    config = _config("augment.jitter_p=0.0")  # views are not under test here; jitter is slow to compile
    images = _source(n=8).images
    params, stats, extras = jax.jit(lambda k: byol.init(k, config, images))(jax.random.PRNGKey(0))
    # The target starts as a copy of the online backbone and projector...
    jax.tree.map(np.testing.assert_array_equal, extras["target"], {k: params[k] for k in byol.TARGET_PARTS})
    # ...and is made different from it here, as it is after the first step.
    extras = jax.tree.map(lambda x: x * 0.9 + 0.01, extras)
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    views = jax.jit(lambda k, im: byol.views(k, im, config))(keys, images)
    progress = {"step": jnp.int32(0), "steps_per_epoch": 8, "total_steps": 16}

    def loss_fn(p, e):
        return byol.loss(p, stats, e, views, None, progress, config=config, axis_name=None)

    @jax.jit
    def run(p, e):
        (value, (new_stats, _, aux)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(p, e)
        outs = []
        for v in views:
            online, _ = byol.forward(p, stats, v, config=config)
            target, _ = byol.forward(e["target"], stats["target"], v, config=config, parts=byol.TARGET_PARTS)
            outs.append((online["predictor"], target["projector"]))
        return value, new_stats, aux, grads, outs

    value, new_stats, aux, (g_params, g_extras), outs = run(params, extras)
    (p1, t1), (p2, t2) = outs
    expected = np.mean(2 - 2 * _cos_np(p1, t2)) + np.mean(2 - 2 * _cos_np(p2, t1))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_extras))
    for part in byol.ONLINE_PARTS:
        assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g_params[part])) > 0, part
    assert aux["features"].shape == (8, byol.feature_dim(config)) and aux["embeddings"].shape == (8, 16)
    # The target's BatchNorm statistics come from its own forward pass in training mode.
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         new_stats["target"], stats["target"])
    assert max(jax.tree.leaves(moved)) > 0


def test_cifar10_preset_takes_lightlys_sgd_steps_for_a_loss_four_times_as_large():
    # lightly's BYOL: loss 0.5 (-cos - cos), torch SGD lr 0.06 x 512/128, momentum 0.9, weight decay 5e-4,
    # cosine decay set once per epoch. Ours: (2 - 2 cos) + (2 - 2 cos), 4x its gradient. The preset's optimizer fed
    # 4x a gradient must move the parameters exactly as torch SGD with lightly's values, written out here in NumPy.
    from ssl_jax import optim  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(f"{CONFIG}:cifar10")
    steps_per_epoch, epochs = 5, 4
    tx, _ = optim.make_optimizer(config.optim, config.batch_size, steps_per_epoch, epochs)
    rs = np.random.RandomState(0)
    target = {"dense": {"kernel": rs.randn(3, 4), "bias": rs.randn(4)}, "bn": {"scale": rs.randn(4)}}
    params = jax.tree.map(lambda t: (t + rs.randn(*t.shape)).astype(np.float32), target)

    def lightly_grad(p):  # any smooth loss; the test only needs it to depend on the parameters
        return jax.tree.map(lambda w, t: (w - t) - 0.3 * np.sin(w), p, target)

    ours, state = params, tx.init(params)
    ref, velocity = jax.tree.map(np.float64, params), jax.tree.map(np.zeros_like, params)
    total = steps_per_epoch * epochs
    for step in range(total):
        updates, state = tx.update(jax.tree.map(lambda g: 4.0 * g, lightly_grad(ours)), state, ours)
        ours = jax.tree.map(lambda w, u: w + u, ours, updates)
        epoch = step // steps_per_epoch  # CosineAnnealingLR(optimizer, epochs), stepped after each epoch
        lr = 0.06 * config.batch_size / 128 * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        d_p = jax.tree.map(lambda g, w: g + 5e-4 * w, lightly_grad(ref), ref)
        velocity = jax.tree.map(lambda v, d: 0.9 * v + d, velocity, d_p)
        ref = jax.tree.map(lambda w, v: w - lr * v, ref, velocity)
    _assert_trees_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params))) > 0.1


def test_tau_schedule_and_ema_update_match_numpy():
    total, base = 1000, 0.996
    for step, expected in ((0, base), (total // 2, 1 - (1 - base) / 2), (total, 1.0), (2 * total, 1.0)):
        np.testing.assert_allclose(float(byol.target_tau(step, total, base)), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(float(byol.target_tau(137, total, base)),
                               1 - (1 - base) * (math.cos(math.pi * 137 / total) + 1) / 2, atol=1e-7)
    for step in (0, 137, total, 2 * total):  # lightly's CIFAR-10 schedule: tau_base throughout
        assert float(byol.target_tau(step, total, 0.99, "constant")) == np.float32(0.99)
    with pytest.raises(ValueError, match="tau_schedule"):
        byol.target_tau(0, total, base, "linear")

    rs = np.random.RandomState(0)

    def tree():
        return {"w": rs.randn(3, 4).astype(np.float32), "b": rs.randn(4).astype(np.float32)}

    params = {"backbone": tree(), "projector": tree(), "predictor": tree()}
    extras = {"target": {"backbone": tree(), "projector": tree()}}
    config = _config()
    progress = {"step": jnp.int32(3), "steps_per_epoch": 4, "total_steps": 8}
    new = byol.update_extras(params, extras, {}, progress, config)
    tau = 1 - (1 - 0.5) * (math.cos(math.pi * 3 / 8) + 1) / 2
    assert set(new["target"]) == {"backbone", "projector"}  # the predictor has no target
    for part in ("backbone", "projector"):
        for name in ("w", "b"):
            expected = tau * extras["target"][part][name] + (1 - tau) * params[part][name]
            np.testing.assert_allclose(new["target"][part][name], expected, rtol=1e-6, atol=1e-7)


def test_imagenet_heads_are_the_official_mlp_without_output_bias():
    # deepmind-research byol/utils/networks.py MLP: hk.Linear(hidden, with_bias=True) -> BatchNorm -> relu ->
    # hk.Linear(output_size, with_bias=False); configs/byol.py: 4096 -> 256 for projector and predictor.
    config = config_lib.load_config(f"{CONFIG}:imagenet")
    assert config.byol.head_out_bias is False
    shapes = jax.eval_shape(lambda: byol.init(jax.random.PRNGKey(0), config, np.zeros((1, 8, 8, 3), np.uint8)))
    params, _, extras = shapes
    for tree in (params, extras["target"]):
        assert {k: sorted(v) for k, v in tree["projector"].items()} == {
            "dense0": ["kernel"], "bn0": ["bias", "scale"], "dense1": ["kernel"]}
        assert (tree["projector"]["dense0"]["kernel"].shape, tree["projector"]["dense1"]["kernel"].shape) == (
            (2048, 4096), (4096, 256))
    assert {k: sorted(v) for k, v in params["predictor"].items()} == {
        "dense0": ["kernel"], "bn0": ["bias", "scale"], "dense1": ["kernel"]}
    assert params["predictor"]["dense1"]["kernel"].shape == (4096, 256)
    # Haiku's initialisation (hk.Conv2D, hk.Linear: TruncatedNormal(1/sqrt(fan_in)), zero biases; the ResNet's
    # convolutions too: networks.ResNetTorso sets no w_init), checked in test_models for the init itself.
    assert config.model.conv_init == "haiku" and config.byol.head_init == "haiku"
    head = byol.networks(config)["projector"].init(jax.random.PRNGKey(0), jnp.zeros((2, 2048)), train=False)
    w = np.asarray(head["params"]["dense0"]["kernel"])
    np.testing.assert_allclose(w.std(), 0.87962566103423978 / np.sqrt(2048), rtol=0.01)
    # lightly's heads (the cifar10 preset) keep the output bias and torch.nn.Linear's initialisation.
    cifar = config_lib.load_config(f"{CONFIG}:cifar10")
    assert cifar.byol.head_out_bias is True and cifar.byol.head_init == "torch"
    assert set(byol.networks(cifar)["projector"].init(jax.random.PRNGKey(0), jnp.zeros((2, 512)),
                                                      train=False)["params"]["dense1"]) == {"kernel", "bias"}


def test_without_output_bias_the_loss_and_step_still_run():
    config = _config("byol.head_out_bias=false")
    images = np.random.RandomState(0).randint(0, 256, size=(16, 16, 16, 3)).astype(np.uint8)
    params, stats, extras = byol.init(jax.random.PRNGKey(0), config, images[:1])
    keys = jax.random.split(jax.random.PRNGKey(1), 16)
    views = byol.views(keys, images, config)
    progress = {"step": jnp.int32(0), "steps_per_epoch": 4, "total_steps": 8}
    grads, (_, _, aux) = jax.grad(lambda p: byol.loss(p, stats, extras, views, jax.random.PRNGKey(2), progress,
                                                     config=config, axis_name=None), has_aux=True)(params)
    assert "bias" not in grads["predictor"]["dense1"] and "bias" not in grads["projector"]["dense1"]
    assert float(jnp.linalg.norm(grads["predictor"]["dense1"]["kernel"])) > 0
    assert set(byol.update_extras(params, extras, aux, progress, config)["target"]["projector"]["dense1"]) == {
        "kernel"}


def test_smoke_run_through_the_cli(tmp_path):
    workdir = str(tmp_path / "run")
    _, rows = cli_smoke_rows(f"{CONFIG}:smoke", workdir,
                             ("loss", "embedding_std_ratio", "effective_rank", "collapsed", "tau"), rbg=True)
    assert rows[-1]["step"] == 16
    for row in rows:
        assert 0 <= row["loss"] <= 8  # two terms of 2 - 2 cos, each in [0, 4]
        assert row["embedding_std_ratio"] > 0 and row["effective_rank"] >= 1
    taus = [r["tau"] for r in rows]
    assert taus == sorted(taus) and 0.99 < taus[0] and taus[-1] <= 1.0
