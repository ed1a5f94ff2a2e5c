"""BatchNorm over a batch made of several views: each view's rows normalised with that view's own statistics.

PyTorch SSL code passes each augmented view through the network on its own (`z1 = f(x1); z2 = f(x2)`: lightly,
solo-learn, the official SimSiam, BYOL and Barlow Twins code), so every BatchNorm sees one view at a time. The
same network run once on the concatenated views would normalise both views together: a different function.
`GroupedBatchNorm(groups=G)` runs on the concatenated batch (G equal blocks of rows, block g = view g) and gives
exactly what G separate passes through flax's `nn.BatchNorm` give, in one pass: outputs, gradients and running
statistics (updated once per block, in block order, as G passes update them). Convolutions and matmuls see
one G x larger batch instead of G small ones.

Its variables are nn.BatchNorm's ("params": scale, bias; "batch_stats": mean, var, all float32 of shape C), so
checkpoints, exports and evaluation (running averages, where groups play no part) are unchanged. Statistics
are float32, averaged over `axis_name` (synchronized BatchNorm: block g of every device is view g), as
nn.BatchNorm computes them. The variance is E[(x - E[x])^2], two passes (as nn.BatchNorm's
use_fast_variance=False, which the library's models use, and as PyTorch computes it): flax's default one-pass
E[x^2] - E[x]^2 cancels catastrophically in float32 where a channel's mean is large against its spread. That
put SimSiam's gradients 2.8% from PyTorch's float64 ones after one update, where PyTorch's float32 ones were
0.16% off, and made the size of that error depend on the CPU that ran it (tests/test_norm.py; BENCHMARKS.md,
"Numerics against float64", measured by benchmarks/parity_vs_float64.py).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupedBatchNorm(nn.Module):
    """nn.BatchNorm over the last axis with the leading (batch) axis split into `groups` equal blocks, each
    normalised by its own batch statistics in training (see the module docstring); the same arguments."""
    use_running_average: bool | None = None
    groups: int = 1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    use_fast_variance: bool = False  # True: flax's one-pass E[x^2] - E[x]^2 (one collective, not two)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        """Returns the normalised x (dtype: self.dtype, else x's and the parameters' promoted dtype)."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        channels = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (channels,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (channels,))
        groups = 1 if use_running_average else self.groups
        if x.shape[0] % groups:
            raise ValueError(f"GroupedBatchNorm: a batch of {x.shape[0]} rows does not split into {groups} equal "
                             f"groups (one per view)")
        x_G = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])  # G x B x ... x C
        axes = tuple(range(1, x_G.ndim - 1))
        if use_running_average:
            mean_GxC, var_GxC = ra_mean.value[None], ra_var.value[None]
        else:
            x32 = x_G.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean_GxC, var_GxC = self._statistics(x32, axes)
            if not self.is_initializing():
                new_mean, new_var = ra_mean.value, ra_var.value
                for g in range(groups):  # the order in which G separate passes would update them
                    new_mean = self.momentum * new_mean + (1 - self.momentum) * mean_GxC[g]
                    new_var = self.momentum * new_var + (1 - self.momentum) * var_GxC[g]
                ra_mean.value, ra_var.value = new_mean, new_var
        shape = (groups,) + (1,) * len(axes) + (channels,)  # broadcast over each group's rows
        y = x_G - mean_GxC.reshape(shape)
        mul = jax.lax.rsqrt(var_GxC.reshape(shape) + self.epsilon)
        dtypes = [x.dtype]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
            mul = mul * scale
            dtypes.append(scale.dtype)
        y = y * mul
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
            y = y + bias
            dtypes.append(bias.dtype)
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*dtypes)
        return jnp.asarray(y.reshape(x.shape), out_dtype)

    def _statistics(self, x32, axes):
        """Returns (mean, biased variance) of each group's channels, G x C, over `axes` and `axis_name`."""
        # As nn.BatchNorm: no collective in init, so a synchronized model can be initialized outside shard_map.
        axis_name = None if self.is_initializing() else self.axis_name
        pmean = (lambda v: v) if axis_name is None else (lambda v: jax.lax.pmean(v, axis_name))  # noqa: E731
        if self.use_fast_variance:  # both moments in one collective
            mean, mean_sq = pmean(jnp.stack([x32.mean(axes), jnp.square(x32).mean(axes)]))
            return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))
        mean = pmean(x32.mean(axes))
        centred = x32 - jnp.expand_dims(mean, axes)
        return mean, pmean(jnp.square(centred).mean(axes))
