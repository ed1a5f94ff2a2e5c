"""Tests for ssl_jax.models: parameter counts, shapes, bf16, synchronized BatchNorm, zero-init, heads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_jax import config as config_lib, flops, train
from ssl_jax.methods import common
from ssl_jax.models import LinearClassifier, MLPHead, get_backbone
from ssl_jax.models.resnet import CONV_INITS, BasicBlock, BottleneckBlock, conv_kernel_init

# Threefry kernels take seconds to compile on a small CPU; "rbg" keys keep parameter init fast.
RNG = jax.random.key(0, impl="rbg")


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torchvision_param_count(stage_sizes, block, width=64, cifar_stem=False, in_channels=3):
    """Trainable parameters of torchvision's ResNet without fc, counted layer by layer."""
    expansion = 1 if block == "basic" else 4
    k = 3 if cifar_stem else 7
    n = k * k * in_channels * width + 2 * width  # conv1 + bn1 (weight, bias)
    c_in = width
    for i, num_blocks in enumerate(stage_sizes):
        w = width * 2 ** i
        for j in range(num_blocks):
            stride = 2 if i > 0 and j == 0 else 1
            if block == "basic":
                n += 9 * c_in * w + 2 * w + 9 * w * w + 2 * w
            else:
                n += c_in * w + 2 * w + 9 * w * w + 2 * w + w * 4 * w + 2 * 4 * w
            if stride != 1 or c_in != w * expansion:
                n += c_in * w * expansion + 2 * w * expansion
            c_in = w * expansion
    return n


def init(module, rng, *args, **kwargs):
    """Jitted module.init (eager Flax is slow on a 2-core CPU)."""
    return jax.jit(lambda r, *a: module.init(r, *a, **kwargs))(rng, *args)


def apply(module, variables, *args, **kwargs):
    """Jitted module.apply."""
    return jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)


def param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model, image_size, batch=2):
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(RNG, x, train=False), x)


def test_torchvision_param_counts():
    # torchvision's published totals minus fc (512*1000+1000 and 2048*1000+1000).
    assert torchvision_param_count((2, 2, 2, 2), "basic") == 11_689_512 - 513_000 == 11_176_512
    assert torchvision_param_count((3, 4, 6, 3), "bottleneck") == 25_557_032 - 2_049_000 == 23_508_032


@pytest.mark.parametrize("name,stages,block,dim", [
    ("resnet18", (2, 2, 2, 2), "basic", 512),
    ("resnet34", (3, 4, 6, 3), "basic", 512),
    ("resnet50", (3, 4, 6, 3), "bottleneck", 2048),
    ("resnet101", (3, 4, 23, 3), "bottleneck", 2048),
    ("resnet200", (3, 24, 36, 3), "bottleneck", 2048),  # not in torchvision: its layout, SimCLR's and BYOL's depth
])
def test_param_count_matches_torchvision(name, stages, block, dim):
    model, feature_dim = get_backbone(name)
    variables = abstract_init(model, 224)
    assert feature_dim == dim
    assert param_count(variables["params"]) == torchvision_param_count(stages, block)
    # Running mean and variance for every BN channel: half the BN params (scale, bias).
    bn_params = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(variables["params"])
                    if "bn" in jax.tree_util.keystr(path))
    assert param_count(variables["batch_stats"]) == bn_params


def test_resnet200_2x_has_byols_parameter_count():
    # BYOL (Grill et al. 2020) Table 1: ResNet-200 (2x), 250M parameters; 62.6M at width 1 (64.7M with fc).
    wide, _ = get_backbone("resnet200", width_multiplier=2)
    assert round(param_count(abstract_init(wide, 64)["params"]) / 1e6) == 250
    assert torchvision_param_count((3, 24, 36, 3), "bottleneck") == 62_624_832


