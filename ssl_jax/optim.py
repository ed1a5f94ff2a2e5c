"""Optimizers (LARS, SGD, Adam, AdamW, LAMB), learning-rate schedules and the weight-decay / trust-ratio mask.

LARS follows SimCLR's TF implementation, which `optax.lars` reproduces step for step:
    g <- g + wd * w                                  (weight decay before the trust ratio)
    r  = eta * ||w|| / ||g||, or 1 if either norm is 0
    v <- momentum * v + lr * r * g                   (momentum after the learning rate)
    w <- w - v
Biases and BatchNorm parameters get neither weight decay nor the trust ratio (for them this is plain
momentum SGD), selected by `decay_mask`, the predicate BYOL's JAX code uses.

`optim.lars_style` picks the variant of a paper's official code (LARS_STYLES); they differ in where the momentum
sits, so only while the learning rate changes (mostly in warm-up: ~9% of the step 100 steps into it):
    "simclr"  the above (google-research/simclr's LARSOptimizer, optax.lars)
    "byol"    v <- momentum * v + r * g;  w <- w - lr * v   (deepmind-research/byol utils/optimizers.py, and the
              LARS of facebookresearch/barlowtwins main.py: momentum on the trust-scaled gradient, then the lr)
    "larc"    r = eta * ||w|| / (||g|| + wd * ||w|| + 1e-8) on the raw gradient, then g <- r * (g + wd * w) and
              the "byol" momentum (apex's LARC(clip=False) around torch's SGD, as facebookresearch/swav)
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "lamb", "lars", "sgd")
LR_SCALINGS = ("linear", "sqrt", "none")
LARS_STYLES = ("simclr", "byol", "larc")  # whose official LARS: the module docstring


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any) -> Any:
    """Returns a pytree of bools like `params`: True for conv/dense kernels, False for biases and BN params."""
    # Flax BN params are named scale/bias and are 1-D; ndim also catches vectors under other names.
    return jax.tree_util.tree_map_with_path(
        lambda path, p: len(p.shape) > 1 and _leaf_name(path) not in ("bias", "scale"), params)


def _all_true(params: Any) -> Any:
    return jax.tree.map(lambda _: True, params)


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """Returns the peak lr: base_lr * B / 256 ('linear'), base_lr * sqrt(B) ('sqrt') or base_lr ('none')."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return float(base_lr)
    raise ValueError(f"Unknown learning-rate scaling {scaling!r}; expected one of {LR_SCALINGS}.")


