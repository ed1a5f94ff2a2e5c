"""MoCo: the queue ring buffer (per direction or shared), the EMA key encoder, stop-gradient, shuffled and split
BatchNorm, 8 devices = 1 device, config errors, CLI."""
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
    """The v2 smoke config at batch 16: a queue per direction, query BatchNorm over the batch unless overridden."""
    return config_lib.load_config(V2 + ":smoke", ["batch_size=16", "moco.queue_size=48", "moco.query_bn_groups=0",
                                                  *overrides])


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


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
    with pytest.raises(ValueError, match="a queue of 5 rows cannot take 2 keys per step"):
        moco.enqueue(np.zeros((1, 5, d), np.float32), jnp.zeros((), jnp.int32), np.zeros((1, 2, d), np.float32))


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


def test_shared_queue_scores_both_directions_against_the_pre_step_queue_and_takes_2n_keys():
    # embedding_loss + update_extras on the suite's 8 devices (2 rows each), plain arrays as embeddings. Reference:
    # float64 InfoNCE of each direction against the same pre-step queue, mean over directions; the write is
    # direction 0's 16 keys then direction 1's, each in global-batch order, at rows 64..95, then 0..31 (wrapped).
    config = _config("moco.shared_queue=true", "moco.queue_size=96")
    n, d, k, t = 16, 16, 96, config.loss.temperature
    mesh = parallel.make_mesh(jax.devices())

    def step(extras, q, keys):
        emb = {"q": q, "k": keys, "features": q[:, 0]}
        value, (_, aux) = moco.embedding_loss(None, emb, {"key_batch_stats": {}}, extras, None, PROGRESS,
                                              config=config, axis_name=parallel.DATA_AXIS)
        return value, moco.update_extras({}, extras, aux, PROGRESS, config)

    fn = parallel.shard_step(step, mesh, n_replicated=1, n_sharded=2, donate=())
    rs = np.random.RandomState(0)
    extras = {"key_params": {}, "key_batch_stats": {}, "queue": _unit(rs.randn(1, k, d)).astype(np.float32),
              "queue_ptr": np.asarray(64, np.int32)}
    for start in (64, 0):
        q_NxVxD = rs.randn(n, 2, d).astype(np.float32)
        k_NxVxD = _unit(rs.randn(n, 2, d)).astype(np.float32)
        value, new = jax.device_get(fn(extras, parallel.put_batch(q_NxVxD, mesh), parallel.put_batch(k_NxVxD, mesh)))
        q64, queue64 = _unit(q_NxVxD.astype(np.float64)), extras["queue"][0].astype(np.float64)
        ce = []
        for v in range(2):
            logits = np.concatenate([np.sum(q64[:, v] * k_NxVxD[:, v], axis=1, keepdims=True), q64[:, v] @ queue64.T],
                                    axis=1) / t
            ce.append(np.mean(np.log(np.sum(np.exp(logits), axis=1)) - logits[:, 0]))
        np.testing.assert_allclose(value, np.mean(ce), rtol=1e-5)
        expected = np.array(extras["queue"])
        expected[0, start:start + 2 * n] = np.concatenate([k_NxVxD[:, 0], k_NxVxD[:, 1]])
        np.testing.assert_array_equal(new["queue"], expected)
        assert int(new["queue_ptr"]) == (start + 2 * n) % k
        extras = new


def test_config_errors_name_the_fix_and_the_shared_queue_is_harmless_when_asymmetric(initial):
    rng, images = jax.random.PRNGKey(0), _images(1)
    with pytest.raises(ValueError, match=r"moco.queue_size=40 must be a positive multiple of the global batch size "
                                         r"\(16\).*--config.moco.queue_size=32"):
        moco.init(rng, _config("moco.queue_size=40"), images)
    with pytest.raises(ValueError, match=r"moco.queue_size=48 must be a positive multiple of twice the global batch "
                                         r"size \(2 x 16 = 32: the shared queue.*--config.moco.queue_size=32"):
        moco.init(rng, _config("moco.shared_queue=true"), images)
    # Asymmetric: one direction, N keys a step, so 48 = 3 x 16 is fine and there is one queue either way.
    _, _, extras = jax.eval_shape(lambda r: moco.init(r, _config("moco.shared_queue=true", "moco.symmetric=false"),
                                                      images), rng)
    assert extras["queue"].shape == (1, 48, 16)
    params, stats, extras = initial
    views = tuple(np.zeros((16, 16, 16, 3), np.float32) for _ in range(2))
    for name in ("query_bn_groups", "shuffle_groups"):
        config = _config(f"moco.{name}=3")
        with pytest.raises(ValueError, match=rf"moco.{name}=3 splits each device's batch of 16 images .* into 3 "):
            jax.eval_shape(lambda: moco.loss(params, stats, extras, views, rng, PROGRESS, config=config,
                                             axis_name=None))


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


