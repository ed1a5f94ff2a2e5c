"""Two processes x 4 CPU devices on localhost run the same job as one process x 8 devices.

The CLI is started as a user would start it on two hosts (`--distributed --coordinator ... --process-id I`);
the losses must agree step for step, the kNN monitor and `ssl-jax eval` must give the same numbers, process 0
alone writes metrics and each checkpoint is written once, and a 2-process run resumes from its checkpoint.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

from ssl_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "simclr.py") + ":smoke"
# 4 steps an epoch, a checkpoint and a kNN evaluation after each of the 2 epochs. Ten classes keep the kNN
# accuracy off 1.0, and an eval batch of 48 splits 128 examples into 3 batches, the last one padded.
OVERRIDES = ["--config.num_epochs=2", "--config.data.num_examples=128", "--config.batch_size=32",
             "--config.log_every_steps=1", "--config.data.num_classes=10", "--config.eval.batch_size=48"]
TIMEOUT_S = 240  # per launch: a hung collective must fail the test, never hang CI


def _env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the real device count: --cpu-devices
    env["JAX_PLATFORMS"] = "cpu"
    # rbg keys: threefry's init takes ~10 s more to compile in every process, and test_cli covers the default.
    # Both sides use the same sharding of the same 8 devices, so rbg's bits agree between them.
    env["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
    # Later launches load the programs the first ones compiled (process 0 writes the cache): the resumed run
    # and the evaluation then skip most of their compilation.
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_until(argvs, cache_dir, act, timeout=60):
    """Starts `argvs` at once, calls act(procs), then waits `timeout` s for all to exit (a hang is killed and
    fails the test); returns (exit statuses, outputs)."""
    logs = [tempfile.TemporaryFile(mode="w+") for _ in argvs]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=_env(cache_dir), stdout=log, stderr=subprocess.STDOUT, text=True)
             for argv, log in zip(argvs, logs)]
    hung = False
    try:
        act(procs)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = any(p.poll() is None for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert not hung, f"still running {timeout} s later:\n" + "\n".join(out[-2000:] for out in outputs)
    return [p.returncode for p in procs], outputs


def _launch(argvs, cache_dir, timeout=TIMEOUT_S):
    """Runs the commands `argvs` at once; returns their outputs (stdout + stderr). All must exit with 0 (a failed
    process ends the others of its job within seconds: parallel.watch_for_failures)."""
    codes, outputs = _run_until(argvs, cache_dir, lambda procs: None, timeout=timeout)
    for argv, code, out in zip(argvs, codes, outputs):
        assert code == 0, f"exit {code}: {' '.join(argv)}\n{out[-4000:]}"
    return outputs


def _cli(*args):
    return [sys.executable, "-m", "ssl_jax", *args, "--no-progress"]


def _one_process(*args):
    return [_cli(*args, "--cpu-devices", "8")]


def _two_processes(*args):
    coordinator = f"localhost:{_free_port()}"
    return [_cli(*args, "--cpu-devices", "4", "--distributed", "--coordinator", coordinator,
                 "--num-processes", "2", "--process-id", str(i)) for i in range(2)]


def _records(workdir, key):
    return [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]


def _checkpoints(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_two_processes_train_evaluate_and_resume_like_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train = ("train", "--config", SMOKE, *OVERRIDES)
    cache = str(tmp_path / "jax_cache")
    # One after the other: three processes on two cores finish later than the two launches in turn.
    _launch(_one_process(*train, "--workdir", one), cache)
    _launch(_two_processes(*train, "--workdir", two), cache)

    # Same losses step for step; only process 0 wrote (one record per step).
    rows1, rows2 = _records(one, "loss"), _records(two, "loss")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, 9))
    for key in ("loss", "probe_loss", "grad_norm", "param_norm", "effective_rank"):
        np.testing.assert_allclose([r[key] for r in rows2], [r[key] for r in rows1], rtol=1e-5, err_msg=key)
    runs = metrics.read_jsonl(os.path.join(two, "runs.jsonl"))
    assert len(runs) == 1 and runs[0]["processes"] == 2 and runs[0]["devices"] == 8

    # The kNN monitor: same features gathered from both processes, hence the same accuracy.
    knn1, knn2 = _records(one, "knn_top1"), _records(two, "knn_top1")
    assert [r["step"] for r in knn2] == [r["step"] for r in knn1] == [4, 8]
    assert any(0.0 < r["knn_top1"] < 1.0 for r in knn1)  # not saturated: the comparison can tell
    for r1, r2 in zip(knn1, knn2):
        np.testing.assert_allclose([r2["knn_top1"], r2["knn_top5"]], [r1["knn_top1"], r1["knn_top5"]], atol=1e-6)
    assert _checkpoints(two) == [4, 8]

    # Resume: without its newest checkpoint the run restarts from step 4 and repeats steps 5-8 exactly,
    # and `ssl-jax eval` in 2 processes reproduces the kNN monitor of the last step.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    outputs = _launch(_two_processes(*train, "--workdir", resumed), cache)
    assert "resuming from the checkpoint at step 4" in outputs[0]
    rows = _records(resumed, "loss")  # steps 5-8 logged again replace the first run's records of them
    assert [r["step"] for r in rows] == list(range(1, 9))
    again = rows[4:]
    np.testing.assert_allclose([r["loss"] for r in again], [r["loss"] for r in rows1[4:]], rtol=1e-5)
    assert _checkpoints(resumed) == [4, 8]
    outputs = _launch(_two_processes("eval", "--workdir", two, "--protocol", "knn"), cache)
    evaluated = json.loads([line for line in outputs[0].splitlines() if line.startswith('{"step"')][-1])
    assert evaluated["step"] == 8
    np.testing.assert_allclose([evaluated["knn_top1"], evaluated["knn_top5"]],
                               [knn1[-1]["knn_top1"], knn1[-1]["knn_top5"]], atol=1e-6)
    assert len(_records(two, "knn_top1")) == 3  # the eval result appended once, by process 0


FEATURES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    process, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_num_cpu_devices", 4)
    from ssl_jax import parallel
    parallel.initialize_distributed(f"localhost:{port}", 2, process)
    import jax.numpy as jnp, numpy as np
    from ssl_jax import data
    from ssl_jax.data import pipeline
    from ssl_jax.evaluators import features, knn
    rng = np.random.default_rng(0)  # the same source on both processes, as a dataset on shared storage
    source = data.Source(images=rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8),
                         labels=rng.integers(0, 10, 37).astype(np.int32), class_names=list("abcdefghij"), name="t")
    encode = jax.jit(lambda x: x.astype(jnp.float32).mean(axis=(1, 2)))
    batches = pipeline.eval_batches(source, 16, jax.process_index(), jax.process_count())
    mesh = parallel.make_mesh()
    feats, labels = features.extract_features(encode, batches, mesh, progress=False)
    # kNN with its test rows split over the 8 devices of both processes, and on this process alone.
    knn_args = (feats[:25], labels[:25], feats[25:], labels[25:], 10)
    print(json.dumps({"feats": feats.tolist(), "labels": labels.tolist(), "images": source.images.tolist(),
                      "source_labels": source.labels.tolist(), "knn_mesh": knn.knn_accuracy(*knn_args, k=5, mesh=mesh),
                      "knn_local": knn.knn_accuracy(*knn_args, k=5)}))
""")


