"""The SimCLR `cifar10` preset trains lightly's SimCLR benchmark model: each sharded step of ours (8 fake
devices) against the same step written in PyTorch as lightly's cifar10_benchmark.py of 27.03.2023 computes it,
from the same state and on the same views, in float32 (the preset computes in bf16, lightly in float32).

Lightly's step is transcribed here rather than taken from ssl_jax.bench_torch, so that a wrong preset value
cannot hide on both sides: a CIFAR-stem ResNet-18 (3x3 stride-1 conv, no max-pool; lightly's nn.Sequential over
the ResNet's children has no stem ReLU: `model.stem_relu=false`, the preset keeps it), SimCLRProjectionHead(512,
512, 128) of that date (Linear with bias -> ReLU -> Linear), the network called once per view, NTXentLoss at
temperature 0.5 as lightly writes it, and torch.optim.SGD(lr=0.06 x batch / 128, momentum=0.9,
weight_decay=5e-4) on every parameter. Needs torch and torchvision (CI has neither; skipped there).

What this can and cannot tell apart, in float32 at batch 16: the loss agrees to 1e-5, so the network, the
BatchNorm grouping, the head and the temperature are lightly's (per-view statistics pooled instead move it by
far more, checked below). Gradients agree only to about 1% in L2, leaf by leaf, because PyTorch in float32 is
itself up to 0.6% from PyTorch in float64 here (ReLU kinks and cancellation in BatchNorm's backward at small
batches). That resolves SGD's momentum and the weight decay of BatchNorm scales (11% to 93% of their first
momentum buffers in L2; dropping it, or adding Nesterov, fails here), not the decay of convolution kernels (0.2%
to 0.7% of theirs): tests/test_optim.py checks that part of the optimizer against torch.optim.SGD directly.
"""
import jax
import numpy as np
import optax
import pytest

from ssl_jax import config as config_lib, export, parallel, train
import harness

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

BATCH = 16  # 2 images per fake device: per-view BatchNorm statistics must be synchronized to match
STEPS = 2   # the second step reads SGD's momentum buffer


def lightly_network(stem_relu):
    """Returns backbone -> head: torchvision's ResNet-18 with lightly's CIFAR stem, lightly's 2023 SimCLR head."""
    nn = torch.nn
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    if not stem_relu:
        backbone.relu = nn.Identity()  # torchvision calls `relu` in the stem only
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    return nn.Sequential(backbone, head)


def lightly_nt_xent(out0, out1, temperature):
    """lightly.loss.NTXentLoss on one process without a memory bank, as written in lightly 1.3 (2023)."""
    f = torch.nn.functional
    out0, out1 = f.normalize(out0, dim=1), f.normalize(out1, dim=1)
    b = out0.shape[0]
    logits_00, logits_01 = out0 @ out0.T / temperature, out0 @ out1.T / temperature
    logits_10, logits_11 = out1 @ out0.T / temperature, out1 @ out1.T / temperature
    off_diagonal = ~torch.eye(b, dtype=torch.bool)
    logits_00, logits_11 = logits_00[off_diagonal].view(b, -1), logits_11[off_diagonal].view(b, -1)
    logits = torch.cat([torch.cat([logits_01, logits_00], 1), torch.cat([logits_10, logits_11], 1)], 0)
    return f.cross_entropy(logits, torch.arange(b).repeat(2))


def torch_named(tree, batch_stats):
    """Returns {torch parameter name: array} of a tree shaped like our model params (params, momentum)."""
    backbone = export.torch_state_dict(tree["backbone"], batch_stats["backbone"])
    out = {f"0.{k}": v for k, v in backbone.items() if k.endswith(("weight", "bias"))}
    for index, name in ((0, "dense0"), (2, "dense1")):
        out[f"1.{index}.weight"] = np.asarray(tree["head"][name]["kernel"]).T
        out[f"1.{index}.bias"] = np.asarray(tree["head"][name]["bias"])
    return out


def load(net, opt, state):
    """Sets the torch network and SGD's momentum buffers to our host train state."""
    params, batch_stats = state["params"]["model"], state["batch_stats"]
    assert set(params["head"]) == {"dense0", "dense1"} and not batch_stats["head"]
    buffers = export.torch_state_dict(params["backbone"], batch_stats["backbone"])
    net[0].load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in buffers.items()}, strict=True)
    values = torch_named(params, batch_stats)
    trace = optax.tree_utils.tree_get(state["opt_state"], "trace")["model"]
    momentum = torch_named(trace, batch_stats) if int(state["step"]) else {}
    for name, param in net.named_parameters():
        param.data = torch.from_numpy(np.array(values.pop(name), np.float32).copy())
        if name in momentum:
            opt.state[param]["momentum_buffer"] = torch.from_numpy(np.array(momentum[name], np.float32).copy())
    assert not values, sorted(values)


def read_back_statistics(net):
    """Returns the torch backbone's running statistics as our batch_stats tree."""
    _, stats = export.from_torch_state_dict({k: v.detach().numpy() for k, v in net[0].state_dict().items()})
    return {"backbone": stats, "head": {}}


