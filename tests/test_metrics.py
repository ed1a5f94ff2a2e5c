"""metrics.MetricWriter on a disk that fills up: a clear error for a record it cannot write, and a close that
never hides the error that stopped the run."""
import errno
import os

import pytest

from ssl_jax import cli, metrics


class _FullDisk:
    """A file whose writes and flushes fail as on a full disk."""
    name = "/full/metrics.jsonl"

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    close = flush = lambda self: self.write("")


def test_a_record_that_cannot_be_written_is_an_error_naming_the_file_and_the_step(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0})
    writer._file = _FullDisk()  # pylint: disable=protected-access
    with pytest.raises(metrics.MetricsWriteError, match="cannot write the metrics of step 2 to /full/metrics.jsonl: "
                                                        "No space left on device; the checkpoints"):
        writer.write(2, {"loss": 0.5})
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1]


def test_close_warns_instead_of_raising_when_the_last_records_cannot_be_flushed(tmp_path, capsys):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=True)
    writer.write(1, {"loss": 1.0})
    real_file = writer._file  # pylint: disable=protected-access
    writer._file = _FullDisk()  # pylint: disable=protected-access
    tb_writer = writer._tb.file_writer.event_writer._ev_writer  # pylint: disable=protected-access
    tb_writer.flush = _FullDisk().flush  # the event file's flush fails too
    writer.close()  # in the trainer's `finally`: an error here would replace the one that stopped the run
    err = capsys.readouterr().err
    assert "warning: the last metrics.jsonl records could not be written: No space left on device" in err
    assert "warning: the last TensorBoard records could not be written: No space left on device" in err
    assert writer._tb is None and writer._file is None  # pylint: disable=protected-access
    real_file.close()


def test_the_cli_reports_an_os_error_in_one_line(tmp_path, capsys, monkeypatch):
    """An I/O failure the trainer does not name itself (config.json on a full disk) is a one-line error."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.json.tmp"))

    from ssl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(config_lib, "to_json", full)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = cli.main(["train", "--config", os.path.join(root, "configs", "simclr.py") + ":smoke", "--workdir",
                     str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "ssl-jax train: error: [Errno 28] No space left on device:" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_a_record_cut_short_is_skipped_when_read_and_the_next_record_gets_a_line_of_its_own(tmp_path, capsys):
    """A run killed while writing a record (or on a full disk) leaves half a line: reading must not fail (a resume
    reads elapsed_s from metrics.jsonl, `ssl-jax report` reads every record) and appending must not glue the
    next record onto it."""
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0, "elapsed_s": 5.0})
    writer.close()
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 0.')  # killed here
    assert metrics.read_jsonl(path) == [{"step": 1, "loss": 1.0, "elapsed_s": 5.0}]
    assert metrics.last_value(path, "elapsed_s") == 5.0
    assert "skipping line 2 of" in capsys.readouterr().err
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)  # the resumed run
    writer.write(2, {"loss": 0.5})
    writer.close()
    metrics.append_run_info(str(tmp_path), start_step=1)
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
    assert metrics.read_jsonl(str(tmp_path / "runs.jsonl"))[0]["start_step"] == 1


def test_the_progress_bar_redraws_rarely_into_a_log_file(monkeypatch):
    """Under SLURM or nohup stderr is a file, where every redraw of the bar stays: once a second over a day's
    run is 86,400 copies of it."""
    import io  # pylint: disable=import-outside-toplevel

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(metrics, "_show_progress", True)
    for stream, interval in ((io.StringIO(), metrics.NON_TTY_INTERVAL_S), (Terminal(), 1.0)):
        monkeypatch.setattr("sys.stderr", stream)
        bar = metrics.progress_bar(10)
        assert bar.mininterval == interval
        bar.close()


def _tensorboard_scalars(logdir):
    """Returns {tag: [(step, value)]} as TensorBoard shows the event files of `logdir`: in file order, and a
    SessionLog START at step s (tensorboardX's purge_step) hides the earlier events of step s and later."""
    import glob  # pylint: disable=import-outside-toplevel
    import struct  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):  # TFRecord: length (8 bytes), its CRC (4), the event, its CRC (4)
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _log_run(workdir, steps, loss):
    """Logs training records every 4 steps and a monitor evaluation every 8, as the trainer does."""
    writer = metrics.MetricWriter(workdir)
    for step in steps:
        writer.write(step, {"loss": loss, "epoch": step / 8})
        if step % 8 == 0:
            writer.write(step, {"epoch": step / 8, "knn_top1": 0.5})
    writer.close()


def test_tensorboard_holds_one_value_per_key_and_step(tmp_path):
    """A training record and the evaluation at the same step both carry `epoch`: TensorBoard gets it once."""
    _log_run(str(tmp_path), (4, 8, 12, 16), 1.0)
    scalars = _tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert scalars["epoch"] == [(4, 0.5), (8, 1.0), (12, 1.5), (16, 2.0)]
    assert scalars["knn_top1"] == [(8, 0.5), (16, 0.5)]


def test_a_resume_from_an_earlier_checkpoint_replaces_the_records_it_logs_again(tmp_path, capsys):
    """Killed after logging step 16 with its newest checkpoint at step 8, a run logs steps 12 and 16 again: each
    step keeps one record in metrics.jsonl and one value per key in TensorBoard, the new ones. An `ssl-jax eval`
    record (it names its protocol) is never removed."""
    workdir = str(tmp_path)
    _log_run(workdir, (4, 8, 12, 16), 1.0)
    evaluation = metrics.MetricWriter(workdir, tensorboard=False)
    evaluation.write(16, {"epoch": 2.0, "linear_top1": 0.25, "protocol": "linear"})
    evaluation.close()
    _log_run(workdir, (12, 16), 2.0)  # the resumed run, from step 8
    assert "3 records of steps 12..16" in capsys.readouterr().err
    records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r.get("loss"), r.get("knn_top1"), r.get("protocol")) for r in records] == [
        (4, 1.0, None, None), (8, 1.0, None, None), (8, None, 0.5, None), (16, None, None, "linear"),
        (12, 2.0, None, None), (16, 2.0, None, None), (16, None, 0.5, None)]
    scalars = _tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert scalars["loss"] == [(4, 1.0), (8, 1.0), (12, 2.0), (16, 2.0)]
    assert scalars["epoch"] == [(4, 0.5), (8, 1.0), (12, 1.5), (16, 2.0)]
    assert scalars["knn_top1"] == [(8, 0.5), (16, 0.5)]


def test_event_files_sort_in_the_order_they_were_opened(tmp_path):
    """TensorBoard reads a run's event files in name order, and a purge marker only hides what was read before it.
    Twelve writers opened one after the other (mostly in the same second, which tensorboardX names them by):
    their files sort as they were opened, so each one's step is read in turn."""
    for step in range(12):
        writer = metrics.MetricWriter(str(tmp_path))
        writer.write(step, {"loss": float(step)})
        writer.close()
    assert _tensorboard_scalars(str(tmp_path / "tensorboard"))["loss"] == [(s, float(s)) for s in range(12)]


def test_a_resume_from_the_last_logged_step_keeps_every_record(tmp_path, capsys):
    workdir = str(tmp_path)
    _log_run(workdir, (4, 8), 1.0)
    _log_run(workdir, (12, 16), 2.0)
    assert "replaced" not in capsys.readouterr().err
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [4, 8, 8, 12, 16, 16]
    assert _tensorboard_scalars(str(tmp_path / "tensorboard"))["loss"] == [(4, 1.0), (8, 1.0), (12, 2.0), (16, 2.0)]
