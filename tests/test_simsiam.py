"""SimSiam: 8 devices equal 1 device, the stop-gradient branch carries no gradient, the loss pairs each
prediction with the other view's projection, the predictor keeps its fixed learning rate, a CLI smoke run."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import config as config_lib, optim
from ssl_jax.methods import simsiam
from harness import assert_trees_close as _assert_trees_close, random_source as _source
from harness import cli_smoke_rows, delta, largest, one_and_all_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "simsiam.py")


def _config(*overrides):
    return config_lib.load_config(f"{CONFIG}:smoke", ["batch_size=16", "optim.lr=0.5", *overrides])


def test_eight_devices_equal_one_device(threefry):  # pylint: disable=unused-argument
    # Colour jitter off: its per-example, device-count-independent draws are test_augment's to check, and it
    # costs seconds of compile here; crop, flip, grayscale and solarize still use the per-example keys.
    before, after1, after8, hist1, _ = one_and_all_devices(
        _config("augment.jitter_p=0.0"), _source(), ("loss", "grad_norm", "param_norm", "probe_loss"), rbg_init=True)
    assert all(-1.0 <= m["loss"] <= 1.0 for m in hist1)
    # Equal parameter updates after two SGD steps mean equal gradients (predictor included).
    delta1, delta8 = delta(after1["params"], before["params"]), delta(after8["params"], before["params"])
    assert largest(delta1["model"]["predictor"]) > 1e-4
    _assert_trees_close(delta8, delta1, rtol=1e-4, atol=1e-6)
    _assert_trees_close(after8["batch_stats"], after1["batch_stats"], rtol=1e-4, atol=1e-6)
    assert after1["extras"] == {} and after8["extras"] == {}


def _neg_cos(p, z):
    """-mean cos(p_i, z_i) with no stop-gradient: the reference decides where gradients flow."""
    p = p / jnp.linalg.norm(p, axis=1, keepdims=True)
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    return -jnp.mean(jnp.sum(p * z, axis=1))


def test_stop_gradient_branch_carries_no_gradient():
    config = _config("augment.jitter_p=0.0")  # views are not under test here; jitter is slow to compile
    images = _source(n=8).images
    params, stats, _ = jax.jit(lambda k: simsiam.init(k, config, images))(jax.random.PRNGKey(0))
    # The projector's output BatchNorm (bn1 of a 2-layer head) has statistics but no affine parameters.
    assert "bn1" in stats["projector"] and "bn1" not in params["projector"] and "bn0" in params["projector"]
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    view_1, view_2 = jax.jit(lambda k, im: simsiam.views(k, im, config))(keys, images)
    progress = {"step": jnp.int32(0), "steps_per_epoch": 8, "total_steps": 16}

    def method_loss(p):
        return simsiam.loss(p, stats, {}, (view_1, view_2), None, progress, config=config, axis_name=None)[0]

    def reference(p_online, p_target):
        # The target branch (z) from its own copy of the parameters: the gradient w.r.t. p_online alone is
        # what the stop-gradient must give; the sum of both is the gradient without it.
        out_1, s = simsiam.forward(p_online, stats, view_1, config=config)
        out_2, _ = simsiam.forward(p_online, s, view_2, config=config)
        tgt_1, s = simsiam.forward(p_target, stats, view_1, config=config)
        tgt_2, _ = simsiam.forward(p_target, s, view_2, config=config)
        return (0.5 * _neg_cos(out_1["predictor"], tgt_2["projector"])
                + 0.5 * _neg_cos(out_2["predictor"], tgt_1["projector"]))

    @jax.jit
    def run(p):
        value, grads = jax.value_and_grad(method_loss)(p)
        ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(p, p)
        return value, grads, ref_value, ref_grads

    value, grads, ref_value, (online_grads, target_branch_grads) = run(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    _assert_trees_close(grads, online_grads, rtol=1e-4, atol=1e-7)
    # The test has teeth: without the stop-gradient the projector would also get the target branch's
    # gradient, and that is far from zero.
    branch = jax.tree.map(lambda g: float(np.abs(g).max()), target_branch_grads["projector"])
    assert max(jax.tree.leaves(branch)) > 1e-4
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(target_branch_grads["predictor"]))
    # And directly: the targets z1, z2 of the symmetric loss get exactly zero gradient, the predictions do not.
    p1, p2, z1, z2 = np.random.RandomState(0).randn(4, 8, 32).astype(np.float32)
    g_p1, g_p2, g_z1, g_z2 = jax.grad(simsiam.symmetric_loss, argnums=(0, 1, 2, 3))(p1, p2, z1, z2)
    assert np.all(np.asarray(g_z1) == 0) and np.all(np.asarray(g_z2) == 0)
    assert float(np.abs(g_p1).min()) > 0 and float(np.abs(g_p2).min()) > 0


def test_predictor_keeps_the_fixed_learning_rate():
    # No momentum and no weight decay, so that an update is exactly -lr * gradient.
    config = _config("optim.momentum=0.0", "optim.weight_decay=0.0", "optim.warmup_epochs=1")
    assert config.optim.fixed_lr_prefixes == ("model/predictor",)
    images = _source(n=8).images
    params, _, _ = jax.jit(lambda k: simsiam.init(k, config, images))(jax.random.PRNGKey(0))
    all_params = {"model": params, "probe": {"fc": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}}
    labels = optim.group_labels(all_params, config.optim.fixed_lr_prefixes)
    for part, tree in labels["model"].items():
        assert set(jax.tree.leaves(tree)) == {"fixed" if part == "predictor" else "default"}, part
    steps_per_epoch, epochs = 5, 4
    tx, schedule = optim.make_optimizer(config.optim, config.batch_size, steps_per_epoch, epochs)
    peak = 0.5 * config.batch_size / 256
    grads = jax.tree.map(jnp.ones_like, all_params)
    opt_state = tx.init(all_params)
    update = jax.jit(tx.update)
    for step in range(steps_per_epoch * epochs):
        updates, opt_state = update(grads, opt_state, all_params)
        lr_now = float(schedule(step))
        for part, tree in updates["model"].items():
            expected = peak if part == "predictor" else lr_now  # warm-up and decay skip the predictor
            for u in jax.tree.leaves(tree):
                np.testing.assert_allclose(-np.asarray(u), expected, rtol=1e-5, atol=1e-9, err_msg=part)
        np.testing.assert_allclose(-np.asarray(updates["probe"]["fc"]["bias"]), lr_now, rtol=1e-5, atol=1e-9)
    assert float(schedule(0)) == 0.0 and np.isclose(float(schedule(steps_per_epoch)), peak)  # warm-up, then peak
    assert float(schedule(steps_per_epoch * epochs - 1)) < 0.05 * peak  # ...decayed by the end


def test_smoke_run_through_the_cli(tmp_path):
    workdir = str(tmp_path / "run")
    _, rows = cli_smoke_rows(f"{CONFIG}:smoke", workdir, ("loss", "embedding_std_ratio", "effective_rank", "collapsed"),
                             rbg=True)
    assert rows[-1]["step"] == 16
    for row in rows:
        assert -1.0 <= row["loss"] <= 1.0  # minus a mean cosine
        assert row["embedding_std_ratio"] > 0 and row["effective_rank"] >= 1
    # Without warm-up the logged (backbone) learning rate starts at the peak and decays.
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
