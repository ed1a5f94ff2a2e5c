"""The SimCLR, SimSiam, Barlow Twins, BYOL, SwAV and MoCo v2 `cifar10` presets train lightly's benchmark models:
each sharded step of ours (8 fake devices) against the same step written in PyTorch as lightly's
cifar10_benchmark.py of 27.03.2023 computes it, from the same state and on the same views, in float32 (the presets
compute in bf16, lightly in float32). The MoCo v1 preset trains the model of MoCo's own CIFAR-10 demo (the
colab; ColabMoCo), and the SimCLR v2 preset the official tf2 code's CIFAR-10 model, step and LARS (TF2SimCLRv2,
transcribed from TensorFlow into PyTorch; three steps, as its warm-up starts at lr 0), checked the same way.

Lightly's models are transcribed here rather than taken from ssl_jax.bench_torch, so that a wrong preset value
cannot hide on both sides: a CIFAR-stem ResNet-18 (3x3 stride-1 conv, no max-pool; lightly's nn.Sequential over
the ResNet's children has no stem ReLU: `model.stem_relu=false`, the presets keep it), each view through the
network on its own, the heads and losses of that date (the Lightly* classes below; Barlow Twins with one
documented difference in the loss, SwAV with lightly's two crops where the preset adds six small ones, MoCo v2
with one documented difference in the order its memory bank is read), and torch.optim.SGD(momentum=0.9,
weight_decay=5e-4) on every trained parameter (SwAV: torch.optim.Adam with weight_decay=1e-6). Needs torch and
torchvision (CI has neither; skipped there).

What this can and cannot tell apart, in float32 at batch 16: the loss agrees to 1e-5, so the network, the
BatchNorm grouping, the heads and the loss are lightly's (statistics pooled over both views move it by more than
100 times that, checked below). Gradients agree only to about 1% in L2, leaf by leaf, because PyTorch in float32
is itself up to 0.6% from PyTorch in float64 here (ReLU kinks and cancellation in BatchNorm's backward at small
batches). That resolves SGD's momentum, SimSiam's stop-gradient and the weight decay of BatchNorm scales (11% to
93% of their first momentum buffers in L2 for SimCLR; dropping it, or adding Nesterov, fails here; BYOL's decay
of 5e-4 in place of the preset's 2e-3 too), not the decay of convolution kernels (0.2% to 0.7% of theirs):
tests/test_optim.py checks that part of the optimizer against torch's SGD and Adam algorithms directly. Adam's
decay of 1e-6 is below float32 here (AdamW's decoupled decay passes too); its betas and eps are not (b2 0.99
for 0.999, or eps 1e-5 for 1e-8, fail). BYOL's target and MoCo's key encoder: torch's momentum copy, updated at
the start of each step, against the one our step used, to float32 rounding; a decay of 0.996 for 0.99 fails
(MoCo: 0.999). MoCo's memory bank after each step is our queue, key by key (4.5e-7 apart), and its pointer;
torch grouping our key permutation's rows otherwise fails, as does any of these in the preset: one BatchNorm
group for the queries, no shuffled BatchNorm for the keys, temperature 0.2, weight decay 1e-4 (2026-11-24; the
buffers and updates were at most 0.70% apart). Two steps stay
in the first epoch, at the schedule's peak, so SimSiam's predictor would step alike with a fixed lr (the
official ImageNet recipe's, not lightly's): test_config checks the preset's choice.
"""
import copy

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


def lightly_backbone(stem_relu):
    """Returns torchvision's ResNet-18 with lightly's CIFAR stem: 3x3 stride-1 conv, no max-pool, no fc."""
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    if not stem_relu:
        backbone.relu = nn.Identity()  # torchvision calls `relu` in the stem only
    return backbone


def mlp(d_in, hidden, d_out):
    """Returns lightly's two-block ProjectionHead [(d_in, hidden, BatchNorm1d, ReLU), (hidden, d_out, None, None)]:
    its Linear has no bias before a BatchNorm."""
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


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


@torch.no_grad()
def update_momentum(net):
    """lightly.models.utils.update_momentum(model, model_ema, 0.99) for each network `net.target` has a copy of
    (the colab's _momentum_update_key_encoder is the same): target <- 0.99 target + 0.01 online, parameters
    only."""
    for name, copy_ in net.target.items():
        for online, target in zip(getattr(net, name).parameters(), copy_.parameters()):
            target.mul_(0.99).add_(0.01 * online)


