"""ResNet backbones (18..200, wide variants, CIFAR stem) in flax.linen.

Layer names follow torchvision's resnet state_dict so a converter is a renaming:
torchvision `layer2.0.downsample.0.weight` is our `layer2_0/downsample_conv/kernel`, `bn1.running_var`
is batch_stats `bn1/var`, and so on. Numerics follow torchvision too: symmetric explicit padding
(Flax's "SAME" pads stride-2 convs asymmetrically), the stride in the bottleneck's 3x3 conv (ResNet
v1.5), bias-free convs, kaiming-normal fan-out init. One known difference: Flax updates the running
variance with the biased batch variance, torchvision with the unbiased one (the TF code of SimCLR and
the haiku code of BYOL use the biased one, as here). Unlike torchvision, those two pad "SAME": BYOL's
stride-2 convs and max-pool, SimCLR's max-pool (its convs pad symmetrically), so on even sizes their
windows sit one pixel later than ours.

Selective kernels (ResNet.sk_ratio > 0, SimCLR v2's "SK" ResNets) follow the official SimCLR tf2 code
(resnet.py SK_Conv2D) rather than the SKNet paper: each bottleneck's 3x3 conv becomes two 3x3 streams (one
conv with twice the filters, split in halves, each stream through BN + ReLU), mixed per channel by a softmax
over the streams of weights computed from their globally pooled sum (1x1 conv to max(filters * sk_ratio,
32) channels, BN, ReLU, 1x1 conv back to two x filters). With SK the net is also a ResNet-D, as there: the
7x7 stem becomes three 3x3 convs (widths w/2, w/2, w; the first strided), and projection shortcuts average-
pool 2x2 (with the block's stride) before a stride-1 1x1 conv. Such a net has no torchvision counterpart.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ssl_jax.models.norm import GroupedBatchNorm

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); JAX's "normal" is untruncated too.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# ResNet.conv_init: "torchvision" (torchvision.models.resnet's explicit init), or "pytorch" (what nn.Conv2d
# starts with when nothing re-initialises it: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# as in lightly's ResNetGenerator). Every conv is followed by BatchNorm, so the init's scale sets the initial
# effective learning rate (proportional to 1 / ||w||^2): the "pytorch" weights are sqrt(6) times smaller for a
# 3x3 conv with as many inputs as outputs.
# "tf": the official SimCLR / TF ResNet code's tf.keras.initializers.VarianceScaling() default: scale 1, fan-in,
# a normal truncated at 2 standard deviations and rescaled to variance 1 / fan_in (JAX's "truncated_normal" does
# the same rescaling, 1 / 0.8796).
# "haiku": haiku's default for hk.Conv2D and hk.Linear (BYOL's official network), TruncatedNormal(1 / sqrt(fan_in)):
# a normal of that scale cut at 2 of it and NOT rescaled, so its variance is 0.8796^2 / fan_in.
HAIKU_INIT = nn.initializers.variance_scaling(0.87962566103423978 ** 2, "fan_in", "truncated_normal")
CONV_INITS = {"torchvision": conv_kernel_init,
              "pytorch": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
              "tf": nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
              "haiku": HAIKU_INIT}

# What the blocks use when built on their own; ResNet passes its own (dtype, BN axis, momentum).
_default_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init)
# Two-pass variance E[(x - E[x])^2], as PyTorch's: flax's one-pass default loses float32 precision where a
# channel's mean is large against its spread (ssl_jax/models/norm.py).
_default_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5, use_fast_variance=False)


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Returns torchvision's symmetric padding ((p, p), (p, p)) for an odd kernel size."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def _saved(y):
    """Names a convolution's output "conv": the values remat_policy="convs" keeps (identity otherwise)."""
    return checkpoint_name(y, "conv")


