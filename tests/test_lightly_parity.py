"""The SimCLR, SimSiam and Barlow Twins `cifar10` presets train lightly's benchmark models: each sharded step
of ours (8 fake devices) against the same step written in PyTorch as lightly's cifar10_benchmark.py of
27.03.2023 computes it, from the same state and on the same views, in float32 (the presets compute in bf16,
lightly in float32).

Lightly's models are transcribed here rather than taken from ssl_jax.bench_torch, so that a wrong preset value
cannot hide on both sides: a CIFAR-stem ResNet-18 (3x3 stride-1 conv, no max-pool; lightly's nn.Sequential over
the ResNet's children has no stem ReLU: `model.stem_relu=false`, the presets keep it), each view through the
network on its own, the heads and losses of that date (LightlySimCLR, LightlySimSiam, LightlyBarlowTwins
below; the last with one documented difference in the loss), and
torch.optim.SGD(momentum=0.9, weight_decay=5e-4) on every parameter. Needs torch and torchvision (CI has
neither; skipped there).

What this can and cannot tell apart, in float32 at batch 16: the loss agrees to 1e-5, so the network, the
BatchNorm grouping, the heads and the loss are lightly's (statistics pooled over both views move it by more than
100 times that, checked below). Gradients agree only to about 1% in L2, leaf by leaf, because PyTorch in float32
is itself up to 0.6% from PyTorch in float64 here (ReLU kinks and cancellation in BatchNorm's backward at small
batches). That resolves SGD's momentum, SimSiam's stop-gradient and the weight decay of BatchNorm scales (11% to
93% of their first momentum buffers in L2 for SimCLR; dropping it, or adding Nesterov, fails here), not the
decay of convolution kernels (0.2% to 0.7% of theirs): tests/test_optim.py checks that part of the optimizer
against torch.optim.SGD directly. Two steps stay in the first epoch, at the schedule's peak, so SimSiam's
predictor would step alike with a fixed lr (the official ImageNet recipe's, not lightly's): test_config checks
the preset's choice.
"""
import jax
import numpy as np
import optax
import pytest

from ssl_jax import config as config_lib, export, parallel, train
import harness

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

BATCH = 16  # 2 images per fake device: per-view BatchNorm statistics must be synchronized to match
STEPS = 2   # the second step reads SGD's momentum buffer


def lightly_backbone(stem_relu):
    """Returns torchvision's ResNet-18 with lightly's CIFAR stem: 3x3 stride-1 conv, no max-pool, no fc."""
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    if not stem_relu:
        backbone.relu = nn.Identity()  # torchvision calls `relu` in the stem only
    return backbone


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


def lightly_negative_cosine(x0, x1):
    """lightly.loss.NegativeCosineSimilarity: minus the batch mean of the rows' cosine similarity."""
    return -torch.nn.functional.cosine_similarity(x0, x1, dim=1).mean()


class LightlyModel(nn.Module):
    """A benchmark model: forward(x) gives one view's outputs, pair_loss(out_0, out_1) the loss of two views."""

    def loss(self, x0, x1):
        """The training step's loss: each view through the network on its own (per-view BatchNorm)."""
        return self.pair_loss(self(x0), self(x1))

    def pooled_loss(self, x0, x1):
        """The loss with BatchNorm statistics over both views: one call on the concatenated views."""
        out = self(torch.cat([x0, x1]))
        split = (lambda t: (t[:BATCH], t[BATCH:]))
        if isinstance(out, tuple):
            halves = [split(t) for t in out]
            return self.pair_loss(tuple(h[0] for h in halves), tuple(h[1] for h in halves))
        return self.pair_loss(*split(out))


class LightlySimCLR(LightlyModel):
    """SimCLRModel of the benchmark: backbone, SimCLRProjectionHead(512, 512, 128) of that date (Linear with bias
    -> ReLU -> Linear), NTXentLoss() (temperature 0.5)."""

    def __init__(self, stem_relu=True):
        super().__init__()
        self.backbone = lightly_backbone(stem_relu)
        self.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))

    def forward(self, x):
        return self.head(self.backbone(x))

    def pair_loss(self, z0, z1):
        return lightly_nt_xent(z0, z1, 0.5)


class LightlySimSiam(LightlyModel):
    """SimSiamModel of the benchmark: backbone; the 2-layer CIFAR projection head ProjectionHead([(512, 2048,
    BatchNorm1d(2048), ReLU), (2048, 2048, BatchNorm1d(2048), None)]), whose Linear layers have no bias before a
    BatchNorm; SimSiamPredictionHead(2048, 512, 2048); z detached; 0.5 (D(z0, p1) + D(z1, p0))."""

    def __init__(self):
        super().__init__()
        self.backbone = lightly_backbone(True)
        self.projector = nn.Sequential(nn.Linear(512, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                                       nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048))
        self.predictor = nn.Sequential(nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                                       nn.Linear(512, 2048))

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z.detach(), self.predictor(z)

    def pair_loss(self, out0, out1):
        (z0, p0), (z1, p1) = out0, out1
        return 0.5 * (lightly_negative_cosine(z0, p1) + lightly_negative_cosine(z1, p0))


