"""Tests for ssl_jax.optim: masks, LARS against SimCLR's algorithm in NumPy, SGD/Adam/AdamW decay, schedules."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax.models import LinearClassifier, MLPHead, get_backbone
from ssl_jax.optim import decay_mask, group_labels, make_optimizer, make_schedule, scaled_learning_rate

KEY = jax.random.key(0, impl="rbg")


def cfg(**kwargs):
    base = dict(name="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-2, momentum=0.9, nesterov=False,
                warmup_epochs=0.0, end_lr_factor=0.0, trust_coefficient=0.001)
    base.update(kwargs)
    return ml_collections.ConfigDict(base)


def small_params(seed=0):
    """A parameter tree with kernels (one all zero), BatchNorm params and a bias."""
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
        "zero": {"kernel": np.zeros((5, 3), np.float32)},
        "bn": {"scale": (1.0 + rng.standard_normal(4)).astype(np.float32),
               "bias": rng.standard_normal(4).astype(np.float32)},
        "head": {"bias": rng.standard_normal(3).astype(np.float32)},
    }


INCLUDED = {"conv/kernel", "zero/kernel"}


def flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(v, np.float64)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def random_grads(params, step):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)


def run_optax(tx, params, num_steps, grad_fn=random_grads):
    state = tx.init(params)
    history = []
    for step in range(num_steps):
        updates, state = tx.update(grad_fn(params, step), state, params)
        params = optax.apply_updates(params, updates)
        history.append(flat(params))
    return history


def np_schedule(step, peak, warmup, total, end=0.0):
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- mask
def resnet18_bn_channels():
    widths, channels = (64, 128, 256, 512), 64  # stem bn1
    for i, w in enumerate(widths):
        channels += 2 * 2 * w + (w if i > 0 else 0)  # 2 blocks x 2 BNs, plus the downsample BN
    return channels


def test_decay_mask_on_resnet18_and_heads():
    backbone, dim = get_backbone("resnet18")
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    z = jax.ShapeDtypeStruct((2, dim), jnp.float32)
    params = {
        "backbone": jax.eval_shape(lambda x: backbone.init(KEY, x, train=False), x)["params"],
        "head": jax.eval_shape(lambda z: MLPHead((2048,), 128).init(KEY, z, train=False), z)["params"],
        "probe": jax.eval_shape(lambda z: LinearClassifier(10).init(KEY, z), z)["params"],
    }
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    decayed = [jax.tree_util.keystr(p) for (p, _), m in zip(leaves, jax.tree.leaves(mask)) if m]
    excluded = [jax.tree_util.keystr(p) for (p, _), m in zip(leaves, jax.tree.leaves(mask)) if not m]
    # 20 convs + head dense0, dense1 + probe fc kernels; 20 BNs x (scale, bias) + head bn0 x 2 + 2 biases.
    assert len(decayed) == 20 + 2 + 1 and all(p.endswith("['kernel']") for p in decayed)
    assert len(excluded) == 40 + 2 + 2 and not any(p.endswith("['kernel']") for p in excluded)
    assert "['head']['dense1']['bias']" in excluded and "['probe']['fc']['bias']" in excluded
    excluded_backbone = sum(int(np.prod(p.shape)) for p, m in zip(
        jax.tree.leaves(params["backbone"]), jax.tree.leaves(mask["backbone"])) if not m)
    assert excluded_backbone == 2 * resnet18_bn_channels() == 9_600


def test_decay_mask_uses_names_and_ndim():
    mask = decay_mask({"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4), "scale": np.zeros((2, 2))},
                       "v": np.zeros(5), "w": np.zeros((2, 2))})
    assert mask == {"a": {"kernel": True, "bias": False, "scale": False}, "v": False, "w": True}


# ----------------------------------------------------------------------------- LARS
def simclr_lars(params, grads_per_step, lrs, wd, eta, momentum, nesterov):
    """SimCLR's LARSOptimizer (tf2/lars_optimizer.py) in float64 NumPy; returns params after each step."""
    w = flat(params)
    v = {k: np.zeros_like(x) for k, x in w.items()}
    history = []
    for grads, lr in zip(grads_per_step, lrs):
        for k, g in flat(grads).items():
            adapt = k in INCLUDED  # the same names get weight decay and layer adaptation
            if adapt:
                g = g + wd * w[k]
            trust = 1.0
            if adapt:
                w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            scaled_lr = lr * trust
            v[k] = momentum * v[k] + scaled_lr * g
            w[k] = w[k] - (momentum * v[k] + scaled_lr * g if nesterov else v[k])
        history.append({k: x.copy() for k, x in w.items()})
    return history


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_simclr_numpy(nesterov):
    # Warmup of 2 steps over 8: the lr changes every step (0, peak/2, peak, cosine...), which separates
    # "momentum after the lr" (SimCLR) from "momentum before the lr" (torch).
    c = cfg(name="lars", lr=0.3, lr_scaling="linear", warmup_epochs=0.5, nesterov=nesterov, weight_decay=0.05)
    tx, schedule = make_optimizer(c, batch_size=512, steps_per_epoch=4, num_epochs=2)
    params = small_params()
    num_steps = 4
    lrs = [np_schedule(s, 0.6, 2, 8) for s in range(num_steps)]
    np.testing.assert_allclose([schedule(s) for s in range(num_steps)], lrs, rtol=1e-6)
    got = run_optax(tx, params, num_steps)
    want = simclr_lars(params, [random_grads(params, s) for s in range(num_steps)], lrs, wd=0.05, eta=0.001,
                       momentum=0.9, nesterov=nesterov)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-7, err_msg=k)
    # The all-zero kernel used the fallback trust ratio 1 on its first real step (lr 0.3 * g),
    # afterwards eta * ||w|| / ||g|| shrinks its steps ~1000-fold.
    g1 = flat(random_grads(params, 1))["zero/kernel"]
    expected = -0.3 * g1 if not nesterov else -(0.9 * 0.3 + 0.3) * g1
    np.testing.assert_allclose(got[1]["zero/kernel"], expected, rtol=1e-5)


