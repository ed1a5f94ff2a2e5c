"""Checkpoints: the whole train state round-trips exactly; SIGTERM becomes a flag the loop polls."""
import os
import re
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from ssl_jax import checkpoint, config as config_lib, data, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup():
    config = config_lib.load_config("configs/simclr.py:smoke", ["batch_size=16"])
    rs = np.random.RandomState(0)
    source = data.Source(rs.randint(0, 256, (32, 16, 16, 3)).astype(np.uint8),
                         (np.arange(32) % 4).astype(np.int32), list("abcd"), "t")
    return train.build(config, source)


def test_state_round_trips_exactly_with_its_sharding(tmp_path):
    setup = _setup()
    state = train.initial_state(setup)
    batch = parallel.put_batch({"index": np.arange(16, dtype=np.int32),
                                "label": np.zeros(16, np.int32)}, setup.mesh)
    state, _ = setup.step_fn(state, setup.dataset, batch)  # non-trivial optimizer state and statistics
    expected = jax.device_get(state)
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2)
    checkpoint.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    fresh = train.initial_state(setup)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(fresh))
    manager.close()
    assert jax.tree.structure(restored) == jax.tree.structure(fresh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    leaf = jax.tree.leaves(restored["params"])[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    # ...and training continues from the restored state.
    restored, metrics = setup.step_fn(restored, setup.dataset, batch)
    assert int(restored["step"]) == 2 and np.isfinite(float(metrics["loss"]))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        checkpoint.save(manager, step, {"x": np.full((2,), step, np.float32)}, force=True)
    assert checkpoint.latest_step(manager) == 3 and sorted(manager.all_steps()) == [2, 3]
    manager.close()
    assert sorted(os.listdir(checkpoint.checkpoint_dir(str(tmp_path)))) == ["2", "3"]


def test_a_writer_removes_unfinished_saves_of_a_killed_run_and_a_reader_leaves_them(tmp_path, capsys):
    # A process killed mid-save (SIGKILL, a preempted VM) leaves orbax's temporary step directory, as big as a
    # checkpoint. A run resumed from an earlier step may never save that step again: nothing else removes it.
    manager = checkpoint.make_manager(str(tmp_path), async_save=False)
    checkpoint.save(manager, 8, {"x": np.zeros((2,), np.float32)}, force=True)
    manager.close()
    ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
    for name in ("16.orbax-checkpoint-tmp-1700000000", "40.orbax-checkpoint-tmp-1700000001",
                 "40.orbax-checkpoint-tmp-1700000002"):  # killed twice at the same step
        os.makedirs(os.path.join(ckpt_dir, name, "default"))
        with open(os.path.join(ckpt_dir, name, "default", "half_written"), "wb") as f:
            f.write(b"0" * 1000)
    reader = checkpoint.make_manager(str(tmp_path), read_only=True)  # the run may be saving right now
    assert reader.latest_step() == 8
    reader.close()
    assert len(os.listdir(ckpt_dir)) == 4
    writer = checkpoint.make_manager(str(tmp_path))
    assert os.listdir(ckpt_dir) == ["8"]
    assert writer.latest_step() == 8
    writer.close()
    err = capsys.readouterr().err
    assert "removed 16.orbax-checkpoint-tmp-1700000000, the unfinished save of step 16" in err and "step 40" in err


def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    guard = checkpoint.PreemptionGuard()
    assert not guard.requested(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested(1) and guard.signal_name == "SIGTERM"
    guard.restore_handlers()
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_sets_the_stop_flag_and_a_second_one_interrupts_at_once(capsys):
    before = signal.getsignal(signal.SIGINT)
    guard = checkpoint.PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested(1) and guard.signal_name == "SIGINT"
        assert "a checkpoint is saved after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        guard.restore_handlers()
    assert signal.getsignal(signal.SIGINT) == before


def test_ctrl_c_with_stderr_gone_still_stops_after_a_save(monkeypatch):
    # Ctrl-C reaches the whole process group, so a `tee` that the trainer's stderr goes to may be dead already:
    # the handler's notice must not raise (inside the step, wherever the signal lands) before the save.
    class Broken:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    guard = checkpoint.PreemptionGuard(signals=(signal.SIGINT,))
    try:
        monkeypatch.setattr(sys, "stderr", Broken())
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested(1) and guard.signal_name == "SIGINT"
    finally:
        monkeypatch.undo()
        guard.restore_handlers()


def test_a_reader_restores_the_newest_checkpoint_of_a_run_that_deletes_the_ones_it_listed(tmp_path):
    """`ssl-jax eval` on a run still training: the checkpoints it listed are deleted (only the newest `keep` stay)
    before it reads them. That is not damage: it reads the newer ones."""
    writer = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
    for step in (1, 2):
        checkpoint.save(writer, step, {"x": np.full((4,), step, np.float32)}, force=True)
    reader = checkpoint.make_manager(str(tmp_path), read_only=True)
    assert sorted(reader.all_steps()) == [1, 2]
    for step in (3, 4):  # the run goes on, deleting 1 and 2
        checkpoint.save(writer, step, {"x": np.full((4,), step, np.float32)}, force=True)
    writer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be read" warning: nothing is damaged
        state = checkpoint.restore(reader, {"x": jax.ShapeDtypeStruct((4,), np.float32)})
    reader.close()
    np.testing.assert_array_equal(state["x"], np.full((4,), 4, np.float32))
    assert checkpoint.finished_steps(checkpoint.checkpoint_dir(str(tmp_path))) == [3, 4]  # the reader deleted none


def damage_checkpoint(step_dir):
    """Overwrites every data file and manifest of a checkpoint (a truncated write, a bad disk sector)."""
    damaged = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            if os.path.basename(root) == "d" or name.endswith("manifest.ocdbt"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\0garbage")
                damaged += 1
    assert damaged


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=3, async_save=False)
    for step in (1, 2):
        checkpoint.save(manager, step, {"x": np.full((64,), step, np.float32)}, force=True)
    manager.close()
    ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
    damage_checkpoint(os.path.join(ckpt_dir, "2"))
    target = {"x": jax.ShapeDtypeStruct((64,), np.float32)}
    reader = checkpoint.make_manager(str(tmp_path), read_only=True)  # `ssl-jax eval`: falls back, changes nothing
    with pytest.warns(RuntimeWarning, match="step 2 .* could not be read"):
        restored = checkpoint.restore(reader, target)
    np.testing.assert_array_equal(restored["x"], np.full((64,), 1, np.float32))
    with pytest.raises(Exception):
        checkpoint.restore(reader, target, step=2)  # asking for the damaged step itself is still an error
    reader.close()
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]  # a reader sets nothing aside: the run may be writing


def test_a_resumed_writer_sets_a_corrupt_checkpoint_aside_and_can_save_that_step_again(tmp_path):
    """The trainer resumes from step 1 because step 2 is damaged; orbax refuses to save a step that exists, so
    without setting step 2 aside the resumed run would fail on reaching step 2, at every attempt."""
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
    for step in (1, 2):
        checkpoint.save(manager, step, {"x": np.full((64,), step, np.float32)}, force=True)
    manager.close()
    ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))
    damage_checkpoint(os.path.join(ckpt_dir, "2"))
    writer = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=False)
    with pytest.warns(RuntimeWarning, match="moved the unreadable checkpoint of step 2 to .*2.damaged-"):
        restored = checkpoint.restore(writer, {"x": jax.ShapeDtypeStruct((64,), np.float32)})
    np.testing.assert_array_equal(restored["x"], np.full((64,), 1, np.float32))
    assert checkpoint.latest_step(writer) == 1
    checkpoint.save(writer, 2, {"x": np.full((64,), 20, np.float32)}, force=True)  # the resumed run reaches step 2
    writer.close()
    assert checkpoint.finished_steps(ckpt_dir) == [1, 2]
    assert [n for n in os.listdir(ckpt_dir) if n.startswith("2.damaged-")]  # kept, not deleted
    reader = checkpoint.make_manager(str(tmp_path), read_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = checkpoint.restore(reader, {"x": jax.ShapeDtypeStruct((64,), np.float32)})
    reader.close()
    np.testing.assert_array_equal(again["x"], np.full((64,), 20, np.float32))


def test_a_checkpoint_of_other_arrays_is_a_mismatch_not_damage(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=3, async_save=False)
    saved = {"a": np.zeros((4, 2), np.float32), "b": {"c": np.zeros((3,), np.float32)}, "gone": np.zeros(2)}
    for step in (1, 2):
        checkpoint.save(manager, step, saved, force=True)
    target = {"a": jax.ShapeDtypeStruct((4, 3), np.float32), "b": {"c": jax.ShapeDtypeStruct((3,), np.float32)},
              "new": jax.ShapeDtypeStruct((), np.int32)}
    assert checkpoint.mismatch(saved, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)) is None
    expected = ("1 arrays this config has and the checkpoint lacks (new); 1 arrays of the checkpoint this config "
                "lacks (gone); 1 arrays of another shape or dtype (a: (4, 2) float32 saved, (4, 3) float32 here)")
    assert checkpoint.mismatch(saved, target) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be read; trying the previous one": step 1 is no better
        with pytest.raises(checkpoint.CheckpointMismatchError, match="step 2 .*" + re.escape(expected)):
            checkpoint.restore(manager, target)
        with pytest.raises(checkpoint.CheckpointMismatchError, match="step 1 "):
            checkpoint.restore(manager, target, step=1)
    manager.close()