# What a rematerialized residual block stores for its backward pass (ResNet.remat_policy).
REMAT_POLICIES = {"block": None, "convs": jax.checkpoint_policies.save_only_these_names("conv")}


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-conv shortcut; output width `filters`."""
    filters: int
    strides: int = 1
    conv: Callable[..., nn.Module] = _default_conv
    norm: Callable[..., nn.Module] = _default_norm
    zero_init_residual: bool = True
    project: bool = False  # a projection shortcut even where the shapes match (ResNet.project_first_block)
    expansion = 1

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        """Returns the block output, B x H/strides x W/strides x filters."""
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        s = (self.strides, self.strides)
        y = _saved(self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv1")(x_BxHxWxC))
        y = nn.relu(self.norm(use_running_average=not train, name="bn1")(y))
        y = _saved(self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y))
        y = self.norm(use_running_average=not train, scale_init=last_scale_init, name="bn2")(y)
        shortcut = _shortcut(self, x_BxHxWxC, self.filters * self.expansion, train)
        return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs with a shortcut; output width 4 * `filters`.

    sk_ratio > 0 makes the 3x3 conv a selective kernel (`_selective_kernel`) and the projection shortcut
    ResNet-D's (module docstring).
    """
    filters: int
    strides: int = 1
    conv: Callable[..., nn.Module] = _default_conv
    norm: Callable[..., nn.Module] = _default_norm
    zero_init_residual: bool = True
    project: bool = False  # a projection shortcut even where the shapes match (ResNet.project_first_block)
    sk_ratio: float = 0.0
    sk_min_dim: int = 32
    expansion = 4

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        """Returns the block output, B x H/strides x W/strides x 4*filters."""
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = _saved(self.conv(self.filters, (1, 1), padding=((0, 0), (0, 0)), name="conv1")(x_BxHxWxC))
        y = nn.relu(self.norm(use_running_average=not train, name="bn1")(y))
        if self.sk_ratio > 0:
            y = _selective_kernel(self, y, train)
        else:
            s = (self.strides, self.strides)
            y = _saved(self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv2")(y))
            y = nn.relu(self.norm(use_running_average=not train, name="bn2")(y))
        y = _saved(self.conv(self.filters * self.expansion, (1, 1), padding=((0, 0), (0, 0)), name="conv3")(y))
        y = self.norm(use_running_average=not train, scale_init=last_scale_init, name="bn3")(y)
        shortcut = _shortcut(self, x_BxHxWxC, self.filters * self.expansion, train, resnet_d=self.sk_ratio > 0)
        return nn.relu(y + shortcut)


def _selective_kernel(block: nn.Module, x_BxHxWxC, train: bool):
    """Returns the selective-kernel 3x3 stage of a bottleneck, B x H/strides x W/strides x block.filters.

    Two 3x3 streams from one conv with 2 x filters outputs (conv2, bn2, ReLU; channels [:f] and [f:]),
    mixed per channel by softmax-over-streams weights from their pooled sum (sk_reduce, sk_bn, ReLU,
    sk_expand): the official SimCLR tf2 SK_Conv2D.
    """
    f, s = block.filters, (block.strides, block.strides)
    y = _saved(block.conv(2 * f, (3, 3), s, padding=_pad(3), name="conv2")(x_BxHxWxC))
    y = nn.relu(block.norm(use_running_average=not train, name="bn2")(y))
    stream1, stream2 = y[..., :f], y[..., f:]
    pooled_Bx1x1xF = jnp.mean(stream1 + stream2, axis=(1, 2), keepdims=True)
    mid = max(int(f * block.sk_ratio), block.sk_min_dim)
    g = block.conv(mid, (1, 1), padding=((0, 0), (0, 0)), name="sk_reduce")(pooled_Bx1x1xF)
    g = nn.relu(block.norm(use_running_average=not train, name="sk_bn")(g))
    logits = block.conv(2 * f, (1, 1), padding=((0, 0), (0, 0)), name="sk_expand")(g)
    # The softmax over the two streams in float32 (B x 1 x 1 x F each); the weighted sum in the compute dtype.
    logits_2xBx1x1xF = jnp.stack([logits[..., :f], logits[..., f:]]).astype(jnp.float32)
    mixing = jax.nn.softmax(logits_2xBx1x1xF, axis=0).astype(y.dtype)
    return stream1 * mixing[0] + stream2 * mixing[1]


def _shortcut(block: nn.Module, x_BxHxWxC, out_channels: int, train: bool, resnet_d: bool = False):
    """Returns the identity, or a strided 1x1 conv + BN (torchvision's `downsample`) when shapes change or the
    block has `project` set.

    For a ResNet-D (resnet_d: an SK bottleneck, as in the official SimCLR tf2 code) the projection is a 2x2 average
    pool with the block's stride, then a stride-1 1x1 conv + BN. Strided: zero-padded at the end to an even
    size, pool windows not overlapping; stride 1: windows of 2x2 ending past the edge average what they hold.
    """
    if block.strides == 1 and x_BxHxWxC.shape[-1] == out_channels and not block.project:
        return x_BxHxWxC
    s = (block.strides, block.strides)
    if resnet_d:
        x_BxHxWxC = _resnet_d_pool(x_BxHxWxC, block.strides)
        s = (1, 1)
    x = _saved(block.conv(out_channels, (1, 1), s, padding=((0, 0), (0, 0)), name="downsample_conv")(x_BxHxWxC))
    return block.norm(use_running_average=not train, name="downsample_bn")(x)


def _resnet_d_pool(x_BxHxWxC, strides: int):
    """Returns ResNet-D's shortcut pool: 2x2 average with stride `strides` (official tf2 padding)."""
    if strides == 1:  # TF's SAME pooling of a 2x2 window: one row/column past the end, not counted
        return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)), count_include_pad=False)
    # TF's FixedPadding(2) then VALID: pads one zero row/column at the end, which an odd size's last window counts.
    x = jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding="VALID")


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
    """ResNet backbone: images B x H x W x C -> globally average-pooled float32 features B x D.

    Attributes:
        stage_sizes: number of blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        block: 'basic' or 'bottleneck'.
        width_multiplier: scales every width, stem included (SimCLR v2's wide ResNets).
        base_width: width of the stem and first stage before the multiplier; stage i has
            base_width * 2**i (64 gives torchvision's 64/128/256/512).
        cifar_stem: 3x3 stride-1 conv and no max-pool instead of the 7x7 stride-2 conv + max-pool.
        dtype: compute dtype (e.g. jnp.bfloat16); parameters and BatchNorm statistics stay float32.
        bn_axis_name: mesh axis over which BatchNorm averages its batch statistics (None: local batch).
        zero_init_residual: start each block's last BN scale at 0 so the block starts as its shortcut.
        conv_init: the convolutions' initialisation, a key of CONV_INITS.
        remat: recompute each residual block's activations in the backward pass instead of storing them
            (nn.remat), for large ResNet-50 / 224 batches on one GPU; numerics are unchanged.
        remat_policy: what a rematerialized block keeps (REMAT_POLICIES): "block" only its input, activation
            memory traded for about one extra forward pass of compute; "convs" its convolutions' outputs too,
            so the backward recomputes only BatchNorm and ReLU (elementwise work, no convolution) and the
            memory saved is what those would have stored.
        sk_ratio: > 0 gives SimCLR v2's selective-kernel ResNet-D (module docstring; the released "sk1"
            checkpoints use 0.0625); bottleneck blocks only. sk_min_dim: the smallest SK mixing width.
        bn_groups: in training, the batch is this many views concatenated (equal blocks of rows) and every
            BatchNorm normalises each view with its own statistics, as that many separate passes would
            (norm.GroupedBatchNorm); 1: one set of statistics over the whole batch. Inside shard_map the
            blocks are of each device's own rows, [view1_local; view2_local], not a sharded global
            [view1; view2] (which runs, with other statistics).
        project_first_block: the first block of every stage has a projection shortcut (1x1 conv + BN), also
            where its input already has the block's output shape, as the official SimCLR tf2 code (and the TF
            TPU ResNet it comes from) builds every BlockGroup; torchvision projects only where the shape
            changes. Only basic-block ResNets differ (18, 34: stage 1 keeps 64 x width channels at stride 1);
            a bottleneck's first block changes the width in every stage.
    """
    stage_sizes: Sequence[int]
    block: str = "basic"
    width_multiplier: int = 1
    base_width: int = 64
    cifar_stem: bool = False
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True
    conv_init: str = "torchvision"
    # False: no ReLU after the stem's last BatchNorm (lightly's CIFAR-10 benchmark network, whose nn.Sequential
    # over the ResNet's children drops the functional ReLU); torchvision then needs model.relu = Identity.
    stem_relu: bool = True
    remat: bool = False
    remat_policy: str = "block"
    sk_ratio: float = 0.0
    sk_min_dim: int = 32
    bn_groups: int = 1
    project_first_block: bool = False

    @property
    def feature_dim(self) -> int:
        """Returns D, the width of the pooled features."""
        last_width = self.base_width * 2 ** (len(self.stage_sizes) - 1) * self.width_multiplier
        return last_width * BLOCKS[self.block].expansion

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        """Returns pooled features B x feature_dim in float32."""
        if self.block not in BLOCKS:
            raise ValueError(f"Unknown ResNet block {self.block!r}; expected one of {sorted(BLOCKS)}.")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"Unknown conv_init {self.conv_init!r}; expected one of {sorted(CONV_INITS)}.")
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                 kernel_init=CONV_INITS[self.conv_init])
        norm = functools.partial(
            nn.BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=jnp.float32, axis_name=self.bn_axis_name, use_fast_variance=False)
        if self.bn_groups > 1:
            norm = functools.partial(GroupedBatchNorm, groups=self.bn_groups, **norm.keywords)
        width = self.base_width * self.width_multiplier
        if self.sk_ratio < 0 or (self.sk_ratio > 0 and self.block != "bottleneck"):
            raise ValueError(f"sk_ratio={self.sk_ratio}: selective kernels need a bottleneck ResNet (resnet50 and "
                             f"deeper) and sk_ratio > 0 (SimCLR v2's sk1: 0.0625), or 0 for none.")

        x = jnp.asarray(x_BxHxWxC, self.dtype)
        if self.sk_ratio > 0 and not self.cifar_stem:  # ResNet-D stem: three 3x3 convs, the first strided
            for name, w, s in (("1", width // 2, 2), ("1b", width // 2, 1), ("1c", width, 1)):
                x = conv(w, (3, 3), (s, s), padding=_pad(3), name=f"conv{name}")(x)
                x = norm(use_running_average=not train, name=f"bn{name}")(x)
                x = nn.relu(x) if self.stem_relu or name != "1c" else x
        else:
            k, s = (3, 1) if self.cifar_stem else (7, 2)
            x = conv(width, (k, k), (s, s), padding=_pad(k), name="conv1")(x)
            x = norm(use_running_average=not train, name="bn1")(x)
            x = nn.relu(x) if self.stem_relu else x
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))

        block_cls = BLOCKS[self.block]
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
        if self.remat:  # argument 2 of __call__(self, x, train) is the Python bool `train`: static
            block_cls = nn.remat(block_cls, static_argnums=(2,), policy=REMAT_POLICIES[self.remat_policy])
        sk = dict(sk_ratio=self.sk_ratio, sk_min_dim=self.sk_min_dim) if self.sk_ratio > 0 else {}
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(
                    filters=width * 2 ** i, strides=strides, conv=conv, norm=norm,
                    zero_init_residual=self.zero_init_residual, project=self.project_first_block and j == 0,
                    name=f"layer{i + 1}_{j}", **sk)(x, train)
        # Pool in float32: the features feed losses and evaluators.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ARCHS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    # Not in torchvision; SimCLR's tf2 resnet.py and BYOL's networks.py (its ResNet-200 2x) have it.
    "resnet200": dict(stage_sizes=(3, 24, 36, 3), block="bottleneck"),
    # For tests: two stages of one basic block, widths 8 and 16.
    "tiny": dict(stage_sizes=(1, 1), block="basic", base_width=8),
}


