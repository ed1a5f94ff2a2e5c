"""Where a run's numbers go: DIR/metrics.jsonl (one JSON object per record), TensorBoard, a progress bar."""
import json
import math
import os
import sys
import time

import numpy as np


def _plain(value):
    """Returns a JSON-friendly Python scalar for numpy/jax scalars; text (a command line) stays text."""
    if isinstance(value, str):
        return value
    value = np.asarray(value)
    if value.dtype.kind in "iu":
        return int(value)
    if value.dtype.kind == "b":
        return bool(value)
    out = float(value)
    return out if math.isfinite(out) else str(out)


class MetricsWriteError(RuntimeError):
    """metrics.jsonl could not be written (disk full, quota, permissions)."""


class MetricWriter:
    """Appends records to metrics.jsonl and TensorBoard; only process 0 writes.

    One record per step and key. A run resumed from a checkpoint older than its last logged step (killed between
    checkpoints) logs those steps again: when the first record this writer writes (other than an `ssl-jax eval`
    record, which names its `protocol`) is at a step that training records already in metrics.jsonl reach, those
    records, of that step and later, are removed from metrics.jsonl (with a note on stderr), and the new event file
    starts with tensorboardX's purge marker (`purge_step`), which makes TensorBoard hide the earlier events of that
    step and later. In TensorBoard, a key logged twice at one step (the `epoch` of a training record and of the
    evaluation at the same step) is written once.
    """

    def __init__(self, workdir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self._tb = None
        self._tb_dir = None
        self._tb_steps = {}  # TensorBoard tag -> the last step written under it
        self._file = None
        self._first = True
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = _open_for_append(os.path.join(workdir, "metrics.jsonl"))
        if tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  (missing: fail now)
            # Opened at the first record: only then is it known from which step on the earlier events are stale.
            self._tb_dir, self._tb_class = os.path.join(workdir, "tensorboard"), SummaryWriter

    def write(self, step, record):
        """Writes one record (a dict of scalars) for `step`; returns the record as written."""
        row = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        if not self.enabled:
            return row
        purge_step = None
        if self._first and "protocol" not in row:
            purge_step = self._supersede(row["step"])
        self._first = False
        try:
            self._file.write(json.dumps(row) + "\n")
        except OSError as e:
            raise MetricsWriteError(f"cannot write the metrics of step {row['step']} to {self._file.name}: "
                                    f"{e.strerror or e}; the checkpoints already written are intact: free disk "
                                    f"space and run the same command again to resume") from e
        if self._tb_dir is not None:
            if self._tb is None:
                # tensorboardX names the file by the second it was opened in; the suffix keeps a writer opened in
                # the same second (a quick restart, a resume in the same process) from truncating the earlier file,
                # and sorts the files by when they were opened (fixed-width nanoseconds, then the pid), the order
                # TensorBoard reads them in, which its purge marker needs.
                self._tb = self._tb_class(self._tb_dir, purge_step=purge_step,
                                         filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")
            for key, value in row.items():
                if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if self._tb_steps.get(key) == row["step"]:
                    continue  # already written at this step (the epoch of a training record and an evaluation)
                self._tb_steps[key] = row["step"]
                self._tb.add_scalar(key, value, global_step=row["step"])
        return row

    def _supersede(self, step):
        """Removes from metrics.jsonl the training and monitor records (those without `protocol`) of `step` and
        later, which this writer is about to log again; returns `step` if there were any, else None."""
        path = self._file.name
        self._file.flush()
        with open(path) as f:
            lines = f.readlines()
        keep, dropped, steps = [], [], []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            stale = (isinstance(record, dict) and "protocol" not in record and is_step(record.get("step"))
                     and record["step"] >= step)
            (dropped if stale else keep).append(line)
            if stale:
                steps.append(record["step"])
        if not dropped:
            return None
        try:
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        except OSError as e:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise MetricsWriteError(f"cannot rewrite {path} without the records of step {step} and later, which "
                                    f"this run logs again: {e.strerror or e}; it is unchanged: fix the cause "
                                    f"(a full disk, permissions) and run the same command again to resume") from e
        self._file.close()
        self._file = _open_for_append(path)
        print(f"note: {path}: {len(dropped)} records of steps {min(steps)}..{max(steps)}, logged before this run "
              f"went back to an older checkpoint, are replaced by the ones it logs", file=sys.stderr)
        return step

    def close(self):
        """Flushes and closes the outputs. A flush that fails (disk full) is a warning, not an error: close runs
        in the trainer's `finally`, where an error would hide the one that stopped the run."""
        file, tb, self._file, self._tb = self._file, self._tb, None, None
        for what, output in (("metrics.jsonl", file), ("TensorBoard", tb)):
            if output is None:
                continue
            try:
                output.close()
            except OSError as e:
                print(f"warning: the last {what} records could not be written: {e.strerror or e}", file=sys.stderr)
                if output is tb:
                    _abandon(tb)


def _abandon(summary_writer):
    """Marks a tensorboardX SummaryWriter whose flush failed as closed, so that its exit hook does not try again
    (and print the same error as a traceback)."""
    for file_writer in (getattr(summary_writer, "all_writers", None) or {}).values():
        event_writer = getattr(file_writer, "event_writer", None)
        if event_writer is None:
            continue
        worker = getattr(event_writer, "_worker", None)
        if worker is not None:
            try:
                worker.stop()
            except Exception:  # pylint: disable=broad-except  (best effort: its queue may be broken too)
                pass
        event_writer._closed = True  # pylint: disable=protected-access  (tensorboardX has no public "abandon")


def is_step(value):
    """Whether `value` is a record's step: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def last_value(path, key, default=0.0):
    """Returns the last value of `key` in a metrics.jsonl file (default if absent or no file)."""
    if not os.path.exists(path):
        return default
    values = [r[key] for r in read_jsonl(path) if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else default


def append_run_info(workdir, **info):
    """Appends one JSON line describing this (re)start of a run to DIR/runs.jsonl: devices, versions, time."""
    import datetime  # pylint: disable=import-outside-toplevel
    row = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **info}
    with _open_for_append(os.path.join(workdir, "runs.jsonl")) as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_jsonl(path):
    """Returns the list of records in a metrics.jsonl (or runs.jsonl) file.

    A line that is not a JSON object (a record cut short when a run was killed while writing it, or when the
    disk filled up) is skipped with a warning: it must not block a resume or a report.
    """
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                print(f"warning: skipping line {number} of {path}: not a JSON record (cut short when the run was "
                      f"killed?): {line.strip()[:80]!r}", file=sys.stderr)
                continue
            records.append(record)
    return records


def _open_for_append(path):
    """Returns `path` opened for appending lines; a last line cut short (no newline) is ended first, so the
    next record starts on a line of its own instead of completing the broken one."""
    f = open(path, "a+", buffering=1)  # pylint: disable=consider-using-with  (closed by MetricWriter.close)
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        last = f.read(1)
        if last != "\n":
            f.write("\n")
    return f


_show_progress = True  # pylint: disable=invalid-name  (module state, set by show_progress)


def show_progress(enabled):
    """Turns every progress bar of this process on or off (the CLI's --no-progress), the data decoding's too."""
    global _show_progress  # pylint: disable=global-statement
    _show_progress = bool(enabled)


def progress_shown():
    """Returns whether progress bars are on (see show_progress)."""
    return _show_progress


def progress_bar(total, initial=0, desc="train", enabled=True, unit="step", mininterval=1.0, iterable=None):
    """Returns a tqdm bar on stderr (disabled when not `enabled`, e.g. not process 0, or after
    show_progress(False)). When stderr is not a terminal (a SLURM or nohup log file) the bar is redrawn at most
    every NON_TTY_INTERVAL_S seconds, not every second: each redraw stays in the file."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    if not _isatty(sys.stderr):
        mininterval = max(mininterval, NON_TTY_INTERVAL_S)
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not (enabled and _show_progress),
                file=sys.stderr, dynamic_ncols=True, mininterval=mininterval, unit=unit)


NON_TTY_INTERVAL_S = 30.0


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