def _train_cli(workdir, *overrides, max_file_bytes=None):
    """Runs `ssl-jax train` on the smoke config; with max_file_bytes, no file can grow past that size."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_PRNG_IMPL="rbg")
    argv = [sys.executable, "-m", "ssl_jax", "train", "--config", "configs/simclr.py:smoke", "--workdir", workdir,
            "--no-progress", "--config.eval.knn_every_epochs=0", "--config.optim.warmup_epochs=0", *overrides]
    if max_file_bytes:
        # A write past the limit then fails with EFBIG ("File too large"), as writes on a full disk fail with
        # ENOSPC. The limit and the ignored SIGXFSZ are set in a tiny Python that execs the trainer.
        argv = [sys.executable, "-c", (
            "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, resource.RLIM_INFINITY)); "
            "os.execv(sys.argv[1], sys.argv[1:])"), *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def test_a_failed_save_keeps_the_previous_checkpoint_and_the_run_resumes_from_it(tmp_path):
    workdir = str(tmp_path / "run")
    first = _train_cli(workdir, "--config.num_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    assert checkpoint.finished_steps(ckpt_dir) == [8]  # smoke: 512 images / batch 64 = 8 steps an epoch
    before = _files(os.path.join(ckpt_dir, "8"))

    # The disk "fills up": checkpoint data files cannot be written. The run must stop with a clear error,
    # leave step 8 byte for byte as it was, and not present a half-written step 16 as a checkpoint.
    full = _train_cli(workdir, "--config.num_epochs=2", max_file_bytes=16 * 1024)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "ssl-jax train: error: saving the checkpoint of step 16 " in full.stderr  # the save that failed
    assert "newest: step 8" in full.stderr and "File too large" in full.stderr
    assert checkpoint.finished_steps(ckpt_dir) == [8]
    assert _files(os.path.join(ckpt_dir, "8")) == before

    again = _train_cli(workdir, "--config.num_epochs=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from the checkpoint at step 8" in again.stderr
    assert checkpoint.finished_steps(ckpt_dir)[-1] == 16
    assert "the unfinished save of step 16" in again.stderr  # the failed save's folder, removed at the start
    assert not [n for n in os.listdir(ckpt_dir) if not n.isdigit()]
