"""The command line end to end: smoke training, resume, evaluation, SIGTERM, and clear errors for bad input."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from ssl_jax import checkpoint, cli, metrics, report, workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "simclr.py") + ":smoke"


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the CLI runs as a user would: the real device count (one CPU here)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cli(*args, check=True, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "ssl_jax", *args, "--no-progress"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600, **kwargs)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _train_rows(workdir):
    return [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    _cli("train", "--config", SMOKE, "--workdir", workdir)  # its wall time is for benchmarks, not a unit test
    return workdir


def test_smoke_train_writes_finite_metrics_config_and_checkpoint(smoke_run):
    workdir = smoke_run
    rows = _train_rows(workdir)
    assert rows and rows[-1]["step"] == 16 and rows[-1]["epoch"] == 2.0
    for row in rows:
        for key in ("loss", "lr", "img_per_s", "grad_norm", "param_norm", "epoch", "embedding_std_ratio"):
            assert isinstance(row[key], float) and np.isfinite(row[key]), (key, row)
        assert row["effective_rank"] > 1.0 and row["collapsed"] == 0.0  # the monitor ran on logged steps
    knn = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [8, 16] and all(0.0 <= r["knn_top1"] <= 1.0 for r in knn)
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["method"] == "simclr" and config["num_epochs"] == 2 and config["data"]["name"] == "synthetic"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_more_epochs_resume_from_the_checkpoint(smoke_run):
    workdir = smoke_run
    before = len(_train_rows(workdir))
    proc = _cli("train", "--config", SMOKE, "--workdir", workdir, "--config.num_epochs=3")
    assert "resuming from the checkpoint at step 16" in proc.stderr
    new_rows = _train_rows(workdir)[before:]
    assert new_rows and min(r["step"] for r in new_rows) > 16 and new_rows[-1]["step"] == 24
    assert json.load(open(os.path.join(workdir, "config.json")))["num_epochs"] == 3
    starts = metrics.read_jsonl(os.path.join(workdir, "runs.jsonl"))
    assert [(s["start_step"], s["command"]) for s in starts] == [  # what `ssl-jax report` lists per run
        (0, f"ssl-jax train --config {SMOKE} --workdir {workdir} --no-progress"),
        (16, f"ssl-jax train --config {SMOKE} --workdir {workdir} --config.num_epochs=3 --no-progress")]


def test_eval_protocols_append_to_metrics(smoke_run):
    workdir = smoke_run
    for protocol, key in (("knn", "knn_top1"), ("linear", "linear_top1")):
        out = json.loads(_cli("eval", "--workdir", workdir, "--protocol", protocol,
                              "--config.eval.linear_epochs=5").stdout.strip().splitlines()[-1])
        assert 0.0 <= out[key] <= 1.0 and out["step"] >= 16
        record = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
        assert record[key] == out[key] and record["protocol"] == protocol
        assert record["command"] == (f"ssl-jax eval --workdir {workdir} --protocol {protocol} "
                                     "--config.eval.linear_epochs=5 --no-progress")
    commands = report.commands(report.load_run(workdir))
    assert [what for what, _ in commands][-2:] == ["eval knn", "eval linear"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_and_exits_cleanly(tmp_path, sig, code):
    """SIGTERM (a preempted VM) saves and exits with status 0; Ctrl-C saves too, then exits as interrupted."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssl_jax", "train", "--config", SMOKE, "--workdir", workdir, "--no-progress",
         "--config.num_epochs=200", "--config.log_every_steps=1", "--config.eval.knn_every_epochs=0",
         "--config.checkpoint.every_epochs=100"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(path) and len(open(path).readlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert f"stop requested ({sig.name})" in err and "Traceback" not in err
    if sig == signal.SIGINT:
        assert "Ctrl-C again stops at once" in err and err.rstrip().endswith("ssl-jax train: interrupted")
    manager = checkpoint.make_manager(workdir, async_save=False)
    step = checkpoint.latest_step(manager)
    manager.close()
    assert step is not None and 3 <= step < 200 * 8  # saved where it stopped, long before the end


def _in_process(capsys, *argv):
    code = cli.main(list(argv) + ["--no-progress"])
    return code, capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir)[0] == 0
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir, "--config.num_epochs=4",
                            "--config.optim.lr=1e30")
    assert code == 2 and "non-finite" in err and "at step 16" in err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]  # nothing newer was written
    # ...and the kept checkpoint is whole and finite: evaluation restores it.
    code, _ = _in_process(capsys, "eval", "--workdir", workdir, "--protocol", "knn")
    assert code == 0