def test_torchvision_names():
    variables = abstract_init(get_backbone("resnet50")[0], 64)
    p = variables["params"]
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
    names = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
    assert set(p["layer1_0"]) == names
    assert "downsample_conv" not in p["layer1_1"]
    assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)  # v1.5: stride in the 3x3 conv
    assert p["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert all("bias" not in v for k, v in p["layer3_5"].items() if k.startswith("conv"))


def _torch_out_size(n, kernel, stride, pad):
    return (n + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("name,cifar_stem,size", [
    ("resnet18", True, 32), ("resnet18", False, 224), ("resnet18", False, 225), ("resnet50", False, 97),
])
def test_output_and_final_map_shapes(name, cifar_stem, size):
    model, dim = get_backbone(name, cifar_stem=cifar_stem)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    variables = abstract_init(model, size)
    feats, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables, x)
    assert feats.shape == (3, dim) and feats.dtype == jnp.float32
    # Spatial size by torchvision's formulas (explicit symmetric padding everywhere).
    n = size if cifar_stem else _torch_out_size(_torch_out_size(size, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        n = _torch_out_size(n, 3, 2, 1)
    last = sorted(k for k in state["intermediates"] if k.startswith("layer4"))[-1]
    assert state["intermediates"][last]["__call__"][0].shape == (3, n, n, dim)


def test_width_multiplier_doubles_widths():
    base, base_dim = get_backbone("resnet50")
    wide, wide_dim = get_backbone("resnet50", width_multiplier=2)
    pb, pw = abstract_init(base, 64)["params"], abstract_init(wide, 64)["params"]
    assert wide_dim == 2 * base_dim == 4096
    assert pw["conv1"]["kernel"].shape == (7, 7, 3, 128)
    assert pw["layer1_0"]["conv1"]["kernel"].shape == (1, 1, 128, 128)
    assert pw["layer3_0"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    for (path, b), w in zip(jax.tree_util.tree_leaves_with_path(pb), jax.tree.leaves(pw)):
        # Every width doubles except the 3 RGB input channels of the stem.
        expected = tuple(2 * d if d > 3 else d for d in b.shape)
        if jax.tree_util.keystr(path).startswith("['conv1']"):
            expected = b.shape[:3] + (2 * b.shape[3],)
        assert w.shape == expected, path
    assert param_count(pw) == torchvision_param_count((3, 4, 6, 3), "bottleneck", width=128)


def test_bf16_compute_keeps_params_and_stats_float32():
    model, _ = get_backbone("tiny", cifar_stem=True, dtype=jnp.bfloat16)
    x = normal((4, 16, 16, 3))
    variables = init(model, RNG, x, train=False)
    feats, state = apply(model, variables, x, train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda m, _: isinstance(m, (nn.Conv, nn.BatchNorm)))
    convs_and_bns = jax.tree.leaves(state["intermediates"])
    assert len(convs_and_bns) == 12  # 6 convs (one a shortcut), 6 BNs
    assert all(a.dtype == jnp.bfloat16 for a in convs_and_bns)
    assert feats.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables["params"]))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state["batch_stats"]))
    # bf16 tracks the float32 model closely.
    tiny32 = get_backbone("tiny", cifar_stem=True)[0]
    feats32, _ = apply(tiny32, variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(feats, feats32, rtol=0.1, atol=0.05)


def test_sync_batchnorm_under_shard_map_matches_full_batch():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert mesh.size == 8
    x = normal((16, 16, 16, 3)) * 2.0 + 0.5
    full, _ = get_backbone("tiny")
    synced, _ = get_backbone("tiny", bn_axis_name="data")
    variables = init(full, jax.random.key(1, impl="rbg"), x, train=False)

    def run(model):
        fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))

    def run_features_only(model):
        fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")))

    want, want_state = jax.jit(lambda v, x: full.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    got, got_state = run(synced)(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # The statistics did move, and unsynchronized BN (2 images per device) gives something else.
    assert not np.allclose(want_state["batch_stats"]["bn1"]["mean"], 0.0)
    local = run_features_only(full)(variables, x)
    assert not np.allclose(local, want, atol=1e-3)


def test_eval_uses_running_stats():
    # With momentum 0 the running stats become the last batch's statistics, so eval on that batch
    # must reproduce the train-mode output.
    model, _ = get_backbone("tiny", cifar_stem=True)
    model = model.clone(bn_momentum=0.0)
    x = normal((6, 16, 16, 3)) + 1.0
    variables = init(model, RNG, x, train=False)
    train_out, state = apply(model, variables, x, train=True, mutable=["batch_stats"])
    updated = {"params": variables["params"], **state}
    eval_out = apply(model, updated, x, train=False)
    np.testing.assert_allclose(eval_out, train_out, rtol=1e-4, atol=1e-5)
    # In eval mode each example is processed on its own.
    np.testing.assert_allclose(apply(model, updated, x[:1], train=False), eval_out[:1], rtol=1e-5, atol=1e-6)
    # Fresh running stats (mean 0, var 1) give a different answer than the batch statistics.
    assert not np.allclose(apply(model, variables, x, train=False), train_out, atol=1e-3)


def test_zero_init_residual_can_be_switched_off_from_the_config():
    x = jnp.zeros((1, 8, 8, 3))
    for zero, want in ((True, 0.0), (False, 1.0)):
        config = config_lib.load_config("configs/simclr.py:smoke", [f"model.zero_init_residual={zero}"])
        params = init(common.backbone(config), RNG, x, train=False)["params"]
        np.testing.assert_array_equal(params["layer1_0"]["bn2"]["scale"], want)
        np.testing.assert_array_equal(params["layer1_0"]["bn1"]["scale"], 1.0)


def test_stem_relu_false_drops_exactly_the_relu_after_the_stem():
    # Same parameters both ways. Stem BatchNorm bias +10 (scale 1e-3): its output is positive, the ReLU does
    # nothing, and the two nets agree; as initialised, half the stem's outputs are negative, and they differ.
    images = np.random.RandomState(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with_relu, _ = get_backbone("tiny", cifar_stem=True, zero_init_residual=False)
    without, _ = get_backbone("tiny", cifar_stem=True, zero_init_residual=False, stem_relu=False)
    variables = with_relu.init(jax.random.PRNGKey(0), images, train=False)
    positive = dict(variables["params"], bn1={"scale": jnp.full((8,), 1e-3), "bias": jnp.full((8,), 10.0)})
    outputs = [[np.asarray(m.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=False))
                for m in (with_relu, without)] for params in (positive, variables["params"])]
    np.testing.assert_allclose(*outputs[0], rtol=1e-6)
    assert np.abs(outputs[1][0] - outputs[1][1]).max() > 1e-2 * np.abs(outputs[1][0]).max() > 0
    assert config_lib.load_config("configs/simclr.py:cifar10").model.stem_relu is True


def test_conv_init_follows_torchvision_or_pytorchs_conv2d_default():
    x = jnp.zeros((1, 32, 32, 3))
    for conv_init in ("torchvision", "pytorch"):
        config = config_lib.load_config("configs/simclr.py:cifar10", [f"model.conv_init={conv_init}"])
        params = init(common.backbone(config), RNG, x, train=False)["params"]
        kernels = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(w)
                   for path, w in jax.tree_util.tree_leaves_with_path(params) if w.ndim == 4}
        assert len(kernels) == 20  # stem, 16 block convs, 3 downsample convs
        for name, w_HxWxIxO in kernels.items():
            h, w, fan_in, fan_out = w_HxWxIxO.shape
            fan_in, fan_out = h * w * fan_in, h * w * fan_out
            if conv_init == "torchvision":  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
                want_std = np.sqrt(2.0 / fan_out)
            else:  # nn.Conv2d.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                want_std = np.sqrt(1.0 / (3.0 * fan_in))
                assert np.abs(w_HxWxIxO).max() <= (1.0 + 1e-6) / np.sqrt(fan_in), name
            tol = 4.0 / np.sqrt(w_HxWxIxO.size)  # a few standard errors of a sample std (relative)
            assert abs(w_HxWxIxO.std() / want_std - 1.0) < max(tol, 0.02), (name, w_HxWxIxO.std(), want_std)
    with pytest.raises(ValueError, match="conv_init"):
        config = config_lib.load_config("configs/simclr.py:smoke", ["model.conv_init=xavier"])
        init(common.backbone(config), RNG, jnp.zeros((1, 8, 8, 3)), train=False)


def test_tf_conv_init_is_variance_scaling_truncated_at_two_standard_deviations():
    # SimCLR v2's tf2 code: tf.keras.initializers.VarianceScaling() = fan-in, truncated normal, variance 1 / fan_in.
    config = config_lib.load_config("configs/simclr_v2.py:cifar10")
    assert config.model.conv_init == "tf"
    params = init(common.backbone(config), RNG, jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    kernels = [np.asarray(w) for w in jax.tree.leaves(params) if w.ndim == 4]
    assert len(kernels) == 21  # stem, 16 block convs, 4 projection shortcuts (stage 1's too)
    for w_HxWxIxO in kernels:
        h, w, c_in, _ = w_HxWxIxO.shape
        std = np.sqrt(1.0 / (h * w * c_in))
        # the underlying normal's std is std / 0.8796; it is cut at twice that
        assert np.abs(w_HxWxIxO).max() <= 2.0 * std / 0.87962566103423978 * (1 + 1e-6)
        tol = 4.0 / np.sqrt(w_HxWxIxO.size)
        assert abs(w_HxWxIxO.std() / std - 1.0) < max(tol, 0.02), (w_HxWxIxO.shape, w_HxWxIxO.std(), std)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_project_first_block_adds_stage_ones_projection_to_basic_block_resnets_only(name):
    # The official SimCLR tf2 ResNet: every stage's first block has a 1x1 conv + BN shortcut, even where shapes
    # match (ResNet-18/34's stage 1); a bottleneck's first block projects anyway.
    plain, with_projection = (abstract_init(get_backbone(name, project_first_block=p)[0], 32) for p in (False, True))
    added = param_count(with_projection["params"]) - param_count(plain["params"])
    if name == "resnet50":
        assert added == 0
    else:
        assert added == 64 * 64 + 2 * 64
        assert set(with_projection["params"]["layer1_0"]) - set(plain["params"]["layer1_0"]) == {
            "downsample_conv", "downsample_bn"}
        assert with_projection["params"]["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 64)
        assert "downsample_conv" not in with_projection["params"]["layer1_1"]
    # Its BatchNorm scale starts at 1 (zero_init_residual zeroes the residual branch's last one only), so with the
    # residual branch at zero the block's output is ReLU(BN(1x1 conv(x))), not x.
    model = get_backbone("tiny", cifar_stem=True, project_first_block=True)[0]
    variables = init(model, RNG, jnp.zeros((2, 8, 8, 3)), train=False)
    assert np.all(np.asarray(variables["params"]["layer1_0"]["downsample_bn"]["scale"]) == 1.0)
    assert np.all(np.asarray(variables["params"]["layer1_0"]["bn2"]["scale"]) == 0.0)


def test_zero_init_residual_blocks_start_as_shortcut():
    eps = 1e-5
    x = np.maximum(normal((2, 8, 8, 16)), 0.0)  # block inputs follow a ReLU
    # Identity shortcut: the block is the identity on non-negative inputs.
    for block, last_bn in ((BasicBlock(filters=16), "bn2"), (BottleneckBlock(filters=4), "bn3")):
        v = init(block, RNG, x, train=False)
        np.testing.assert_array_equal(v["params"][last_bn]["scale"], 0.0)
        fwd = jax.jit(lambda v, x: block.apply(v, x, train=False))
        np.testing.assert_allclose(fwd(v, x), x, atol=1e-6)
        v["params"][last_bn]["scale"] = jnp.ones_like(v["params"][last_bn]["scale"])  # what it would be without
        assert not np.allclose(fwd(v, x), x, atol=1e-3)
    # Projection shortcut: relu(BN(1x1 stride-2 conv(x))) with fresh BN (mean 0, var 1, scale 1, bias 0).
    block = BasicBlock(filters=32, strides=2)
    v = init(block, RNG, x, train=False)
    k = np.asarray(v["params"]["downsample_conv"]["kernel"][0, 0])
    want = np.maximum(np.asarray(x)[:, ::2, ::2, :] @ k / np.sqrt(1.0 + eps), 0.0)
    np.testing.assert_allclose(apply(block, v, x, train=False), want, rtol=1e-5, atol=1e-5)
    # Whole network: every block's last BN scale starts at zero, other scales at one.
    params = init(get_backbone("tiny")[0], RNG, x[..., :3], train=False)["params"]
    for name in ("layer1_0", "layer2_0"):
        np.testing.assert_array_equal(params[name]["bn2"]["scale"], 0.0)
        np.testing.assert_array_equal(params[name]["bn1"]["scale"], 1.0)


def test_conv_init_is_kaiming_fan_out():
    k = np.asarray(conv_kernel_init(RNG, (3, 3, 256, 512)))
    np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (9 * 512)), rtol=0.01)
    assert np.abs(k).max() > 4.0 * k.std()  # untruncated normal, as torch.nn.init.kaiming_normal_
    model = get_backbone("tiny", width_multiplier=4)[0]
    params = init(model, RNG, jnp.ones((1, 16, 16, 3)), train=False)["params"]
    k = np.asarray(params["layer2_0"]["conv2"]["kernel"])  # 3x3x64x64
    np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.05)


