"""The one training loop for every method: `train(config, workdir)`.

Read top to bottom: mesh, input, method and state, the sharded update step, checkpoint, evaluation, loop.
The trainer never branches on the method's name: it calls the contract in ssl_jax/methods/simclr.py.
"""
import dataclasses
import importlib
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import accumulate, checkpoint, config as config_lib, losses, metrics as metrics_lib, monitors, optim
from ssl_jax import data as data_lib, parallel, workdir as workdir_lib
from ssl_jax.data import pipeline
from ssl_jax.models import LinearClassifier

AXIS = parallel.DATA_AXIS


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss, gradient or parameter norm."""


def get_method(config):
    """Returns the method module named by config.method (ssl_jax.methods.<name>)."""
    try:
        return importlib.import_module(f"ssl_jax.methods.{config.method}")
    except ModuleNotFoundError as e:
        if e.name != f"ssl_jax.methods.{config.method}":
            raise
        raise config_lib.ConfigError(f"unknown method {config.method!r}: no module ssl_jax/methods/{config.method}.py")


@dataclasses.dataclass(eq=False)  # hashable by identity: evaluators cache their jitted functions per Setup
class Setup:
    """Everything derived from a config that the loop, the benchmark and the evaluators share."""
    config: object
    method: object
    mesh: object
    train_source: object
    steps_per_epoch: int
    total_steps: int
    tx: object
    schedule: object
    init_fn: object      # rng -> replicated train state
    step_fn: object      # (state, dataset, batch) -> (state, metrics), jitted and sharded
    dataset: object      # resident uint8 images on every device, or a placeholder
    views_step_fn: object  # (state, views, labels) -> (state, metrics): the step on ready views (benchmarks)


# ----------------------------------------------------------------------------------------------
# Setup: mesh, input, method, optimizer, state, update step.
# ----------------------------------------------------------------------------------------------
def build(config, train_source=None, devices=None):
    """Returns the Setup for `config`: mesh (over `devices`, default all), data source, optimizer, step."""
    config_lib.validate(config)  # configs built in Python, not only those load_config read
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(config.batch_size, mesh)
    method = get_method(config)
    source = train_source if train_source is not None else data_lib.get_source(config.data, "train")
    steps_per_epoch = len(source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training set ({len(source)} images)")
    total_steps = config.num_epochs * steps_per_epoch
    tx, schedule = optim.make_optimizer(config.optim, config.batch_size, steps_per_epoch, config.num_epochs)
    num_classes = max(source.num_classes, 1)
    sample = np.asarray(source.images[:1])
    probe = LinearClassifier(num_classes)

    def init_fn(rng):
        k_model, k_probe, k_state = jax.random.split(rng, 3)
        params, batch_stats, extras = method.init(k_model, config, sample)
        feat = jnp.zeros((1, method.feature_dim(config)), jnp.float32)
        all_params = {"model": params, "probe": probe.init(k_probe, feat)["params"]}
        return {"step": jnp.zeros((), jnp.int32), "params": all_params, "batch_stats": batch_stats,
                "opt_state": tx.init(all_params), "extras": extras, "rng": k_state}

    init_jit = jax.jit(init_fn, out_shardings=parallel.replicated(mesh))

    chunks = config.get("grad_accum_steps", 1)
    accumulate.check_chunks(method, config.batch_size // mesh.devices.size, chunks)

    def model_value_and_grad(state, inputs, keys, make_views, rng, progress):
        """Returns ((loss, (stats, metrics, aux)), grads) of the method's loss w.r.t. the model params."""
        if chunks > 1:
            return accumulate.value_and_grad(method, state["params"]["model"], state["batch_stats"],
                                             state["extras"], inputs, keys, make_views, rng, progress,
                                             config=config, axis_name=AXIS, chunks=chunks)
        views = make_views(keys, inputs)
        # The loss is already the pmean over devices, so the gradient w.r.t. the replicated params is the
        # exact global gradient (vma-typed shard_map sums the per-device cotangents); no extra pmean.
        return jax.value_and_grad(
            lambda p: method.loss(p, state["batch_stats"], state["extras"], views, rng, progress, config=config,
                                  axis_name=AXIS), has_aux=True)(state["params"]["model"])

    def probe_loss_fn(probe_params, features, labels):
        """Online linear probe on stop-gradient features: representation quality, live."""
        logits = probe.apply({"params": probe_params}, jax.lax.stop_gradient(features))
        probe_acc = parallel.pmean(jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)), AXIS)
        return losses.softmax_cross_entropy(logits, labels, AXIS), probe_acc

    def update(state, inputs, labels, make_views):
        """Returns (new state, metrics) of one optimizer step on this device's inputs (images or views)."""
        progress = {"step": state["step"], "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        rng = jax.random.fold_in(state["rng"], state["step"])
        aug_rng, loss_rng = jax.random.split(rng)
        keys = parallel.example_keys(aug_rng, labels.shape[0], AXIS)
        (value, (stats, m, aux)), model_grads = model_value_and_grad(state, inputs, keys, make_views, loss_rng,
                                                                     progress)
        (probe_loss, probe_acc), probe_grads = jax.value_and_grad(probe_loss_fn, has_aux=True)(
            state["params"]["probe"], aux["features"], labels)
        grads = {"model": model_grads, "probe": probe_grads}
        if not config.model.sync_bn:  # unsynchronized BatchNorm: average the running statistics once per step
            stats = jax.tree.map(lambda x: parallel.pmean(x, AXIS), stats)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if hasattr(method, "project_params"):  # optional: constrain weights after the update (SwAV's prototypes)
            params = {**params, "model": method.project_params(params["model"], progress, config)}
        extras = method.update_extras(params["model"], state["extras"], aux, progress, config)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": stats, "opt_state": opt_state,
                     "extras": extras, "rng": state["rng"]}
        out = {"loss": value, "probe_loss": probe_loss, "probe_top1": probe_acc, "lr": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads["model"]), "probe_grad_norm": optax.tree.norm(grads["probe"]),
               "param_norm": optax.tree.norm(params["model"]),
               **logged_only(state["step"], monitors.collapse_metrics, jax.lax.stop_gradient(aux["embeddings"])),
               **m}
        return new_state, out

    def step(state, dataset, batch):
        images = dataset[batch["index"]] if config.data.resident else batch["image"]
        return update(state, images, batch["label"], lambda keys, x: method.views(keys, x, config))

    def views_step(state, views, labels):
        return update(state, views, labels, lambda keys, v: v)

    def logged_only(step, fn, *args):
        """Returns fn(*args, AXIS) on steps whose metrics are logged and zeros otherwise (saves an eigh)."""
        done = step + 1
        logged = jnp.logical_or(done % config.log_every_steps == 0, done == total_steps)
        shapes = jax.eval_shape(lambda *a: fn(*a, AXIS), *args)
        zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        return jax.lax.cond(logged, lambda *a: fn(*a, AXIS), zeros, *args)

    step_fn = parallel.shard_step(step, mesh, n_replicated=2, n_sharded=1, donate=(0,))
    views_step_fn = parallel.shard_step(views_step, mesh, n_replicated=1, n_sharded=2, donate=(0,))
    if config.data.resident:
        check_resident_fits(source, mesh)
        dataset = parallel.put_replicated(np.asarray(source.images), mesh)
    else:
        dataset = parallel.put_replicated(np.zeros((1,), np.uint8), mesh)
    return Setup(config, method, mesh, source, steps_per_epoch, total_steps, tx, schedule, init_jit, step_fn,
                 dataset, views_step_fn)


