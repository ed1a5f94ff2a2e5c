"""MoCo: the queue ring buffer, the EMA key encoder, stop-gradient, shuffled BatchNorm, 8 devices = 1 device, CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_jax import checkpoint, cli, config as config_lib, metrics, parallel
from ssl_jax.methods import moco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(ROOT, "configs", "moco_v2.py")
V1 = os.path.join(ROOT, "configs", "moco_v1.py")
PROGRESS = {"step": jnp.zeros((), jnp.int32), "steps_per_epoch": 4, "total_steps": 8}


def _config(*overrides):
    return config_lib.load_config(V2 + ":smoke", ["batch_size=16", "moco.queue_size=48", *overrides])


def _images(n=16, size=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def _views(config, images, seed=1):
    keys = parallel.example_keys(jax.random.PRNGKey(seed), images.shape[0], None)
    return moco.views(keys, images, config)


@pytest.fixture(scope="module")
def initial():
    """(params, batch_stats, extras) of the v2 smoke networks, initialised once (jitted, suite PRNG)."""
    config = _config()
    return jax.device_get(jax.jit(lambda r: moco.init(r, config, _images(1)))(jax.random.PRNGKey(0)))


# ------------------------------------------------------------------ queue and EMA (plain NumPy references)
def test_enqueue_writes_global_batches_in_order_and_wraps():
    k, n, d = 6, 2, 3
    queue = np.zeros((2, k, d), np.float32)
    ptr = jnp.zeros((), jnp.int32)
    expected = queue.copy()
    for step in range(4):  # rows 0-1, 2-3, 4-5, then back to 0-1
        keys = np.random.RandomState(step).randn(2, n, d).astype(np.float32)
        queue, ptr = jax.jit(moco.enqueue)(queue, ptr, keys)
        start = (step * n) % k
        expected[:, start:start + n] = keys
        np.testing.assert_array_equal(np.asarray(queue), expected)
        assert int(ptr) == ((step + 1) * n) % k
    with pytest.raises(ValueError, match="multiple of the global batch size"):
        moco.enqueue(np.zeros((1, 5, d), np.float32), jnp.zeros((), jnp.int32), np.zeros((1, 2, d), np.float32))
    with pytest.raises(ValueError, match=r"moco.queue_size=40 must be a positive multiple of the global batch"):
        moco.init(jax.random.PRNGKey(0), _config("moco.queue_size=40", "batch_size=16"), _images(1))


def test_ema_update_and_enqueue_match_numpy():
    config = _config("moco.momentum=0.9")
    rs = np.random.RandomState(0)
    params = {"w": rs.randn(3, 2).astype(np.float32), "b": rs.randn(2).astype(np.float32)}
    key_params = {"w": rs.randn(3, 2).astype(np.float32), "b": rs.randn(2).astype(np.float32)}
    extras = {"key_params": key_params, "key_batch_stats": {}, "queue": np.zeros((2, 48, 4), np.float32),
              "queue_ptr": jnp.asarray(32, jnp.int32)}
    aux = {"keys": rs.randn(2, 16, 4).astype(np.float32), "key_batch_stats": {"mean": np.ones(2, np.float32)}}
    new = moco.update_extras(params, extras, aux, PROGRESS, config)
    for name in ("w", "b"):
        np.testing.assert_allclose(new["key_params"][name], 0.9 * key_params[name] + 0.1 * params[name], rtol=1e-6)
    np.testing.assert_array_equal(new["queue"][:, 32:], aux["keys"])  # written at ptr=32 ...
    np.testing.assert_array_equal(new["queue"][:, :32], 0.0)
    assert int(new["queue_ptr"]) == 0  # ... and the pointer wraps to 0
    np.testing.assert_array_equal(new["key_batch_stats"]["mean"], 1.0)


def test_init_copies_the_query_encoder_and_fills_the_queue_with_unit_keys(initial):
    params, stats, extras = initial
    jax.tree.map(np.testing.assert_array_equal, extras["key_params"], params)
    jax.tree.map(np.testing.assert_array_equal, extras["key_batch_stats"], stats)
    assert extras["queue"].shape == (2, 48, 16) and int(extras["queue_ptr"]) == 0  # symmetric: one per direction
    np.testing.assert_allclose(np.linalg.norm(extras["queue"], axis=-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------ shuffled BatchNorm
def test_shuffled_batchnorm_uses_group_statistics_and_returns_keys_in_batch_order(initial):
    _, _, extras = initial
    rng = jax.random.PRNGKey(7)
    view = np.asarray(_views(_config(), _images())[1])

    def key_fn(*overrides):
        config = _config(*overrides)
        return jax.jit(lambda v: moco.key_embeddings(extras["key_params"], extras["key_batch_stats"], v, rng,
                                                     config, None))

    unshuffled = key_fn("moco.shuffle_bn=false")
    plain, _, plain_stats = jax.device_get(unshuffled(view))
    # One group: the permutation cannot change the statistics, so only a wrong un-shuffle could change the keys.
    one, one_local, _ = jax.device_get(key_fn("moco.shuffle_groups=1")(view))
    np.testing.assert_allclose(one, plain, atol=2e-5)
    np.testing.assert_array_equal(one_local, one)
    # Four groups of the shuffled batch: each group normalised alone, keys still in batch order. Reference:
    # the unshuffled key encoder on each group's images (BatchNorm over just those), put back by hand.
    four, _, four_stats = jax.device_get(key_fn("moco.shuffle_groups=4")(view))
    perm = np.asarray(jax.random.permutation(rng, 16))
    expected, group_stats = np.zeros_like(plain), []
    for g in range(4):
        idx = perm[4 * g:4 * g + 4]
        k, _, s = jax.device_get(unshuffled(view[idx]))
        expected[idx] = k
        group_stats.append(s)
    np.testing.assert_allclose(four, expected, atol=2e-5)
    jax.tree.map(lambda a, *gs: np.testing.assert_allclose(a, np.mean(gs, axis=0), rtol=1e-4, atol=1e-6),
                 four_stats, *group_stats)
    # ...and the group statistics really differ from the whole batch's.
    assert np.abs(four - plain).max() > 1e-3
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), four_stats, plain_stats))
    assert max(diffs) > 1e-4


# ------------------------------------------------------------------ 8 devices = 1 device
def _two_steps(config, state, views, devices):
    """Runs loss, gradients and update_extras twice under shard_map over `devices`; returns what they produced."""
    mesh = parallel.make_mesh(devices)
    params, stats, extras = state

    def step(params, stats, extras, rng, views):
        def f(p, key_params, queue):  # differentiated w.r.t. the key encoder and the queue too: must be zero
            e = dict(extras, key_params=key_params, queue=queue)
            return moco.loss(p, stats, e, views, rng, PROGRESS, config=config, axis_name=parallel.DATA_AXIS)
        (value, (stats, m, aux)), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
            params, extras["key_params"], extras["queue"])
        new_params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads[0])  # plain SGD: the EMA sees a move
        extras = moco.update_extras(new_params, extras, aux, PROGRESS, config)
        return new_params, stats, extras, {"loss": value, "grads": grads, **m}

    fn = parallel.shard_step(step, mesh, n_replicated=4, n_sharded=1, donate=())
    views = jax.tree.map(lambda v: parallel.put_batch(v, mesh), views)
    out = []
    for i in range(2):
        params, stats, extras, m = fn(params, stats, extras, jax.random.PRNGKey(10 + i), views[i])
        out.append(jax.device_get(m))
    return jax.device_get((params, stats, extras)), out


# Shuffled BatchNorm off (the key encoder's BatchNorm is then synchronised like the query's) with the symmetric
# loss; on, with the asymmetric one. shuffle_groups=8: 8 groups either way (one per device, or 8 on one device).
@pytest.mark.parametrize("shuffle, symmetric", [("false", "true"), ("true", "false")])
def test_eight_devices_equal_one_device_and_extras_get_no_gradient(initial, threefry, shuffle, symmetric):
    del threefry
    config = _config(f"moco.shuffle_bn={shuffle}", f"moco.symmetric={symmetric}", "moco.shuffle_groups=8")
    queues = 2 if symmetric == "true" else 1
    params, stats, extras = initial
    state = (params, stats, dict(extras, queue=extras["queue"][:queues]))
    # Plain arrays as the two steps' views: augmentation has its own tests (and threefry compiles slowly).
    rs = np.random.RandomState(0)
    views = [tuple(rs.randn(16, 16, 16, 3).astype(np.float32) for _ in range(2)) for _ in range(2)]
    (p1, s1, e1), out1 = _two_steps(config, state, views, jax.devices()[:1])
    (p8, s8, e8), out8 = _two_steps(config, state, views, jax.devices())
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    for m1, m8 in zip(out1, out8):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m8["contrastive_acc"], m1["contrastive_acc"])
        jax.tree.map(close, m8["grads"][0], m1["grads"][0])
        for leaf in jax.tree.leaves((m1["grads"][1:], m8["grads"][1:])):
            assert not np.any(leaf)  # exactly zero: key encoder and queue are stop-gradient
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(out1[0]["grads"][0])) > 1e-4
    jax.tree.map(close, (p8, s8), (p1, s1))
    jax.tree.map(close, e8["key_params"], e1["key_params"])
    jax.tree.map(close, e8["key_batch_stats"], e1["key_batch_stats"])
    # Two global batches of 16 keys went to rows 0..31 of each queue, in global-batch order; 32..47 untouched.
    assert e1["queue"].shape == (queues, 48, 16)
    assert int(e1["queue_ptr"]) == int(e8["queue_ptr"]) == 32
    np.testing.assert_allclose(e8["queue"], e1["queue"], atol=2e-5)
    np.testing.assert_array_equal(e1["queue"][:, 32:], state[2]["queue"][:, 32:])
    # Rows 0..15 hold step 1's keys in global-batch order: the key encoder (then still the initial copy) on that
    # step's key views, computed here without devices; the loss draws direction v's permutation from fold_in(rng, v).
    keys_fn = jax.jit(lambda x, r: moco.key_embeddings(params, stats, x, r, config, None)[0])
    for v, key_view in enumerate((1, 0)[:queues]):
        expected = keys_fn(views[0][key_view], jax.random.fold_in(jax.random.PRNGKey(10), v))
        np.testing.assert_allclose(e8["queue"][v, :16], expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(e1["queue"], axis=-1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------ the CLI, checkpoint and resume
def _cli(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the real device count (one CPU here)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "ssl_jax", "train", *args, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _extras(workdir, step):
    manager = checkpoint.make_manager(workdir, async_save=False)
    state = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return jax.tree.map(np.asarray, state["extras"])


def _check_rows(workdir):
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert rows
    for row in rows:
        for key in ("loss", "grad_norm", "contrastive_acc", "embedding_std_ratio", "effective_rank", "collapsed"):
            assert np.isfinite(row[key]), (key, row)
    return rows


def test_v1_smoke_run_in_a_subprocess(tmp_path):
    # As a user runs it: one CPU device, so the shuffled BatchNorm groups are emulated on that device.
    workdir = str(tmp_path / "run")
    _cli("--config", V1 + ":smoke", "--workdir", workdir, "--config.num_epochs=1", "--config.eval.knn_every_epochs=0")
    assert _check_rows(workdir)[-1]["step"] == 8
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["method"] == "moco" and config["head"]["num_layers"] == 1 and not config["moco"]["symmetric"]
    extras = _extras(workdir, 8)  # 8 steps of 64 keys in a queue of 192: the pointer is at 512 % 192 = 128
    assert extras["queue"].shape == (1, 192, 16) and int(extras["queue_ptr"]) == 128


def test_v2_smoke_run_checkpoints_the_queue_and_resume_restores_its_pointer(tmp_path, capsys):
    # In-process, so on the suite's 8 fake devices: the trainer with shuffled BatchNorm across devices.
    workdir = str(tmp_path / "run")

    def train_epochs(n):
        code = cli.main(["train", "--config", V2 + ":smoke", "--workdir", workdir, f"--config.num_epochs={n}",
                         "--config.eval.knn_every_epochs=0", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        return err

    train_epochs(1)
    assert _check_rows(workdir)[-1]["step"] == 8
    extras = _extras(workdir, 8)
    assert extras["queue"].shape == (2, 192, 16) and int(extras["queue_ptr"]) == 128
    assert "resuming from the checkpoint at step 8" in train_epochs(2)
    assert _check_rows(workdir)[-1]["step"] == 16
    # Restored, not reset: 16 x 64 = 1024 keys leave it at 64 (a reset pointer would be back at 128).
    assert int(_extras(workdir, 16)["queue_ptr"]) == 64