def make_schedule(optim_cfg, batch_size: int, steps_per_epoch: int, num_epochs: float) -> optax.Schedule:
    """Returns step -> lr: linear warmup from 0 for `warmup_epochs`, then cosine decay to `end_lr_factor`*peak.

    With `step_milestones` (epochs), the decay after the warm-up is stepwise instead: the lr is multiplied
    by `step_factor` (default 0.1) at each milestone.

    The schedule reaches its end value at step `steps_per_epoch * num_epochs`, the count after the
    last update (the last update itself uses the value one step before), as in SimCLR.

    With `schedule_per_epoch`, the lr only changes at epoch boundaries: every step of epoch e takes the value
    at that epoch's first step, as torch code that steps its scheduler (or sets the lr) once per epoch does:
    CosineAnnealingLR(optimizer, num_epochs) gives lr(e) = peak x (1 + cos(pi e / num_epochs)) / 2.
    """
    schedule = _step_schedule(optim_cfg, batch_size, steps_per_epoch, num_epochs)
    if not optim_cfg.get("schedule_per_epoch", False):
        return schedule
    return lambda step: schedule((jnp.asarray(step) // steps_per_epoch) * steps_per_epoch)


def _step_schedule(optim_cfg, batch_size: int, steps_per_epoch: int, num_epochs: float) -> optax.Schedule:
    """Returns make_schedule's schedule, its lr changing every step."""
    peak = scaled_learning_rate(optim_cfg["lr"], batch_size, optim_cfg.get("lr_scaling", "linear"))
    total_steps = int(round(steps_per_epoch * num_epochs))
    warmup_steps = int(round(steps_per_epoch * optim_cfg.get("warmup_epochs", 0)))
    end_factor = optim_cfg.get("end_lr_factor", 0.0)
    if total_steps <= 0:
        raise ValueError(f"The schedule needs at least one step, got {steps_per_epoch} steps x {num_epochs}.")
    if warmup_steps >= total_steps:
        raise ValueError(f"optim.warmup_epochs={optim_cfg.get('warmup_epochs', 0)} ({warmup_steps} steps) must be "
                         f"shorter than the whole run ({total_steps} steps); lower --config.optim.warmup_epochs "
                         f"or raise --config.num_epochs")
    milestones = tuple(optim_cfg.get("step_milestones", ()) or ())
    if milestones:  # step decay (MoCo v1, the ResNet recipes): lr x step_factor at each milestone epoch
        factor = optim_cfg.get("step_factor", 0.1)
        decay = optax.piecewise_constant_schedule(
            peak, {int(round(e * steps_per_epoch)): factor for e in milestones})
        if warmup_steps == 0:
            return decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup_steps), lambda s: decay(s + warmup_steps)], [warmup_steps])
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, decay_steps=total_steps, alpha=end_factor)
    # decay_steps is the total length, warmup included.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=end_factor * peak)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_labels(params: Any, fixed_lr_prefixes=(), split_norm=False) -> Any:
    """Returns a pytree of group names like `params`: 'fixed', 'norm' or 'default'.

    'fixed': parameters whose '/'-joined path starts with one of `fixed_lr_prefixes` (SimSiam's predictor);
    'norm': biases and BatchNorm parameters when `split_norm` (Barlow Twins' separate bias learning rate).
    """
    decays = decay_mask(params)

    def label(path, _, decay):
        if any(_path_str(path).startswith(prefix) for prefix in fixed_lr_prefixes):
            return "fixed"
        return "norm" if split_norm and not decay else "default"

    return jax.tree_util.tree_map_with_path(label, params, decays)