class LightlyModel(nn.Module):
    """A benchmark model: forward(x) gives one view's outputs, pair_loss(out_0, out_1) the loss of two views.

    SCALE: our loss's gradient over lightly's (BYOL's loss is 4 times lightly's): our learning rate is lightly's
    / SCALE and our optimizer's buffers SCALE times lightly's, so the updates are the same."""
    SCALE = 1.0
    STEPS = 2  # the second step reads the optimizer's buffers
    ORDER = np.arange(BATCH)  # the order in which the torch model gets our batch's rows
    BACKBONE_BN_GROUPS = 1  # BatchNorm groups per call in the backbone

    def optimizer(self, lr):
        """Returns the benchmark's optimizer over the trained parameters."""
        return torch.optim.SGD(self.trained(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def trained(self):
        return [p for p in self.parameters() if p.requires_grad]

    def step_start(self):
        """What lightly's training_step does before its forward passes (EMA, prototype normalisation)."""

    def step_end(self):
        """What our step does after the update and lightly's next step before anything else (SwAV's prototypes
        renormalised), so that the updates compare."""

    def loss(self, x0, x1):
        """The training step's loss: each view through the network on its own (per-view BatchNorm)."""
        self.step_start()
        return self.pair_loss(self(x0), self(x1))

    def our_loss(self, loss):
        """Returns our loss from lightly's loss value."""
        return loss

    def pooled_loss(self, x0, x1):
        """The loss with BatchNorm statistics over both views: one call on the concatenated views."""
        self.step_start()
        out = self(torch.cat([x0, x1]))
        split = (lambda t: (t[:BATCH], t[BATCH:]))
        if isinstance(out, tuple):
            halves = [split(t) for t in out]
            return self.pair_loss(tuple(h[0] for h in halves), tuple(h[1] for h in halves))
        return self.pair_loss(*split(out))

    def other_functions(self):
        """Returns {what: loss function of (x0, x1)} for steps that differ from lightly's in one respect: each
        must give another loss than ours, so that the loss's agreement resolves that respect."""
        return {"statistics pooled over both views": self.pooled_loss}

    def target_state(self, state):
        """Returns (params, batch_stats) of our momentum network in the host train state (BYOL's target)."""
        return state["extras"]["target"], state["batch_stats"]["target"]

    def load_extras(self, state):
        """Sets the torch model's state outside the networks and the optimizer from our host train state."""

    def check_extras(self, state, what):
        """Asserts that our state outside the networks after a step is torch's."""


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



class LightlyBYOL(LightlyModel):
    """BYOLModel of the benchmark: backbone, BYOLProjectionHead(512, 1024, 256), BYOLPredictionHead(256, 1024,
    256) (Linear -> BatchNorm1d -> ReLU -> Linear, no bias before the BatchNorm); a momentum copy of backbone and
    projection head (`target`, not trained), updated with m = 0.99 at the start of every training step, before the
    forward passes; 0.5 (D(p0, z1) + D(p1, z0)) with D = NegativeCosineSimilarity and z from the momentum copy.
    Our loss, the official one, is (2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1')) = 4 + 4 x lightly's: the preset's
    lr is lightly's / 4 and its weight decay lightly's x 4, so torch's SGD buffers are ours / 4, the updates the
    same. Lightly's order (EMA, then forward) is ours (forward, update, EMA of the updated online weights): the
    target a step sees includes the online weights of that step in both."""
    SCALE = 4.0

    def __init__(self):
        super().__init__()
        self.backbone = lightly_backbone(True)
        self.projector = mlp(512, 1024, 256)
        self.predictor = mlp(256, 1024, 256)
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                     "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)

    def step_start(self):
        update_momentum(self)

    def forward(self, x):
        p = self.predictor(self.projector(self.backbone(x)))
        return p, self.target["projector"](self.target["backbone"](x)).detach()

    def pair_loss(self, out0, out1):
        (p0, z0), (p1, z1) = out0, out1
        return 0.5 * (lightly_negative_cosine(p0, z1) + lightly_negative_cosine(p1, z0))

    def our_loss(self, loss):
        return 4.0 + 4.0 * loss


class LightlySwAV(LightlyModel):
    """SwaVModel of the benchmark with its two 32 x 32 crops (`swav.num_small_crops=0`; the preset adds six
    small ones): backbone, SwaVProjectionHead(512, 512, 128) (Linear -> BatchNorm1d -> ReLU -> Linear), L2
    normalisation, SwaVPrototypes(128, 512) (a bias-free Linear, as lightly's single-head prototypes and the
    official code have it), normalised to unit rows at the start of every training step; each crop through the
    network on its own; SwaVLoss() (temperature 0.1, 3 Sinkhorn iterations, epsilon 0.05); torch.optim.Adam(lr
    1e-3 x batch / 128, weight_decay=1e-6) on every parameter."""

    def __init__(self):
        super().__init__()
        self.backbone = lightly_backbone(True)
        self.head = mlp(512, 512, 128)
        self.prototypes = nn.Linear(128, 512, bias=False)

    def optimizer(self, lr):
        return torch.optim.Adam(self.trained(), lr=lr, weight_decay=1e-6)

    @torch.no_grad()
    def step_start(self):
        w = self.prototypes.weight
        w.div_(torch.linalg.norm(w, dim=1, keepdim=True))

    def step_end(self):
        self.step_start()

    def forward(self, x):
        return self.prototypes(torch.nn.functional.normalize(self.head(self.backbone(x)), dim=1))

    def pair_loss(self, s0, s1):
        """lightly.loss.SwaVLoss with two high-resolution crops: each crop's Sinkhorn codes predicted from the
        other crop's scores."""
        def sinkhorn(scores):
            q = torch.exp(scores / 0.05).t()
            q /= q.sum()
            k, b = q.shape
            for _ in range(3):
                q /= q.sum(dim=1, keepdim=True)
                q /= k
                q /= q.sum(dim=0, keepdim=True)
                q /= b
            return (q * b).t()

        def subloss(scores, q):
            return -torch.mean(torch.sum(q * torch.nn.functional.log_softmax(scores / 0.1, dim=1), dim=1))
        with torch.no_grad():
            q0, q1 = sinkhorn(s0.detach()), sinkhorn(s1.detach())
        return (subloss(s1, q0) + subloss(s0, q1)) / 2


SPLITS = 8  # lightly's MoCo: ResNetGenerator("resnet-18", num_splits=8)


class SplitBatchNorm(nn.BatchNorm2d):
    """SplitBatchNorm in train mode, as lightly.models.batchnorm and facebookresearch/moco's colab write it: one
    BatchNorm2d whose batch is viewed as N / S rows of S x C channels, so that split s normalises the rows n with
    n mod S = s with their own statistics. Lightly's (`split_buffers`) keeps running statistics per split (S x C
    buffers, averaged when the model goes to eval mode), the colab's averages the splits' after every call.
    `groups = 1` (neither's) pools the statistics of the whole call instead."""

    def __init__(self, num_features, num_splits, split_buffers):
        super().__init__(num_features)
        self.num_splits, self.groups, self.split_buffers = num_splits, num_splits, split_buffers
        if split_buffers:
            self.register_buffer("running_mean", torch.zeros(num_features * num_splits))
            self.register_buffer("running_var", torch.ones(num_features * num_splits))

    def forward(self, x):
        n, c, h, w = x.shape
        if self.groups == 1:
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        s = self.num_splits
        mean, var = ((self.running_mean, self.running_var) if self.split_buffers
                     else (self.running_mean.repeat(s), self.running_var.repeat(s)))
        out = nn.functional.batch_norm(x.view(-1, c * s, h, w), mean, var, self.weight.repeat(s),
                                       self.bias.repeat(s), True, self.momentum, self.eps).view(n, c, h, w)
        if not self.split_buffers:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(0))
                self.running_var.copy_(var.view(s, c).mean(0))
        return out


def split_batchnorm(module, splits, split_buffers):
    """Returns `module` with every BatchNorm2d replaced by a SplitBatchNorm of `splits` splits."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SplitBatchNorm(child.num_features, splits, split_buffers))
        else:
            split_batchnorm(child, splits, split_buffers)
    return module


class LightlyMoCo(LightlyModel):
    """MocoModel of the benchmark, the MoCo v2 preset's: backbone with lightly's SplitBatchNorm (8 splits) for
    every BatchNorm, MoCoProjectionHead(512, 512, 128) (Linear -> ReLU -> Linear, with biases), and a momentum
    copy of both (`target`, not trained) updated with m = 0.99 at the start of each training step, as BYOL's.
    Each direction, step(x0, x1) then step(x1, x0): the key view in the order of utils.batch_shuffle's
    permutation through the momentum copy, the keys put back in batch order (batch_unshuffle); NTXentLoss(0.1)
    with its memory bank: cross-entropy of [q.k, q.bank] / 0.1 with the positive at index 0, q and k L2-normalised,
    then k enqueued; 0.5 (loss_1 + loss_2); torch's SGD over backbone and head.

    Our devices' BatchNorm groups are consecutive pairs of rows (2 images per device), SplitBatchNorm's the rows
    {s, s + 8}: the batch reaches this model in ORDER, the order in which lightly's shuffling loader would have
    to deliver it for the groups to be the same sets. The key permutation is ours (`load_extras`), put into
    batch_shuffle's form. One documented difference (configs/moco_v2.py): lightly's memory bank hands the second
    direction the bank after the first direction's keys went in; both our directions, as the colab's, read the
    bank as it was before the step, and so does this model unless `sequential_bank` (lightly's order: another
    loss, checked)."""
    ORDER = np.concatenate([np.arange(0, BATCH, 2), np.arange(1, BATCH, 2)])  # torch row j holds our row ORDER[j]
    BACKBONE_BN_GROUPS = SPLITS
    SPLIT_BUFFERS = True  # lightly's SplitBatchNorm
    WRITE_ORDER = (0, 1)  # the directions whose keys the bank takes, in that order

    def __init__(self):
        super().__init__()
        self.backbone = split_batchnorm(lightly_backbone(True), SPLITS, self.SPLIT_BUFFERS)
        self.head = self.make_head()
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head)})
        self.target.requires_grad_(False)
        self.sequential_bank, self.bank, self.bank_ptr, self.shuffles, self.ptr_before = False, None, 0, None, 0

    def make_head(self):
        return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))

    def target_state(self, state):
        return state["extras"]["key_params"], state["extras"]["key_batch_stats"]

    def load_extras(self, state):
        """Our queue is the bank (lightly's is D x K); the shuffles are our step's key permutations: ours gives
        device d the rows perm[2d], perm[2d + 1] (moco.key_embeddings, the loss rng folded with the direction)."""
        self.bank = torch.from_numpy(np.array(state["extras"]["queue"][0].T, np.float32))
        self.bank_ptr = self.ptr_before = int(state["extras"]["queue_ptr"])
        _, loss_rng = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
        where = np.argsort(self.ORDER)  # our row i is torch row where[i]
        self.shuffles = []
        for v in range(2):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(loss_rng, v), BATCH))
            # batch_shuffle's x[shuffle] puts torch rows shuffle[s] and shuffle[s + 8] in split s.
            self.shuffles.append(torch.from_numpy(where[np.concatenate([perm[0::2], perm[1::2]])]))

    def check_extras(self, state, what):
        """Our queue after the step is torch's bank: our direction v's BATCH keys (rows ptr + v x BATCH on) in
        torch's order, at torch's place for them."""
        ours, ptr = np.asarray(state["extras"]["queue"][0]), self.ptr_before
        queue = ours.copy()
        for v in range(2):
            queue[ptr + self.WRITE_ORDER.index(v) * BATCH + np.arange(BATCH)] = ours[ptr + v * BATCH + self.ORDER]
        np.testing.assert_allclose(queue, self.bank.numpy().T, atol=5e-6, err_msg=f"{what}, queue")  # 4.5e-7 seen
        assert int(state["extras"]["queue_ptr"]) == self.bank_ptr, (int(state["extras"]["queue_ptr"]), self.bank_ptr)

    def step_start(self):
        update_momentum(self)

    def enqueue(self, keys):
        """lightly's MemoryBankModule._dequeue_and_enqueue (the bank size is a multiple of the batch here)."""
        self.bank[:, self.bank_ptr:self.bank_ptr + keys.shape[0]] = keys.T
        self.bank_ptr = (self.bank_ptr + keys.shape[0]) % self.bank.shape[1]

    def loss(self, x0, x1):
        f = torch.nn.functional
        self.step_start()
        before, values, keys = self.bank.clone(), [], []
        for v, (xq, xk) in enumerate(((x0, x1), (x1, x0))):
            q = f.normalize(self.head(self.backbone(xq)), dim=1)
            with torch.no_grad():
                shuffle = self.shuffles[v]
                k = self.target["head"](self.target["backbone"](xk[shuffle]))[torch.argsort(shuffle)]
                keys.append(f.normalize(k, dim=1))
            bank = self.bank.clone() if self.sequential_bank else before
            logits = torch.cat([torch.sum(q * keys[v], dim=1, keepdim=True), q @ bank], dim=1) / 0.1
            values.append(f.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long)))
            if self.sequential_bank:
                self.enqueue(keys[v])
        if not self.sequential_bank:
            for v in self.WRITE_ORDER:
                self.enqueue(keys[v])
        return self.combine(values)

    def combine(self, values):
        """The training loss from the two directions' losses."""
        return 0.5 * (values[0] + values[1])

    def pooled_loss(self, x0, x1):
        """The loss with one BatchNorm group per call (statistics over the whole batch, not 8 splits)."""
        splits = [m for m in self.modules() if isinstance(m, SplitBatchNorm)]
        for m in splits:
            m.groups = 1
        try:
            return self.loss(x0, x1)
        finally:
            for m in splits:
                m.groups = m.num_splits

    def lightly_order_loss(self, x0, x1):
        """The loss with lightly's bank order: the second direction reads the first direction's keys."""
        self.sequential_bank = True
        try:
            return self.loss(x0, x1)
        finally:
            self.sequential_bank = False

    def other_functions(self):
        return {"one BatchNorm group per call": self.pooled_loss,
                "lightly's bank order (the second direction reads the first's keys)": self.lightly_order_loss}


