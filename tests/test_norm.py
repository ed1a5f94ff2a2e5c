"""GroupedBatchNorm: one pass over concatenated views equals one nn.BatchNorm pass per view."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P

from ssl_jax.models import MLPHead, get_backbone
from ssl_jax.models.norm import GroupedBatchNorm

RNG = jax.random.key(0, impl="rbg")


def normal(shape, seed=0, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + shift).astype(np.float32)


def per_view_passes(model, variables, views, **kwargs):
    """Runs `model` once per view in training mode, statistics chained as sequential torch passes do; returns
    (outputs concatenated, final batch_stats)."""
    outs, stats = [], variables["batch_stats"]
    for x in views:
        out, new = model.apply({"params": variables["params"], "batch_stats": stats}, x, mutable=["batch_stats"],
                               **kwargs)
        outs.append(out)
        stats = new["batch_stats"]
    return jnp.concatenate(outs), stats


def one_pass(model, variables, views, **kwargs):
    out, new = model.apply(variables, jnp.concatenate(views), mutable=["batch_stats"], **kwargs)
    return out, new["batch_stats"]


def assert_trees_close(got, want, rtol, atol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_group_is_flax_batchnorm(dtype, fast):
    x = normal((6, 5, 5, 4), scale=3.0, shift=1.5)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, use_running_average=False, use_fast_variance=fast)
    ours = GroupedBatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, use_running_average=False, use_fast_variance=fast)
    variables = flax_bn.init(RNG, x)
    assert jax.tree.structure(ours.init(RNG, x)) == jax.tree.structure(variables)
    variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 4), "bias": jnp.linspace(-1.0, 1.0, 4)},
                 "batch_stats": variables["batch_stats"]}
    want, want_stats = one_pass(flax_bn, variables, [x])
    got, got_stats = one_pass(ours, variables, [x])
    assert got.dtype == want.dtype == dtype
    assert_trees_close((got, got_stats), (want, want_stats), rtol=1e-6, atol=1e-6)
    # Inference mode reads the running averages.
    inference = {"params": variables["params"], "batch_stats": got_stats}
    np.testing.assert_allclose(ours.clone(use_running_average=True).apply(inference, x),
                               flax_bn.clone(use_running_average=True).apply(inference, x), rtol=1e-6, atol=1e-6)


def test_groups_equal_one_batchnorm_pass_per_view_outputs_statistics_and_gradients():
    # Three views with different statistics; the gradient of a loss that mixes the views goes through the
    # group statistics, so it checks the backward of the grouping too.
    views = [normal((4, 3, 3, 5), seed=s, scale=1.0 + s, shift=s - 1.0) for s in range(3)]
    flax_bn = nn.BatchNorm(momentum=0.9, use_running_average=False, use_fast_variance=False)
    ours = GroupedBatchNorm(groups=3, momentum=0.9, use_running_average=False)
    variables = flax_bn.init(RNG, views[0])
    variables = {"params": {"scale": jnp.linspace(0.5, 2.0, 5), "bias": jnp.linspace(-1.0, 1.0, 5)},
                 "batch_stats": {"mean": jnp.full(5, 0.3), "var": jnp.full(5, 2.0)}}
    want, want_stats = per_view_passes(flax_bn, variables, views)
    got, got_stats = one_pass(ours, variables, views)
    assert_trees_close((got, got_stats), (want, want_stats), rtol=1e-5, atol=1e-6)
    # Each view is normalised on its own: zero mean per view and channel before scale and bias ...
    per_view_mean = (np.asarray(got).reshape(3, -1, 5) - np.linspace(-1.0, 1.0, 5)).mean(axis=1)
    np.testing.assert_allclose(per_view_mean, 0.0, atol=1e-5)
    # ... which one set of statistics over all rows would not give.
    whole, _ = one_pass(flax_bn, variables, views)
    assert not np.allclose(whole, want, atol=1e-2)

    weights = normal((12, 3, 3, 5), seed=7)

    def loss(params, inputs, run):
        out, _ = run({"params": params, "batch_stats": variables["batch_stats"]}, inputs)
        return jnp.sum(jnp.tanh(out) * weights)

    grads_want = jax.grad(loss, argnums=(0, 1))(variables["params"], views,
                                                 lambda v, xs: per_view_passes(flax_bn, v, xs))
    grads_got = jax.grad(loss, argnums=(0, 1))(variables["params"], views, lambda v, xs: one_pass(ours, v, xs))
    assert_trees_close(grads_got, grads_want, rtol=1e-4, atol=1e-5)


def test_statistics_of_a_channel_whose_mean_dwarfs_its_spread_are_those_of_float64():
    # One-pass E[x^2] - E[x]^2 (flax's default) cancels in float32 when |mean| >> std: at mean 300 and std 0.1
    # the variance it gives is off by tens of %. The models' BatchNorms (grouped, and flax's for one group, in
    # the backbone and the heads) compute E[(x - E[x])^2], as PyTorch does: within 1e-4 of float64, also
    # synchronized over 8 devices, where each device's rows are centred on the global mean.
    x = normal((64, 4, 4, 3), seed=11, scale=0.1, shift=300.0)
    x64 = x.astype(np.float64).reshape(2, -1, 3)
    want_mean, want_var = x64.mean(axis=1), x64.var(axis=1)
    stats = lambda model, inputs: one_pass(model, model.init(RNG, inputs), [inputs])[1]  # noqa: E731
    for model in (GroupedBatchNorm(groups=2, momentum=0.0, use_running_average=False),  # momentum 0: the batch's
                  nn.BatchNorm(momentum=0.0, use_running_average=False, use_fast_variance=False)):
        got = stats(model, x)
        if isinstance(model, nn.BatchNorm):  # one group: the statistics of all rows
            np.testing.assert_allclose(got["var"], x64.reshape(-1, 3).var(axis=0), rtol=1e-4)
            continue
        np.testing.assert_allclose(got["mean"], want_mean[1], rtol=1e-6)  # momentum 0: the last group's
        np.testing.assert_allclose(got["var"], want_var[1], rtol=1e-4)
    one_pass_var = stats(GroupedBatchNorm(momentum=0.0, use_running_average=False, use_fast_variance=True), x)["var"]
    assert np.max(np.abs(one_pass_var / x64.reshape(-1, 3).var(axis=0) - 1)) > 0.05  # what it guards against
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    synced = GroupedBatchNorm(momentum=0.0, use_running_average=False, axis_name="data")
    variables = synced.clone(axis_name=None).init(RNG, x)
    run = jax.jit(jax.shard_map(lambda v, xs: synced.apply(v, xs, mutable=["batch_stats"])[1]["batch_stats"],
                                mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    np.testing.assert_allclose(run(variables, x)["var"], x64.reshape(-1, 3).var(axis=0), rtol=1e-4)


def test_batch_that_does_not_split_into_the_groups_is_an_error():
    bn = GroupedBatchNorm(groups=2, use_running_average=False)
    x = jnp.ones((5, 3))
    with pytest.raises(ValueError, match="5 rows does not split into 2"):
        bn.init(RNG, x)


def test_resnet_and_head_with_bn_groups_equal_one_pass_per_view():
    # The whole backbone (bf16 compute, as the presets train) and a BN head: one pass over both views
    # with bn_groups=2 against two passes, outputs, every BatchNorm statistic and the parameter gradients.
    views = [normal((3, 8, 8, 3), seed=1), normal((3, 8, 8, 3), seed=2, scale=2.0, shift=0.5)]
    per_view, _ = get_backbone("tiny", cifar_stem=True, dtype=jnp.bfloat16, zero_init_residual=False)
    grouped, _ = get_backbone("tiny", cifar_stem=True, dtype=jnp.bfloat16, zero_init_residual=False, bn_groups=2)
    variables = per_view.init(RNG, views[0], train=False)
    assert jax.tree.structure(grouped.init(RNG, views[0], train=False)) == jax.tree.structure(variables)

    def loss(params, run):
        out, stats = run({"params": params, "batch_stats": variables["batch_stats"]})
        return jnp.sum(jnp.sin(out)), (out, stats)

    (v0, (o0, s0)), g0 = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], lambda v: per_view_passes(per_view, v, views, train=True))
    (v1, (o1, s1)), g1 = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], lambda v: one_pass(grouped, v, views, train=True))
    np.testing.assert_allclose(v1, v0, rtol=1e-3)
    assert_trees_close((o1, s1), (o0, s0), rtol=1e-3, atol=1e-3)
    for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # bf16 forward: compare with the scale
        np.testing.assert_allclose(got, want, atol=1e-2 * float(np.max(np.abs(want))) + 1e-6)

    # Rematerialized blocks (the ResNet-50 presets) recompute the same grouped statistics.
    remat = grouped.clone(remat=True)
    (v2, (o2, s2)), g2 = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], lambda v: one_pass(remat, v, views, train=True))
    assert_trees_close((v2, o2, s2, g2), (v1, o1, s1, g1), rtol=1e-5, atol=1e-5)

    head_per_view = MLPHead(hidden_dims=(6,), out_dim=4, last_bn=True, last_bn_scale=True)
    head_grouped = head_per_view.clone(bn_groups=2)
    feats = [normal((5, 7), seed=3), normal((5, 7), seed=4, shift=1.0)]
    head_vars = head_per_view.init(RNG, feats[0], train=False)
    want, want_stats = per_view_passes(head_per_view, head_vars, feats, train=True)
    got, got_stats = one_pass(head_grouped, head_vars, feats, train=True)
    assert_trees_close((got, got_stats), (want, want_stats), rtol=1e-5, atol=1e-6)


def test_synchronized_groups_over_eight_devices_equal_one_device():
    # Each device holds its rows of view 1 then its rows of view 2 (how a method concatenates its local
    # views); averaged over the mesh axis, the statistics are those of each whole view.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert mesh.size == 8
    view_1, view_2 = normal((16, 4, 4, 3), seed=5), normal((16, 4, 4, 3), seed=6, scale=3.0, shift=-1.0)
    bn = GroupedBatchNorm(groups=2, momentum=0.9, use_running_average=False)
    synced = bn.clone(axis_name="data")
    variables = bn.init(RNG, jnp.concatenate([view_1, view_2]))

    def local(v, x1, x2):
        out, new = synced.apply(v, jnp.concatenate([x1, x2]), mutable=["batch_stats"])
        return out[:x1.shape[0]], out[x1.shape[0]:], new["batch_stats"]

    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=(P("data"), P("data"), P())))
    got_1, got_2, got_stats = run(variables, view_1, view_2)
    want, want_stats = one_pass(bn, variables, [view_1, view_2])
    assert_trees_close((jnp.concatenate([got_1, got_2]), got_stats), (want, want_stats), rtol=1e-5, atol=1e-5)


def test_synchronized_grouped_model_initializes_outside_shard_map_as_nn_batchnorm_does():
    # Init outside the mesh, apply inside it: nn.BatchNorm skips its collective while initializing, and so must
    # its grouped drop-in (it raised "unbound axis name").
    x = normal((4, 8, 8, 3), seed=10)
    for groups in (1, 2):
        synced, _ = get_backbone("tiny", bn_axis_name="data", bn_groups=groups)
        local, _ = get_backbone("tiny", bn_groups=groups)
        got, want = synced.init(RNG, x, train=True), local.init(RNG, x, train=True)
        assert_trees_close(got, want, rtol=0, atol=0)
    head = MLPHead(hidden_dims=(6,), out_dim=4, bn_axis_name="data", bn_groups=2)
    assert jax.tree.leaves(head.init(RNG, normal((4, 5), seed=11), train=True))


def test_grouped_resnet18_equals_torchvision_called_once_per_view():
    # What bn_per_view is for: PyTorch code that calls its network once per view. torchvision's ResNet-18
    # with our weights (ssl_jax.export), in training mode, called on each view, against our one grouped pass.
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from ssl_jax import export  # pylint: disable=import-outside-toplevel
    views = [normal((4, 32, 32, 3), seed=8), normal((4, 32, 32, 3), seed=9, scale=1.5, shift=0.3)]
    model, _ = get_backbone("resnet18", cifar_stem=True, zero_init_residual=False, bn_groups=2)
    variables = model.init(RNG, views[0], train=False)
    got, got_stats = one_pass(model, variables, views, train=True)

    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    state = export.torch_state_dict(jax.device_get(variables["params"]), jax.device_get(variables["batch_stats"]))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    net.train()
    with torch.no_grad():
        want = torch.cat([net(torch.from_numpy(v.transpose(0, 3, 1, 2).copy())) for v in views]).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    # Running means follow torch's two updates (its running variances are unbiased, ours biased as flax's).
    torch_means = {k: v.numpy() for k, v in net.state_dict().items() if k.endswith("running_mean")}
    ours = export.torch_state_dict(jax.device_get(variables["params"]), jax.device_get(got_stats))
    for name, mean in torch_means.items():
        np.testing.assert_allclose(ours[name], mean, rtol=1e-3, atol=1e-4)
    # Statistics over both views together are another function, which these views tell apart.
    joint, _ = get_backbone("resnet18", cifar_stem=True, zero_init_residual=False)
    assert not np.allclose(one_pass(joint, variables, views, train=True)[0], want, atol=1e-2)


def test_simclr_bn_per_view_keeps_one_pass_over_both_views():
    # Per-view statistics without a second network call: the SimCLR loss traces as many convolutions with
    # simclr.bn_per_view as without it (one pass over 2B images), where a call per view would trace twice as
    # many, each on B images.
    from ssl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from ssl_jax.methods import simclr  # pylint: disable=import-outside-toplevel
    views = (jnp.zeros((4, 16, 16, 3)), jnp.ones((4, 16, 16, 3)))
    progress = {"step": jnp.int32(0), "steps_per_epoch": 1, "total_steps": 1}

    def conv_batches(per_view):
        config = config_lib.load_config("configs/simclr.py:smoke", [f"simclr.bn_per_view={per_view}"])
        params, stats, extras = simclr.init(RNG, config, np.zeros((1, 16, 16, 3), np.uint8))
        jaxpr = jax.make_jaxpr(lambda p: simclr.loss(p, stats, extras, views, RNG, progress, config=config,
                                                     axis_name=None)[0])(params)
        return _conv_batches(jaxpr.jaxpr)

    joint, per_view = conv_batches(False), conv_batches(True)
    assert joint and per_view == joint and set(joint) == {8}


def _conv_batches(jaxpr):
    """The batch sizes of the convolutions in `jaxpr` and the jaxprs nested in it."""
    out = [e.invars[0].aval.shape[0] for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    return out + [b for e in jaxpr.eqns for sub in jax_core.jaxprs_in_params(e.params) for b in _conv_batches(sub)]