def test_mlp_head_init_is_torch_linear_default():
    """Weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch.nn.Linear; init_scheme="flax": Flax's."""
    head = MLPHead(hidden_dims=(1024,), out_dim=512, use_bn=True)  # dense0 300->1024 (no bias), dense1 with bias
    params = init(head, RNG, jnp.ones((2, 300)), train=False)["params"]
    for name, fan_in in (("dense0", 300), ("dense1", 1024)):
        w = np.asarray(params[name]["kernel"])
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound  # uniform up to the bound
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.01)
    b = np.asarray(params["dense1"]["bias"])
    assert "bias" not in params["dense0"] and np.abs(b).max() <= 1.0 / np.sqrt(1024) and b.std() > 0.015
    flax_params = init(head.clone(init_scheme="flax"), RNG, jnp.ones((2, 300)), train=False)["params"]
    np.testing.assert_allclose(np.asarray(flax_params["dense0"]["kernel"]).std(), 1.0 / np.sqrt(300), rtol=0.02)
    assert not np.asarray(flax_params["dense1"]["bias"]).any()


def test_haiku_init_is_haikus_unrescaled_truncated_normal():
    """haiku's hk.Conv2D / hk.Linear default (BYOL's official network): TruncatedNormal(stddev=1/sqrt(fan_in)),
    i.e. s * truncnorm(-2, 2) with s = 1/sqrt(fan_in), whose std is 0.8796 s (scipy.stats.truncnorm(-2, 2).std())."""
    k = np.asarray(CONV_INITS["haiku"](RNG, (3, 3, 128, 256)))
    s = 1.0 / np.sqrt(9 * 128)
    assert np.abs(k).max() <= 2.0 * s * (1 + 1e-6) and np.abs(k).max() > 1.99 * s  # cut at 2 s
    np.testing.assert_allclose(k.std(), 0.87962566103423978 * s, rtol=0.01)
    head = MLPHead(hidden_dims=(1024,), out_dim=512, use_bn=False, init_scheme="haiku")
    params = init(head, RNG, jnp.ones((2, 300)), train=False)["params"]
    for name, fan_in in (("dense0", 300), ("dense1", 1024)):
        w, s = np.asarray(params[name]["kernel"]), 1.0 / np.sqrt(fan_in)
        assert np.abs(w).max() <= 2.0 * s * (1 + 1e-6)
        np.testing.assert_allclose(w.std(), 0.87962566103423978 * s, rtol=0.01)
        assert not np.asarray(params[name]["bias"]).any()  # hk.Linear's b_init: zeros
    with pytest.raises(ValueError, match="init_scheme 'jax'"):
        init(head.clone(init_scheme="jax"), RNG, jnp.ones((2, 300)), train=False)


