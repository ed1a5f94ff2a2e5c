"""Mesh, shardings and collectives over the one mesh axis, "data".

Parameters, optimizer state and method extras are replicated (P()); batches are sharded (P("data")).
Every collective in the library names DATA_AXIS; losses take `axis_name=None` to run unsharded in tests.
"""
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Starts JAX's multi-process runtime (before any JAX computation); returns this process's index.

    With no arguments JAX detects the cluster (TPU VM slice, SLURM, Open MPI). Every process then sees all
    devices of all processes in `jax.devices()`, so make_mesh() spans the whole job.
    """
    # CPU processes exchange collectives over TCP with gloo (jax 0.10's default); should a release or the
    # user's config leave it unset, every cross-process collective on CPU would fail.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    if jax.process_count() > 1:
        watch_for_failures()
    return jax.process_index()


FAILED_KEY = "ssl_jax/failed"  # in the job's key-value store: which process failed, and why
WATCH_INTERVAL_S = 2.0
_COORDINATOR_LINGER_S = 3 * WATCH_INTERVAL_S  # process 0 ends this long after it learned of a failure
_LEAVING = threading.Event()  # set once this process failed and leaves the job (see leave_failed_job)
_PEER_FAILED = threading.Event()  # set once another process of the job failed (see watch_for_failures)


def another_process_failed():
    """Whether another process of the job failed: this one's own errors since are consequences of that."""
    return _PEER_FAILED.is_set()


def _client():
    """Returns the job's distributed runtime client (its key-value store), or None (one process)."""
    try:
        from jax._src import distributed  # pylint: disable=import-outside-toplevel  (no public accessor)
    except ImportError:
        return None
    return getattr(distributed.global_state, "client", None)


def watch_for_failures(interval_s=WATCH_INTERVAL_S):
    """Starts a thread that ends this process (exit status 1) once another process of the job has failed.

    The others are then waiting in a collective that the failed process never joins: without this they hang
    until the coordination service's heartbeat timeout (minutes) and abort with a stack dump, or forever
    while the failed process waits in JAX's shutdown barrier. See leave_failed_job.
    """
    client = _client()
    if client is None:
        return

    def watch():
        while True:
            time.sleep(interval_s)
            try:
                failed = client.key_value_try_get(FAILED_KEY)
            except Exception:  # pylint: disable=broad-except  (no such key yet; or the job has ended)
                continue
            if _LEAVING.is_set():  # this process failed and is telling the others: it exits with its own status
                return
            _PEER_FAILED.set()
            print(f"ssl-jax: stopping process {jax.process_index()}: {failed}", file=sys.stderr, flush=True)
            if jax.process_index() == 0:  # it runs the coordination service: leave last, or the others abort
                time.sleep(_COORDINATOR_LINGER_S)
            _exit_now(1)

    threading.Thread(target=watch, name="ssl_jax-failure-watch", daemon=True).start()


def leave_failed_job(message, code):
    """Ends this failed process of a job of several at once, after telling the other processes (their
    watch_for_failures thread ends them too). Never returns.

    A normal exit would wait in JAX's shutdown barrier for processes that are waiting in a collective for this
    one: the whole job would hang.
    """
    client = _client() if jax.process_count() > 1 else None  # alone (--distributed on one host): nobody to tell
    _LEAVING.set()
    if client is not None:
        try:
            client.key_value_set(FAILED_KEY, f"process {jax.process_index()} failed: {message}")
        except Exception:  # pylint: disable=broad-except  (another process failed first and said so)
            pass
        # The others read it before this process ends; the coordinator (process 0) ends after all of them.
        time.sleep(_COORDINATOR_LINGER_S if jax.process_index() == 0 else 1.5 * WATCH_INTERVAL_S)
    _exit_now(code)


def _exit_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access  (skips the shutdown barrier the others never reach)