class LightlyBarlowTwins(LightlyModel):
    """BarlowTwinsModel of the benchmark: backbone; the 2-layer CIFAR projection head ProjectionHead([(512, 2048,
    BatchNorm1d(2048), ReLU), (2048, 2048, None, None)]); BarlowTwinsLoss() (lambda 5e-3) as lightly wrote it,
    except one documented difference: lightly standardises each dimension by z.std(0), the unbiased standard
    deviation, where ssl_jax.losses.barlow_twins (as the official code's BatchNorm) divides by the biased one
    with eps 1e-5 inside the square root. That scales c by (N - 1) / N: 0.998 at lightly's batch of 512, but
    15/16 at this test's 16, so this transcription takes the biased one."""

    def __init__(self):
        super().__init__()
        self.backbone = lightly_backbone(True)
        self.head = nn.Sequential(nn.Linear(512, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
                                  nn.Linear(2048, 2048))

    def forward(self, x):
        return self.head(self.backbone(x))

    def pair_loss(self, z_a, z_b):
        def standardize(z):
            return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        n, d = z_a.shape
        c = standardize(z_a).T @ standardize(z_b) / n
        c_diff = (c - torch.eye(d)).pow(2)
        c_diff[~torch.eye(d, dtype=torch.bool)] *= 5e-3
        return c_diff.sum()


# method, overrides, the torch model, its SGD learning rate at BATCH, parameters whose gradient is exactly 0.
CASES = {
    "simclr": ("simclr", [], LightlySimCLR,
               0.06 * BATCH / 128, ()),  # lightly: lr_factor = batch_size / 128, SGD lr 6e-2 x lr_factor
    "simclr_without_stem_relu": ("simclr", ["model.stem_relu=false"], lambda: LightlySimCLR(stem_relu=False),
                                 0.06 * BATCH / 128, ()),
    # lightly's SimSiam lr is 6e-2 whatever the batch ("no lr-scaling"), its batch 512; the preset scales 0.03 x
    # batch / 256 linearly, which is 6e-2 at 512 (test_config) and this at BATCH.
    # The projector's output BatchNorm bias shifts z by a constant over the batch; the predictor's first BatchNorm
    # takes it out again, and z's other path is detached: its gradient is 0 (1e-10 on either side), its weight 0.
    "simsiam": ("simsiam", [], LightlySimSiam, 0.03 * BATCH / 256, ("projector.4.bias",)),
    # Barlow Twins standardises each dimension of z over the batch, which takes out the last Linear's bias.
    "barlow_twins": ("barlow_twins", [], LightlyBarlowTwins, 0.06 * BATCH / 128, ("head.3.bias",)),
}


def mlp_layers(seq):
    """Yields (index in the Sequential, our layer name, module): Linear k -> dense{k}, its BatchNorm -> bn{k}."""
    k = -1
    for i, module in enumerate(seq):
        if isinstance(module, nn.Linear):
            k += 1
            yield i, f"dense{k}", module
        elif isinstance(module, nn.BatchNorm1d):
            yield i, f"bn{k}", module


def to_torch(net, params, batch_stats):
    """Returns {name in net.state_dict(): array} from our trees; `params` may be any tree of the params' shape
    (SGD's momentum). Every leaf of `params` must find its place."""
    backbone = export.torch_state_dict(params["backbone"], batch_stats["backbone"])
    out = {f"backbone.{k}": v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    used = len(jax.tree.leaves(params["backbone"]))
    for part, seq in net.named_children():
        if part == "backbone":
            continue
        for i, name, module in mlp_layers(seq):
            p, stats = params[part].get(name, {}), batch_stats[part].get(name, {})
            if isinstance(module, nn.Linear):
                out[f"{part}.{i}.weight"] = np.asarray(p["kernel"]).T
                if module.bias is not None:
                    out[f"{part}.{i}.bias"] = np.asarray(p["bias"])
                used += 1 + (module.bias is not None)
            else:
                if module.affine:
                    out[f"{part}.{i}.weight"], out[f"{part}.{i}.bias"] = np.asarray(p["scale"]), np.asarray(p["bias"])
                    used += 2
                out[f"{part}.{i}.running_mean"], out[f"{part}.{i}.running_var"] = stats["mean"], stats["var"]
    assert used == len(jax.tree.leaves(params)), "our params have leaves the torch model lacks"
    return out


def load(net, opt, state):
    """Sets the torch model's weights, running statistics and SGD's momentum buffers to our host train state."""
    params, batch_stats = state["params"]["model"], state["batch_stats"]
    values = to_torch(net, params, batch_stats)
    want = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(values) == sorted(want), set(values) ^ set(want)
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in values.items()}, strict=False)
    trace = optax.tree_utils.tree_get(state["opt_state"], "trace")["model"]
    momentum = to_torch(net, trace, batch_stats) if int(state["step"]) else {}
    for name, param in net.named_parameters():
        if name in momentum:
            opt.state[param]["momentum_buffer"] = torch.from_numpy(np.array(momentum[name], np.float32))