def test_mlp_head_kernel_init_std_draws_normal_kernels_and_zero_biases():
    # SimCLR v2's tf2 LinearLayer: Dense kernels from RandomNormal(stddev=0.01); configs/simclr_v2.py's head.init_std.
    head = MLPHead(hidden_dims=(1024,), out_dim=512, use_bn=False, kernel_init_std=0.01)
    params = init(head, RNG, jnp.ones((2, 300)), train=False)["params"]
    for name in ("dense0", "dense1"):
        w = np.asarray(params[name]["kernel"])
        np.testing.assert_allclose(w.std(), 0.01, rtol=0.01)
        assert np.abs(w).max() > 0.04  # untruncated: 4.5 standard deviations occur among 3e5 draws
        assert not np.asarray(params[name]["bias"]).any()
    assert config_lib.load_config("configs/simclr_v2.py:cifar10").head.init_std == 0.01
    with pytest.raises(ValueError, match="kernel_init_std"):
        init(head.clone(kernel_init_std=-1.0), RNG, jnp.ones((2, 300)), train=False)


def _np_bn(x, eps=1e-5):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def test_mlp_head_matches_numpy():
    x = normal((10, 12))
    head = MLPHead(hidden_dims=(16, 8), out_dim=4)
    v = init(head, RNG, x, train=False)
    (out, hidden), state = apply(head, v, x, train=True, return_hidden=True, mutable=["batch_stats"])
    p = jax.tree.map(np.asarray, v["params"])
    assert set(p) == {"dense0", "bn0", "dense1", "bn1", "dense2"}
    assert "bias" not in p["dense0"] and "bias" in p["dense2"]  # BN makes the hidden bias redundant
    h1 = np.maximum(_np_bn(x @ p["dense0"]["kernel"]), 0)  # fresh BN: scale 1, bias 0
    h2 = np.maximum(_np_bn(h1 @ p["dense1"]["kernel"]), 0)
    want = h2 @ p["dense2"]["kernel"] + p["dense2"]["bias"]
    assert out.shape == (10, 4) and out.dtype == jnp.float32
    assert [h.shape for h in hidden] == [(10, 16), (10, 8)]
    np.testing.assert_allclose(hidden[0], h1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["batch_stats"]["bn0"]["mean"], 0.1 * (x @ p["dense0"]["kernel"]).mean(0),
                               rtol=1e-4, atol=1e-6)
    assert apply(head, v, x, train=False).shape == (10, 4)


