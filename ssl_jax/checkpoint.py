"""Checkpoints with orbax: the whole train state (params, optimizer, BatchNorm stats, extras, step, rng).

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save never
leaves a half checkpoint that looks finished. The trainer only saves states whose loss, gradient norm and
parameter norm were checked finite, so a failing run never replaces the last good checkpoint.
"""
import os
import signal
import threading
import warnings

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir):
    """Returns the absolute directory holding a run's checkpoints."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def make_manager(workdir, max_to_keep=2, async_save=True):
    """Returns an orbax CheckpointManager for `workdir`/checkpoints keeping the newest `max_to_keep`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(manager):
    """Returns the newest finished checkpoint step, or None."""
    return manager.latest_step()


def save(manager, step, state, *, force=False):
    """Saves `state` at `step` (asynchronously when enabled); returns whether a save was started."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager, abstract_state, step=None):
    """Returns the state restored from `step` (default: the newest one that reads back) with the shardings
    of `abstract_state`.

    Without `step`, a checkpoint that fails to read (truncated or corrupt files) is skipped with a warning
    and the next older one is tried, so one damaged save does not lose the run.
    """
    if step is not None:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    errors = []
    for candidate in steps:
        try:
            return manager.restore(candidate, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
            errors.append(f"step {candidate}: {type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"checkpoint at step {candidate} in {manager.directory} could not be read "
                          f"({type(e).__name__}); trying the previous one", RuntimeWarning, stacklevel=2)
    raise RuntimeError(f"no checkpoint in {manager.directory} could be read:\n" + "\n".join(errors))


def abstract_like(state):
    """Returns ShapeDtypeStructs (with shardings) describing `state`, the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT, optionally) into a flag the training loop polls between steps.

    The loop then saves a checkpoint and exits cleanly instead of dying mid-step. orbax's own
    `reached_preemption` is consulted too; it only works after `jax.distributed.initialize()`.
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
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def requested(self, step):
        """Returns True once a stop was signalled (by a signal or by the platform's preemption notice)."""
        if self._flag.is_set():
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
