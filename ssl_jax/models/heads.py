"""Projection / prediction MLP heads and the linear classifier used by the evaluators."""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.norm import GroupedBatchNorm
from ssl_jax.models.resnet import HAIKU_INIT

HEAD_INITS = ("torch", "flax", "haiku")

# torch.nn.Linear's default initialisation, which the official PyTorch code of MoCo, SimSiam, SwAV and Barlow
# Twins (and lightly's and solo-learn's benchmarks) keep: kaiming_uniform_(a=sqrt(5)) for the weight, i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias. Flax's default (lecun_normal, variance
# 1/fan_in) draws weights sqrt(3) times larger. Where BatchNorm follows a layer its output ignores the
# weights' scale, but its effective learning rate goes as lr / |w|^2, so the scale at the start matters. On
# the CPU SimSiam comparison in BENCHMARKS.md this init followed the PyTorch reference more closely.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in):
    """Returns torch.nn.Linear's default bias initialiser for a layer with `fan_in` inputs."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class MLPHead(nn.Module):
    """MLP head: (Dense -> BN -> ReLU) per hidden layer, then a Dense output layer.

    Attributes:
      hidden_dims: widths of the hidden layers; () gives a single linear layer.
      out_dim: output width.
      use_bn: BatchNorm after each hidden Dense. The Dense then has no bias, which BN would cancel.
      last_bn: BatchNorm without bias on the output (the output Dense then has no bias), as
        BYOL / SimSiam / MoCo v3 / SimCLR v2 do.
      last_bn_scale: give that output BatchNorm a learnable scale (SimCLR v2's TF head: center=False,
        scale=True); without it (and without last_bn_bias) the output BN has neither scale nor bias (SimSiam).
      last_bn_bias: give that output BatchNorm a learnable bias; with last_bn_scale it is an affine
        BatchNorm1d (lightly's CIFAR-10 SimSiam projector).
      out_bias: without last_bn, whether the output Dense has a bias (BYOL's official networks.MLP has none).
      dtype: compute dtype; parameters and BN statistics stay float32, outputs are float32.
      bn_axis_name: mesh axis over which BN averages batch statistics (None: local batch).
      init_scheme: the Dense layers' initialisation: "torch" as torch.nn.Linear (see `torch_linear_kernel_init`),
        "flax" Flax's default (lecun_normal weights, zero biases), "haiku" haiku's hk.Linear default (BYOL's
        official heads: TruncatedNormal(1 / sqrt(fan_in)) weights, zero biases; resnet.HAIKU_INIT).
      kernel_init_std: > 0 draws every Dense kernel from N(0, kernel_init_std^2) instead (biases zero), as the
        official SimCLR tf2 code's LinearLayer does (RandomNormal(stddev=0.01)).
      bn_groups: in training, the batch is this many views concatenated and each BatchNorm normalises each
        view with its own statistics (norm.GroupedBatchNorm; ResNet.bn_groups: per device, the device's
        own rows of each view).
    """
    hidden_dims: Sequence[int]
    out_dim: int
    use_bn: bool = True
    last_bn: bool = False
    last_bn_scale: bool = False
    last_bn_bias: bool = False
    out_bias: bool = True
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    init_scheme: str = "torch"
    bn_groups: int = 1
    kernel_init_std: float = 0.0

    def _dense(self, width: int, use_bias: bool, fan_in: int, name: str) -> nn.Dense:
        if self.kernel_init_std < 0:
            raise ValueError(f"kernel_init_std must be >= 0 (0: the default init), got {self.kernel_init_std}")
        if self.init_scheme not in HEAD_INITS:
            raise ValueError(f"Unknown head init_scheme {self.init_scheme!r}; expected one of {HEAD_INITS}")
        if self.kernel_init_std > 0:
            inits = dict(kernel_init=nn.initializers.normal(self.kernel_init_std))
        elif self.init_scheme == "torch":
            inits = dict(kernel_init=torch_linear_kernel_init, bias_init=torch_linear_bias_init(fan_in))
        elif self.init_scheme == "haiku":
            inits = dict(kernel_init=HAIKU_INIT)
        else:
            inits = {}
        return nn.Dense(width, use_bias=use_bias, dtype=self.dtype, param_dtype=jnp.float32, name=name, **inits)

    def _bn(self, train: bool, name: str, scale: bool = True, bias: bool = True) -> nn.Module:
        bn = functools.partial(GroupedBatchNorm, groups=self.bn_groups) if self.bn_groups > 1 else nn.BatchNorm
        return bn(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            use_scale=scale, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
            axis_name=self.bn_axis_name, use_fast_variance=False, name=name)  # two-pass variance: models/norm.py

    @nn.compact
    def __call__(self, x_BxD, train: bool, return_hidden: bool = False):
        """Returns out_BxO (float32), plus the float32 post-ReLU hidden activations [B x H_i] if return_hidden.

        SimCLR v2 fine-tunes from the first of those hidden layers (`hidden[0]`).
        """
        x = jnp.asarray(x_BxD, self.dtype)
        hidden = []
        for i, width in enumerate(self.hidden_dims):
            x = self._dense(width, not self.use_bn, x.shape[-1], f"dense{i}")(x)
            if self.use_bn:
                x = self._bn(train, f"bn{i}")(x)
            x = nn.relu(x)
            hidden.append(x.astype(jnp.float32))
        n = len(self.hidden_dims)
        x = self._dense(self.out_dim, self.out_bias and not self.last_bn, x.shape[-1], f"dense{n}")(x)
        if self.last_bn:
            x = self._bn(train, f"bn{n}", scale=self.last_bn_scale, bias=self.last_bn_bias)(x)
        out_BxO = x.astype(jnp.float32)
        return (out_BxO, hidden) if return_hidden else out_BxO


class LinearClassifier(nn.Module):
    """A float32 Dense layer from features to class logits (linear evaluation, online probe)."""
    num_classes: int

    @nn.compact
    def __call__(self, x_BxD):
        """Returns logits B x num_classes in float32."""
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="fc")(
            jnp.asarray(x_BxD, jnp.float32))