def test_mlp_head_last_bn_and_no_bn():
    x = normal((32, 12)) * 3.0 + 1.0
    head = MLPHead(hidden_dims=(16,), out_dim=6, last_bn=True)
    v = init(head, RNG, x, train=False)
    assert "bn1" not in v["params"] and v["batch_stats"]["bn1"]["mean"].shape == (6,)
    assert set(v["params"]["dense1"]) == {"kernel"}
    out, _ = apply(head, v, x, train=True, mutable=["batch_stats"])
    # Output BN has no affine part: each feature is standardized over the batch.
    np.testing.assert_allclose(np.mean(out, 0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.var(out, 0), 1.0, rtol=1e-3)

    plain = MLPHead(hidden_dims=(16,), out_dim=6, use_bn=False)
    vp = init(plain, RNG, x, train=False)
    assert "batch_stats" not in vp and set(vp["params"]) == {"dense0", "dense1"}
    p = jax.tree.map(np.asarray, vp["params"])
    h = np.maximum(x @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0)
    want = h @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    np.testing.assert_allclose(apply(plain, vp, x, train=True), want, rtol=1e-4, atol=1e-4)

    # Affine output BN (last_bn_scale and last_bn_bias): standardised, then scale * x + bias per feature.
    affine = MLPHead(hidden_dims=(16,), out_dim=6, last_bn=True, last_bn_scale=True, last_bn_bias=True)
    va = init(affine, RNG, x, train=False)
    assert set(va["params"]["bn1"]) == {"scale", "bias"} and set(va["params"]["dense1"]) == {"kernel"}
    va["params"]["bn1"] = {"scale": jnp.full((6,), 2.0), "bias": jnp.arange(6.0)}
    out_a, _ = apply(affine, va, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.mean(out_a, 0), np.arange(6.0), atol=1e-4)
    np.testing.assert_allclose(np.var(out_a, 0), 4.0, rtol=1e-3)

    bf16 = MLPHead(hidden_dims=(16,), out_dim=6, last_bn=True, dtype=jnp.bfloat16)
    out16, st16 = apply(bf16, v, x, train=True, mutable=["batch_stats"])
    assert out16.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(st16))