def momentum_first_lars(params, grads_per_step, lrs, wd, eta, momentum, larc):
    """The momentum-before-lr LARS of BYOL's utils/optimizers.py and Barlow Twins' main.py (larc False), or apex's
    LARC(clip=False) around torch's SGD as SwAV's main_swav.py (larc True), in float64 NumPy."""
    w = flat(params)
    mu = {k: np.zeros_like(x) for k, x in w.items()}
    history = []
    for grads, lr in zip(grads_per_step, lrs):
        for k, g in flat(grads).items():
            if k in INCLUDED:
                w_norm = np.linalg.norm(w[k])
                if larc:  # the trust ratio from the raw gradient; decay and scaling only where both norms > 0
                    g_norm = np.linalg.norm(g)
                    if w_norm > 0 and g_norm > 0:
                        g = eta * w_norm / (g_norm + wd * w_norm + 1e-8) * (g + wd * w[k])
                else:
                    g = g + wd * w[k]
                    g_norm = np.linalg.norm(g)
                    if w_norm > 0 and g_norm > 0:
                        g = eta * w_norm / g_norm * g
            mu[k] = momentum * mu[k] + g
            w[k] = w[k] - lr * mu[k]
        history.append({k: x.copy() for k, x in w.items()})
    return history


@pytest.mark.parametrize("style", ["byol", "larc"])
def test_lars_styles_match_the_official_code_in_numpy(style):
    # The lr changes every step (warm-up, then cosine), where momentum before and after the lr differ. A large
    # weight decay makes LARC's ||g|| + wd ||w|| differ from ||g + wd w||.
    c = cfg(name="lars", lr=0.3, warmup_epochs=0.5, weight_decay=0.5, lars_style=style)
    tx, schedule = make_optimizer(c, batch_size=512, steps_per_epoch=4, num_epochs=2)
    params = small_params()
    num_steps = 5
    lrs = [np_schedule(s, 0.6, 2, 8) for s in range(num_steps)]
    grads = [random_grads(params, s) for s in range(num_steps)]
    got = run_optax(tx, params, num_steps)
    others = {"simclr": simclr_lars(params, grads, lrs, wd=0.5, eta=0.001, momentum=0.9, nesterov=False),
              "byol": momentum_first_lars(params, grads, lrs, wd=0.5, eta=0.001, momentum=0.9, larc=False),
              "larc": momentum_first_lars(params, grads, lrs, wd=0.5, eta=0.001, momentum=0.9, larc=True)}
    for name, want in others.items():
        close = all(np.allclose(g[k], w[k], rtol=2e-5, atol=1e-7) for g, w in zip(got, want) for k in w)
        assert close is (name == style), name  # each style is its own reference and none of the others'


