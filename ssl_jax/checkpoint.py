"""Checkpoints with orbax: the whole train state (params, optimizer, BatchNorm stats, extras, step, rng).

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never
leaves a half checkpoint that looks finished. A finished one damaged later (a bad disk, a truncated copy) is
skipped for the previous one with a warning, and the trainer moves it aside (restore_newest). The trainer only
saves states whose loss, gradient norm and parameter norm were checked finite, so a failing run never replaces
the last good checkpoint.
"""
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir):
    """Returns the absolute directory holding a run's checkpoints."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


# The managers make_manager opened to write: only a workdir's writer may set its damaged checkpoints aside.
_WRITERS = weakref.WeakSet()


def make_manager(workdir, max_to_keep=2, async_save=True, read_only=False):
    """Returns an orbax CheckpointManager for `workdir`/checkpoints keeping the newest `max_to_keep`.

    `read_only`: for readers (evaluation) of a run that may still be training: it never saves or deletes.
    A writer first removes the unfinished step directories (`<step>.orbax-checkpoint-tmp-*`) that a process killed
    mid-save left behind; each is the size of a checkpoint, and a step the run never reaches again would keep
    its own forever. Only the one writer of a workdir (the trainer holds its lock) may do that.
    """
    if read_only:
        options = read_only_options()
    else:
        if jax.process_index() == 0:
            remove_unfinished(checkpoint_dir(workdir))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                    item_handlers=ocp.StandardCheckpointHandler())  # item_metadata reads shapes
    if not read_only:
        _WRITERS.add(manager)
    return manager


class _DropReadOnlyNotice(logging.Filter):
    """Drops orbax's "Given directory is read only" warning: a read-only manager is what a reader asks for."""

    def filter(self, record):
        return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_FILTER = _DropReadOnlyNotice()


def read_only_options():
    """Returns CheckpointManagerOptions for a manager that never saves or deletes (a reader of a run that may
    still be training), set so that orbax has nothing to warn about."""
    logger = logging.getLogger("absl")
    if _READ_ONLY_FILTER not in logger.filters:
        logger.addFilter(_READ_ONLY_FILTER)
    return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
                                        enable_async_checkpointing=False)


def latest_step(manager):
    """Returns the newest finished checkpoint step, or None."""
    return manager.latest_step()


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, quota, permissions); the finished checkpoints are intact."""


class CheckpointReadError(RuntimeError):
    """No finished checkpoint of a run could be read back (every one damaged)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds other arrays (names, shapes or dtypes) than the state of the config restoring it:
    it was written by another model, method or head, so it cannot be resumed or evaluated with this config."""


def _leaves(tree):
    """Returns {dotted path: (shape, dtype)} of a tree of arrays, ShapeDtypeStructs or orbax array metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = (
            None if shape is None else tuple(shape), None if dtype is None else str(dtype))
    return out


def mismatch(saved, expected, limit=3):
    """Returns how the arrays of `saved` differ from those of `expected` (missing, unexpected, other shape or
    dtype), naming up to `limit` of each kind, or None when they match."""
    have, want = _leaves(saved), _leaves(expected)

    def listed(kind, keys, fmt=str):
        keys = sorted(keys)
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"{len(keys)} {kind} ({', '.join(fmt(k) for k in keys[:limit])}{more})"

    parts = []
    if set(want) - set(have):
        parts.append(listed("arrays this config has and the checkpoint lacks", set(want) - set(have)))
    if set(have) - set(want):
        parts.append(listed("arrays of the checkpoint this config lacks", set(have) - set(want)))
    differ = [k for k in set(have) & set(want) if None not in have[k] and None not in want[k] and have[k] != want[k]]
    if differ:
        show = lambda k: f"{k}: {have[k][0]} {have[k][1]} saved, {want[k][0]} {want[k][1]} here"  # noqa: E731
        parts.append(listed("arrays of another shape or dtype", differ, show))
    return "; ".join(parts) or None


