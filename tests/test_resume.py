"""Exact resume: a run preempted at step k, or killed between checkpoints, ends bit-identical to an
uninterrupted run (parameters, optimizer state, method extras such as queues and EMA targets, data order); a
run preempted on 8 devices resumes on 2 and goes on as the 8-device run does."""
import os

import harness
import jax
import numpy as np
import pytest
from test_checkpoint import damage_checkpoint

from ssl_jax import checkpoint, config as config_lib, metrics, parallel, train

# Two epochs of 8 steps; checkpoints every epoch; no kNN (it does not touch the state).
OVERRIDES = ["eval.knn_every_epochs=0", "checkpoint.every_epochs=1"]


def _restore(workdir, config, devices=None):
    """Returns the newest checkpoint of `workdir`, restored on the mesh over `devices` (default all)."""
    setup = train.build(config, devices=devices)
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        return checkpoint.restore(manager, checkpoint.abstract_like(train.initial_state(setup)))
    finally:
        manager.close()


def _final_state(workdir, config):
    return jax.device_get(_restore(workdir, config))


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("config_file", ["configs/simclr.py", "configs/moco_v2.py", "configs/byol.py"])
def test_preempted_and_killed_runs_resume_exactly(tmp_path, monkeypatch, config_file):
    config = config_lib.load_config(f"{config_file}:smoke", OVERRIDES)
    straight = str(tmp_path / "straight")
    train.train(config, straight, progress=False)
    expected = _final_state(straight, config)
    assert int(expected["step"]) == 16

    # 1. Preempted at step 5 (the platform's notice, as SIGTERM would be): saves step 5, exits, resumes.
    preempted = str(tmp_path / "preempted")
    monkeypatch.setattr(checkpoint.PreemptionGuard, "requested", lambda self, step, agreed=None: step == 5)
    train.train(config, preempted, progress=False)
    manager = checkpoint.make_manager(preempted, async_save=False)
    assert checkpoint.latest_step(manager) == 5
    manager.close()
    monkeypatch.undo()
    train.train(config, preempted, progress=False)
    _assert_identical(_final_state(preempted, config), expected)

    # 2. Killed at step 12, between the checkpoints at 8 and 16: the rerun redoes steps 9-16 from step 8.
    killed = str(tmp_path / "killed")
    real_put_batch = parallel.put_batch
    calls = {"n": 0}

    def dying_put_batch(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 13:
            raise RuntimeError("killed")
        return real_put_batch(batch, mesh)

    monkeypatch.setattr(parallel, "put_batch", dying_put_batch)
    with pytest.raises(RuntimeError, match="killed"):
        train.train(config, killed, progress=False)
    monkeypatch.undo()
    manager = checkpoint.make_manager(killed, async_save=False)
    assert checkpoint.latest_step(manager) == 8
    manager.close()
    train.train(config, killed, progress=False)
    _assert_identical(_final_state(killed, config), expected)


def _train(path, config, monkeypatch=None, stop_after=None):
    """Trains `config` in `path` (to the end, or stopped as a preemption notice stops it after step `stop_after`);
    returns the workdir."""
    workdir = str(path)
    if stop_after is not None:
        monkeypatch.setattr(checkpoint.PreemptionGuard, "requested", lambda self, step, agreed=None: step == stop_after)
    train.train(config, workdir, progress=False)
    if stop_after is not None:
        monkeypatch.undo()
    return workdir


def test_a_run_whose_newest_checkpoint_is_damaged_resumes_from_the_previous_one_and_finishes(tmp_path, monkeypatch):
    # A bad disk sector or a truncated copy of the workdir damages the newest checkpoint (step 16 of 24). The rerun
    # resumes from step 8 with a warning, and must be able to save step 16 again (orbax refuses to save a step that
    # exists): the run ends as an undamaged one does.
    config = config_lib.load_config("configs/simclr.py:smoke", OVERRIDES + ["num_epochs=3"])
    expected = _final_state(_train(tmp_path / "straight", config), config)
    damaged = _train(tmp_path / "damaged", config, monkeypatch, stop_after=16)
    ckpt_dir = checkpoint.checkpoint_dir(damaged)
    assert checkpoint.finished_steps(ckpt_dir) == [8, 16]
    damage_checkpoint(os.path.join(ckpt_dir, "16"))
    with pytest.warns(RuntimeWarning, match="step 16 .* could not be read"):
        train.train(config, damaged, progress=False)
    assert checkpoint.finished_steps(ckpt_dir) == [16, 24]
    _assert_identical(_final_state(damaged, config), expected)


@pytest.mark.usefixtures("threefry")
def test_a_checkpoint_resumes_on_another_number_of_devices(tmp_path, monkeypatch):
    # Preempted on 8 devices and resumed on 2 (a smaller TPU slice, fewer GPUs): the replicated state comes back on
    # the new mesh, and since the data order and the augmentation keys are those of the global batch, the run goes
    # on as the 8-device run does, up to float32 summation order. Residual BatchNorm scales start at 1: see
    # test_train_step's 8-versus-1-device test.
    config = config_lib.load_config("configs/simclr.py:smoke", OVERRIDES + ["model.zero_init_residual=false"])
    expected = _final_state(_train(tmp_path / "straight", config), config)
    moved = _train(tmp_path / "moved", config, monkeypatch, stop_after=10)
    at_10 = _final_state(moved, config)
    assert int(at_10["step"]) == 10
    two = jax.devices()[:2]
    restored = _restore(moved, config, devices=two)  # on the 2-device mesh: the 8-device run's state, bit for bit
    assert {d for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set} == set(two)
    _assert_identical(jax.device_get(restored), at_10)

    final = jax.device_get(train.train(config, moved, progress=False, devices=two))
    assert int(final["step"]) == 16
    harness.assert_updates_close(final["params"], expected["params"], at_10["params"], rtol=2e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 final["batch_stats"], expected["batch_stats"])
    runs = metrics.read_jsonl(os.path.join(moved, "runs.jsonl"))
    assert [(r["start_step"], r["devices"]) for r in runs] == [(0, 8), (10, 2)]


def test_a_resume_on_a_training_set_of_another_size_warns_and_records_it(tmp_path, capsys):
    # Images added to the run's folder (a copy that was incomplete at the first start): the step counts batches,
    # so the epoch and the schedule move to the new size. The resume says so; runs.jsonl records each size.
    workdir = str(tmp_path / "run")
    first = config_lib.load_config("configs/simclr.py:smoke", OVERRIDES + ["num_epochs=1", "optim.warmup_epochs=0"])
    train.train(first, workdir, progress=False)
    capsys.readouterr()
    bigger = config_lib.load_config("configs/simclr.py:smoke", OVERRIDES + ["num_epochs=2", "data.num_examples=640"])
    train.train(bigger, workdir, progress=False)
    err = capsys.readouterr().err
    assert "warning: the training set has 640 images; when this run last started it had 512" in err
    assert "An epoch is now 10 steps (was 8), so the resumed step 8 is epoch 0.80 (was 1.00)" in err
    starts = metrics.read_jsonl(os.path.join(workdir, "runs.jsonl"))
    assert [(r["start_step"], r["train_examples"], r["steps_per_epoch"]) for r in starts] == [(0, 512, 8), (8, 640, 10)]
    assert metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] == 20

    train.train(config_lib.load_config("configs/simclr.py:smoke", OVERRIDES + ["num_epochs=3",
                                                                              "data.num_examples=640"]),
                workdir, progress=False)
    assert "training set has" not in capsys.readouterr().err  # the same size as at the last start


def test_a_resume_on_devices_that_do_not_divide_its_batch_says_to_change_the_devices(tmp_path):
    # The mesh's own check suggested another --config.batch_size, which a resume then refuses (the step counts
    # batches of the saved size): with a checkpoint, the device count is what to change.
    config = config_lib.load_config("configs/simclr.py:smoke", OVERRIDES)
    n = next(d for d in range(3, 9) if config.batch_size % d)
    fits = max(d for d in range(1, n) if config.batch_size % d == 0)
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        train.train(config, str(workdir), progress=False, devices=jax.devices()[:n])
    message = str(e.value)
    assert f"batch_size={config.batch_size} is not divisible by the number of devices ({n})" in message
    assert f"resume on a number of devices that divides {config.batch_size} (e.g. {fits}" in message
    assert "--config.batch_size" not in message
    with pytest.raises(ValueError, match=r"use a multiple of \d+, e.g. --config.batch_size="):  # a new run may
        train.train(config, str(tmp_path / "new"), progress=False, devices=jax.devices()[:n])  # change it
