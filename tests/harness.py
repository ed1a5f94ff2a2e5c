"""Helpers the method tests share: a random labelled source, and running the real sharded step N times."""
import os
import subprocess
import sys

import jax
import numpy as np

from ssl_jax import data, metrics, parallel, train


def random_source(n=64, size=16, classes=4, seed=0):
    """Returns a Source of n random uint8 size x size images with labels cycling over `classes`."""
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, size=(n, size, size, 3)).astype(np.uint8)
    labels = (np.arange(n) % classes).astype(np.int32)
    return data.Source(images=images, labels=labels, class_names=list("abcdefghij"[:classes]), name="test")


def steps(setup, state, source, steps=2, batch=16):
    """Returns (host final state, host metrics per step) after `steps` steps on consecutive batches."""
    history = []
    for step in range(steps):
        idx = np.arange(step * batch, (step + 1) * batch, dtype=np.int32)
        state, m = setup.step_fn(state, setup.dataset, parallel.put_batch(
            {"index": idx, "label": source.labels[idx]}, setup.mesh))
        history.append(jax.device_get(m))
    return jax.device_get(state), history


def run_steps(config, source, devices, initial=None, steps=2, batch=16):
    """Returns (initial state, final state, metrics per step) on host; `initial` skips a second init compile."""
    setup = train.build(config, source, devices=devices)
    state = train.initial_state(setup) if initial is None else parallel.put_replicated(initial, setup.mesh)
    before = jax.device_get(state)
    after, history = globals()["steps"](setup, state, source, steps, batch)
    return before, after, history


def one_and_all_devices(config, source, metric_keys, rbg_init=False, rtol=2e-5, atol=1e-6):
    """Runs two steps of config.batch_size images from one initial state on 1 device and on all devices;
    asserts `metric_keys` agree (pass "grad_norm" and "param_norm" with the loss), and that the first step's
    learning rate is not 0: under a warm-up it is, the first update moves nothing, and the second step's
    metrics would see the initial parameters again (set optim.warmup_epochs=0). Compare the returned states
    as well (parameter updates, method state, BatchNorm statistics): test_barlow_twins.py shows how.

    The metrics are float32 reductions of terms of order 1, summed in another order on 8 devices: `atol` is
    the floor for a mean that nearly cancels (SimSiam's -mean cos starts near 0, where rtol alone fails on
    rounding; a missing cross-replica mean changes it by orders of magnitude more).
    rbg_init: initialise with rbg keys (`rbg_initial_state`), several seconds faster to compile.
    Returns (before, after on 1 device, after on all, metrics per step on 1, metrics per step on all), on host.
    """
    one = jax.devices()[:1]
    initial = rbg_initial_state(train.build(config, source, devices=one)) if rbg_init else None
    batch = config.batch_size
    assert 2 * batch <= len(source), f"two steps of batch_size={batch} need {2 * batch} images, got {len(source)}"
    before, after1, hist1 = run_steps(config, source, one, initial=initial, batch=batch)
    assert hist1[0]["lr"] > 0, ("the first step's learning rate is 0 (a warm-up): its update moves nothing and a "
                                "gradient bug would pass; set optim.warmup_epochs=0")
    _, after_all, hist_all = run_steps(config, source, jax.devices(), initial=before, batch=batch)
    for m1, m_all in zip(hist1, hist_all):
        for key in metric_keys:
            np.testing.assert_allclose(m_all[key], m1[key], rtol=rtol, atol=atol, err_msg=key)
    return before, after1, after_all, hist1, hist_all


def delta(after, before):
    """Returns the tree after - before."""
    return jax.tree.map(np.subtract, after, before)


def largest(tree):
    """Returns the largest absolute value over all leaves (did the steps move anything?)."""
    return max(float(np.abs(x).max()) for x in jax.tree.leaves(tree))


def assert_updates_close(after, expected_after, before, rtol=1e-4):
    """Asserts the updates after - before and expected_after - before agree leaf by leaf, relative to the
    leaf's largest expected update: max|u - v| <= rtol * max|v|.

    Elementwise rtol fails on rounding where a parameter ends near 0 after a large step (a BatchNorm bias
    moved by 0.75 to 0.02, say); against the step's own size, float32 summation order stays near 1e-5.
    A leaf that did not move must not move in either.
    """
    def check(path, a, b, b0):
        u, v = np.asarray(a) - np.asarray(b0), np.asarray(b) - np.asarray(b0)
        err, scale = float(np.abs(u - v).max(initial=0.0)), float(np.abs(v).max(initial=0.0))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: update differs by {err:.3g}, its size {scale:.3g}"

    jax.tree_util.tree_map_with_path(check, after, expected_after, before)


def assert_trees_close(a, b, **tol):
    """Asserts every leaf of a and b is allclose with `tol`."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def rbg_initial_state(setup):
    """Returns a host copy of the initial state, initialised with rbg keys and given a threefry step key.

    Initialisation is not under test there (test_train_step compares it across device counts), and the
    threefry init takes several times longer to compile; both device counts start from this one state.
    """
    impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        state = jax.device_get(train.initial_state(setup))
    finally:
        jax.config.update("jax_default_prng_impl", impl)
    state["rng"] = np.asarray(jax.random.PRNGKey(1))
    return state


def cli_smoke_rows(config_spec, workdir, finite_keys, *overrides, rbg=False):
    """Runs `cli_train`, asserts it succeeded and that every logged training row has finite `finite_keys`.

    Returns (all records of metrics.jsonl, the training rows: those with a loss).
    """
    proc = cli_train(config_spec, workdir, *overrides, rbg=rbg)
    assert proc.returncode == 0, proc.stderr
    records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rows = [r for r in records if "loss" in r]
    assert rows, records
    for row in rows:
        for key in finite_keys:
            assert np.isfinite(row[key]), (key, row)
    return records, rows


def cli_train(config_spec, workdir, *overrides, rbg=False):
    """Runs `python -m ssl_jax train` as a user would (real device count, CPU) and returns the finished process.

    overrides: extra arguments, e.g. "--config.num_epochs=1".
    rbg=True uses rbg keys: threefry's init takes ~10 s more to compile, and test_cli covers the default.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if rbg:
        env["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "ssl_jax", "train", "--config", config_spec, "--workdir", workdir,
                           "--no-progress", *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=600)