def finished_steps(directory):
    """Returns the sorted steps of the finished checkpoints in `directory` (orbax renames a step's
    temporary directory to the bare step number only once every file of it is written)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _save_failed(manager, step, error):
    kept = finished_steps(str(manager.directory))
    newest = f"step {kept[-1]}" if kept else "none"
    which = "" if step is None else f" of step {step}"
    return CheckpointSaveError(
        f"saving the checkpoint{which} in {manager.directory} failed ({type(error).__name__}: "
        f"{str(error)[:300]}). The checkpoints already written are intact (newest: {newest}); fix the cause "
        f"(a full disk, the folder's permissions or quota) and run the same command again to resume from it")


def save(manager, step, state, *, force=False):
    """Saves `state` at `step` (asynchronously when enabled); returns whether a save was started.

    Raises CheckpointSaveError when this save, or the previous asynchronous one, fails to write. A failed
    save never touches finished checkpoints: orbax writes into a temporary directory and renames it last,
    and deletes old checkpoints (max_to_keep) only after a save has finished.
    """
    wait(manager)  # the previous save first (orbax would wait for it too): its failure names its own step
    try:
        return manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise ValueError, OSError, ...)
        raise _save_failed(manager, step, e) from e


def wait(manager):
    """Waits for the pending asynchronous save; raises CheckpointSaveError if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
        raise _save_failed(manager, _unfinished_step(manager), e) from e


def _unfinished(directory):
    """Returns the sorted (step, folder name) of the unfinished saves in `directory` (orbax's
    `<step>.orbax-checkpoint-tmp-<time>` folders, renamed to `<step>` once complete; a step may have several)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted((int(n.split(".", 1)[0]), n) for n in names
                  if ".orbax-checkpoint-tmp" in n and n.split(".", 1)[0].isdigit())


def _unfinished_step(manager):
    """Returns the step of the newest unfinished save, or None."""
    return max((step for step, _ in _unfinished(str(manager.directory))), default=None)


def remove_unfinished(directory):
    """Deletes the unfinished saves in `directory`, saying so on stderr. Only a workdir's one writer may call
    this: a save in progress looks the same."""
    for step, name in _unfinished(directory):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        print(f"removed {name}, the unfinished save of step {step} of a process that stopped mid-save",
              file=sys.stderr)


def restore(manager, abstract_state, step=None):
    """Returns the state restored from `step` (default: the newest one that reads back) with the shardings
    of `abstract_state`.

    Without `step`, a checkpoint that fails to read (truncated or corrupt files) is skipped with a warning
    and the next older one is tried, so one damaged save does not lose the run (restore_newest). A checkpoint
    whose arrays differ from `abstract_state` (another model, method or head) raises CheckpointMismatchError at
    once: that is not damage, and the older checkpoints of the same run differ in the same way.
    """
    if step is not None:
        _check_matches(manager, step, abstract_state, required=False)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def read(candidate):
        _check_matches(manager, candidate, abstract_state)
        return manager.restore(candidate, args=ocp.args.StandardRestore(abstract_state))

    return restore_newest(manager, read)[1]


def restore_newest(manager, read):
    """Returns (step, read(step)) for the newest checkpoint of `manager` that `read` reads back.

    A checkpoint that fails to read is skipped with a warning and the next older one tried; none readable raises
    CheckpointReadError naming the directory and each step's error. CheckpointMismatchError is raised at once.
    A writer (make_manager without read_only) then sets the damaged newer ones aside (set_aside): orbax refuses
    to save a step that exists, so the resumed run would otherwise fail on reaching that step, every time.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    skipped, errors, tried = [], [], set()
    while steps:
        candidate = steps.pop(0)
        tried.add(candidate)
        try:
            result = read(candidate)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
            skipped.append(candidate)
            if not os.path.isdir(os.path.join(str(manager.directory), str(candidate))):
                # Deleted while we read it: the run is still training (it keeps only the newest few) and has
                # saved newer ones since; or, for a writer of several processes, process 0 set it aside (this
                # process then joins set_aside all the same). Not damage: list the checkpoints again.
                manager.reload()
                steps = sorted((s for s in manager.all_steps() if s not in tried), reverse=True)
                continue
            errors.append(f"step {candidate}: {type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"checkpoint at step {candidate} in {manager.directory} could not be read "
                          f"({type(e).__name__}); trying the previous one", RuntimeWarning, stacklevel=3)
            continue
        if skipped and manager in _WRITERS:
            set_aside(manager, skipped)
        return candidate, result
    if not errors:
        raise FileNotFoundError(f"no checkpoint in {manager.directory} (each was deleted while being read)")
    raise CheckpointReadError(f"no checkpoint in {manager.directory} could be read:\n" + "\n".join(errors))