def get_backbone(name: str, *, width_multiplier: int = 1, cifar_stem: bool = False, dtype: Any = jnp.float32,
                 bn_axis_name: str | None = None, remat: bool = False, remat_policy: str = "block",
                 zero_init_residual: bool = True, sk_ratio: float = 0.0,
                 conv_init: str = "torchvision", stem_relu: bool = True, bn_groups: int = 1,
                 project_first_block: bool = False) -> tuple[ResNet, int]:
    """Returns (ResNet module, feature dimension D) for an architecture name such as 'resnet50'.

    remat=True rematerializes every residual block in the backward pass, keeping what remat_policy says (see
    ResNet.remat, ResNet.remat_policy);
    zero_init_residual=False starts every BatchNorm scale at 1, as torchvision's default;
    sk_ratio > 0: selective kernels and ResNet-D (ResNet.sk_ratio); conv_init: a key of CONV_INITS;
    stem_relu=False: no ReLU after the stem (ResNet.stem_relu); bn_groups: views per batch (ResNet.bn_groups);
    project_first_block: a projection shortcut in every stage's first block (ResNet.project_first_block).
    """
    if name not in ARCHS:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {sorted(ARCHS)}.")
    model = ResNet(**ARCHS[name], width_multiplier=width_multiplier, cifar_stem=cifar_stem, dtype=dtype,
                   bn_axis_name=bn_axis_name, remat=remat, remat_policy=remat_policy,
                   zero_init_residual=zero_init_residual, sk_ratio=sk_ratio, conv_init=conv_init,
                   stem_relu=stem_relu, bn_groups=bn_groups, project_first_block=project_first_block)
    return model, model.feature_dim


def backbone_from_config(model_config, *, dtype: Any = jnp.float32, bn_axis_name: str | None = None,
                         bn_groups: int = 1) -> tuple[ResNet, int]:
    """Returns (ResNet module, D) for a run's config.model (name, width_multiplier, cifar_stem, remat,
    remat_policy, zero_init_residual, sk_ratio, conv_init, stem_relu, project_first_block), in compute `dtype`
    with BatchNorm over `bn_axis_name`, and `bn_groups` views per training batch (ResNet.bn_groups)."""
    m = model_config
    return get_backbone(m.name, width_multiplier=m.width_multiplier, cifar_stem=m.cifar_stem, dtype=dtype,
                        bn_axis_name=bn_axis_name, remat=m.get("remat", False),
                        remat_policy=m.get("remat_policy", "block"),
                        zero_init_residual=m.get("zero_init_residual", True), sk_ratio=m.get("sk_ratio", 0.0),
                        conv_init=m.get("conv_init", "torchvision"),
                        stem_relu=bool(m.get("stem_relu", True)), bn_groups=bn_groups,
                        project_first_block=bool(m.get("project_first_block", False)))