RESIDENT_FRACTION = 0.5  # of one device's memory, at most, for a resident train set (the model needs the rest)


def check_resident_fits(source, mesh):
    """Raises ConfigError when data.resident's copy of the train set on every device would take more than
    RESIDENT_FRACTION of a device's memory (known on GPUs and TPUs), instead of an out-of-memory error from
    XLA after the whole set was read into host memory."""
    needed = int(np.prod(source.images.shape)) * np.dtype(np.uint8).itemsize
    limit = parallel.device_memory_bytes(mesh.devices.flat[0])
    if limit and needed > RESIDENT_FRACTION * limit:
        raise config_lib.ConfigError(
            f"data.resident=true keeps the whole train set on every device: {len(source)} images of "
            f"{'x'.join(map(str, source.images.shape[1:]))} are {needed / 2**30:.1f} GiB, more than "
            f"{RESIDENT_FRACTION:.0%} of a device's {limit / 2**30:.1f} GiB; set --config.data.resident=false "
            f"(the host pipeline feeds the batches) or a smaller data.image_size")


def initial_state(setup):
    """Returns a freshly initialized, replicated train state."""
    return setup.init_fn(jax.random.PRNGKey(setup.config.seed))


def loader(setup, start_step):
    """Returns the host loader that yields this process's part of each global batch from `start_step`."""
    return pipeline.HostLoader(setup.train_source, setup.config.batch_size, setup.config.seed, start_step,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               resident=setup.config.data.resident)


def check_finite(step, record):
    """Raises NonFiniteLossError naming the step when loss, gradient or parameter norm is not finite."""
    bad = [k for k in ("loss", "grad_norm", "param_norm", "probe_grad_norm") if not np.isfinite(record[k])]
    if bad:
        values = ", ".join(f"{k}={record[k]}" for k in bad)
        raise NonFiniteLossError(
            f"non-finite {values} at step {step}; stopping. The last good checkpoint is kept "
            f"(try a lower --config.optim.lr or --config.model.dtype=float32)")