def assert_leaves_agree(got, want, before, what, zero=(), rtol=0.02):
    """Asserts got[k] - before[k] is within `rtol` of want[k] - before[k] in L2 for every name k (before None:
    got[k] against want[k]).

    rtol 2%: per leaf, our momentum buffers and updates were at most 0.83% from PyTorch's in float32, where
    PyTorch's float32 was up to 0.56% from its float64 (medians 0.15% to 0.6% against 0.15% to 0.34%; jax 0.10.2,
    torch 2.14.1, 2-core CPU, 2026-11-23).
    The names in `zero` have a gradient of exactly 0 in exact arithmetic: what either side computes for it is
    rounding noise of a sum that cancels, so they must agree to 1e-6 of the largest element of any leaf instead
    (1.8e-8 seen, Barlow Twins' last bias against its largest momentum element, 450 to 510).
    """
    assert sorted(got) == sorted(want)
    deltas = {}
    for k in got:
        u, v = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
        deltas[k] = (u - before[k], v - before[k]) if before is not None else (u, v)
    scale = max(float(np.abs(v).max()) for _, v in deltas.values())
    for k, (u, v) in deltas.items():
        if k in zero:
            err = float(np.abs(u - v).max())
            assert err <= 1e-6 * scale, f"{what}, {k}: {err:.3g} from PyTorch's, the largest element {scale:.3g}"
            continue
        l2 = float(np.linalg.norm(u - v) / np.linalg.norm(v))
        assert l2 <= rtol, f"{what}, {k}: {l2:.2%} from PyTorch's in L2"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cifar10_preset_step_is_lightlys_step(case):
    method, overrides, model, lr, zero = CASES[case]
    config = config_lib.load_config(f"configs/{method}.py:cifar10", [
        "model.dtype=float32", f"batch_size={BATCH}", *overrides])
    source = harness.random_source(n=4 * BATCH, size=32)
    setup = train.build(config, source)  # all 8 fake devices
    assert setup.mesh.devices.size == 8
    state = train.initial_state(setup)
    net = model().train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    names = [k for k, _ in net.named_parameters()]
    stat_names = [k for k in net.state_dict() if k.endswith(("running_mean", "running_var"))]
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

        x0, x1 = (torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for v in (v1, v2))
        if step == 0:  # statistics pooled over both views: the same network called once on both views
            with torch.no_grad():
                pooled = net.pooled_loss(x0, x1).item()
            load(net, opt, before)  # undoes that call's update of the running statistics
        opt.zero_grad()
        loss = net.loss(x0, x1)
        loss.backward()
        opt.step()
        # The same loss and learning rate (cosine stepped per epoch: the first epoch runs at the peak).
        np.testing.assert_allclose(metrics["loss"], loss.item(), rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-6)
        if step == 0:  # per-view statistics are another function: the loss tells at 100 times that tolerance
            assert not np.isclose(pooled, loss.item(), rtol=1e-3, atol=1e-4), (pooled, loss.item())
        # SGD's momentum buffers (gradient + 5e-4 x weight, plus 0.9 x the last buffer from the second step
        # on) and the updates, -lr x the buffer, in torch's names.
        params = dict(net.named_parameters())
        trace = optax.tree_utils.tree_get(after["opt_state"], "trace")["model"]
        ours = to_torch(net, trace, after["batch_stats"])
        assert_leaves_agree({k: ours[k] for k in names},
                            {k: opt.state[params[k]]["momentum_buffer"].numpy() for k in names}, None,
                            f"step {step}, momentum", zero)
        ours, start = to_torch(net, after["params"]["model"], after["batch_stats"]), to_torch(
            net, before["params"]["model"], before["batch_stats"])
        assert_leaves_agree({k: ours[k] for k in names}, {k: params[k].detach().numpy() for k in names},
                            {k: start[k] for k in names}, f"step {step}, update", zero)
        # Running statistics after each view's update, in order. Torch keeps unbiased running variances, flax
        # biased ones: they differ by at most a factor n / (n - 1), n a view's values per channel, >= 16 x 4 x 4
        # in the ResNet and 16 in the heads' BatchNorm1d.
        torch_stats = net.state_dict()
        for k in stat_names:
            n = BATCH * 16 if k.startswith("backbone.") else BATCH
            tol = dict(rtol=1e-4, atol=1e-6) if k.endswith("mean") else dict(rtol=1.0 / (n - 1) + 1e-4)
            np.testing.assert_allclose(ours[k], torch_stats[k].numpy(), err_msg=f"step {step}, {k}", **tol)
    assert harness.largest(harness.delta(after["params"]["model"], first["params"]["model"])) > 1e-4