def test_a_resume_with_another_model_or_method_is_refused_and_the_run_is_left_as_it_was(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    short = ["--config.num_epochs=1", "--config.optim.warmup_epochs=0", "--config.eval.knn_every_epochs=0"]
    assert _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir, *short)[0] == 0
    config_path = os.path.join(workdir, "config.json")
    record = open(config_path).read()

    # Another head: the checkpoint's arrays do not fit. The error names the arrays and the config keys that
    # differ, is not taken for a damaged checkpoint (no fallback warnings), and config.json (which eval and
    # export read) is left as it was.
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir, *short,
                            "--config.head.hidden_dim=48")
    assert code == 2, err
    assert "step 8" in err and "does not fit this config's state" in err and "(32,) float32 saved, (48,)" in err
    assert "head.hidden_dim: 32 -> 48" in err and f"ssl-jax train --workdir {workdir}" in err
    assert "could not be read" not in err
    # Another method: refused even before the arrays are compared.
    code, err = _in_process(capsys, "train", "--config", SMOKE.replace("simclr.py", "byol.py"), "--workdir", workdir,
                            *short)
    assert code == 2 and "holds a checkpoint of a simclr run and this config trains byol" in err, err
    # Another batch size: the step counts batches of the saved size, so the data order, the epoch and the
    # schedule would resume elsewhere. Refused, also as an override of a resume without --config.
    for extra in (["--config", SMOKE, *short], []):
        code, err = _in_process(capsys, "train", *extra, "--workdir", workdir, "--config.batch_size=32")
        assert code == 2 and "batch_size=64, whose step counts batches" in err and "--config.batch_size=64" in err, err
    # Evaluating with an override that changes the arrays is the same clear error.
    code, err = _in_process(capsys, "eval", "--workdir", workdir, "--protocol", "knn", "--config.head.hidden_dim=48")
    assert code == 2 and "does not fit this config's state" in err, err
    assert open(config_path).read() == record
    assert checkpoint.finished_steps(checkpoint.checkpoint_dir(workdir)) == [8]

    # Without --config, train resumes with the run's own config.json; the changed keys are reported and
    # recorded with the run.
    code, err = _in_process(capsys, "train", "--workdir", workdir, "--config.num_epochs=2")
    assert code == 0, err
    assert "resuming from the checkpoint at step 8" in err and "num_epochs: 1 -> 2" in err
    assert metrics.read_jsonl(os.path.join(workdir, "runs.jsonl"))[-1]["config_changes"] == {"num_epochs": [1, 2]}
    assert json.load(open(config_path))["num_epochs"] == 2
    assert checkpoint.finished_steps(checkpoint.checkpoint_dir(workdir))[-1] == 16
    code, err = _in_process(capsys, "train", "--workdir", str(tmp_path / "empty"))
    assert code == 2 and "--config is needed" in err, err
    # A damaged config.json does not block a resume with the config file: the restore checks the arrays.
    with open(config_path, "w") as f:
        f.write(record[:50])
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir, *short, "--config.num_epochs=3")
    assert code == 0 and "cannot be read" in err and "resuming from the checkpoint at step 16" in err, err
    assert json.load(open(config_path))["num_epochs"] == 3