def check_train_size(workdir, setup, start):
    """Warns when the training set has another size than at the run's previous start (images added to or
    removed from its folder, a copy that was incomplete): the step counts batches, so the epoch, the checkpoint
    and evaluation intervals and the learning-rate schedule all move to the new size from step `start` on."""
    before = int(metrics_lib.last_value(os.path.join(workdir, "runs.jsonl"), "train_examples", 0))
    now = len(setup.train_source)
    if before and before != now:
        spe_before = before // setup.config.batch_size
        print(f"warning: the training set has {now} images; when this run last started it had {before}. An "
              f"epoch is now {setup.steps_per_epoch} steps (was {spe_before}), so the resumed step {start} is "
              f"epoch {start / setup.steps_per_epoch:.2f} (was {start / max(spe_before, 1):.2f}), and the "
              f"learning-rate schedule and the checkpoint and evaluation intervals follow the new size. If the "
              f"data is incomplete, stop (Ctrl-C saves) and fix it", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
def train(config, workdir, *, progress=True, evaluate_fn=None, command=None, devices=None):
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final state.

    `command` (the command line that started this run, if any) is recorded in DIR/runs.jsonl, where
    `ssl-jax report` finds it. `devices`: the mesh's devices (default all). A checkpoint written on another
    number of devices resumes here: the state is replicated and the data order and augmentation keys are those
    of the global batch. SIGTERM saves a checkpoint after the current step and returns; SIGINT (Ctrl-C) saves
    one too, then raises KeyboardInterrupt (a second SIGINT raises it at once).
    """
    from ssl_jax.evaluators import protocols  # pylint: disable=import-outside-toplevel
    evaluate_fn = evaluate_fn or protocols.monitor
    is_main = jax.process_index() == 0
    workdir_lib.check_workdir(workdir)  # before the data is loaded: a bad --workdir fails at once
    config = config_lib.with_absolute_paths(config)  # config.json records where the data is, whatever the cwd
    workdir_lib.check_resume_devices(workdir, config, len(devices) if devices is not None else jax.device_count())
    setup = build(config, devices=devices)
    if config.eval.knn_every_epochs and evaluate_fn is protocols.monitor:
        try:  # the test split now (it is loaded once a process), not after the first epoch of training
            protocols.eval_source(config, "test")
        except data_lib.DataError as e:
            raise data_lib.DataError(f"{e}; the kNN monitor (eval.knn_every_epochs={config.eval.knn_every_epochs}) "
                                     "evaluates on it: add the split, or train without the monitor with "
                                     "--config.eval.knn_every_epochs=0") from e
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e

    # A second run in the same workdir fails here, before anything is written.
    with workdir_lib.workdir_lock(workdir, enabled=is_main):
        return _train_in(workdir, setup, evaluate_fn, progress, command)


def _train_in(workdir, setup, evaluate_fn, progress, command):
    """The body of `train` once the workdir exists and is locked: resume, loop, checkpoints, metrics."""
    config, is_main = setup.config, jax.process_index() == 0
    # Checkpoint: resume from the newest one if there is one. DIR/config.json is (re)written only once the
    # checkpoint has been restored: a resume with another model or method fails and leaves the run's record
    # (which `ssl-jax eval` and `export` read) as it was.
    manager = checkpoint.make_manager(workdir, max_to_keep=config.checkpoint.keep)
    state = initial_state(setup)
    start = checkpoint.latest_step(manager)
    changes = []
    try:
        workdir_lib.check_shared(workdir, start)  # several processes: the same checkpoints everywhere
        if start is not None:
            changes = workdir_lib.resume_changes(workdir, config)  # another method: CheckpointMismatchError
            try:
                state = checkpoint.restore(manager, checkpoint.abstract_like(state))
            except checkpoint.CheckpointMismatchError as e:  # another model or head: name the config keys
                raise checkpoint.CheckpointMismatchError(f"{e}. {workdir_lib.mismatch_hint(workdir, changes)}") from e
    except BaseException:
        manager.close()
        raise
    if start is not None:
        start = int(state["step"])
        print(f"resuming from the checkpoint at step {start} in {checkpoint.checkpoint_dir(workdir)}",
              file=sys.stderr)
        if changes:
            print("the config differs from the run's config.json in: " + workdir_lib.describe(changes), file=sys.stderr)
        check_train_size(workdir, setup, start)
    start = start or 0
    if start >= setup.total_steps:
        print(f"nothing to do: step {start} >= {setup.total_steps} steps of {config.num_epochs} epochs",
              file=sys.stderr)
        manager.close()
        return state
    if is_main:  # written whole, then renamed: a crash never leaves half a config.json
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(path + ".tmp", path)

    elapsed_before = metrics_lib.last_value(os.path.join(workdir, "metrics.jsonl"), "elapsed_s") if start else 0.0
    run_start = time.perf_counter()
    if is_main:
        metrics_lib.append_run_info(workdir, start_step=start, devices=setup.mesh.devices.size,
                                    device_kind=jax.devices()[0].device_kind, processes=jax.process_count(),
                                    jax_version=jax.__version__, train_examples=len(setup.train_source),
                                    steps_per_epoch=setup.steps_per_epoch, **({"command": command} if command else {}),
                                    **({"config_changes": {k: [a, b] for k, a, b in changes}} if changes else {}))
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    guard = checkpoint.PreemptionGuard(manager, signals=(signal.SIGTERM, signal.SIGINT))  # Ctrl-C saves too
    batches = loader(setup, start)
    bar = metrics_lib.progress_bar(setup.total_steps, start, desc=config.method, enabled=progress and is_main)
    spe, every = setup.steps_per_epoch, config.log_every_steps
    ckpt_every = config.checkpoint.every_epochs * spe
    knn_every = config.eval.knn_every_epochs * spe
    pending = None  # (step, device metrics, stop vote) of the previous step, fetched one step late
    timer = (time.perf_counter(), start)
    # Several processes stop together: each votes its own flag every step, and all act on the fetched result.
    vote = parallel.any_process_vote(setup.mesh) if jax.process_count() > 1 else None
    agreed = False
    # The collapse warning: once per collapse (again only after the monitor saw the embeddings spread), and not in
    # the first epoch, where an untrained network's embeddings are not spread yet (MoCo v2's start at about 0.05
    # of the isotropic standard deviation, with a queue of random keys): `collapsed` is logged all the same.
    warned = False

    def drain():
        """Fetches the pending step's metrics, checks them, and logs every `every` steps."""
        nonlocal pending, timer, agreed, warned
        if pending is None:
            return
        step, device_metrics, ballot = pending
        pending = None
        record = jax.device_get(device_metrics)
        agreed = agreed or (ballot is not None and bool(jax.device_get(ballot)))
        check_finite(step, record)
        done = step + 1
        if done % every == 0 or done == setup.total_steps:
            now = time.perf_counter()
            record["img_per_s"] = (done - timer[1]) * config.batch_size / max(now - timer[0], 1e-9)
            timer = (now, done)
            record["epoch"] = done / spe
            record["elapsed_s"] = elapsed_before + now - run_start  # wall time of training, over all resumes
            writer.write(done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if record.get("collapsed") and done > spe and not warned:
                bar.write(f"warning: representation collapse at step {done} (embedding_std_ratio="
                          f"{record['embedding_std_ratio']:.3g}, effective_rank={record['effective_rank']:.3g}; "
                          f"metrics.jsonl's `collapsed` says when it ends)", file=sys.stderr)
            warned = bool(record.get("collapsed")) and (warned or done > spe)
        if step == start:  # img_per_s from here on leaves out the first step's compilation
            timer = (time.perf_counter(), done)

    try:
        for step in range(start, setup.total_steps):
            batch = parallel.put_batch(next(batches), setup.mesh)
            state, device_metrics = setup.step_fn(state, setup.dataset, batch)
            ballot = vote(guard.signalled) if vote else None
            drain()  # the previous step's metrics; the device is already busy with this one
            pending = (step, device_metrics, ballot)
            bar.update(1)
            done = step + 1
            stop = guard.requested(done, agreed if vote else None)
            if done % ckpt_every == 0 or done == setup.total_steps or stop:
                drain()  # a checkpoint is written only after its step was checked finite
                checkpoint.save(manager, done, state, force=True)
                timer = (time.perf_counter(), done)  # img_per_s: training steps only, not the save
            if knn_every and (done % knn_every == 0 or done == setup.total_steps):
                drain()
                result = evaluate_fn(setup, state)
                timer = (time.perf_counter(), done)  # ...nor the evaluation
                writer.write(done, {"epoch": done / spe, **result})
                summary = json.dumps({k: round(v, 4) for k, v in result.items()})
                if is_main:  # tqdm.write prints even where the bar is disabled
                    bar.write(f"step {done} (epoch {done / spe:g}): {summary}", file=sys.stderr)
            if stop:
                reason = guard.signal_name or ("a signal to another process" if agreed else "preemption")
                bar.write(f"stop requested ({reason}): saved step {done}, exiting", file=sys.stderr)
                break
        drain()
    finally:
        bar.close()
        batches.close()
        try:
            checkpoint.wait(manager)  # an asynchronous save that failed raises here
        finally:
            manager.close()
            writer.close()
            guard.restore_handlers()
    if guard.signal_name == "SIGINT":  # saved; now stop as an interrupt does (the CLI exits with status 130)
        raise KeyboardInterrupt
    return state
