"""FLOP counts of a training step and the accelerators' peak: what `ssl-jax bench` divides by.

Two counts, because each is wrong in its own way:
  analytic: the conv and dense multiply-accumulates of the method's loss and its gradient, x 2 FLOPs per MAC,
      read off the shapes of the traced jaxpr of jax.value_and_grad(loss) w.r.t. the trained parameters, with
      rematerialization off: the model FLOPs of the step. A trained layer costs about 3 forward passes
      (forward, gradient w.r.t. its input, w.r.t. its weights), a target network (MoCo's key encoder, BYOL's
      target) one, and the first convolution no input gradient. Independent of the backend, so the same step
      gives the same count on every device.
  xla: XLA's cost analysis of the compiled per-device program x the device count: everything the program
      executes (augmentation, BatchNorm, optimizer, the real backward), as XLA's cost model sees it.
`ssl-jax bench` reports both and computes the fraction of peak from the analytic count.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) bf16 peak per chip in TFLOP/s, from the vendors' data sheets: NVIDIA's H100 / H200 /
# A100 pages (the "with sparsity" figures halved), Google Cloud's TPU v4 / v5e / v5p / v6e system pages.
# Keys are lowercase jax `device_kind` strings (TPU v5e reports "TPU v5 lite", v6e "TPU v6 lite").
PEAK_BF16_TFLOPS = {
    "nvidia h100 pcie": 756.0,
    "nvidia h100 nvl": 835.0,
    "nvidia h100": 989.0,  # SXM: device_kind "NVIDIA H100 80GB HBM3"
    "nvidia h200": 989.0,
    "nvidia a100": 312.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
}


def peak_tflops(device_kind):
    """Returns the dense bf16 peak TFLOP/s of one device of `device_kind`, or None when unknown (CPU)."""
    kind = device_kind.lower()
    if kind.startswith("tpu"):  # exact: "TPU v4 lite" (v4i) is not a v4
        return PEAK_BF16_TFLOPS.get(kind)
    for prefix, value in PEAK_BF16_TFLOPS.items():  # longest names first within a family ("h100 pcie")
        if kind.startswith(prefix):
            return value
    return None


def _subjaxprs(value):
    """Yields the jaxprs inside an equation parameter (a ClosedJaxpr, a Jaxpr, or sequences of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _subjaxprs(v)


def matmul_flops(jaxpr):
    """Returns 2 x the multiply-accumulates of every conv and dot_general in `jaxpr` (a Jaxpr or ClosedJaxpr).

    Nested jaxprs are counted too: scan bodies `length` times, the costliest branch of a cond, a shard_map
    body once per device. Elementwise work is not counted.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out_size = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs_shape = eqn.invars[1].aval.shape
            out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            # A strided conv's input gradient is a conv over the cotangent dilated by the strides
            # (lhs_dilation): only 1 / prod(lhs_dilation) of its window positions meet a non-zero.
            dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2 * out_size * math.prod(rhs_shape) // out_features // dilation
        elif name == "cond":
            total += max(matmul_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(matmul_flops(j) for v in eqn.params.values() for j in _subjaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":
                inner *= eqn.params["mesh"].size
            total += inner
    return total


def analytic_step_flops(method, config, image_shape):
    """Returns the model FLOPs of one training step at config.batch_size: the loss's and its gradient's.

    image_shape: (H, W, C) of the stored uint8 images. Traces shapes only (no compilation, no device memory).
    """
    b = config.batch_size
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    images = jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8)
    keys = jax.ShapeDtypeStruct((b, *key.shape), key.dtype)
    sample = np.zeros((1, *image_shape), np.uint8)
    params, batch_stats, extras = jax.eval_shape(lambda r: method.init(r, config, sample), key)
    views = jax.eval_shape(lambda k, x: method.views(k, x, config), keys, images)
    progress = {"step": jnp.zeros((), jnp.int32), "steps_per_epoch": 1, "total_steps": 1}

    plain = config.copy_and_resolve_references()  # remat's recomputed forward is not model FLOPs
    if "model" in plain and "remat" in plain.model:
        plain.model.remat = False

    def forward_backward(params, batch_stats, extras, views, rng):
        return jax.value_and_grad(lambda p: method.loss(p, batch_stats, extras, views, rng, progress,
                                                        config=plain, axis_name=None), has_aux=True)(params)

    return matmul_flops(jax.make_jaxpr(forward_backward)(params, batch_stats, extras, views, key))


def xla_flops(compiled, num_devices):
    """Returns XLA's FLOP count of a compiled SPMD step summed over devices, or None if XLA gives none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or cost.get("flops") is None or cost["flops"] < 0:
        return None
    return float(cost["flops"]) * num_devices


def step_memory_bytes(compiled):
    """Returns XLA's static estimate of one device's memory for a compiled step (arguments, outputs, temps)."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None  # a backend without memory analysis: the bench reports step_bytes null rather than a guess
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
