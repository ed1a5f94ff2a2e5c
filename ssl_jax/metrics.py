"""Where a run's numbers go: DIR/metrics.jsonl (one JSON object per record), TensorBoard, a progress bar."""
import json
import math
import os
import sys

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
    """Appends records to metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, workdir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = _open_for_append(os.path.join(workdir, "metrics.jsonl"))
        if tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step, record):
        """Writes one record (a dict of scalars) for `step`; returns the record as written."""
        row = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        if not self.enabled:
            return row
        try:
            self._file.write(json.dumps(row) + "\n")
        except OSError as e:
            raise MetricsWriteError(f"cannot write the metrics of step {row['step']} to {self._file.name}: "
                                    f"{e.strerror or e}; the checkpoints already written are intact: free disk "
                                    f"space and run the same command again to resume") from e
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))
        return row

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
