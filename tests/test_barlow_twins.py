"""Barlow Twins: the loss path against NumPy, 8 devices equal 1, the bias/BN learning rate, a CLI smoke run."""
import os

import jax
import numpy as np
import optax

from ssl_jax import config as config_lib, optim
from ssl_jax.methods import barlow_twins
from harness import cli_smoke_rows, delta, largest, one_and_all_devices, random_source as _source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "barlow_twins.py")


def _config(preset="smoke", *overrides):
    return config_lib.load_config(f"{CONFIG}:{preset}", list(overrides))


def _np_barlow(z1, z2, lambd, eps=1e-5):
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    z1n = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
    z2n = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    c = z1n.T @ z2n / z1.shape[0]
    off = c - np.diag(np.diag(c))
    return np.sum((1.0 - np.diag(c)) ** 2) + lambd * np.sum(off ** 2)


def test_loss_and_statistics_of_two_separate_passes():
    config = _config()
    rs = np.random.RandomState(0)
    params, stats, extras = barlow_twins.init(jax.random.PRNGKey(0), config, np.zeros((1, 16, 16, 3), np.uint8))
    v1, v2 = (rs.randn(8, 16, 16, 3).astype(np.float32) for _ in range(2))
    loss_fn = jax.jit(lambda p, s, v: barlow_twins.loss(p, s, extras, v, None, None, config=config, axis_name=None))
    value, (new_stats, _, aux) = loss_fn(params, stats, (v1, v2))
    backbone, projector = barlow_twins.networks(config)

    @jax.jit
    def features_and_embeddings(x):  # train-mode BN normalises with batch statistics, not the running ones
        h = backbone.apply({"params": params["backbone"], "batch_stats": stats["backbone"]},
                           x, train=True, mutable=["batch_stats"])[0]
        return h, projector.apply({"params": params["head"], "batch_stats": stats["head"]},
                                  h, train=True, mutable=["batch_stats"])[0]

    (h1, z1), (h2, z2) = features_and_embeddings(v1), features_and_embeddings(v2)
    h1, h2 = np.asarray(h1, np.float64), np.asarray(h2, np.float64)
    np.testing.assert_allclose(value, _np_barlow(z1, z2, config.loss.lambd), rtol=1e-4)
    np.testing.assert_allclose(aux["features"], h1, rtol=1e-5, atol=1e-6)
    assert aux["embeddings"].shape == (8, config.head.out_dim)
    # Two torch-style forward passes: the running mean moves twice, view 1 then view 2 (momentum 0.9).
    w0 = np.asarray(params["head"]["dense0"]["kernel"], np.float64)
    expected = 0.9 * (0.1 * (h1 @ w0).mean(0)) + 0.1 * (h2 @ w0).mean(0)
    np.testing.assert_allclose(new_stats["head"]["bn0"]["mean"], expected, rtol=1e-4, atol=1e-6)


def test_views_apply_each_views_own_probabilities():
    # Whole-image crops, no flip or colour: the views differ only by view 2's solarisation (p = 1 here).
    config = _config("smoke", "augment.min_scale=1.0", "augment.flip_p=0.0", "augment.jitter_p=0.0",
                     "augment.grayscale_p=0.0", "augment.mean=(0.0, 0.0, 0.0)", "augment.std=(1.0, 1.0, 1.0)",
                     "barlow_twins.view2_solarize_p=1.0")
    images = np.random.RandomState(0).randint(0, 256, size=(4, 16, 16, 3)).astype(np.uint8)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    view_1, view_2 = jax.jit(lambda k, x: barlow_twins.views(k, x, config))(keys, images)
    np.testing.assert_allclose(view_1, images / 255.0, atol=1e-6)
    np.testing.assert_allclose(view_2, np.where(view_1 >= 0.5, 1.0 - view_1, view_1), atol=1e-6)