def make_optimizer(optim_cfg, batch_size: int, steps_per_epoch: int,
                   num_epochs: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optax optimizer, lr schedule) for optim_cfg.name in 'lars' | 'sgd' | 'adam' | 'adamw' | 'lamb'.

    `optim_cfg` (a dict or ConfigDict) needs `name` and `lr`. `lr` is a base rate that `lr_scaling` scales
    with `batch_size` (`scaled_learning_rate`): "linear" (the default) peaks at lr x batch_size / 256, "sqrt"
    at lr x sqrt(batch_size), "none" at lr. The schedule (`make_schedule`) warms up for `warmup_epochs`
    (default 0) and decays by cosine to `end_lr_factor` (default 0) x peak, or by `step_milestones`.
    Other keys and their defaults: weight_decay 0, momentum 0.9 (SGD, LARS), nesterov False, b1 0.9 and
    b2 0.999 (Adam, AdamW, LAMB), trust_coefficient 0.001 and lars_style "simclr" (LARS; the module docstring).
    `optim_cfg.exclude_bias_and_norm` (default True) exempts biases and BatchNorm from weight decay
    (and from LARS's trust ratio); set it False for torch recipes that decay every parameter.
    Optional parameter groups: `fixed_lr_prefixes` (paths such as 'model/predictor' that keep the peak
    learning rate throughout, as SimSiam's predictor) and `bias_lr_factor` (the learning rate of biases and
    BatchNorm parameters relative to the weights', as Barlow Twins' 0.0048 / 0.2).
    """
    name = optim_cfg["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.")
    schedule = make_schedule(optim_cfg, batch_size, steps_per_epoch, num_epochs)
    fixed = tuple(optim_cfg.get("fixed_lr_prefixes", ()) or ())
    bias_factor = float(optim_cfg.get("bias_lr_factor", 1.0))
    if not fixed and bias_factor == 1.0:
        return _base_optimizer(optim_cfg, schedule), schedule
    peak = scaled_learning_rate(optim_cfg["lr"], batch_size, optim_cfg.get("lr_scaling", "linear"))
    transforms = {"default": _base_optimizer(optim_cfg, schedule),
                  "fixed": _base_optimizer(optim_cfg, optax.constant_schedule(peak)),
                  "norm": _base_optimizer(optim_cfg, lambda step: bias_factor * schedule(step))}
    labels = lambda params: group_labels(params, fixed, split_norm=bias_factor != 1.0)  # noqa: E731
    return optax.multi_transform(transforms, labels), schedule


def _base_optimizer(optim_cfg, schedule) -> optax.GradientTransformation:
    """Returns the optimizer named by optim_cfg.name driven by `schedule`."""
    name = optim_cfg["name"]
    wd = optim_cfg.get("weight_decay", 0.0)
    mask = decay_mask if optim_cfg.get("exclude_bias_and_norm", True) else _all_true
    momentum = optim_cfg.get("momentum", 0.9)
    nesterov = optim_cfg.get("nesterov", False)
    b1, b2 = optim_cfg.get("b1", 0.9), optim_cfg.get("b2", 0.999)

    if name == "lars":
        tx = _lars(optim_cfg.get("lars_style", "simclr"), schedule, wd, mask,
                   optim_cfg.get("trust_coefficient", 0.001), momentum, nesterov)
    elif name == "sgd":
        # torch.optim.SGD: L2 decay added to the gradient, momentum on the gradient, then the lr.
        tx = optax.chain(optax.add_decayed_weights(wd, mask=mask),
                         optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
    elif name == "adam":
        # torch.optim.Adam(weight_decay=...): L2 decay added to the gradient before the moments (coupled),
        # eps 1e-8 outside the square root; "adamw" decouples it (torch.optim.AdamW).
        tx = optax.chain(optax.add_decayed_weights(wd, mask=mask), optax.adam(schedule, b1=b1, b2=b2, eps=1e-8))
    elif name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd, mask=mask)
    else:
        tx = optax.lamb(schedule, b1=b1, b2=b2, weight_decay=wd, mask=mask)
    return tx


def _lars(style, schedule, weight_decay, mask, eta, momentum, nesterov) -> optax.GradientTransformation:
    """Returns LARS in the `style` of one paper's official code (module docstring); `mask` selects the parameters
    that get weight decay and the trust ratio."""
    if style == "simclr":
        return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=mask, trust_coefficient=eta,
                          trust_ratio_mask=mask, momentum=momentum, nesterov=nesterov)
    if style == "byol":
        trust = optax.chain(optax.add_decayed_weights(weight_decay, mask),
                            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta), mask))
    elif style == "larc":
        trust = _scale_by_larc(eta, weight_decay, mask)
    else:
        raise ValueError(f"Unknown optim.lars_style {style!r}; expected one of {LARS_STYLES}.")
    return optax.chain(trust, optax.trace(decay=momentum, nesterov=nesterov), optax.scale_by_learning_rate(schedule))


def _scale_by_larc(eta, weight_decay, mask, eps=1e-8) -> optax.GradientTransformation:
    """apex's LARC with clip=False: for a parameter in `mask` whose weight and gradient norms are both non-zero,
    g <- eta * ||w|| / (||g|| + wd * ||w|| + eps) * (g + wd * w); other gradients pass unchanged."""
    def update_fn(updates, state, params):
        def larc(g, w, included):
            if not included:
                return g
            w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
            ratio = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
            return jnp.where((w_norm > 0) & (g_norm > 0), ratio * (g + weight_decay * w), g)
        return jax.tree.map(larc, updates, params, mask(params)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
