"""SimCLR v2: the 3-layer head, fine-tuning features, 8 devices equal 1, v1 unchanged, a CLI smoke run."""
import os

import jax
import numpy as np
import pytest

from ssl_jax import config as config_lib
from ssl_jax.methods import common, simclr
from harness import assert_updates_close, cli_smoke_rows, delta, largest, one_and_all_devices, random_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "configs", "simclr_v2.py")
V1 = os.path.join(ROOT, "configs", "simclr.py")
SAMPLE = np.zeros((1, 16, 16, 3), np.uint8)


def _source():
    return random_source(n=32)


def _config(spec, *overrides):
    return config_lib.load_config(spec, list(overrides))


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_head_is_three_layers_as_wide_as_the_backbone_with_bn_on_every_layer():
    config = _config(f"{V2}:imagenet", "model.width_multiplier=2")
    params, stats, _ = jax.eval_shape(lambda k: simclr.init(k, config, SAMPLE), jax.random.PRNGKey(0))
    assert simclr.feature_dim(config) == 4096  # ResNet-50 2x: the hidden layers follow the backbone width
    assert _shapes(params["head"]) == {
        "dense0": {"kernel": (4096, 4096)}, "bn0": {"scale": (4096,), "bias": (4096,)},
        "dense1": {"kernel": (4096, 4096)}, "bn1": {"scale": (4096,), "bias": (4096,)},
        "dense2": {"kernel": (4096, 128)}, "bn2": {"scale": (128,)}}  # output BN: scale, no bias (SimCLR v2 TF)
    assert _shapes(stats["head"]) == {"bn0": {"mean": (4096,), "var": (4096,)},
                                      "bn1": {"mean": (4096,), "var": (4096,)},
                                      "bn2": {"mean": (128,), "var": (128,)}}
    assert config.loss.temperature == 0.1 and config.head.finetune_layer == 1


def test_output_batchnorm_standardises_each_dimension_in_training():
    # head.init_std=0 (torch's init): the preset's N(0, 0.01^2) kernels on the smoke network's 16 features give
    # pre-BN variances near 1e-3, where BatchNorm's epsilon of 1e-5 visibly shrinks the output variance (to 0.98).
    config = _config(f"{V2}:smoke", "model.dtype=float32", "head.init_std=0.0")
    params, stats, _ = simclr.init(jax.random.PRNGKey(0), config, SAMPLE)
    _, head = simclr.networks(config)
    h = np.random.RandomState(0).randn(32, simclr.feature_dim(config)).astype(np.float32) * 3.0 + 1.0
    z, _ = head.apply({"params": params["head"], "batch_stats": stats["head"]}, h, train=True,
                      mutable=["batch_stats"])
    z = np.asarray(z, np.float64)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.var(0), 1.0, rtol=1e-3)


def _perturbed(tree, rs):
    return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rs.rand(*x.shape).astype(np.float32), tree)


def test_finetune_features_layer_0_is_encode_and_layer_1_the_first_hidden_activation():
    config = _config(f"{V2}:smoke", "model.dtype=float32")
    params, stats, _ = simclr.init(jax.random.PRNGKey(0), config, SAMPLE)
    rs = np.random.RandomState(0)
    stats = _perturbed(stats, rs)  # non-trivial running statistics, so inference-mode BN is really checked
    params = {"backbone": params["backbone"], "head": _perturbed(params["head"], rs)}
    images = rs.randn(4, 16, 16, 3).astype(np.float32)
    backbone_features = np.asarray(simclr.encode(params, stats, images, config), np.float64)
    layer_1 = np.asarray(simclr.finetune_features(params, stats, images, config), np.float64)
    hidden = common.head_hidden_dim(config)
    assert hidden == simclr.feature_dim(config) == 16 and layer_1.shape == (4, hidden)
    bn, kernel = params["head"]["bn0"], np.asarray(params["head"]["dense0"]["kernel"], np.float64)
    pre = backbone_features @ kernel
    manual = (pre - stats["head"]["bn0"]["mean"]) / np.sqrt(stats["head"]["bn0"]["var"] + 1e-5)
    manual = np.maximum(manual * bn["scale"] + bn["bias"], 0.0)
    np.testing.assert_allclose(layer_1, manual, rtol=1e-4, atol=1e-5)
    assert (layer_1 == 0).any() and (layer_1 > 0).any()  # the ReLU is applied, and not everything died

    with config.unlocked():
        config.head.finetune_layer = 0
    np.testing.assert_array_equal(simclr.finetune_features(params, stats, images, config), backbone_features)
    with config.unlocked():
        config.head.finetune_layer = 3  # the 3-layer head has hidden layers 1 and 2 only
    with pytest.raises(ValueError, match="finetune_layer=3"):
        simclr.init(jax.random.PRNGKey(0), config, SAMPLE)


