"""`ssl-jax bench`: wall time of the full training step, input pipeline and augmentation included."""
import time

import jax
import numpy as np

from ssl_jax import parallel, train


def bench(config, steps=50, warmup=3):
    """Returns {'img_per_s', 'step_ms', ...} for `steps` full steps after `warmup` untimed ones."""
    setup = train.build(config)
    state = train.initial_state(setup)
    batches = train.loader(setup, 0)
    try:
        metrics = None
        for _ in range(warmup):
            state, metrics = setup.step_fn(state, setup.dataset, parallel.put_batch(next(batches), setup.mesh))
        jax.block_until_ready((state, metrics))
        start = time.perf_counter()
        for _ in range(steps):
            # The same per-step work as training: a host batch (indices or images) moved to the devices, then
            # the step, whose augmentation runs on the device. Metrics are not fetched, as in the training loop.
            state, metrics = setup.step_fn(state, setup.dataset, parallel.put_batch(next(batches), setup.mesh))
        loss = float(jax.device_get(metrics["loss"]))
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
    finally:
        batches.close()
    step_s = seconds / steps
    return {
        "img_per_s": round(config.batch_size / step_s, 1),
        "step_ms": round(1000 * step_s, 3),
        "epoch_s": round(step_s * setup.steps_per_epoch, 3),
        "batch_size": config.batch_size, "steps": steps, "method": config.method, "model": config.model.name,
        "dtype": config.model.dtype, "resident": bool(config.data.resident), "devices": setup.mesh.devices.size,
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "final_loss": loss,
        "finite": bool(np.isfinite(loss)),
    }