def test_lars_excluded_params_are_plain_momentum_sgd():
    c = cfg(name="lars", lr=0.1, lr_scaling="none", weight_decay=0.1, warmup_epochs=0.0)
    tx, _ = make_optimizer(c, batch_size=256, steps_per_epoch=5, num_epochs=1)
    params = small_params()
    got = run_optax(tx, params, 3)
    w = flat(params)
    v = {k: 0.0 for k in w}
    for step in range(3):
        lr = np_schedule(step, 0.1, 0, 5)
        for k, g in flat(random_grads(params, step)).items():
            if k in INCLUDED:
                continue
            v[k] = 0.9 * v[k] + lr * g  # no weight decay, no trust ratio
            w[k] = w[k] - v[k]
            np.testing.assert_allclose(got[step][k], w[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # ...while a kernel moves ~eta-fold less than plain SGD would move it.
    first_step = np.abs(got[0]["conv/kernel"] - flat(params)["conv/kernel"]).max()
    assert first_step < 0.01 * 0.1 * np.abs(flat(random_grads(params, 0))["conv/kernel"]).max()


# ----------------------------------------------------------------------------- SGD, AdamW, LAMB
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_torch_sgd_with_l2_on_kernels_only(nesterov):
    c = cfg(name="sgd", lr=0.05, lr_scaling="linear", weight_decay=1e-2, nesterov=nesterov, warmup_epochs=1.0)
    tx, _ = make_optimizer(c, batch_size=512, steps_per_epoch=2, num_epochs=4)
    params = small_params()
    got = run_optax(tx, params, 4)
    w = flat(params)
    buf = {k: np.zeros_like(x) for k, x in w.items()}
    for step in range(4):
        lr = np_schedule(step, 0.1, 2, 8)
        for k, g in flat(random_grads(params, step)).items():
            if k in INCLUDED:
                g = g + 1e-2 * w[k]  # torch.optim.SGD(weight_decay=...) on kernels only
            buf[k] = 0.9 * buf[k] + g
            w[k] = w[k] - lr * (g + 0.9 * buf[k] if nesterov else buf[k])
        for k in w:
            np.testing.assert_allclose(got[step][k], w[k], rtol=1e-5, atol=1e-7, err_msg=k)


def zero_grads(params, step):
    return jax.tree.map(np.zeros_like, params)


@pytest.mark.parametrize("exclude", [True, False])
def test_sgd_decay_only_where_masked(exclude):
    c = cfg(name="sgd", lr=0.1, lr_scaling="none", weight_decay=0.5, exclude_bias_and_norm=exclude)
    tx, _ = make_optimizer(c, batch_size=256, steps_per_epoch=10, num_epochs=1)
    params = small_params()
    after = run_optax(tx, params, 1, grad_fn=zero_grads)[0]
    for k, w in flat(params).items():
        decayed = k in INCLUDED or not exclude
        np.testing.assert_allclose(after[k], w * (1 - 0.1 * 0.5) if decayed else w, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("exclude", [True, False])
def test_adam_is_torch_adam_with_coupled_l2(exclude):
    # torch.optim.Adam(lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.3), its algorithm as documented:
    # g <- g + wd w; m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    # w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    c = cfg(name="adam", lr=0.02, lr_scaling="none", weight_decay=0.3, b1=0.9, b2=0.99, warmup_epochs=1.0,
            exclude_bias_and_norm=exclude)
    tx, _ = make_optimizer(c, batch_size=256, steps_per_epoch=2, num_epochs=4)
    params = small_params()
    got = run_optax(tx, params, 5)
    w = flat(params)
    m, v = ({k: np.zeros_like(x) for k, x in w.items()} for _ in range(2))
    for step in range(5):
        lr = np_schedule(step, 0.02, 2, 8)
        for k, g in flat(random_grads(params, step)).items():
            if k in INCLUDED or not exclude:
                g = g + 0.3 * w[k]  # the decay enters the moments: not AdamW's lr x wd x w
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.99 * v[k] + 0.01 * g * g
            t = step + 1
            w[k] = w[k] - lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.99**t)) + 1e-8)
        for k in w:
            np.testing.assert_allclose(got[step][k], w[k], rtol=1e-5, atol=1e-6, err_msg=f"step {step}, {k}")