def set_aside(manager, steps):
    """Renames the damaged checkpoints `steps` to `<step>.damaged-<time>`, which no manager lists, and says so.

    Kept rather than deleted: a read can fail for a reason that passes (an unmounted or flaky disk). A collective
    in a job of several processes: process 0 renames, then every process lists the checkpoints again.
    """
    directory = str(manager.directory)
    if jax.process_index() == 0:
        stamp = int(time.time())
        for step in steps:
            if not os.path.isdir(os.path.join(directory, str(step))):
                continue
            moved = os.path.join(directory, f"{step}.damaged-{stamp}")
            os.rename(os.path.join(directory, str(step)), moved)
            warnings.warn(f"moved the unreadable checkpoint of step {step} to {moved}, so that this run can save "
                          f"step {step} again; delete it once you no longer need it", RuntimeWarning, stacklevel=4)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("ssl_jax.checkpoint.set_aside")
    manager.reload()


def _check_matches(manager, step, abstract_state, required=True):
    """Raises CheckpointMismatchError when checkpoint `step`'s arrays differ from `abstract_state`'s.

    Unreadable metadata raises its own error when `required` (the caller then treats the step as damaged);
    otherwise the check is skipped and the restore itself reports the damage.
    """
    try:
        meta = manager.item_metadata(step)
        saved = getattr(meta, "tree", meta)
    except Exception:  # pylint: disable=broad-except  (damaged metadata: orbax/tensorstore raise many kinds)
        if required:
            raise
        return
    if saved is None:  # no metadata written (orbax writes it for every StandardSave): leave it to the restore
        return
    difference = mismatch(saved, abstract_state)
    if difference:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {manager.directory} does not fit this config's state: {difference}")


def abstract_like(state):
    """Returns ShapeDtypeStructs (with shardings) describing `state`, the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT, optionally) into a flag the training loop polls between steps.

    The loop then saves a checkpoint and exits cleanly instead of dying mid-step. orbax's own
    `reached_preemption` is consulted too; it only works after `jax.distributed.initialize()`.
    A second SIGINT (Ctrl-C pressed again while the step, an evaluation or the save runs) raises
    KeyboardInterrupt at once, without waiting for the save.
    """

    def __init__(self, manager=None, signals=(signal.SIGTERM,)):
        self._manager = manager
        self._flag = threading.Event()
        self._previous = {}
        self.signal_name = None
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._flag.set()
        if signum == signal.SIGINT:
            try:
                print("\ninterrupted: a checkpoint is saved after this step, then the run stops (Ctrl-C again stops "
                      "at once, without saving)", file=sys.stderr, flush=True)
            except (OSError, ValueError):  # stderr gone (Ctrl-C killed the `tee` it went to): raised here, the
                pass  # error would surface wherever the step was, and the run stop without saving

    @property
    def signalled(self):
        """Whether this process received one of the signals."""
        return self._flag.is_set()

    def requested(self, step, agreed=None):
        """Returns True once a stop was signalled (by a signal or by the platform's preemption notice).

        `agreed`: in a job of several processes, whether any of them was signalled, as they agreed on it
        (parallel.any_process_vote); it replaces this process's own flag, so that every process stops at the
        same step.
        """
        if self._flag.is_set() if agreed is None else agreed:
            return True
        if self._manager is not None and jax.process_count() > 1:
            try:
                return bool(self._manager.reached_preemption(step))
            except Exception:  # pylint: disable=broad-except  (no preemption service: single host)
                return False
        return False

    def restore_handlers(self):
        """Puts back the signal handlers that were installed before this guard."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
