"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network's projection.

Online: backbone -> projector -> predictor (trained). Target: backbone -> projector, an exponential moving
average of the online weights kept in `extras["target"]`, never differentiated. The loss is
byol_loss(p1, z2') + byol_loss(p2, z1'): each view's online prediction regresses the target projection of
the other view. Views are asymmetric: `config.augment` describes view 1, `config.byol.view2_blur_p` and
`config.byol.view2_solarize_p` are where view 2 differs (ImageNet: blur 1.0 / 0.1, solarize 0 / 0.2).

Decisions checked against the official JAX code (deepmind-research/byol, byol_experiment.py):
  - Projector and predictor are networks.MLP: Linear -> BN -> ReLU -> Linear, the output Linear WITHOUT a bias
    (`hk.Linear(output_size, with_bias=False)`): `config.byol.head_out_bias=False` (the imagenet preset). True
    gives the output Linear a bias, as lightly's BYOL heads have (the cifar10 preset).
  - Initialisation: haiku's defaults, hk.Conv2D's and hk.Linear's TruncatedNormal(1 / sqrt(fan_in)) with zero
    biases (`model.conv_init="haiku"`, `config.byol.head_init="haiku"`, the imagenet preset); and every residual
    block's last BatchNorm scale starting at 0 (hk.nets.ResNet's blocks: `model.zero_init_residual`).
  - BatchNorm normalises each view with its own batch statistics, as `apply_once_fn` does per view there;
    ours runs each network once over both views with per-view statistics (models.ResNet.bn_groups), the
    same function.
  - The target runs in training mode: its BatchNorm normalises with the current batch's statistics, and
    its running averages (`batch_stats["target"]`) are updated by its own forward passes, not averaged from
    the online ones (the official `target_state` is the state returned by the target's forward). Only the
    parameters are EMA'd. The running averages are never used in training; they are kept so a target
    network could be evaluated.
  - tau(k) = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 with K the total number of steps (schedules.py);
    the update after step k uses tau(k). `config.byol.tau_schedule="constant"` keeps tau = tau_base instead
    (lightly's CIFAR-10 benchmark: 0.99 throughout).
  - The target starts as a copy of the online network, as in the PyTorch ports (lightly, solo-learn). The
    official code initialises it from a different seed and notes no significant difference.
  - The EMA uses the online parameters after this step's update, as the official `_update_fn` does.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from ssl_jax import augment, losses, models
from ssl_jax.methods import common

ONLINE_PARTS = ("backbone", "projector", "predictor")
TARGET_PARTS = ("backbone", "projector")


def networks(config, axis_name=None, bn_groups=1):
    """Returns the flax modules {'backbone', 'projector', 'predictor'}; BN synchronized over `axis_name`, with
    `bn_groups` views per training batch (models.ResNet.bn_groups)."""
    bn_axis = common.bn_axis(config, axis_name)
    dtype = common.compute_dtype(config)
    backbone = common.backbone(config, axis_name, bn_groups=bn_groups)
    # Both MLPs are Linear -> BN -> ReLU -> Linear, as networks.MLP of the official code (whose output Linear has
    # no bias: byol.head_out_bias=False) and whose Linears start from haiku's default (byol.head_init="haiku").
    head = dict(out_dim=config.projector.out_dim, use_bn=True, dtype=dtype, bn_axis_name=bn_axis, bn_groups=bn_groups,
                out_bias=bool(config.byol.get("head_out_bias", True)),
                init_scheme=config.byol.get("head_init", "torch"))
    projector = models.MLPHead(hidden_dims=(config.projector.hidden_dim,), **head)
    predictor = models.MLPHead(hidden_dims=(config.predictor.hidden_dim,), **head)
    return {"backbone": backbone, "projector": projector, "predictor": predictor}


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras): online networks, BN statistics of both, target = online copy."""
    nets = networks(config)
    k_backbone, k_projector, k_predictor = jax.random.split(rng, 3)
    size = config.augment.crop_size
    b_vars = nets["backbone"].init(k_backbone, jnp.zeros((2, size, size, sample_images.shape[-1])), train=False)
    p_vars = nets["projector"].init(k_projector, jnp.zeros((2, feature_dim(config))), train=False)
    q_vars = nets["predictor"].init(k_predictor, jnp.zeros((2, config.projector.out_dim)), train=False)
    all_vars = {"backbone": b_vars, "projector": p_vars, "predictor": q_vars}
    params = {name: v["params"] for name, v in all_vars.items()}
    stats = {name: v.get("batch_stats", {}) for name, v in all_vars.items()}
    # The trainer jits init, so the copies below get buffers of their own (donation needs that).
    stats["target"] = {name: stats[name] for name in TARGET_PARTS}
    return params, stats, {"target": {name: params[name] for name in TARGET_PARTS}}


TAU_SCHEDULES = ("constant", "cosine")


def target_tau(step, total_steps, tau_base, schedule="cosine"):
    """Returns the EMA decay at `step`, float32: for schedule "cosine" (BYOL's)
    tau = 1 - (1 - tau_base) (cos(pi step / total_steps) + 1) / 2, rising from tau_base to 1; for "constant"
    tau_base."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"Unknown byol.tau_schedule {schedule!r}; expected one of {TAU_SCHEDULES}.")
    if schedule == "constant":
        return jnp.float32(tau_base)
    k = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return 1.0 - (1.0 - tau_base) * (jnp.cos(jnp.pi * k / total_steps) + 1.0) / 2.0


def views(keys_Bx2, images, config):
    """Returns (view_1, view_2): config.augment for view 1; view 2 with byol.view2_blur_p / view2_solarize_p."""
    spec_1 = augment.spec_from_config(config.augment)
    spec_2 = dataclasses.replace(spec_1, blur_p=config.byol.view2_blur_p,
                                 solarize_p=config.byol.view2_solarize_p)
    keys_1 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 1)
    keys_2 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 2)
    return augment.view_batch(keys_1, images, spec_1), augment.view_batch(keys_2, images, spec_2)