def test_linear_classifier():
    x = jnp.asarray(normal((5, 7)), jnp.bfloat16)
    clf = LinearClassifier(num_classes=3)
    v = init(clf, RNG, x)
    logits = apply(clf, v, x)
    p = v["params"]["fc"]
    assert logits.dtype == jnp.float32 and logits.shape == (5, 3)
    want = np.asarray(x, np.float32) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="resnet7"):
        get_backbone("resnet7")


def _loss_and_grads(model, variables, x):
    """Returns (((loss, (out, batch_stats)), grads), jaxpr) of a scalar loss of `model`'s training forward."""
    def loss(params):
        out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out)), (out, state)
    fn = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(fn)(variables["params"]), jax.make_jaxpr(fn)(variables["params"])


def test_remat_gives_the_same_outputs_statistics_and_gradients():
    # nn.remat only changes what the backward pass stores, so everything must match the plain network;
    # the rematerialized backward really is different code (the block's forward runs twice in it).
    plain, _ = get_backbone("tiny", cifar_stem=True)
    remat, _ = get_backbone("tiny", cifar_stem=True, remat=True)
    x = normal((4, 16, 16, 3))
    variables = init(plain, RNG, x, train=False)
    assert jax.tree.structure(init(remat, RNG, x, train=False)) == jax.tree.structure(variables)

    ((v0, (o0, s0)), g0), jaxpr_plain = _loss_and_grads(plain, variables, x)
    ((v1, (o1, s1)), g1), jaxpr_remat = _loss_and_grads(remat, variables, x)
    assert "remat" in str(jaxpr_remat) and "remat" not in str(jaxpr_plain)
    np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for got, want in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s0, g0))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0)) > 1e-3  # gradients are not all zero