def make_mesh(devices=None):
    """Returns a 1-D mesh over `devices` (default: all devices of all processes) with axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axis types: outside shard_map, plain global-batch code (evaluation, init) must not hit
    # ShardingTypeError, which the Explicit default of jax.make_mesh can raise.
    return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh):
    """Returns the sharding that replicates an array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh):
    """Returns the sharding that splits an array's leading (batch) axis over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch, mesh):
    """Raises ValueError unless the global batch splits evenly over devices and processes."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % n_dev:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the number of devices ({n_dev}); "
            f"use a multiple of {n_dev}, e.g. --config.batch_size={max(n_dev, global_batch // n_dev * n_dev)}")
    if global_batch % n_proc:
        raise ValueError(f"batch_size={global_batch} is not divisible by the process count ({n_proc})")


def put_replicated(tree, mesh):
    """Returns `tree` with every leaf replicated over `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def device_memory_bytes(device):
    """Returns the memory one accelerator has for arrays (memory_stats' bytes_limit), or None (CPU, unknown)."""
    try:
        stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def put_batch(tree, mesh):
    """Returns the global sharded arrays built from this process's slice of the batch (numpy leaves)."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_step(fn, mesh, *, n_replicated, n_sharded, donate=(0,)):
    """Returns jit(shard_map(fn)) whose first `n_replicated` args are P() and next `n_sharded` are P("data").

    All outputs are replicated: `fn` must reduce what it returns (pmean/psum) over DATA_AXIS.
    """
    in_specs = (P(),) * n_replicated + (P(DATA_AXIS),) * n_sharded
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())
    return jax.jit(mapped, donate_argnums=donate)


def any_process_vote(mesh):
    """Returns vote(flag) -> a replicated device scalar, nonzero when `flag` was true on any process.

    A collective: every process calls it at the same point of its loop, with its own flag. A job of several
    processes agrees this way on a stop that only some of them were told of (SIGTERM reaches hosts at different
    moments, or one host only); a process stopping on its own flag would leave the others waiting forever in the
    next step's collectives. The loop fetches the result one step later, with that step's metrics, so the vote
    adds no wait.
    """
    voted = jax.jit(jax.shard_map(lambda flags: lax.pmax(jnp.max(flags), DATA_AXIS), mesh=mesh,
                                  in_specs=P(DATA_AXIS), out_specs=P()))
    sharding, local = batch_sharded(mesh), len(mesh.local_devices)

    def vote(flag):
        return voted(jax.make_array_from_process_local_data(sharding, np.full((local,), int(bool(flag)), np.int32)))
    return vote


def axis_size(axis_name):
    """Returns the number of devices along `axis_name` (1 when unsharded)."""
    return 1 if axis_name is None else lax.axis_size(axis_name)


def axis_index(axis_name):
    """Returns this device's index along `axis_name` (0 when unsharded)."""
    return 0 if axis_name is None else lax.axis_index(axis_name)


def all_gather(x, axis_name):
    """Returns x concatenated over devices along the leading axis (x itself when unsharded).

    The transpose of a tiled all_gather is a reduce-scatter, so gradients flow back to the device that
    produced each row: this is what makes the cross-replica contrastive denominator train correctly.
    """
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)


def pmean(x, axis_name):
    """Returns the mean of x over devices (x itself when unsharded)."""
    return x if axis_name is None else lax.pmean(x, axis_name)


def psum(x, axis_name):
    """Returns the sum of x over devices (x itself when unsharded)."""
    return x if axis_name is None else lax.psum(x, axis_name)


def global_example_index(local_batch, axis_name):
    """Returns int32 [local_batch] global positions of this device's examples in the global batch."""
    return axis_index(axis_name) * local_batch + jnp.arange(local_batch, dtype=jnp.int32)


def example_keys(rng, local_batch, axis_name):
    """Returns [local_batch, 2] per-example keys: fold_in(rng, global index), independent of device count."""
    idx = global_example_index(local_batch, axis_name)
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, idx)


def all_gather_invariant(x, axis_name):
    """Returns x concatenated over devices, typed as identical on every device (for replicated state).

    Use it for values that become part of the replicated state (a MoCo/SwAV queue): a plain all_gather
    result is typed per-device and cannot leave shard_map with out_specs=P(). Not for gradients.
    """
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")