def test_extract_features_gathers_every_process_part_in_order(tmp_path):
    port = _free_port()
    outputs = _launch([[sys.executable, "-c", FEATURES_SCRIPT, str(i), str(port)] for i in range(2)],
                      str(tmp_path / "jax_cache"), timeout=120)
    for out in outputs:
        got = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        images = np.asarray(got["images"], np.float64)
        # Each process fed 8 of every 16 rows (the last batch padded): all 37 come back, in order, everywhere.
        np.testing.assert_allclose(got["feats"], images.mean(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_array_equal(got["labels"], got["source_labels"])
        assert got["knn_mesh"] == got["knn_local"] and set(got["knn_mesh"]) == {"knn_top1", "knn_top5"}


def test_a_sigterm_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
    # A preempted host (or `kill` on one node) signals one process; stopping it alone left the other waiting in
    # the next step's collectives forever. The processes vote every step and all stop after the same one.
    workdir = str(tmp_path / "run")
    argvs = _two_processes("train", "--config", SMOKE, *OVERRIDES, "--config.num_epochs=500",
                           "--config.eval.knn_every_epochs=0", "--workdir", workdir)

    def signal_one_once_training(procs):
        deadline = time.monotonic() + TIMEOUT_S
        path = os.path.join(workdir, "metrics.jsonl")
        while not (os.path.exists(path) and len(_records(workdir, "loss")) >= 3):  # training, past compilation
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)

    codes, outputs = _run_until(argvs, str(tmp_path / "jax_cache"), signal_one_once_training)
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    saved = [re.search(r"stop requested \((.*)\): saved step (\d+), exiting", out) for out in outputs]
    assert saved[0] and saved[1], outputs
    assert saved[0].group(1) == "a signal to another process" and saved[1].group(1) == "SIGTERM"
    step = int(saved[0].group(2))
    assert int(saved[1].group(2)) == step < 500 * 4 and _checkpoints(workdir)[-1] == step
    assert _records(workdir, "loss")[-1]["step"] == step

    # A workdir that is not shared (a local folder on each host): process 1 sees no checkpoint where process 0
    # resumes. Both used to train on, from different steps with different parameters; both now refuse.
    argvs[1][argvs[1].index(workdir)] = str(tmp_path / "elsewhere")
    codes, outputs = _run_until(argvs, str(tmp_path / "jax_cache"), lambda procs: None, timeout=TIMEOUT_S)
    assert codes == [2, 2], outputs
    for out in outputs:
        assert f"see different checkpoints in {workdir} (process 0 step {step}, process 1 none): the workdir must " \
            "be one folder that every host mounts" in out.replace(str(tmp_path / "elsewhere"), workdir), out[-3000:]


FAILING_SCRIPT = textwrap.dedent("""
    import sys
    from ssl_jax import cli, parallel
    put_batch, calls = parallel.put_batch, []

    def failing_put_batch(batch, mesh):  # process 1 alone fails at its 6th step: a full disk, a bad file
        calls.append(1)
        if len(calls) == 6 and sys.argv[sys.argv.index("--process-id") + 1] == "1":
            raise OSError(28, "No space left on device")
        return put_batch(batch, mesh)

    parallel.put_batch = failing_put_batch
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_an_error_in_one_process_ends_every_process_with_its_message(tmp_path):
    # The failed process used to wait in JAX's shutdown barrier and the others in the next step's collective:
    # the whole job hung. It now tells the others through the job's key-value store, and all end within seconds.
    argvs = [[sys.executable, "-c", FAILING_SCRIPT, *argv[3:]] for argv in _two_processes(
        "train", "--config", SMOKE, *OVERRIDES, "--config.eval.knn_every_epochs=0", "--workdir", str(tmp_path / "run"))]
    codes, outputs = _run_until(argvs, str(tmp_path / "jax_cache"), lambda procs: None, timeout=TIMEOUT_S)
    assert codes == [1, 2], outputs
    assert "ssl-jax train: error: [Errno 28] No space left on device" in outputs[1]
    assert "ssl-jax: stopping process 0: process 1 failed: ssl-jax train: error: [Errno 28] No space left on " \
        "device" in outputs[0]
    assert "Traceback" not in outputs[0] + outputs[1]  # the lost collective's error is not reported as another one


ALONE_SCRIPT = textwrap.dedent("""
    import sys
    from ssl_jax import cli, parallel
    parallel.time.sleep = lambda s: print(f"slept {s} s", flush=True)  # what leave_failed_job would wait
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_an_error_in_a_job_of_one_process_ends_it_without_waiting_for_others(tmp_path):
    # launch/tpu_vm.sh passes --distributed on a single-host VM too: nobody to tell, nothing to wait for.
    argv = [sys.executable, "-c", ALONE_SCRIPT, "train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
            "--config.optim.learning_rate=0.1", "--no-progress", "--distributed", "--coordinator",
            f"localhost:{_free_port()}", "--num-processes", "1", "--process-id", "0"]
    codes, outputs = _run_until([argv], str(tmp_path / "jax_cache"), lambda procs: None, timeout=TIMEOUT_S)
    assert codes == [2] and "unknown config key 'optim.learning_rate'" in outputs[0], outputs
    assert "slept" not in outputs[0]