def _tar_with_corrupt_image(path):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(8):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(buf, format="PNG")
                    data = buf.getvalue()
                    if (split, cls, i) == ("train", "b", 3):
                        data = data[:20]  # truncated: not decodable
                    info = tarfile.TarInfo(f"tiny/{split}/{cls}/{i:03d}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("override, message", [
    ("--config.optim.learning_rate=0.1", "unknown config key 'optim.learning_rate'"),
    ("--config.num_epochs=two", "config key 'num_epochs' expects a int"),
    ("--config.batch_size=60", "batch_size=60 is not divisible by the number of devices (8)"),
    ("--config.data.path=/no/such/cifar.tar.gz", "/no/such/cifar.tar.gz"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, override, message):
    argv = ["train", "--config", SMOKE, "--workdir", str(tmp_path / "run"), override]
    if "data.path" in override:
        argv.append("--config.data.name=imagefolder")
    code, err = _in_process(capsys, *argv)
    assert code == 2 and message in err, err


def test_corrupt_image_error_names_the_file(tmp_path, capsys):
    archive = str(tmp_path / "tiny.tar.gz")
    _tar_with_corrupt_image(archive)
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
                            "--config.data.name=imagefolder", f"--config.data.path={archive}",
                            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.num_workers=1")
    assert code == 2 and "tiny/train/b/003.png" in err, err
    assert "decoding 16 images" in err and "%|" not in err  # --no-progress hides the decoding bar too


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_an_error_naming_it(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    for extra in (["--config", SMOKE], []):  # a new run, and a resume (no --config)
        code, err = _in_process(capsys, "train", *extra, "--workdir", str(a_file))
        assert code == 2 and f"the workdir {a_file} is a file, not a directory" in err and "Traceback" not in err
    assert a_file.read_text() == "mine\n"
    monkeypatch.chdir(tmp_path)  # where a local folder named "gs:" would appear
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", "gs://bucket/run")
    assert code == 2 and "the workdir gs://bucket/run is a URL" in err and not os.path.exists("gs:"), err
    under_a_file = a_file / "run"  # its parent is a file: makedirs fails with NotADirectoryError
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", str(under_a_file))
    assert code == 2 and f"cannot create the workdir {under_a_file}" in err


def test_a_second_run_in_a_workdir_in_use_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lib.workdir_lock(str(workdir)):  # as a running `ssl-jax train` holds it
        code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", str(workdir))
        assert code == 2 and f"the workdir {workdir} is in use by another training run (pid {os.getpid()} on" in err
        assert sorted(os.listdir(workdir)) == [".lock"]  # nothing written, nothing resumed
    # Released when the run ends (or its process dies): the workdir is usable again.
    short = ["--config.num_epochs=1", "--config.optim.warmup_epochs=0", "--config.eval.knn_every_epochs=0"]
    assert _in_process(capsys, "train", "--config", SMOKE, "--workdir", str(workdir), *short)[0] == 0
    with workdir_lib.workdir_lock(str(workdir)):
        pass


def test_a_run_whose_data_moved_says_how_to_give_the_new_path(tmp_path, capsys):
    rs = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in "ab":
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rs.randint(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    workdir = str(tmp_path / "run")
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", workdir,
                            f"--config.data.path={tmp_path / 'data'}", "--config.batch_size=8", "--config.num_epochs=1",
                            "--config.optim.warmup_epochs=0", "--config.eval.knn_every_epochs=0",
                            f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    os.rename(tmp_path / "data", tmp_path / "moved")  # config.json records the absolute path it had
    hint = f"{os.path.join(workdir, 'config.json')} records where the run's data was: if it has moved, give " \
        "--config.data.path=NEW_PATH"
    for argv in (["eval", "--workdir", workdir, "--protocol", "knn"], ["train", "--workdir", workdir]):
        code, err = _in_process(capsys, *argv)
        assert code == 2 and f"{tmp_path / 'data'}' does not exist" in err and hint in err, err
    code, err = _in_process(capsys, "eval", "--workdir", workdir, "--protocol", "knn",
                            f"--config.data.path={tmp_path / 'moved'}")
    assert code == 0 and "evaluating step 2" in err, err
    # A config file given on the command line is the user's own: its missing path gets the plain error.
    code, err = _in_process(capsys, "train", "--config", SMOKE, "--workdir", str(tmp_path / "other"),
                            f"--config.data.path={tmp_path / 'data'}")
    assert code == 2 and "does not exist" in err and "records where" not in err, err


def test_no_test_split_for_the_knn_monitor_is_an_error_before_training(tmp_path, capsys):
    rs = np.random.RandomState(0)
    for c in "ab":
        folder = tmp_path / "data" / "train" / c
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rs.randint(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    workdir = tmp_path / "run"
    argv = ["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.path={tmp_path / 'data'}",
            "--config.batch_size=8", "--config.num_epochs=2", "--config.optim.warmup_epochs=0"]
    code, err = _in_process(capsys, *argv)
    assert code == 2 and "no test split" in err and "--config.eval.knn_every_epochs=0" in err
    assert not workdir.exists()  # failed before a step was taken: nothing written
    assert _in_process(capsys, *argv, "--config.eval.knn_every_epochs=0")[0] == 0
    assert "2" in os.listdir(workdir / "checkpoints")  # the whole run, trained without the monitor


@pytest.mark.parametrize("flags, message", [
    (["--cpu-devices", "-3"], "--cpu-devices must be >= 0 (0: the devices the machine has), got -3"),
    (["--num-processes", "2"], "--coordinator, --num-processes and --process-id need --distributed"),
    (["--distributed", "--num-processes", "0"], "--num-processes must be >= 1, got 0"),
    (["--distributed", "--num-processes", "2", "--process-id", "5"],
     "--process-id must be in 0 .. 1 (--num-processes 2), got 5"),
    (["--distributed", "--process-id", "-1"], "--process-id must be in 0 .. num-processes - 1, got -1"),
])
def test_bad_device_and_cluster_flags_are_usage_errors_before_jax_starts(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: exit status 2, nothing initialized or written
        cli.main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "run"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["report", "--workdir", "RUN", "--config.num_epochs=3"],
     "report takes no --config overrides (it uses the run's config.json), got --config.num_epochs=3"),
    (["export", "--workdir", "RUN", "--format", "npz", "--config.model.name=resnet50"],
     "export takes no --config overrides (it uses the run's config.json), got --config.model.name=resnet50"),
    (["report", "--workdir", "RUN", "--cpu-devices", "8"],
     "unrecognized argument '--cpu-devices' (see ssl-jax report --help)"),
    (["report", "--workdir", "RUN", "--distributed"], "unrecognized argument '--distributed'"),
    (["export", "--workdir", "RUN", "--format", "npz", "--distributed"], "unrecognized argument '--distributed' "
     "(see ssl-jax export --help)"),
    (["bench", "--config", SMOKE, "--torch-compile"], "--torch-compile needs --torch"),
])
def test_flags_a_command_would_ignore_are_usage_errors(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "export"])
def test_host_only_commands_list_only_the_flags_they_use(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "--workdir" in out and "--out" in out
    assert not any(f in out for f in ("--cpu-devices", "--distributed", "--no-progress", "--coordinator"))