def test_remat_policy_convs_keeps_the_convolutions_and_recomputes_only_the_rest():
    # "convs" keeps every convolution's output: same numbers as the plain network, and its backward does no
    # convolution beyond the plain one's, while "block" recomputes each block's forward convolutions.
    x = normal((4, 16, 16, 3))
    plain, _ = get_backbone("tiny", cifar_stem=True)
    variables = init(plain, RNG, x, train=False)
    want, jaxpr_plain = _loss_and_grads(plain, variables, x)
    got, jaxpr_convs = _loss_and_grads(get_backbone("tiny", cifar_stem=True, remat=True, remat_policy="convs")[0],
                                       variables, x)
    _, jaxpr_block = _loss_and_grads(get_backbone("tiny", cifar_stem=True, remat=True, remat_policy="block")[0],
                                     variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    plain_flops, convs_flops, block_flops = map(flops.matmul_flops, (jaxpr_plain, jaxpr_convs, jaxpr_block))
    assert convs_flops == plain_flops < block_flops
    with pytest.raises(ValueError, match="remat_policy 'dots'"):
        bad, _ = get_backbone("tiny", cifar_stem=True, remat=True, remat_policy="dots")
        init(bad, RNG, x, train=False)


def test_remat_policy_comes_from_the_config():
    config = config_lib.load_config("configs/simclr.py:imagenet", ["model.remat=true", "model.remat_policy=convs"])
    module = common.backbone(config)
    assert (module.remat, module.remat_policy) == (True, "convs")


# ----------------------------------------------------------------------------------------------
# Selective kernels (SimCLR v2's SK ResNets, model.sk_ratio).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,width,sk0_m,sk1_m", [
    ("resnet50", 1, 24, 35), ("resnet50", 2, 94, 140), ("resnet101", 1, 43, 65), ("resnet152", 1, 58, 89),
    ("resnet152", 3, None, 795)])
def test_sk_resnet_param_counts_match_the_simclr_v2_paper(name, width, sk0_m, sk1_m):
    """SimCLR v2 (Chen et al. 2020b) Table 1's parameter counts in millions, SK0 / SK1 (sk_ratio 0.0625)."""
    for sk_ratio, want in ((0.0, sk0_m), (0.0625, sk1_m)):
        if want is not None:
            model, _ = get_backbone(name, width_multiplier=width, sk_ratio=sk_ratio)
            assert round(param_count(abstract_init(model, 64)["params"]) / 1e6) == want, (name, width, sk_ratio)


def _np_conv(x_BxHxWxC, k_HxWxIxO, stride, pad):
    """float64 NumPy convolution, NHWC x HWIO, symmetric zero padding `pad`."""
    x = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = k_HxWxIxO.shape[:2]
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k_HxWxIxO.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch @ k_HxWxIxO[i, j]
    return out


def _np_bn_train(x, p, eps=1e-5):
    """BatchNorm in training mode over every axis but the last (biased variance), float64."""
    axes = tuple(range(x.ndim - 1))
    return (x - x.mean(axes)) / np.sqrt(x.var(axes) + eps) * p["scale"] + p["bias"]


