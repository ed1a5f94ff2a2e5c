"""The sharded step: 8 fake devices equal 1 device on the same global batch; no recompiles."""
import os
import types

import jax
import numpy as np
import pytest

from ssl_jax import config as config_lib, metrics, monitors, parallel, train
import harness
from harness import random_source as _source


def _config(*overrides):
    return config_lib.load_config("configs/simclr.py:smoke", [
        "batch_size=16", "optim.warmup_epochs=0", "optim.lr=0.5", *overrides])


def _run_steps(config, source, devices, steps=2):
    setup = train.build(config, source, devices=devices)
    state = train.initial_state(setup)
    before = jax.device_get(state)
    history, states = [], []
    for step in range(steps):
        idx = np.arange(step * 16, (step + 1) * 16, dtype=np.int32)
        batch = parallel.put_batch({"index": idx, "label": source.labels[idx]}, setup.mesh)
        state, metrics = setup.step_fn(state, setup.dataset, batch)
        history.append(jax.device_get(metrics))
        states.append(jax.device_get(state))
    return setup, before, states, history


@pytest.mark.parametrize("per_view", [False, True], ids=["bn_over_both_views", "bn_per_view"])
def test_eight_devices_equal_one_device(threefry, per_view):  # pylint: disable=unused-argument
    assert jax.device_count() == 8
    source = _source()
    # Residual BatchNorm scales start at 1 (as the cifar10 preset's do). Started at 0, some channels sit near
    # 1e-5 after one step, where float32 summation order (one device or eight, AVX2 or SSE) decides a ReLU:
    # their second updates then differed by up to 0.4% (SSE4.2) of their size, every other leaf's by 2e-5.
    # bn_per_view: each device holds its rows of both views; the statistics are still each whole view's.
    config = _config("model.zero_init_residual=false", f"simclr.bn_per_view={per_view}")
    _, before1, states1, hist1 = _run_steps(config, source, jax.devices()[:1])
    setup8, before8, states8, hist8 = _run_steps(config, source, jax.devices())
    after1, after8 = states1[-1], states8[-1]
    assert setup8.mesh.devices.size == 8
    jax.tree.map(np.testing.assert_array_equal, before1, before8)  # same init
    for m1, m8 in zip(hist1, hist8):
        for key in ("loss", "grad_norm", "param_norm", "probe_loss", "contrastive_acc"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
    # The first update is -lr x the gradient at the same parameters: equal updates, equal gradients.
    first1, first8 = harness.delta(states1[0]["params"], before1["params"]), harness.delta(states8[0]["params"],
                                                                                          before8["params"])
    assert harness.largest(first1) > 1e-4  # the step did move the weights
    harness.assert_trees_close(first8, first1, rtol=1e-4, atol=1e-7)
    # After two steps every leaf's update agrees to 2e-4 of its largest element (at most 1.7e-5 seen with
    # XLA's CPU code for AVX2, AVX and SSE4.2, --xla_cpu_max_isa; jax 0.10.2, 2026-11-23).
    harness.assert_updates_close(after8["params"], after1["params"], before1["params"], rtol=2e-4)
    # Synchronized BatchNorm: statistics of the global batch, whatever the device count.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 after8["batch_stats"], after1["batch_stats"])


def test_grad_norm_is_the_models_own_and_the_probe_has_its_own():
    # Plain SGD without weight decay: the first update is -lr x the gradient (momentum starts from zero), so the
    # model's parameters move by lr x grad_norm; the online probe's gradient is logged apart (probe_grad_norm).
    _, before, (after,), (m,) = _run_steps(_config("optim.name=sgd", "optim.weight_decay=0"), _source(),
                                           jax.devices()[:1], steps=1)
    moved = harness.delta(after["params"]["model"], before["params"]["model"])
    moved_norm = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in jax.tree.leaves(moved)))
    np.testing.assert_allclose(moved_norm / m["lr"], m["grad_norm"], rtol=1e-3)
    assert m["probe_grad_norm"] > 0.05 * m["grad_norm"]  # not negligible: folded into grad_norm, it would show


def test_img_per_s_counts_training_steps_only(tmp_path, monkeypatch):
    # A fake clock for the trainer: one second per reading, and a kNN monitor that takes a million. Each logged
    # interval is one step, a few readings long; with the monitor's time in it the rate would drop a million-fold.
    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 1.0
        return clock["t"]

    def slow_monitor(setup, state):  # pylint: disable=unused-argument
        clock["t"] += 1e6
        return {"knn_top1": 0.5}

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=perf_counter))
    config = config_lib.load_config("configs/simclr.py:smoke", [
        "num_epochs=3", "log_every_steps=1", "eval.knn_every_epochs=1", "checkpoint.every_epochs=1"])
    workdir = str(tmp_path / "run")
    train.train(config, workdir, progress=False, evaluate_fn=slow_monitor, devices=jax.devices()[:1])
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    records = [r for r in rows if "img_per_s" in r]
    assert len(records) > 3 and sum("knn_top1" in r for r in rows) == 3  # every step logged; one kNN per epoch
    assert min(r["img_per_s"] for r in records) > config.batch_size / 20