class ColabMoCo(LightlyMoCo):
    """facebookresearch/moco's CIFAR-10 demo (colab/moco_cifar10_demo.ipynb on the colab-notebook branch), the
    MoCo v1 preset's model: ModelBase's torchvision ResNet-18 with SplitBatchNorm(num_splits=8) (bn_splits=8;
    its running statistics averaged over the splits after every call), a 3x3 stride-1 stem convolution, the
    stem ReLU, no max-pool, and fc = Linear(512, 128) as the head; ModelMoCo(dim=128, K=4096, m=0.99, T=0.1,
    symmetric=True): the key encoder's momentum update first, contrastive_loss(im1, im2) and (im2, im1) against
    the queue as it was before the step (keys through _batch_shuffle_single_gpu, which is our permutation here
    as in LightlyMoCo), loss_12 + loss_21, then the keys enqueued as cat([k1, k2]): view 0's keys, our second
    direction's, first. The SUM: our mean's gradient is half of it (SCALE 0.5), so the preset's lr is twice the
    colab's (0.06 at its batch of 512) and its weight decay half of the colab's 5e-4."""
    SCALE = 0.5
    SPLIT_BUFFERS = False
    WRITE_ORDER = (1, 0)

    def make_head(self):
        return nn.Sequential(nn.Linear(512, 128))

    def combine(self, values):
        return values[0] + values[1]

    def our_loss(self, loss):
        return 0.5 * loss

    def other_functions(self):
        return {"one BatchNorm group per call": self.pooled_loss}