def forward(params, batch_stats, x, *, config, parts=ONLINE_PARTS, axis_name=None, bn_groups=1):
    """Returns ({part: output} for `parts` in order, new BN statistics); every BN uses batch statistics.

    ONLINE_PARTS gives {'backbone': h_BxF, 'projector': z_BxD, 'predictor': p_BxD}; TARGET_PARTS stops at the
    projection. `params` and `batch_stats` hold (at least) the parts named. x may be `bn_groups` views
    concatenated, each normalised with its own statistics.
    """
    nets = networks(config, axis_name, bn_groups)
    outputs, new_stats = {}, {}
    x = x.astype(common.compute_dtype(config))
    for name in parts:
        x, mutated = nets[name].apply({"params": params[name], "batch_stats": batch_stats[name]}, x, train=True,
                                      mutable=["batch_stats"])
        outputs[name], new_stats[name] = x, mutated.get("batch_stats", {})
    return outputs, new_stats


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"p1", "p2": online predictions, "t1", "t2": target projections (no gradient), "z1": the
    first view's online projection, "features"}, (new BN statistics, {}))."""
    del rng, progress
    # Each network runs once over both views, BatchNorm statistics per view: exactly one call per view.
    x = jnp.concatenate(views)
    online = functools.partial(forward, config=config, parts=ONLINE_PARTS, axis_name=axis_name, bn_groups=2)
    target = functools.partial(forward, config=config, parts=TARGET_PARTS, axis_name=axis_name, bn_groups=2)
    online_out, online_stats = online(params, batch_stats, x)
    online_1, online_2 = common.split_views(online_out, 2)
    # Only params are differentiated; the stop_gradient states that no gradient reaches the target (and
    # makes it so even for a caller that differentiates w.r.t. extras).
    target_params = jax.lax.stop_gradient(extras["target"])
    target_out, target_stats = target(target_params, batch_stats["target"], x)
    target_1, target_2 = common.split_views(target_out, 2)
    emb = {"p1": online_1["predictor"], "p2": online_2["predictor"],
           "t1": jax.lax.stop_gradient(target_1["projector"]), "t2": jax.lax.stop_gradient(target_2["projector"]),
           "z1": online_1["projector"], "features": jax.lax.stop_gradient(online_1["backbone"]).astype(jnp.float32)}
    return emb, ({**online_stats, "target": target_stats}, {})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns the symmetrised BYOL loss (global batch mean), metrics and aux."""
    del params, side, extras, rng
    value = losses.byol_loss(emb["p1"], emb["t2"], axis_name) + losses.byol_loss(emb["p2"], emb["t1"], axis_name)
    metrics = {"tau": _tau(progress, config)}
    return value, (metrics, {"features": emb["features"], "embeddings": emb["z1"]})


loss = common.composed_loss(embed, embedding_loss)


def _tau(progress, config):
    """Returns the EMA decay of the update after step progress["step"] (config.byol's schedule)."""
    return target_tau(progress["step"], progress["total_steps"], config.byol.tau_base,
                      config.byol.get("tau_schedule", "cosine"))


def update_extras(params, extras, aux, progress, config):
    """Returns extras with target <- tau * target + (1 - tau) * online (backbone and projector)."""
    del aux
    tau = _tau(progress, config)
    online = {name: params[name] for name in TARGET_PARTS}
    return {"target": optax.incremental_update(online, extras["target"], step_size=1.0 - tau)}


feature_dim = common.feature_dim
encode = common.encode
