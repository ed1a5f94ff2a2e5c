"""ResNet backbones (18..152, wide variants, CIFAR stem) in flax.linen.

Layer names follow torchvision's resnet state_dict so a converter is a renaming:
torchvision `layer2.0.downsample.0.weight` is our `layer2_0/downsample_conv/kernel`, `bn1.running_var`
is batch_stats `bn1/var`, and so on. Numerics follow torchvision too: symmetric explicit padding
(Flax's "SAME" pads stride-2 convs asymmetrically), the stride in the bottleneck's 3x3 conv (ResNet
v1.5), bias-free convs, kaiming-normal fan-out init. One known difference: Flax updates the running
variance with the biased batch variance, torchvision with the unbiased one.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); JAX's "normal" is untruncated too.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# What the blocks use when built on their own; ResNet passes its own (dtype, BN axis, momentum).
_default_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init)
_default_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


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
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs with a shortcut; output width 4 * `filters`."""
    filters: int
    strides: int = 1
    conv: Callable[..., nn.Module] = _default_conv
    norm: Callable[..., nn.Module] = _default_norm
    zero_init_residual: bool = True
    expansion = 4

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool):
        """Returns the block output, B x H/strides x W/strides x 4*filters."""
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = _saved(self.conv(self.filters, (1, 1), padding=((0, 0), (0, 0)), name="conv1")(x_BxHxWxC))
        y = nn.relu(self.norm(use_running_average=not train, name="bn1")(y))
        s = (self.strides, self.strides)
        y = _saved(self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv2")(y))
        y = nn.relu(self.norm(use_running_average=not train, name="bn2")(y))
        y = _saved(self.conv(self.filters * self.expansion, (1, 1), padding=((0, 0), (0, 0)), name="conv3")(y))
        y = self.norm(use_running_average=not train, scale_init=last_scale_init, name="bn3")(y)
        shortcut = _shortcut(self, x_BxHxWxC, self.filters * self.expansion, train)
        return nn.relu(y + shortcut)


def _shortcut(block: nn.Module, x_BxHxWxC, out_channels: int, train: bool):
    """Returns the identity, or a strided 1x1 conv + BN (torchvision's `downsample`) when shapes change."""
    if block.strides == 1 and x_BxHxWxC.shape[-1] == out_channels:
        return x_BxHxWxC
    s = (block.strides, block.strides)
    x = _saved(block.conv(out_channels, (1, 1), s, padding=((0, 0), (0, 0)), name="downsample_conv")(x_BxHxWxC))
    return block.norm(use_running_average=not train, name="downsample_bn")(x)


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
        remat: recompute each residual block's activations in the backward pass instead of storing them
            (nn.remat), for large ResNet-50 / 224 batches on one GPU; numerics are unchanged.
        remat_policy: what a rematerialized block keeps (REMAT_POLICIES): "block" only its input, activation
            memory traded for about one extra forward pass of compute; "convs" its convolutions' outputs too,
            so the backward recomputes only BatchNorm and ReLU (elementwise work, no convolution) and the
            memory saved is what those would have stored.
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
    remat: bool = False
    remat_policy: str = "block"

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
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init)
        norm = functools.partial(
            nn.BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=jnp.float32, axis_name=self.bn_axis_name)
        width = self.base_width * self.width_multiplier

        k, s = (3, 1) if self.cifar_stem else (7, 2)
        x = conv(width, (k, k), (s, s), padding=_pad(k), name="conv1")(jnp.asarray(x_BxHxWxC, self.dtype))
        x = nn.relu(norm(use_running_average=not train, name="bn1")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))

        block_cls = BLOCKS[self.block]
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
        if self.remat:  # argument 2 of __call__(self, x, train) is the Python bool `train`: static
            block_cls = nn.remat(block_cls, static_argnums=(2,), policy=REMAT_POLICIES[self.remat_policy])
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(
                    filters=width * 2 ** i, strides=strides, conv=conv, norm=norm,
                    zero_init_residual=self.zero_init_residual, name=f"layer{i + 1}_{j}")(x, train)
        # Pool in float32: the features feed losses and evaluators.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


_ARCHS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    # For tests: two stages of one basic block, widths 8 and 16.
    "tiny": dict(stage_sizes=(1, 1), block="basic", base_width=8),
}


def get_backbone(name: str, *, width_multiplier: int = 1, cifar_stem: bool = False, dtype: Any = jnp.float32,
                 bn_axis_name: str | None = None, remat: bool = False, remat_policy: str = "block",
                 zero_init_residual: bool = True) -> tuple[ResNet, int]:
    """Returns (ResNet module, feature dimension D) for an architecture name such as 'resnet50'.

    remat=True rematerializes every residual block in the backward pass, keeping what remat_policy says (see
    ResNet.remat, ResNet.remat_policy);
    zero_init_residual=False starts every BatchNorm scale at 1, as torchvision's default.
    """
    if name not in _ARCHS:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {sorted(_ARCHS)}.")
    model = ResNet(**_ARCHS[name], width_multiplier=width_multiplier, cifar_stem=cifar_stem, dtype=dtype,
                   bn_axis_name=bn_axis_name, remat=remat, remat_policy=remat_policy,
                   zero_init_residual=zero_init_residual)
    return model, model.feature_dim