class ScaleOnlyBatchNorm1d(nn.BatchNorm1d):
    """tf.keras BatchNormalization(center=False, scale=True): a learnable scale and no bias (the tf2 head's last
    LinearLayer, use_bias=False)."""

    def __init__(self, num_features):
        super().__init__(num_features, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))


class TF2LARS(torch.optim.Optimizer):
    """The official tf2 LARSOptimizer (simclr/tf2/lars_optimizer.py) with its defaults (classic momentum, no
    Nesterov, eeta 0.001), transcribed: for a parameter whose name matches none of exclude_from_weight_decay
    (and so of exclude_from_layer_adaptation), g <- g + wd w and trust = eeta ||w|| / ||g|| (1 if a norm is 0);
    otherwise trust = 1; then v <- momentum v + lr trust g and w <- w - v. Groups say `adapt` for the former."""

    def __init__(self, groups, lr, momentum=0.9, weight_decay=1e-4, eeta=0.001):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eeta=eeta))

    @torch.no_grad()
    def step(self):  # pylint: disable=arguments-differ
        for group in self.param_groups:
            for p in group["params"]:
                grad, trust = p.grad, 1.0
                if group["adapt"]:
                    grad = grad + group["weight_decay"] * p
                    w_norm, g_norm = float(p.norm()), float(grad.norm())
                    trust = group["eeta"] * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                v = self.state[p].setdefault("momentum", torch.zeros_like(p))
                v.mul_(group["momentum"]).add_(group["lr"] * trust * grad)
                p.sub_(v)


