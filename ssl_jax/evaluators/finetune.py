"""Supervised training on top of a pretrained backbone: whole-network fine-tuning or a frozen-backbone probe.

Two protocols share this loop:
- semi-supervised fine-tuning (SimCLR): backbone and a new linear head trained together, BatchNorm in train
  mode, on a labelled subset. For SimCLR v2 configs (head.finetune_layer = k) the classifier starts from the
  projection head's first k hidden layers (Dense + BN + ReLU, pretrained weights kept), the official
  ft_proj_selector.
- the full linear protocol: the backbone frozen in inference mode, an affine-free BatchNorm (standardisation)
  and a linear classifier trained on features recomputed from freshly augmented images at every step.
Augmentation is random resized crop (scale 0.08 to 1 for every method) + flip on the device from uint8 batches
(colour ops off). The step is a plain `jax.jit` over global arrays whose batch axis is sharded on "data":
BatchNorm's batch mean and variance are then reductions over the global batch, which XLA computes across
devices, i.e. synchronised BatchNorm as in pretraining, with no axis names in the model. Optimizer: SGD with
Nesterov momentum 0.9, cosine decay, weight decay on kernels only.
"""
import dataclasses
from typing import Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import augment, metrics, models, parallel
from ssl_jax.data import pipeline
from ssl_jax.evaluators import features as features_lib, knn

class_rank = knn.class_rank  # the fine-tuned classifier's ranks: argmax's tie-breaking, non-finite rows wrong