def test_v1_config_is_unchanged():
    config = _config(f"{V1}:smoke")
    assert "finetune_layer" not in config.head and simclr.finetune_layer(config) == 0
    _, head = simclr.networks(config)
    assert tuple(head.hidden_dims) == (config.head.hidden_dim,) == (32,) and not head.last_bn
    params, stats, _ = simclr.init(jax.random.PRNGKey(0), config, SAMPLE)
    assert _shapes(params["head"])["dense1"] == {"kernel": (32, 16), "bias": (16,)}
    images = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    np.testing.assert_array_equal(simclr.finetune_features(params, stats, images, config),
                                  simclr.encode(params, stats, images, config))


def test_presets():
    imagenet = _config(f"{V2}:imagenet")
    assert (imagenet.optim.name, imagenet.optim.lr, imagenet.optim.lr_scaling) == ("lars", 0.1, "sqrt")
    assert (imagenet.batch_size, imagenet.num_epochs, imagenet.optim.warmup_epochs) == (4096, 800, 40)
    assert imagenet.optim.weight_decay == 1e-4 and imagenet.model.name == "resnet50"
    cifar = _config(f"{V2}:cifar10")
    assert cifar.model.name == "resnet18" and cifar.loss.temperature == 0.5 and cifar.augment.blur_p == 0.0
    assert common.head_hidden_dim(cifar) == 512


def test_loss_scale_two_is_the_official_sum_of_both_directions():
    # objective.py: loss_a + loss_b, each the batch mean of cross-entropy over [logits_ab, logits_aa - LARGE_NUM].
    rs = np.random.RandomState(0)
    z1, z2 = rs.randn(8, 16).astype(np.float32), rs.randn(8, 16).astype(np.float32)
    t = 0.5
    h1, h2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1.astype(np.float64), z2.astype(np.float64)))

    def direction(a, b):
        logits = np.concatenate([a @ b.T, a @ a.T - 1e9 * np.eye(8)], axis=1) / t
        return np.mean(np.log(np.sum(np.exp(logits), axis=1)) - np.diag(logits))

    official = direction(h1, h2) + direction(h2, h1)

    def value(scale, z1, z2):
        config = _config(f"{V2}:smoke", f"loss.scale={scale}", "loss.temperature=0.5")
        emb = {"z1": z1, "z2": z2, "features": z1}
        return simclr.embedding_loss(None, emb, None, None, None, None, config=config, axis_name=None)[0]

    (v1, g1), (v2, g2) = (jax.value_and_grad(lambda a, b, s=s: value(s, a, b), argnums=(0, 1))(z1, z2)
                          for s in (1.0, 2.0))
    np.testing.assert_allclose(v2, official, rtol=1e-5)
    np.testing.assert_allclose(v1, official / 2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-6), g2, g1)
    assert _config(f"{V2}:cifar10").loss.scale == _config(f"{V2}:imagenet").loss.scale == 2.0


def test_eight_devices_equal_one_device(threefry):  # pylint: disable=unused-argument
    config = _config(f"{V2}:smoke", "batch_size=16", "optim.warmup_epochs=0")
    before, after1, after8, hist1, _ = one_and_all_devices(config, _source(),
                                                            ("loss", "grad_norm", "param_norm", "contrastive_acc"))
    assert hist1[1]["loss"] != hist1[0]["loss"]
    # Global BatchNorm, the output layer's included: the same running statistics on 1 and 8 devices.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 after8["batch_stats"], after1["batch_stats"])
    # The same two LARS steps: every leaf's update, the head's included, agrees to 1e-4 of its size.
    assert largest(delta(after1["params"], before["params"])["model"]["head"]) > 1e-3
    assert_updates_close(after8["params"], after1["params"], before["params"])


def test_smoke_run_through_the_cli(tmp_path):
    workdir = str(tmp_path / "run")
    records, rows = cli_smoke_rows(f"{V2}:smoke", workdir,
                                   ("loss", "grad_norm", "contrastive_acc", "embedding_std_ratio", "effective_rank"))
    assert rows[-1]["step"] == 16
    assert [r["step"] for r in records if "knn_top1" in r] == [8, 16]