def _np_resnet_d_pool(x, stride):
    """The official tf2 ResNet-D shortcut pool, written out window by window."""
    b, h, w, c = x.shape
    if stride == 2:  # FixedPadding(2): one zero row/column at the end, then VALID 2x2 windows (zeros counted)
        x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return np.stack([np.stack([x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for j in range(-(-w // 2))], 1)
                         for i in range(-(-h // 2))], 1)
    # SAME 2x2 windows at stride 1: a window past the edge averages only what it holds
    return np.stack([np.stack([x[:, i:i + 2, j:j + 2].mean((1, 2)) for j in range(w)], 1) for i in range(h)], 1)


@pytest.mark.parametrize("strides,size", [(1, 4), (2, 5)])
def test_selective_kernel_bottleneck_matches_numpy(strides, size):
    """The whole SK bottleneck in training mode against a float64 NumPy version of the official tf2 block."""
    f, ratio = 4, 0.5
    block = BottleneckBlock(filters=f, strides=strides, sk_ratio=ratio, sk_min_dim=3, zero_init_residual=False)
    x = normal((3, size, size, 6), seed=1)
    v = init(block, RNG, x, train=False)
    rs = np.random.default_rng(2)  # random parameters everywhere, so that no term can hide behind an init
    params = jax.tree.map(lambda a: (rs.standard_normal(a.shape) * 0.5 + (a.ndim == 1)).astype(np.float32),
                          v["params"])
    assert params["sk_reduce"]["kernel"].shape == (1, 1, f, 3)  # max(int(4 * 0.5), 3) mixing channels
    assert params["conv2"]["kernel"].shape == (3, 3, f, 2 * f)
    assert params["sk_expand"]["kernel"].shape == (1, 1, 3, 2 * f)
    out, _ = apply(block, {"params": params, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64, relu = x.astype(np.float64), lambda a: np.maximum(a, 0.0)
    y = relu(_np_bn_train(_np_conv(x64, p["conv1"]["kernel"], 1, 0), p["bn1"]))
    t = relu(_np_bn_train(_np_conv(y, p["conv2"]["kernel"], strides, 1), p["bn2"]))
    s1, s2 = t[..., :f], t[..., f:]
    g = relu(_np_bn_train((s1 + s2).mean((1, 2)) @ p["sk_reduce"]["kernel"][0, 0], p["sk_bn"]))
    a = g @ p["sk_expand"]["kernel"][0, 0]
    w1 = 1.0 / (1.0 + np.exp(a[:, f:] - a[:, :f]))  # softmax over the two streams, weight of the first
    u = w1[:, None, None, :] * s1 + (1.0 - w1[:, None, None, :]) * s2
    main = _np_bn_train(_np_conv(u, p["conv3"]["kernel"], 1, 0), p["bn3"])
    short = _np_bn_train(_np_conv(_np_resnet_d_pool(x64, strides), p["downsample_conv"]["kernel"], 1, 0),
                         p["downsample_bn"])
    want = relu(main + short)
    assert out.shape == want.shape == (3, -(-size // strides), -(-size // strides), 4 * f)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)


def test_sk_resnet_has_a_resnet_d_stem_and_comes_from_the_config():
    config = config_lib.load_config("configs/simclr_v2.py:smoke", [
        "model.name=resnet50", "model.cifar_stem=false", "model.sk_ratio=0.0625"])
    model = common.backbone(config)
    assert model.sk_ratio == 0.0625 and common.feature_dim(config) == 2048
    params = abstract_init(model, 64)["params"]
    assert [params[n]["kernel"].shape for n in ("conv1", "conv1b", "conv1c")] == [
        (3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64)]
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert params["layer4_2"]["sk_reduce"]["kernel"].shape == (1, 1, 512, 32)  # max(512 * 0.0625, 32)


@pytest.mark.parametrize("name,sk_ratio", [("resnet18", 0.0625), ("resnet50", -0.5)])
def test_sk_needs_a_bottleneck_resnet_and_a_positive_ratio(name, sk_ratio):
    model, _ = get_backbone(name, sk_ratio=sk_ratio)
    with pytest.raises(ValueError, match="sk_ratio"):
        abstract_init(model, 32)


@pytest.mark.parametrize("method", ["simclr_v2", "moco_v2", "swav", "barlow_twins"])
def test_head_hidden_dim_zero_is_the_backbone_width(method):
    """head.hidden_dim = 0 (SimCLR v2's head) means as wide as the backbone for every method with a `head`."""
    config = config_lib.load_config(f"configs/{method}.py:smoke", ["model.name=resnet18", "head.hidden_dim=0"])
    params, _, _ = train.get_method(config).init(RNG, config, jnp.zeros((2, 16, 16, 3)))
    assert common.feature_dim(config) == 512
    assert params["head"]["dense0"]["kernel"].shape == (512, 512)
