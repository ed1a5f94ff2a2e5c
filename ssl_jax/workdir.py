"""A run's directory: its lock, its checks, and what a resume may change (used by ssl_jax.train and the CLI)."""
import contextlib
import fcntl
import json
import os
import socket
import sys
import time

import jax
import numpy as np

from ssl_jax import checkpoint, config as config_lib


def describe(changes, limit=8):
    """Returns 'key: old -> new, ...' for (key, old, new) triples, the first `limit` of them."""
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def mismatch_hint(workdir, changes):
    """Returns what to do about a checkpoint whose arrays do not fit the config, naming the keys that differ."""
    if not changes:  # same config (or none recorded): the state's layout changed between ssl_jax versions
        return (f"{workdir}/config.json does not differ from this config (or is missing), so the checkpoint was "
                f"probably written by another version of ssl_jax; evaluate or export it with that version, or give "
                f"a new --workdir")
    return (f"{workdir} holds a checkpoint of another run. Its config.json differs from this config in: "
            f"{describe(changes)}. To resume it, run `ssl-jax train --workdir {workdir}` without --config (its own "
            f"config.json; overrides such as --config.num_epochs still apply), or give a new --workdir")


def resume_changes(workdir, config):
    """Returns the (key, old, new) differences between DIR/config.json and `config` for a resume.

    Raises CheckpointMismatchError when the method differs (a checkpoint of one method is never resumed as
    another, even where their arrays happen to have the same shapes) or the batch size does (the step counts
    batches). Other changes (a longer `num_epochs`, another evaluation interval or data path) are allowed; the
    caller reports them. Changes that alter the state's arrays (model, head, queue size) fail in the restore,
    whose error then names these differences.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:  # damaged (older versions wrote it in place): the restore still checks the arrays
        print(f"warning: {path} cannot be read ({e}); it is written anew", file=sys.stderr)
        return []
    changes = config_lib.differences(saved, config)
    if saved.get("method") != config.method:
        raise checkpoint.CheckpointMismatchError(
            f"{workdir} holds a checkpoint of a {saved.get('method')} run and this config trains {config.method}; "
            f"to resume it, run `ssl-jax train --workdir {workdir}` without --config (its own config.json), or give "
            f"a new --workdir")
    if saved.get("batch_size", config.batch_size) != config.batch_size:
        # The checkpoint's step counts batches of the saved size: the data order, the epoch and the learning-rate
        # schedule (whose count lives in the optimizer state) would all resume at another point of the run.
        raise checkpoint.CheckpointMismatchError(
            f"{workdir} holds a checkpoint of a run with batch_size={saved['batch_size']}, whose step counts batches "
            f"of that size; resuming it with batch_size={config.batch_size} would repeat or skip data and move the "
            f"learning-rate schedule. Resume with --config.batch_size={saved['batch_size']} (to save memory, "
            f"--config.grad_accum_steps splits each batch), or give a new --workdir")
    return changes


def check_resume_devices(workdir, config, num_devices):
    """Raises ValueError when `workdir` holds a checkpoint and config.batch_size does not split over `num_devices`.

    Checked before the mesh is built: its own error would suggest another batch_size, which resume_changes then
    refuses (the step counts batches of the saved size). Here the device count is what can change.
    """
    b = config.batch_size
    if b % num_devices == 0 or not checkpoint.finished_steps(checkpoint.checkpoint_dir(workdir)):
        return
    fits = max(d for d in range(1, num_devices + 1) if b % d == 0)
    raise ValueError(f"batch_size={b} is not divisible by the number of devices ({num_devices}), and {workdir} holds "
                     f"a checkpoint whose step counts batches of {b}, so resuming keeps it: resume on a number of "
                     f"devices that divides {b} (e.g. {fits}: CUDA_VISIBLE_DEVICES, or --cpu-devices on CPU), or give "
                     f"a new --workdir to train with another batch_size")


class WorkdirNotSharedError(ValueError):
    """The processes of a job see different checkpoints in the workdir: it is not one shared folder."""


def check_shared(workdir, start):
    """Raises WorkdirNotSharedError on every process of a job whose processes see different newest checkpoints
    (`start`: this process's, or None) in `workdir`.

    A workdir on each host's local disk has the checkpoints only where process 0 wrote them: the others would
    start from step 0 with other parameters while process 0 resumes, and train garbage until the shorter loop
    ends and the job hangs. A collective: every process calls it at the same point.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    steps = [int(s) for s in np.asarray(multihost_utils.process_allgather(np.int64(-1 if start is None else start)))]
    if len(set(steps)) > 1:
        seen = ", ".join(f"process {i} {'step ' + str(s) if s >= 0 else 'none'}" for i, s in enumerate(steps))
        raise WorkdirNotSharedError(
            f"the processes of this job see different checkpoints in {workdir} ({seen}): the workdir must be one "
            f"folder that every host mounts at the same path (NFS, Filestore, a mounted bucket), not a local "
            f"folder on each host; see launch/README.md. On a shared filesystem that is slow to show new files, "
            f"start again in a minute")


class WorkdirLockedError(ValueError):
    """Another process is training in the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir, enabled=True):
    """Holds an exclusive lock on DIR/.lock (flock: released when the process dies, so never stale).

    Raises WorkdirLockedError when another process holds it: two runs writing one workdir's checkpoints and
    metrics would corrupt each other. Only process 0 of a job locks (a shared workdir has one writer). A
    filesystem without locks (some network mounts) gets a warning and no lock.
    """
    if not enabled:
        yield
        return
    path = os.path.join(workdir, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkdirLockedError(f"the workdir {workdir} is in use by another training run ({holder}); wait for "
                                     f"it to end, stop it (SIGTERM saves a checkpoint), or give another --workdir"
                                     ) from e
        except OSError as e:
            print(f"warning: cannot lock {path} ({e.strerror or e}); make sure no other run uses this workdir",
                  file=sys.stderr)
            yield
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_workdir(workdir):
    """Raises ValueError when `workdir` exists and is not a directory, or is a URL (gs://...)."""
    if "://" in workdir:  # os.makedirs would create a local folder named "gs:", and TensorBoard crash in it
        raise ValueError(f"the workdir {workdir} is a URL; runs are written through the local filesystem, so use a "
                         f"local or mounted folder (launch/tpu_vm.sh's SYNC_TO={workdir} copies a run to a bucket)")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"the workdir {workdir} is a file, not a directory")