def test_collapse_warning_is_printed_once_per_collapse_and_not_in_the_first_epoch(tmp_path, monkeypatch, capsys):
    # Every logged step flagged (a threshold above any ratio): `collapsed` is logged at each, and the warning is
    # printed once, at the first logged step after epoch 1 (MoCo v2 on CIFAR-10 starts at ratio 0.04-0.06, a
    # warning every logged step of its first epoch on 2026-11-25, before its queue holds real keys).
    monkeypatch.setattr(monitors, "COLLAPSE_STD_RATIO", 10.0)
    config = config_lib.load_config("configs/simclr.py:smoke", ["num_epochs=3", "log_every_steps=2",
                                                                "eval.knn_every_epochs=0"])
    workdir = str(tmp_path / "run")
    capsys.readouterr()
    train.train(config, workdir, progress=False, devices=jax.devices()[:1])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "representation collapse" in line]
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    spe = rows[-1]["step"] // 3
    assert all(r["collapsed"] == 1.0 for r in rows) and len(rows) > 3
    first_after = min(r["step"] for r in rows if r["step"] > spe)
    assert len(warnings) == 1 and f"at step {first_after} " in warnings[0], warnings


def test_bn_per_view_is_another_function_than_bn_over_both_views():
    # The same initial state and batch: per-view statistics give another loss, and another one than the
    # unsynchronized step's, so the 8-vs-1 check above with bn_per_view compares something that differs.
    source = _source()
    losses = {per_view: _run_steps(_config(f"simclr.bn_per_view={per_view}"), source, jax.devices(), steps=1)[3][0]
              for per_view in (False, True)}
    assert np.isfinite(losses[True]["loss"]) and abs(losses[True]["loss"] - losses[False]["loss"]) > 1e-4


def test_unsynchronized_batchnorm_uses_per_device_statistics():
    source = _source()
    _, _, (synced,), hist_sync = _run_steps(_config(), source, jax.devices(), steps=1)
    _, _, (local,), hist_local = _run_steps(_config("model.sync_bn=false"), source, jax.devices(), steps=1)
    # Per-device batches of 2 normalise differently from the global batch: a different loss, still finite,
    # and running statistics averaged over devices so the replicated state stays identical everywhere.
    assert np.isfinite(hist_local[0]["loss"]) and abs(hist_local[0]["loss"] - hist_sync[0]["loss"]) > 1e-3
    for a in jax.tree.leaves(local["batch_stats"]):
        assert np.isfinite(a).all()


def test_step_compiles_once_and_metrics_are_complete():
    source = _source()
    setup, _, states, hist = _run_steps(_config(), source, None, steps=3)
    after = states[-1]
    assert setup.step_fn._cache_size() == 1  # pylint: disable=protected-access
    assert int(after["step"]) == 3
    assert {"loss", "lr", "grad_norm", "param_norm", "probe_loss", "probe_top1"} <= set(hist[-1])
    assert all(np.isfinite(float(m["loss"])) for m in hist)


def test_batch_not_divisible_by_device_count_is_an_error():
    source = _source()
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the number of devices \(8\)"):
        train.build(_config("batch_size=12"), source)


def test_a_resident_train_set_too_large_for_a_device_is_a_config_error(monkeypatch):
    """Before, the whole set was read into host memory and then failed in XLA with RESOURCE_EXHAUSTED."""
    source = _source()
    nbytes = source.images.size
    monkeypatch.setattr(parallel, "device_memory_bytes", lambda device: 2 * nbytes - 1)  # half is just too little
    with pytest.raises(config_lib.ConfigError, match=r"data\.resident=true keeps the whole train set on every "
                                                     r"device: .* --config\.data\.resident=false"):
        train.build(_config(), source)
    train.build(_config("data.resident=false"), source)  # the host pipeline needs no room for it
    monkeypatch.setattr(parallel, "device_memory_bytes", lambda device: 2 * nbytes)
    train.build(_config(), source)
    monkeypatch.setattr(parallel, "device_memory_bytes", lambda device: None)  # unknown (CPU): no check
    train.build(_config(), source)


def test_a_config_changed_in_python_is_checked_like_an_override():
    config = _config()
    with config.unlocked():
        config.eval.knn_temperature = 0.0
    with pytest.raises(config_lib.ConfigError, match=r"'eval.knn_temperature' must be in \(0, inf\), got 0.0"):
        train.build(config, _source())