def assert_leaves_agree(got, want, before, what, rtol=0.02):
    """Asserts each leaf of got - before is within `rtol` of want - before in L2 (before None: got, want).

    rtol 2%: per leaf, our momentum buffers and updates were at most 0.83% from PyTorch's in float32, where
    PyTorch's float32 was up to 0.56% from its float64 (medians 0.15% to 0.6% against 0.15% to 0.34%; jax 0.10.2,
    torch 2.14.1, 2-core CPU, 2026-11-23).
    """
    def check(path, g, w, b=None):
        u, v = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if b is not None:
            u, v = u - b, v - b
        l2 = float(np.linalg.norm(u - v) / np.linalg.norm(v))
        assert l2 <= rtol, f"{what}, {jax.tree_util.keystr(path)}: {l2:.2%} from PyTorch's in L2"
    if before is None:
        jax.tree_util.tree_map_with_path(check, got, want)
    else:
        jax.tree_util.tree_map_with_path(check, got, want, before)


@pytest.mark.parametrize("stem_relu", [True, False], ids=["preset_stem_relu", "lightly_stem_without_relu"])
def test_cifar10_preset_step_is_lightlys_simclr_step(stem_relu):
    config = config_lib.load_config("configs/simclr.py:cifar10", [
        "model.dtype=float32", f"batch_size={BATCH}", f"model.stem_relu={stem_relu}"])
    source = harness.random_source(n=4 * BATCH, size=32)
    setup = train.build(config, source)  # all 8 fake devices
    assert setup.mesh.devices.size == 8
    state = train.initial_state(setup)

    net = lightly_network(stem_relu).train()
    lr = 0.06 * BATCH / 128  # lightly: lr_factor = batch_size / 128, SGD lr 6e-2 * lr_factor
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    rs = np.random.RandomState(0)
    labels = np.arange(BATCH, dtype=np.int32) % source.num_classes
    first = jax.device_get(state)
    for step in range(STEPS):
        # Each step starts torch from our state (weights, running statistics, SGD's momentum buffers), so a
        # difference cannot carry over from the step before. Normalized views: standard normal, the second
        # shifted and scaled so that the two views' batch statistics differ (pooled ones give another step).
        before = jax.device_get(state)
        load(net, opt, before)
        v1 = rs.randn(BATCH, 32, 32, 3).astype(np.float32)
        v2 = (1.5 * rs.randn(BATCH, 32, 32, 3) + 0.3).astype(np.float32)
        state, metrics = setup.views_step_fn(state, parallel.put_batch((v1, v2), setup.mesh),
                                             parallel.put_batch(labels, setup.mesh))
        after, metrics = jax.device_get((state, metrics))

        if step == 0:  # statistics pooled over both views give another loss, by far more than 1e-5
            with torch.no_grad():
                pooled = net(torch.from_numpy(np.concatenate([v1, v2]).transpose(0, 3, 1, 2).copy()))
            pooled_loss = lightly_nt_xent(pooled[:BATCH], pooled[BATCH:], 0.5).item()
            load(net, opt, before)  # undoes that call's update of the running statistics
        opt.zero_grad()
        z0, z1 = (net(torch.from_numpy(v.transpose(0, 3, 1, 2).copy())) for v in (v1, v2))
        loss = lightly_nt_xent(z0, z1, 0.5)
        loss.backward()
        opt.step()
        # The same loss and learning rate (cosine stepped per epoch: the first epoch runs at the peak).
        np.testing.assert_allclose(metrics["loss"], loss.item(), rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-6)
        if step == 0:
            assert abs(pooled_loss - loss.item()) > 1e-3
        # SGD's momentum buffers (gradient + 5e-4 x weight, plus 0.9 x the last buffer from the second step
        # on) and the updates, -lr x the buffer, in torch's names.
        params = dict(net.named_parameters())
        trace = optax.tree_utils.tree_get(after["opt_state"], "trace")["model"]
        assert_leaves_agree(torch_named(trace, after["batch_stats"]),
                            {k: opt.state[p]["momentum_buffer"].numpy() for k, p in params.items()}, None,
                            f"step {step}, momentum")
        assert_leaves_agree(torch_named(after["params"]["model"], after["batch_stats"]),
                            {k: p.detach().numpy() for k, p in params.items()},
                            torch_named(before["params"]["model"], before["batch_stats"]), f"step {step}, update")
        want_stats = read_back_statistics(net)
        # Running means after each view's update, in order (torch keeps unbiased running variances, flax
        # biased ones: they differ by a factor n / (n - 1), n the rows x pixels of a view, >= 16 x 4 x 4).
        for path, want in jax.tree_util.tree_leaves_with_path(want_stats):
            got = after["batch_stats"]
            for key in path:
                got = got[key.key]
            tol = dict(rtol=1e-4, atol=1e-6) if path[-1].key == "mean" else dict(rtol=1.0 / (BATCH * 16 - 1) + 1e-4)
            np.testing.assert_allclose(got, want, err_msg=jax.tree_util.keystr(path), **tol)
    assert harness.largest(harness.delta(after["params"]["model"], first["params"]["model"])) > 1e-4