def test_query_split_batchnorm_normalises_each_group_alone_and_passes_gradient(initial):
    params, stats, _ = initial
    x = np.asarray(_views(_config(), _images())[0])
    w = np.random.RandomState(3).randn(16, 16).astype(np.float32)  # d(sum(w * q))/dparams: a gradient to compare

    def forward(config):
        def f(p, x, w):
            h, q, new_stats = moco.query_forward(p, stats, x, config, None)
            return jnp.sum(w * q), (h, q, new_stats)
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, (h4, q4, stats4)), grads4 = jax.device_get(forward(_config("moco.query_bn_groups=4"))(params, x, w))
    # Reference: BatchNorm over the whole input (query_bn_groups=0, one device) on each group of 4 rows alone;
    # features and queries concatenated, running statistics averaged, gradients summed.
    plain = forward(_config())
    groups = [jax.device_get(plain(params, x[4 * g:4 * g + 4], w[4 * g:4 * g + 4])) for g in range(4)]
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    close(h4, np.concatenate([out[0][1][0] for out in groups]))
    close(q4, np.concatenate([out[0][1][1] for out in groups]))
    jax.tree.map(lambda a, *gs: close(a, np.mean(gs, axis=0)), stats4, *[out[0][1][2] for out in groups])
    jax.tree.map(lambda a, *gs: close(a, np.sum(gs, axis=0)), grads4, *[out[1] for out in groups])
    # ...and groups really differ from the whole batch.
    (_, (_, q16, _)), _ = jax.device_get(plain(params, x, w))
    assert np.abs(q4 - q16).max() > 1e-3


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
# loss and a queue per direction; on, with the asymmetric one; on, with the symmetric loss, the shared queue and
# split query BatchNorm (the cifar10 presets). shuffle_groups=8 and query_bn_groups=8: 8 groups of 2 either way
# (one per device, or 8 on one device).
@pytest.mark.parametrize("shuffle, symmetric, shared, query_groups", [
    ("false", "true", False, 0), ("true", "false", False, 0), ("true", "true", True, 8)])
def test_eight_devices_equal_one_device_and_extras_get_no_gradient(initial, threefry, shuffle, symmetric, shared,
                                                                    query_groups):
    del threefry
    per_step = 32 if shared else 16  # keys written per step (into each queue)
    config = _config(f"moco.shuffle_bn={shuffle}", f"moco.symmetric={symmetric}", "moco.shuffle_groups=8",
                     f"moco.shared_queue={shared}", f"moco.query_bn_groups={query_groups}",
                     f"moco.queue_size={3 * per_step}")
    directions = 2 if symmetric == "true" else 1
    params, stats, extras = initial
    # The fixture's two queues of 48 unit keys: one per direction, the first alone, or both as one of 96.
    queue = extras["queue"].reshape(1, 96, 16) if shared else extras["queue"][:directions]
    state = (params, stats, dict(extras, queue=queue))
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
    # Two steps' keys went to rows 0 .. 2 x per_step - 1 of each queue, in global-batch order; the rest untouched.
    assert e1["queue"].shape == queue.shape
    assert int(e1["queue_ptr"]) == int(e8["queue_ptr"]) == 2 * per_step
    np.testing.assert_allclose(e8["queue"], e1["queue"], atol=2e-5)
    np.testing.assert_array_equal(e1["queue"][:, 2 * per_step:], queue[:, 2 * per_step:])
    # Step 1's rows hold its keys in global-batch order: the key encoder (then still the initial copy) on that step's
    # key views, computed here without devices; the loss draws direction v's permutation from fold_in(rng, v).
    # Direction v's 16 keys: rows 0..15 of queue v, or rows 16v .. 16v+15 of the shared queue.
    keys_fn = jax.jit(lambda x, r: moco.key_embeddings(params, stats, x, r, config, None)[0])
    for v, key_view in enumerate((1, 0)[:directions]):
        expected = keys_fn(views[0][key_view], jax.random.fold_in(jax.random.PRNGKey(10), v))
        got = e8["queue"][0, 16 * v:16 * v + 16] if shared else e8["queue"][v, :16]
        np.testing.assert_allclose(got, expected, atol=2e-5)
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
    # As a user runs it: one CPU device, so the shuffled and the query BatchNorm groups are emulated on that device.
    workdir = str(tmp_path / "run")
    _cli("--config", V1 + ":smoke", "--workdir", workdir, "--config.num_epochs=1", "--config.eval.knn_every_epochs=0")
    assert _check_rows(workdir)[-1]["step"] == 8
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["method"] == "moco" and config["head"]["num_layers"] == 1
    assert config["moco"]["symmetric"] and config["moco"]["shared_queue"] and config["moco"]["query_bn_groups"] == 4
    # One shared queue of 384: 8 steps of 2 x 64 keys leave the pointer at 1024 % 384 = 256.
    extras = _extras(workdir, 8)
    assert extras["queue"].shape == (1, 384, 16) and int(extras["queue_ptr"]) == 256


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