class NonFiniteFineTuningError(FloatingPointError, ValueError):
    """The fine-tuning loss became NaN or inf (a ValueError: `ssl-jax eval` reports it in one line)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one fine-tuning run; lr is the peak learning rate (already scaled by batch size)."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    train_backbone: bool = True
    backbone_lr_factor: float = 1.0
    seed: int = 0


def head_layers(config, params) -> int:
    """Returns how many pretrained projection-head hidden layers fine-tuning keeps (SimCLR v2: 1, else 0)."""
    if "head" not in config or "head" not in params:
        return 0
    return int(config.head.get("finetune_layer", 0))


def _networks(config, num_classes, layers, hidden_width, standardize):
    """Returns (backbone, norm or None, classifier) modules; no BN axis names (global arrays under jit)."""
    backbone, feature_dim = models.backbone_from_config(config.model, dtype=jnp.dtype(config.model.dtype))
    use_bn = bool(config.head.get("use_bn", True)) if "head" in config else True
    classifier = models.MLPHead(hidden_dims=(hidden_width,) * layers, out_dim=num_classes, use_bn=use_bn)
    norm = nn.BatchNorm(use_scale=False, use_bias=False, momentum=0.9, epsilon=1e-5,
                        use_fast_variance=False) if standardize else None
    return backbone, norm, classifier, feature_dim


def _apply(module, variables, x, update_stats, **kwargs):
    """Returns (output, new batch_stats): updated statistics in train mode, the given ones otherwise."""
    if update_stats:
        out, mutated = module.apply(variables, x, mutable=["batch_stats"], **kwargs)
        return out, mutated.get("batch_stats", {})
    return module.apply(variables, x, **kwargs), variables.get("batch_stats", {})


class Model:
    """Backbone + (standardisation) + classifier; `variables` = {'params': {...}, 'batch_stats': {...}}."""

    def __init__(self, config, params, batch_stats, num_classes, *, train_backbone=True):
        self.train_backbone = train_backbone
        self.layers = head_layers(config, params) if train_backbone else 0
        width = params["head"]["dense0"]["kernel"].shape[1] if self.layers else 0
        self.backbone, self.norm, self.classifier, feature_dim = _networks(
            config, num_classes, self.layers, width, standardize=not train_backbone)
        cls_vars = self.classifier.init(jax.random.PRNGKey(0), jnp.zeros((2, feature_dim)), train=False)
        cls_params, cls_stats = dict(cls_vars["params"]), dict(cls_vars.get("batch_stats", {}))
        for i in range(self.layers):  # SimCLR v2: keep the pretrained hidden layers of the projection head
            cls_params[f"dense{i}"] = params["head"][f"dense{i}"]
            if f"bn{i}" in cls_params:
                cls_params[f"bn{i}"] = params["head"][f"bn{i}"]
                cls_stats[f"bn{i}"] = batch_stats["head"][f"bn{i}"]
        # A zero-initialised output layer: the pretrained representation is what the first steps see.
        out = f"dense{self.layers}"
        cls_params[out] = jax.tree.map(jnp.zeros_like, cls_params[out])
        stats = {"backbone": batch_stats["backbone"], "classifier": cls_stats}
        if self.norm is not None:
            stats["norm"] = self.norm.init(jax.random.PRNGKey(0), jnp.zeros((2, feature_dim)),
                                           use_running_average=True)["batch_stats"]
        self.variables = {"params": {"backbone": params["backbone"], "classifier": cls_params},
                          "batch_stats": stats}

    @property
    def trainable(self) -> Tuple[str, ...]:
        return ("backbone", "classifier") if self.train_backbone else ("classifier",)

    def logits(self, params, batch_stats, x, train):
        """Returns (float32 logits_BxC, new batch_stats) of preprocessed views x_BxSxSx3."""
        train_backbone = train and self.train_backbone
        h, b_stats = _apply(self.backbone, {"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
                            x.astype(self.backbone.dtype), train_backbone, train=train_backbone)
        h = h.astype(jnp.float32)
        stats = {"backbone": b_stats}
        if not self.train_backbone:
            h = jax.lax.stop_gradient(h)
        if self.norm is not None:
            h, stats["norm"] = _apply(self.norm, {"batch_stats": batch_stats["norm"]}, h, train,
                                      use_running_average=not train)
        out, stats["classifier"] = _apply(
            self.classifier, {"params": params["classifier"], "batch_stats": batch_stats["classifier"]}, h, train,
            train=train)
        return out, stats


def _make_tx(recipe, total_steps):
    """Returns SGD (Nesterov 0.9, cosine decay to 0, weight decay on kernels)."""
    schedule = optax.cosine_decay_schedule(recipe.lr, max(total_steps, 1))
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim > 1, tree)  # noqa: E731  (kernels, not biases/BN)
    return optax.chain(optax.add_decayed_weights(recipe.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=0.9, nesterov=True))


# torchvision's RandomResizedCrop default, which the official linear evaluation of MoCo, SimSiam, SwAV, BYOL and
# Barlow Twins and SimCLR's fine-tuning all use, whatever crop the method pretrained with.
EVAL_CROP_SCALE = (0.08, 1.0)


def _train_spec(config):
    """Returns the light training augmentation: random resized crop (scale EVAL_CROP_SCALE) + flip, no colour ops.

    The same for every method: the pretraining's augment.min_scale (0.2 for MoCo and SimSiam, 0.14 for SwAV's
    global crops) would make the linear and fine-tuning protocols differ from method to method."""
    a = config.augment
    return augment.ViewSpec(size=a.crop_size, crop_scale=EVAL_CROP_SCALE, flip_p=0.5, jitter_p=0.0,
                            grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=tuple(a.mean), std=tuple(a.std))


def fit(model: Model, config, source, mesh, recipe: Recipe, progress=False) -> List[float]:
    """Trains model.variables in place on `source` for recipe.epochs; returns the train top-1 of every epoch.

    The global batch B is recipe.batch_size clamped to the set and rounded down to a multiple of the devices.
    The run takes ceil(epochs x N / B) steps, as SimCLR's fine-tuning on a repeated dataset does, so it sees
    `epochs` times the N examples whatever the remainder of N / B: dropping each epoch's partial batch would
    train 1% of CIFAR-10 (500 examples, B = 256) for half its epochs. Each batch holds B distinct examples
    (shuffled anew whenever the set is used up, less the remainder); epoch e is the e-th of `epochs` equal
    runs of steps.
    """
    n_dev = mesh.devices.size
    batch = min(recipe.batch_size, len(source)) // n_dev * n_dev
    if batch == 0:
        raise ValueError(f"{len(source)} labelled examples cannot fill a batch on {n_dev} devices")
    total_steps = -(-recipe.epochs * len(source) // batch)  # >= epochs, since batch <= len(source)
    epoch_ends = [(e + 1) * total_steps // recipe.epochs for e in range(recipe.epochs)]
    tx = _make_tx(recipe, total_steps)
    spec = _train_spec(config)
    replicated = parallel.replicated(mesh)

    def step(state, images_B, labels_B, key):
        views = augment.view_batch(jax.random.split(key, images_B.shape[0]), images_B, spec)

        def loss_fn(trainable):
            params = {**state["params"], **trainable}
            logits, stats = model.logits(params, state["batch_stats"], views, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels_B).mean()
            return loss, (stats, jnp.mean(jnp.argmax(logits, -1) == labels_B))

        trainable = {k: state["params"][k] for k in model.trainable}
        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        if "backbone" in updates:  # SGD is linear in the lr: scaling updates is a per-group learning rate
            updates["backbone"] = jax.tree.map(lambda u: u * recipe.backbone_lr_factor, updates["backbone"])
        params = {**state["params"], **optax.apply_updates(trainable, updates)}
        return {"params": params, "batch_stats": stats, "opt_state": opt_state}, {"loss": loss, "top1": acc}

    step_jit = jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))
    trainable = {k: model.variables["params"][k] for k in model.trainable}
    # A copy (may_alias=False): the step donates its state, and the caller's train state must survive that.
    state = jax.device_put({**model.variables, "opt_state": tx.init(trainable)}, replicated, may_alias=False)
    loader = pipeline.HostLoader(source, batch, recipe.seed, 0, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    key = jax.random.PRNGKey(recipe.seed)
    history, start = [], 0
    try:
        for epoch in metrics.progress_bar(recipe.epochs, desc="fine-tune", enabled=progress, unit="epoch",
                                          iterable=range(recipe.epochs)):
            accs = []
            for i in range(start, epoch_ends[epoch]):
                b = parallel.put_batch(next(loader), mesh)
                state, m = step_jit(state, b["image"], b["label"], jax.random.fold_in(key, i))
                accs.append(m["top1"])
            start = epoch_ends[epoch]
            epoch_top1 = float(np.mean(jax.device_get(accs)))
            if not np.isfinite(float(m["loss"])):
                raise NonFiniteFineTuningError(f"non-finite fine-tuning loss in epoch {epoch + 1} of {recipe.epochs} "
                                               f"(learning rate {recipe.lr:g}); try a lower learning rate")
            history.append(epoch_top1)
    finally:
        loader.close()
    model.variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return history


def evaluate(model: Model, config, source, mesh, batch_size, progress=False) -> Dict[str, float]:
    """Returns {'top1', 'top5'} of the model on centre views of `source` (top-5 only with >= 5 classes)."""
    a = config.augment
    size, mean, std = a.crop_size, tuple(a.mean), tuple(a.std)

    @jax.jit
    def predict(variables, images):
        x = augment.center_view(images, size, mean, std)
        return model.logits(variables["params"], variables["batch_stats"], x, train=False)[0]

    variables = model.variables
    batch = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
    local_batches = pipeline.eval_batches(source, batch, jax.process_index(), jax.process_count())
    logits_NxC, labels_N = features_lib.extract_features(
        lambda x: predict(variables, x), local_batches, mesh,
        desc=f"evaluate ({len(source)})", progress=progress)
    rank_N = np.asarray(class_rank(jnp.asarray(logits_NxC), jnp.asarray(labels_N)))
    result = {"top1": float(np.mean(rank_N < 1))}
    if logits_NxC.shape[1] >= 5:
        result["top5"] = float(np.mean(rank_N < 5))
    return result