def tf2_learning_rate(step, base_lr=1.0, num_examples=4 * BATCH, warmup_epochs=10):
    """The official tf2 WarmUpAndCosineDecay (model.py) with the CIFAR-10 command's flags at batch BATCH (linear
    scaling, lr 1.0), on a dataset of `num_examples`, in its warm-up (linear from 0), where this test's steps
    are; its cosine decay after it is not transcribed."""
    warmup_steps = int(round(warmup_epochs * num_examples // BATCH))
    assert step < warmup_steps, f"step {step} is past the warm-up's {warmup_steps} steps"
    return step / float(warmup_steps) * base_lr * BATCH / 256.0


def tf2_contrastive_loss(hidden, temperature):
    """The official tf2 add_contrastive_loss (objective.py) on one replica: `hidden` is [view 1; view 2],
    l2-normalized; each view's own similarities masked with -1e9; the batch mean of loss_a + loss_b."""
    f = torch.nn.functional
    hidden1, hidden2 = f.normalize(hidden, dim=-1).chunk(2)
    b = hidden1.shape[0]
    masks, labels = torch.eye(b) * 1e9, torch.arange(b)
    logits_aa, logits_bb = hidden1 @ hidden1.T / temperature - masks, hidden2 @ hidden2.T / temperature - masks
    logits_ab, logits_ba = hidden1 @ hidden2.T / temperature, hidden2 @ hidden1.T / temperature
    loss_a = f.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels, reduction="none")
    loss_b = f.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels, reduction="none")
    return (loss_a + loss_b).mean()


class TF2SimCLRv2(LightlyModel):
    """SimCLR v2 as google-research/simclr's tf2 code pretrains it with its README's CIFAR-10 command
    (--resnet_depth=18 --image_size=32 --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5, the flags'
    defaults otherwise), transcribed: its ResNet-18 (resnet.py: a 3x3 stride-1 CIFAR stem with BN and ReLU, no
    max-pool, and every BlockGroup's first block with a projection shortcut, stage 1's too, where torchvision has
    none; BatchNorm decay 0.9 and epsilon 1e-5, torch's momentum 0.1 and eps), the nonlinear ProjectionHead
    (model.py: 3 LinearLayers, Dense without bias -> BN -> ReLU twice at the input's width, then Dense -> BN
    with a scale and no bias to 128-d), one call on both views concatenated (global BatchNorm over them),
    add_contrastive_loss, and LARSOptimizer(momentum 0.9, weight_decay 1e-4, exclude_from_weight_decay=
    ['batch_normalization', 'bias', ...]) at WarmUpAndCosineDecay's lr. The tf2 code has no bias outside its
    BatchNorm layers, so the exclusion is exactly the BatchNorm parameters. Its warm-up starts at lr 0: the first
    step moves nothing on either side, which is why this case runs a third step."""
    STEPS = 3

    def __init__(self):
        super().__init__()
        self.backbone = lightly_backbone(stem_relu=True)
        self.backbone.layer1[0].downsample = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64))
        self.head = nn.Sequential(
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 128, bias=False), ScaleOnlyBatchNorm1d(128))

    def forward(self, x):
        return self.head(self.backbone(x))

    def optimizer(self, lr):
        norm = (nn.BatchNorm1d, nn.BatchNorm2d)
        excluded = {id(p) for m in self.modules() if isinstance(m, norm) for p in m.parameters(recurse=False)}
        adapt = [p for p in self.trained() if id(p) not in excluded]
        plain = [p for p in self.trained() if id(p) in excluded]
        return TF2LARS([dict(params=adapt, adapt=True), dict(params=plain, adapt=False)], lr=lr)

    def loss(self, x0, x1):
        return tf2_contrastive_loss(self(torch.cat([x0, x1])), 0.5)

    def per_view_loss(self, x0, x1):
        """The loss with BatchNorm statistics per view (one call per view, as lightly's SimCLR)."""
        return tf2_contrastive_loss(torch.cat([self(x0), self(x1)]), 0.5)

    def other_functions(self):
        return {"statistics per view": self.per_view_loss,
                "the mean of the two directions (loss.scale 1)": lambda x0, x1: 0.5 * self.loss(x0, x1)}