def test_eight_devices_equal_one_device(threefry):  # pylint: disable=unused-argument
    # SGD (still with the bias/BN group) so that parameter deltas are proportional to the gradients.
    config = _config("smoke", "batch_size=16", "optim.name=sgd", "optim.lr=0.5", "optim.warmup_epochs=0")
    before1, after1, after8, _, _ = one_and_all_devices(config, _source(),
                                                         ("loss", "grad_norm", "param_norm", "probe_loss"))
    delta1, delta8 = delta(after1["params"], before1["params"]), delta(after8["params"], before1["params"])
    scale = largest(delta1["model"])
    assert scale > 1e-3  # the steps did move the weights
    # float32 sums in a different order: agree to a small fraction of the largest step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * scale), delta8, delta1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 after8["batch_stats"], after1["batch_stats"])


def test_bias_and_norm_learning_rate_factor_is_applied():
    config = _config("imagenet", "optim.warmup_epochs=0")
    assert (config.optim.name, config.optim.lr, config.optim.bias_lr_factor) == ("lars", 0.2, 0.024)
    tx, schedule = optim.make_optimizer(config.optim, config.batch_size, 10, config.num_epochs)
    rs = np.random.RandomState(1)
    params = {"model": {"head": {"dense0": {"kernel": rs.randn(6, 4).astype(np.float32)},
                                 "bn0": {"scale": rs.rand(4).astype(np.float32) + 0.5,
                                         "bias": rs.randn(4).astype(np.float32)}}}}
    grads = jax.tree.map(lambda p: rs.randn(*p.shape).astype(np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    peak = 0.2 * config.batch_size / 256  # 1.6 at batch 2048: the official 0.2 x B/256
    assert np.isclose(schedule(0), peak)
    bn_up, bn_g = updates["model"]["head"]["bn0"], grads["model"]["head"]["bn0"]
    for name in ("scale", "bias"):  # no decay, no trust ratio, lr 0.0048 x B/256
        np.testing.assert_allclose(bn_up[name], -0.0048 * config.batch_size / 256 * bn_g[name], rtol=1e-5)
    w = params["model"]["head"]["dense0"]["kernel"].astype(np.float64)
    g = grads["model"]["head"]["dense0"]["kernel"] + config.optim.weight_decay * w
    trust = 0.001 * np.linalg.norm(w) / np.linalg.norm(g)
    np.testing.assert_allclose(updates["model"]["head"]["dense0"]["kernel"], -peak * trust * g, rtol=1e-5)
    assert optax.tree.norm(updates) > 0


def test_presets_follow_the_official_recipe():
    imagenet = _config("imagenet")
    assert (imagenet.head.num_layers, imagenet.head.hidden_dim, imagenet.head.out_dim) == (3, 8192, 8192)
    assert (imagenet.loss.lambd, imagenet.batch_size, imagenet.num_epochs) == (0.0051, 2048, 1000)
    spec_1, spec_2 = barlow_twins.view_specs(imagenet)
    assert (spec_1.blur_p, spec_1.solarize_p, spec_2.blur_p, spec_2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert spec_1.size == 224 and spec_1.jitter == spec_2.jitter == (0.4, 0.4, 0.2, 0.1)
    cifar = _config("cifar10")
    spec_1, spec_2 = barlow_twins.view_specs(cifar)
    # lightly's CIFAR-10 benchmark: the same SimCLR views for both branches, a 2-layer 2048-2048 projector.
    assert (spec_1.blur_p, spec_2.blur_p, spec_1.solarize_p, spec_2.solarize_p) == (0.0, 0.0, 0.0, 0.0)
    assert cifar.model.name == "resnet18" and cifar.batch_size == 512 and cifar.optim.name == "sgd"
    assert (cifar.head.num_layers, cifar.head.hidden_dim, cifar.head.out_dim, cifar.loss.lambd) == (2, 2048, 2048,
                                                                                                    0.005)


def test_smoke_run_through_the_cli(tmp_path):
    workdir = str(tmp_path / "run")
    records, rows = cli_smoke_rows(f"{CONFIG}:smoke", workdir,
                                   ("loss", "grad_norm", "embedding_std_ratio", "effective_rank", "collapsed"))
    assert rows[-1]["step"] == 16
    for row in rows:
        assert row["effective_rank"] > 1.0  # computed on logged steps, and not collapsed to a line
    assert [r["step"] for r in records if "knn_top1" in r] == [8, 16]