def test_adamw_decoupled_decay_on_kernels_only():
    c = cfg(name="adamw", lr=1e-3, lr_scaling="none", weight_decay=0.1, b1=0.9, b2=0.95)
    tx, _ = make_optimizer(c, batch_size=256, steps_per_epoch=10, num_epochs=1)
    params = small_params()
    after = run_optax(tx, params, 1, grad_fn=zero_grads)[0]
    for k, w in flat(params).items():
        np.testing.assert_allclose(after[k], w * (1 - 1e-3 * 0.1) if k in INCLUDED else w, rtol=1e-6, err_msg=k)
    # With gradients, the first Adam step moves every parameter by about lr * sign(g).
    after = run_optax(tx, params, 1)[0]
    g = flat(random_grads(params, 0))
    w = flat(params)
    np.testing.assert_allclose(w["head/bias"] - after["head/bias"], 1e-3 * np.sign(g["head/bias"]), rtol=1e-4)


def test_lamb_masks_decay():
    tx, _ = make_optimizer(cfg(name="lamb", lr=1e-2, lr_scaling="none", weight_decay=0.1), 256, 10, 1)
    params = small_params()
    after = run_optax(tx, params, 1, grad_fn=zero_grads)[0]
    w = flat(params)
    assert not np.allclose(after["conv/kernel"], w["conv/kernel"])
    for k in ("bn/scale", "bn/bias", "head/bias"):
        np.testing.assert_array_equal(after[k], w[k])


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match="adam.*lars.*sgd"):
        make_optimizer(cfg(name="rmsprop"), 256, 10, 1)


# ----------------------------------------------------------------------------- schedules and scaling
def test_scaled_learning_rate():
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)  # SimCLR: 0.075 * sqrt(B)
    assert scaled_learning_rate(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scaled_learning_rate(0.05, 512, "linear") == pytest.approx(0.1)
    assert scaled_learning_rate(0.05, 512, "none") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="cubic"):
        scaled_learning_rate(0.1, 256, "cubic")


def test_warmup_cosine_schedule():
    c = cfg(lr=0.1, lr_scaling="linear", warmup_epochs=2, end_lr_factor=0.1)
    schedule = make_schedule(c, batch_size=1024, steps_per_epoch=5, num_epochs=10)  # peak 0.4
    peak, warmup, total = 0.4, 10, 50
    values = np.array([schedule(s) for s in range(total + 1)])
    np.testing.assert_allclose(values[:warmup + 1], peak * np.arange(warmup + 1) / warmup, rtol=1e-6, atol=1e-9)
    assert values[0] == 0.0 and values[warmup] == pytest.approx(peak)
    want = [np_schedule(s, peak, warmup, total, end=0.1 * peak) for s in range(total + 1)]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-8)
    assert values[total] == pytest.approx(0.1 * peak)
    assert np.all(np.diff(values[warmup:]) < 0)
    assert float(schedule(total + 7)) == pytest.approx(0.1 * peak)


def test_schedule_without_warmup_and_fractional_warmup():
    schedule = make_schedule(cfg(lr=0.2, lr_scaling="none", warmup_epochs=0), 256, 4, 3)
    assert float(schedule(0)) == pytest.approx(0.2)
    assert float(schedule(6)) == pytest.approx(0.1)  # cosine midpoint
    assert float(schedule(12)) == pytest.approx(0.0, abs=1e-9)
    # 0.5 epochs of 4 steps: 2 warmup steps.
    schedule = make_schedule(cfg(lr=0.2, lr_scaling="none", warmup_epochs=0.5), 256, 4, 3)
    assert float(schedule(1)) == pytest.approx(0.1) and float(schedule(2)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="optim.warmup_epochs=.* must be shorter than the whole run"):
        make_schedule(cfg(lr=0.2, warmup_epochs=3), 256, 4, 3)


def test_schedule_per_epoch_holds_each_epochs_first_value():
    # torch's CosineAnnealingLR(optimizer, T_max=epochs) stepped once per epoch: lr(e) = peak (1 + cos(pi e / E)) / 2.
    c = cfg(lr=0.2, lr_scaling="none", warmup_epochs=0, schedule_per_epoch=True)
    schedule, steps = make_schedule(c, 256, 4, 5), make_schedule(cfg(lr=0.2, lr_scaling="none", warmup_epochs=0),
                                                                  256, 4, 5)
    values = np.array([schedule(s) for s in range(20)])
    want = np.repeat([0.2 * (1 + np.cos(np.pi * e / 5)) / 2 for e in range(5)], 4)
    np.testing.assert_allclose(values, want, rtol=1e-6)
    np.testing.assert_allclose(values[::4], [steps(s) for s in range(0, 20, 4)], rtol=1e-6)
    assert float(schedule(jnp.asarray(7, jnp.int32))) == pytest.approx(want[7])  # traced steps too
    # A warm-up is held per epoch as well: 1 epoch of warm-up gives lr 0 for its 4 steps.
    warm = make_schedule(cfg(lr=0.2, lr_scaling="none", warmup_epochs=1, schedule_per_epoch=True), 256, 4, 5)
    assert [float(warm(s)) for s in range(5)] == [0.0, 0.0, 0.0, 0.0, pytest.approx(0.2)]


