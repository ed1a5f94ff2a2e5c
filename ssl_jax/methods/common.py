"""What every method file shares: the backbone built from config.model, its size, and `encode`.

Each method keeps its backbone under params["backbone"] / batch_stats["backbone"], so the evaluators'
`encode` is the same function for all of them.
"""
import jax
import jax.numpy as jnp

from ssl_jax import models


def compute_dtype(config):
    """Returns the compute dtype named by config.model.dtype (parameters stay float32)."""
    return jnp.dtype(config.model.dtype)


def bn_axis(config, axis_name):
    """Returns the axis BatchNorm averages its statistics over: `axis_name` when config.model.sync_bn."""
    return axis_name if config.model.sync_bn else None


def backbone(config, axis_name=None, bn_groups=1):
    """Returns the flax backbone of config.model, BatchNorm synchronized over `axis_name` when sync_bn and
    taking `bn_groups` views per training batch (models.ResNet.bn_groups)."""
    module, _ = models.backbone_from_config(
        config.model, dtype=compute_dtype(config), bn_axis_name=bn_axis(config, axis_name), bn_groups=bn_groups)
    return module


def feature_dim(config):
    """Returns the backbone's representation size."""
    return models.backbone_from_config(config.model)[1]


def head_hidden_dim(config):
    """Returns the head's hidden width: head.hidden_dim, or the backbone's feature width when it is 0 (SimCLR v2's
    head; the same for every method whose head is configured by `head`)."""
    return config.head.hidden_dim or feature_dim(config)


def encode(params, batch_stats, images, config):
    """Returns float32 backbone features_BxD of preprocessed images, BatchNorm in inference mode."""
    return backbone(config).apply({"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
                                  images.astype(compute_dtype(config)), train=False).astype(jnp.float32)


def train_forward(backbone, head, params, batch_stats, x):
    """Returns (backbone features, head outputs, new batch_stats) of one batch in training mode.

    `params` / `batch_stats` hold the "backbone" and "head" subtrees, as in SimCLR, MoCo and Barlow Twins.
    """
    h, b_vars = backbone.apply({"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
                               x, train=True, mutable=["batch_stats"])
    z, h_vars = head.apply({"params": params["head"], "batch_stats": batch_stats["head"]},
                           h, train=True, mutable=["batch_stats"])
    return h, z, {"backbone": b_vars["batch_stats"], "head": h_vars.get("batch_stats", {})}


def split_views(outputs, num_views):
    """Returns the outputs of one pass over `num_views` concatenated views as one tree per view (each leaf
    split into equal blocks of rows along its leading axis)."""
    leaves, treedef = jax.tree.flatten(outputs)
    blocks = [jnp.split(x, num_views) for x in leaves]  # each leaf split once
    return [treedef.unflatten([b[i] for b in blocks]) for i in range(num_views)]


def keep_extras(params, extras, aux, progress, config):
    """Returns extras unchanged: the update_extras of methods with no state outside the optimizer."""
    del params, aux, progress, config
    return extras


def composed_loss(embed, embedding_loss):
    """Returns the contract's `loss` of a method given as `embed` (per-example outputs) + `embedding_loss`.

    Splitting a method this way is what makes gradient accumulation exact for losses over the whole batch
    (ssl_jax/accumulate.py): the trainer can embed a batch chunk by chunk, evaluate `embedding_loss` once on
    all rows, and backpropagate chunk by chunk. `embedding_loss` reads params only under stop_gradient.
    """
    def loss(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
        emb, (new_stats, side) = embed(params, batch_stats, extras, views, rng, progress, config=config,
                                       axis_name=axis_name)
        value, (metrics, aux) = embedding_loss(jax.lax.stop_gradient(params), emb, side, extras, rng, progress,
                                               config=config, axis_name=axis_name)
        return value, (new_stats, metrics, aux)
    loss.__doc__ = f"embed, then embedding_loss: {embed.__module__}.loss"
    return loss