# method, overrides, the torch model, its learning rate at BATCH, parameters whose gradient is exactly 0.
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
    "byol": ("byol", [], LightlyBYOL, 0.06 * BATCH / 128, ()),
    "swav": ("swav", ["swav.num_small_crops=0"], LightlySwAV, 1e-3 * BATCH / 128, ()),
    # A bank of 4 x BATCH keys: the second step reads the first step's keys, and writes the bank's second half.
    "moco_v2": ("moco_v2", [f"moco.queue_size={4 * BATCH}"], LightlyMoCo, 0.06 * BATCH / 128, ()),
    # The colab's lr is 0.06 at its batch of 512 (not scaled with the batch); the preset scales it linearly.
    "moco_v1_colab": ("moco_v1", [f"moco.queue_size={4 * BATCH}"], ColabMoCo, 0.06 * BATCH / 512, ()),
    # The official tf2 code's step (not lightly's): its lr changes every step of the warm-up.
    "simclr_v2_tf2": ("simclr_v2", [], TF2SimCLRv2, tf2_learning_rate, ()),
}

# Our optimizer's state -> torch's, per optimizer: (our key, torch's key, power of SCALE between them, sign).
# optax.lars's trace accumulates -lr x trust x g, tf2's momentum slot +lr x trust x g.
BUFFERS = {torch.optim.SGD: (("trace", "momentum_buffer", 1, 1),),
           torch.optim.Adam: (("mu", "exp_avg", 1, 1), ("nu", "exp_avg_sq", 2, 1)),
           TF2LARS: (("trace", "momentum", 1, -1),)}


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
    """Returns {name in net.state_dict(): array} for the parts of `net` that `params` has; `params` may be any
    tree of the params' shape (an optimizer's buffers). Every leaf of `params` must find its place."""
    backbone = export.torch_state_dict(params["backbone"], batch_stats["backbone"])
    out = {f"backbone.{k}": v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    used = len(jax.tree.leaves(params["backbone"]))
    for part, seq in net.named_children():
        if part == "backbone" or part not in params:  # BYOL's target: not in params (load checks every name)
            continue
        if isinstance(seq, nn.Linear):  # SwAV's prototypes: our kernel is d x P, torch's weight P x d
            out[f"{part}.weight"] = np.asarray(params[part]["kernel"]).T
            used += 1
            continue
        for i, name, module in mlp_layers(seq):
            p, stats = params[part].get(name, {}), batch_stats[part].get(name, {})
            if isinstance(module, nn.Linear):
                out[f"{part}.{i}.weight"] = np.asarray(p["kernel"]).T
                if module.bias is not None:
                    out[f"{part}.{i}.bias"] = np.asarray(p["bias"])
                used += 1 + (module.bias is not None)
            else:
                for theirs, ours in (("weight", "scale"), ("bias", "bias")):  # ScaleOnlyBatchNorm1d: no bias
                    if getattr(module, theirs) is not None:
                        out[f"{part}.{i}.{theirs}"] = np.asarray(p[ours])
                        used += 1
                out[f"{part}.{i}.running_mean"], out[f"{part}.{i}.running_var"] = stats["mean"], stats["var"]
    assert used == len(jax.tree.leaves(params)), "our params have leaves the torch model lacks"
    return out


def named(net, state, params=None):
    """Returns {torch name: array} of our host state: the online networks (`params`, default the state's) with
    their running statistics, and BYOL's target network from extras as `target.*`."""
    out = to_torch(net, state["params"]["model"] if params is None else params, state["batch_stats"])
    if "target" in dict(net.named_children()):
        target = to_torch(net.target, *net.target_state(state))
        out.update({f"target.{k}": v for k, v in target.items()})
    return out


def buffers(net, opt, state):
    """Returns {(torch's buffer key, parameter name): our buffer / SCALE^power} from our optimizer state."""
    out, trained = {}, {k for k, p in net.named_parameters() if p.requires_grad}
    for ours, theirs, power, sign in BUFFERS[type(opt)]:
        tree = to_torch(net, optax.tree_utils.tree_get(state["opt_state"], ours)["model"], state["batch_stats"])
        out.update({(theirs, k): sign * np.asarray(v, np.float64) / net.SCALE**power
                    for k, v in tree.items() if k in trained})
    return out


def load(net, opt, state, target):
    """Sets the torch model's weights, running statistics and optimizer state to our host train state; BYOL's
    target network too when `target` (at the first step only: from then on torch's EMA keeps its own)."""
    values = named(net, state)
    want = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert sorted(values) == sorted(want), set(values) ^ want
    if not target:
        values = {k: v for k, v in values.items() if not k.startswith("target.")}
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    # SplitBatchNorm's running statistics: one copy per split (S x C), each starting from our C.
    tile = (lambda k, v: np.tile(v, shapes[k][0] // np.size(v)) if np.shape(v) != shapes[k] else v)  # noqa: E731
    net.load_state_dict({k: torch.from_numpy(np.array(tile(k, v), np.float32)) for k, v in values.items()},
                        strict=False)
    net.load_extras(state)
    if not int(state["step"]):
        return
    params = dict(net.named_parameters())
    for (key, name), value in buffers(net, opt, state).items():
        opt.state[params[name]][key] = torch.from_numpy(value.astype(np.float32))
        if isinstance(opt, torch.optim.Adam):
            opt.state[params[name]]["step"] = torch.tensor(float(state["step"]))


def assert_leaves_agree(got, want, before, what, zero=(), rtol=0.02, weights=None):
    """Asserts got[k] - before[k] is within `rtol` of want[k] - before[k] in L2 for every name k (before None:
    got[k] against want[k]).

    rtol 2%: per leaf, our momentum buffers and updates were at most 0.83% from PyTorch's in float32 (MoCo v1
    against the colab's model: 1.06%, 2026-11-24), where
    PyTorch's float32 was up to 0.56% from its float64 (medians 0.15% to 0.6% against 0.15% to 0.34%; jax 0.10.2,
    torch 2.14.1, 2-core CPU, 2026-11-23).
    The names in `zero` have a gradient of exactly 0 in exact arithmetic: what either side computes for it is
    rounding noise of a sum that cancels, so they must agree to 1e-6 of the largest element of any leaf instead
    (1.8e-8 seen, Barlow Twins' last bias against its largest momentum element, 450 to 510). So must a leaf
    whose PyTorch value is exactly 0: behind a BatchNorm scale of 0 (the tf2 ResNet's zero-initialised residual
    branches, before their first update) a gradient is 0 on both sides.
    `weights` (Adam's updates): the error is sum(w |got - want|) / sum(w |want|) per leaf instead, w = |Adam's
    first moment|. Adam's first step moves every element by lr x sign(gradient), so an element whose gradient is
    within rounding of 0 can flip sign on either side (1 of 64 elements of a BatchNorm bias: 25% in L2); weighted
    by the gradient, the updates were at most 0.46% apart, its moments up to 1.23% and 1.55% (SwAV; jax 0.10.2,
    torch 2.14.1, 2-core CPU, 2026-11-23).
    """
    assert sorted(got) == sorted(want)
    deltas = {}
    for k in got:
        u, v = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
        deltas[k] = (u - before[k], v - before[k]) if before is not None else (u, v)
    scale = max(float(np.abs(v).max()) for _, v in deltas.values())
    for k, (u, v) in deltas.items():
        if k in zero or not np.any(v):  # a reference of exactly 0 (zero-initialised residual branches) too
            err = float(np.abs(u - v).max())
            assert err <= 1e-6 * scale, f"{what}, {k}: {err:.3g} from PyTorch's, the largest element {scale:.3g}"
            continue
        l2 = float(np.linalg.norm(u - v) / np.linalg.norm(v))
        if weights is not None:
            w = weights[k]
            l2 = float(np.sum(w * np.abs(u - v)) / np.sum(w * np.abs(v)))
        assert l2 <= rtol, f"{what}, {k}: {l2:.2%} from PyTorch's in L2"


def assert_ema_agrees(got, want, before, what, resolved):
    """Asserts the EMA step got - before is want - before (torch's), leaf by leaf, to 2% in L2 plus the float32
    rounding of the values (4 ulps per element: each side rounds the product and the sum), and that at least
    `resolved` leaves have a step larger than 50 times that rounding, where a wrong decay or order would show.

    A target step is 0.01 x the online weights' last update, 1e-8 per element here: below the rounding of a
    BatchNorm scale near 1, above that of a bias near 0."""
    n = 0
    for k in want:
        step_got, step_want = (np.asarray(x[k], np.float64) - before[k] for x in (got, want))
        rounding = 4 * np.finfo(np.float32).eps * float(np.linalg.norm(before[k]))
        err, size = float(np.linalg.norm(step_got - step_want)), float(np.linalg.norm(step_want))
        assert err <= 0.02 * size + rounding, f"{what}, {k}: EMA step {err:.3g} from torch's {size:.3g}"
        n += size > 50 * rounding
    assert n >= resolved, f"{what}: only {n} target leaves have an EMA step above float32 rounding"


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
    lr_at = lr if callable(lr) else (lambda step: lr)  # noqa: E731
    opt = net.optimizer(lr_at(0))
    params = {k: p for k, p in net.named_parameters() if p.requires_grad}
    stat_names = [k for k in net.state_dict() if k.endswith(("running_mean", "running_var"))]
    rs = np.random.RandomState(0)
    labels = np.arange(BATCH, dtype=np.int32) % source.num_classes
    first = jax.device_get(state)
    for step in range(net.STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # Each step starts torch from our state (weights, running statistics, optimizer state), so a difference
        # cannot carry over from the step before. Normalized views: standard normal, the second shifted and scaled
        # so that the two views' batch statistics differ (pooled ones give another step).
        before = jax.device_get(state)
        load(net, opt, before, target=step == 0)
        v1 = rs.randn(BATCH, 32, 32, 3).astype(np.float32)
        v2 = (1.5 * rs.randn(BATCH, 32, 32, 3) + 0.3).astype(np.float32)
        state, metrics = setup.views_step_fn(state, parallel.put_batch((v1, v2), setup.mesh),
                                             parallel.put_batch(labels, setup.mesh))
        after, metrics = jax.device_get((state, metrics))

        x0, x1 = (torch.from_numpy(v[net.ORDER].transpose(0, 3, 1, 2).copy()) for v in (v1, v2))
        others = {}
        if step == 0:  # e.g. statistics pooled over both views: the same network called once on both views
            for what, other_loss in net.other_functions().items():
                with torch.no_grad():
                    others[what] = net.our_loss(other_loss(x0, x1).item())
                load(net, opt, before, target=True)  # undoes that call's update of running statistics and EMA
        target_before = {k: v.numpy().copy() for k, v in net.state_dict().items()
                         if k.startswith("target.") and k.endswith(("weight", "bias"))}
        opt.zero_grad()
        loss = net.loss(x0, x1)
        loss.backward()
        opt.step()
        net.step_end()
        # The same loss and learning rate (cosine stepped per epoch: the first epoch runs at the peak).
        np.testing.assert_allclose(metrics["loss"], net.our_loss(loss.item()), rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {step}")
        np.testing.assert_allclose(metrics["lr"], lr_at(step) / net.SCALE, rtol=1e-6)
        for what, other in others.items():  # another function: the loss tells at 100 times that tolerance
            assert not np.isclose(other, net.our_loss(loss.item()), rtol=1e-3, atol=1e-4), (what, other, loss.item())
        net.check_extras(after, f"step {step}")
        # The optimizer's buffers in torch's names: SGD's momentum (gradient + 5e-4 x weight, plus 0.9 x the
        # last buffer from the second step on); Adam's two moments (gradient + 1e-6 x weight).
        # At lr 0 (the tf2 warm-up's first step) both sides must leave buffers and weights exactly as they were.
        ours, moving = buffers(net, opt, after), lr_at(step) > 0
        for _, key, power, _ in BUFFERS[type(opt)]:  # Adam's second moment: squares double relative errors
            got, want = {k: ours[key, k] for k in params}, {k: opt.state[p][key].numpy() for k, p in params.items()}
            if not moving:
                assert not any(np.any(v) for v in (*got.values(), *want.values())), f"step {step}: a buffer at lr 0"
                continue
            assert_leaves_agree(got, want, None, f"step {step}, {key}", zero, rtol=0.02 * power)
        # The updates: SGD's -lr x momentum buffer; Adam's, a function of its moments alone.
        ours, start = named(net, after), named(net, before)
        got, want = {k: ours[k] for k in params}, {k: p.detach().numpy() for k, p in params.items()}
        if not moving:
            assert all(np.array_equal(got[k], start[k]) and np.array_equal(want[k], start[k]) for k in params)
        else:
            assert_leaves_agree(got, want, {k: start[k] for k in params}, f"step {step}, update", zero,
                                weights={k: np.abs(opt.state[p]["exp_avg"].numpy()) for k, p in params.items()}
                                if isinstance(opt, torch.optim.Adam) else None)
        # BYOL's target: torch's EMA at the start of this step (m = 0.99, the online weights it was loaded with)
        # is the target our step used, which our previous step's EMA made from its updated online weights.
        torch_stats = net.state_dict()
        if target_before:
            assert_ema_agrees({k: start[k] for k in target_before}, {k: torch_stats[k].numpy() for k in target_before},
                              target_before, f"step {step}", resolved=10 * step)
        # Running statistics after each view's update, in order. Torch keeps unbiased running variances, flax
        # biased ones: they differ by at most a factor n / (n - 1), n a view's values per channel and BatchNorm
        # group, >= 16 x 4 x 4 in the ResNet and 16 in the heads' BatchNorm1d (MoCo's 8 groups: 2 x 4 x 4).
        # SplitBatchNorm's S copies: their mean, as lightly takes for eval mode; ours average each update.
        for k in stat_names:
            theirs = torch_stats[k].numpy().reshape(-1, np.size(ours[k])).mean(axis=0)
            n = BATCH // net.BACKBONE_BN_GROUPS * 16 if k.startswith(("backbone.", "target.backbone.")) else BATCH
            tol = dict(rtol=1e-4, atol=1e-6) if k.endswith("mean") else dict(rtol=1.0 / (n - 1) + 1e-4)
            np.testing.assert_allclose(ours[k], theirs, err_msg=f"step {step}, {k}", **tol)
    assert harness.largest(harness.delta(after["params"]["model"], first["params"]["model"])) > 1e-4