def test_parameter_groups_fixed_lr_and_bias_lr_factor():
    params = {"model": {"backbone": {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}},
                        "predictor": {"dense0": {"kernel": jnp.ones((2, 2))}}}}
    grads = jax.tree.map(jnp.ones_like, params)
    cfg = ml_collections.ConfigDict(dict(name="sgd", lr=1.0, lr_scaling="none", weight_decay=0.0, momentum=0.0,
                          warmup_epochs=0, fixed_lr_prefixes=("model/predictor",), bias_lr_factor=0.5))
    tx, schedule = make_optimizer(cfg, batch_size=256, steps_per_epoch=10, num_epochs=1)
    state = tx.init(params)
    for step in range(6):
        updates, state = tx.update(grads, state, params)
    lr = float(schedule(5))
    assert 0.0 < lr < 1.0  # the cosine has decayed by step 5
    np.testing.assert_allclose(updates["model"]["backbone"]["conv"]["kernel"], -lr, rtol=1e-6)
    np.testing.assert_allclose(updates["model"]["backbone"]["bn"]["scale"], -0.5 * lr, rtol=1e-6)
    np.testing.assert_allclose(updates["model"]["predictor"]["dense0"]["kernel"], -1.0, rtol=1e-6)  # fixed
    labels = group_labels(params, ("model/predictor",), split_norm=True)
    assert labels["model"]["backbone"]["bn"]["scale"] == "norm" and labels["model"]["predictor"]["dense0"][
        "kernel"] == "fixed"


def test_step_schedule_with_and_without_warmup():
    cfg = ml_collections.ConfigDict(dict(name="sgd", lr=0.03, lr_scaling="none", warmup_epochs=0,
                                         step_milestones=(120, 160), step_factor=0.1))
    schedule = make_schedule(cfg, batch_size=256, steps_per_epoch=10, num_epochs=200)
    np.testing.assert_allclose([schedule(0), schedule(1199), schedule(1200), schedule(1600), schedule(1999)],
                               [0.03, 0.03, 0.003, 0.0003, 0.0003], rtol=1e-5)
    cfg.warmup_epochs = 5
    schedule = make_schedule(cfg, batch_size=256, steps_per_epoch=10, num_epochs=200)
    np.testing.assert_allclose([schedule(0), schedule(25), schedule(50), schedule(1199), schedule(1200)],
                               [0.0, 0.015, 0.03, 0.03, 0.003], rtol=1e-5)


@pytest.mark.parametrize("style", ["simclr", "byol", "larc"])
def test_lars_zero_gradient(style):
    # A kernel whose gradient is exactly zero (SwAV's prototypes while frozen): eta ||w|| / ||g|| is inf and
    # 0 x inf NaN, so every official LARS takes a trust ratio of 1 there; without weight decay nothing moves.
    tx, _ = make_optimizer(cfg(name="lars", lr=0.1, lr_scaling="none", weight_decay=0.0, lars_style=style), 256, 10, 1)
    params = small_params()
    for k, w in flat(params).items():
        np.testing.assert_array_equal(run_optax(tx, params, 2, grad_fn=zero_grads)[-1][k], w, err_msg=k)
    # With weight decay the kernels' gradient is wd w, so the trust ratio is eta / wd and the step lr eta w
    # (SimCLR's LARS, BYOL's); apex's LARC (SwAV) skips decay and trust ratio alike while ||g|| = 0.
    tx, _ = make_optimizer(cfg(name="lars", lr=0.1, lr_scaling="none", weight_decay=0.5, lars_style=style), 256, 10, 1)
    after = run_optax(tx, params, 1, grad_fn=zero_grads)[0]
    for k, w in flat(params).items():
        decayed = k == "conv/kernel" and style != "larc"  # the all-zero kernel has nothing to decay
        np.testing.assert_allclose(after[k], w * (1 - 0.1 * 0.001) if decayed else w, rtol=1e-7, err_msg=k)
