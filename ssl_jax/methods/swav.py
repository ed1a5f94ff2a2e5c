"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn cluster assignments between multi-crop views.

Every crop goes through backbone -> projection head -> L2 normalisation -> prototypes (a bias-free linear
layer whose P columns are unit vectors), giving scores B x P per crop. The codes of each large crop come from
Sinkhorn-Knopp over the global batch (sums over all replicas), without gradient; the loss predicts each large
crop's code from every other crop's scores (softmax at temperature 0.1), `losses.swav_loss`.

Decisions checked against the official code (facebookresearch/swav: main_swav.py, src/resnet50.py,
src/multicropdataset.py):
  - Multi-crop: `num_large_crops` crops of config.augment (size crop_size, scale (min_scale, max_scale)),
    then `num_small_crops` crops of size small_crop_size and scale (small_min_scale, small_max_scale), all
    with the same colour recipe (the official MultiCropDataset). The codes come from the large crops
    (`crops_for_assign = [0, 1]`).
  - The backbone runs once per resolution group (same-size crops concatenated), so its BatchNorm normalises
    each group with that group's statistics and its running averages are updated once per group, as the
    official forward does. The projection head runs once on the features of all crops together.
    `swav.bn_per_crop` (the cifar10 preset) instead normalises every crop with its own statistics, in the
    backbone and in the head, as PyTorch code that calls the network once per crop does (lightly's
    benchmark): still one pass per resolution group (models.GroupedBatchNorm), the running averages updated
    once per crop in crop order.
  - Prototypes: the official loop copies W / ||W|| into the layer before every forward. Here the trainer
    calls `project_params` after every optimizer update (the optional post-update hook of the method
    contract), and the forward divides by the columns' norms as constants (`prototype_matrix`), so the scores
    and the gradient are the official ones and the optimizer sees unit-norm weights, as it does there.
  - Frozen prototypes: for the first freeze_prototypes_epochs x steps_per_epoch steps (official: 313
    iterations, one ImageNet epoch at batch 4096) the prototypes enter the loss through stop_gradient, so
    their gradient is exactly zero. The official code drops the gradient (`p.grad = None`), so the optimizer
    skips the prototypes entirely. Here the LARC optimizer (optim.lars_style="larc", the imagenet preset)
    skips them too, as apex LARC skips weight decay where the gradient is 0; under SGD, Adam or the other LARS
    styles weight decay still shrinks them during the freeze, which changes their norm but not their
    direction, and the forward only sees the direction (project_params restores the norm after each step).
  - Queue (queue_length > 0): the embeddings of the large crops of the last queue_length / batch_size global
    batches, newest first, gathered in global example order (`extras["queue"]`: num_large x L x d). From
    epoch queue_start_epoch every step enqueues; once the queue is full its rows are scored with the current
    prototypes and take part in Sinkhorn, and only the batch's codes are kept. The official code keeps one
    queue of L / world_size rows per GPU; here each device scores its own slice of the global queue, so the
    rows Sinkhorn sees over all replicas are the same set, whatever the device count.
"""
import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax import augment, losses, models, parallel
from ssl_jax.methods import common

_HIGHEST = jax.lax.Precision.HIGHEST  # scores are divided by epsilon = 0.05 before exp: no TF32 here



def networks(config, axis_name=None, head_bn_groups=1):
    """Returns (backbone, projection head) flax modules; BatchNorm synchronized over `axis_name` when sync_bn,
    the head's taking `head_bn_groups` crops per training batch (models.MLPHead.bn_groups)."""
    bn_axis = common.bn_axis(config, axis_name)
    backbone = common.backbone(config, axis_name)
    # Official head: Linear -> BN -> ReLU -> Linear (src/resnet50.py, hidden_mlp=2048, output_dim=128).
    head = models.MLPHead(
        hidden_dims=(common.head_hidden_dim(config),) * (config.head.num_layers - 1), out_dim=config.head.out_dim,
        use_bn=config.head.use_bn, last_bn=config.head.last_bn, dtype=common.compute_dtype(config),
        bn_axis_name=bn_axis, bn_groups=head_bn_groups)
    return backbone, head


def bn_per_crop(config):
    """Returns swav.bn_per_crop: BatchNorm statistics per crop (True, one network call per crop as lightly's
    benchmark makes them) or per resolution group in the backbone and over all crops in the head (False, the
    official forward)."""
    return bool(config.swav.get("bn_per_crop", False))



def _check(config):
    """Raises ValueError for crop counts or a queue length that SwAV cannot use."""
    sw = config.swav
    if sw.num_large_crops < 1 or sw.num_large_crops + sw.num_small_crops < 2:
        raise ValueError(f"SwAV needs at least one large crop and two crops in all, got swav.num_large_crops="
                         f"{sw.num_large_crops}, swav.num_small_crops={sw.num_small_crops}")
    if sw.queue_length < 0 or sw.queue_length % config.batch_size:
        # The official code silently rounds the length down; a config that says 3840 should get 3840.
        fit = max(config.batch_size, sw.queue_length // config.batch_size * config.batch_size)
        raise ValueError(f"swav.queue_length={sw.queue_length} must be 0 (no queue) or a multiple of the "
                         f"global batch_size={config.batch_size}, e.g. --config.swav.queue_length={fit}")


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras): backbone, head and unit-norm prototypes_dxP; the queue if used."""
    _check(config)
    backbone, head = networks(config)
    k_backbone, k_head, k_protos = jax.random.split(rng, 3)
    size = config.augment.crop_size
    x = jnp.zeros((2, size, size, sample_images.shape[-1]), jnp.float32)
    b_vars = backbone.init(k_backbone, x, train=False)
    h_vars = head.init(k_head, jnp.zeros((2, feature_dim(config)), jnp.float32), train=False)
    kernel = jax.random.normal(k_protos, (config.head.out_dim, config.swav.num_prototypes), jnp.float32)
    params = {"backbone": b_vars["params"], "head": h_vars["params"],
              "prototypes": {"kernel": losses.l2_normalize(kernel, axis=0)}}
    batch_stats = {"backbone": b_vars.get("batch_stats", {}), "head": h_vars.get("batch_stats", {})}
    extras = {}
    if config.swav.queue_length:
        shape = (config.swav.num_large_crops, config.swav.queue_length, config.head.out_dim)
        extras["queue"] = jnp.zeros(shape, jnp.float32)
    return params, batch_stats, extras


def crop_specs(config):
    """Returns one ViewSpec per crop: num_large_crops from config.augment, then num_small_crops small ones."""
    sw = config.swav
    large = augment.spec_from_config(config.augment)
    small = dataclasses.replace(large, size=sw.small_crop_size, crop_scale=(sw.small_min_scale, sw.small_max_scale))
    return (large,) * sw.num_large_crops + (small,) * sw.num_small_crops


def views(keys_Bx2, images, config):
    """Returns the multi-crop views: large crops (B x S x S x 3) first, then small ones (B x s x s x 3)."""
    out = []
    for i, spec in enumerate(crop_specs(config)):
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, i + 1)
        out.append(augment.view_batch(keys, images, spec))
    return tuple(out)


def freeze_steps(config, steps_per_epoch):
    """Returns the number of initial steps during which the prototypes get no gradient."""
    return config.swav.freeze_prototypes_epochs * steps_per_epoch


def queue_active(config, progress, global_batch):
    """Returns a bool scalar: the queue is full and its rows take part in Sinkhorn at this step."""
    steps_to_fill = config.swav.queue_length // global_batch
    return progress["step"] >= config.swav.queue_start_epoch * progress["steps_per_epoch"] + steps_to_fill


def prototype_matrix(params, progress, config):
    """Returns the unit-column prototypes_dxP used for scores; stop-gradient during the freeze."""
    kernel = params["prototypes"]["kernel"]
    n_frozen = freeze_steps(config, progress["steps_per_epoch"])
    if n_frozen > 0:
        kernel = jnp.where(progress["step"] < n_frozen, jax.lax.stop_gradient(kernel), kernel)
    kernel = kernel.astype(jnp.float32)
    # Divided by its norm as a constant: the scores are those of unit columns, and the gradient is the full
    # gradient w.r.t. the columns, as official SwAV's (it renormalises in place, then uses the raw weights),
    # not its projection onto the sphere's tangent plane that differentiating through the norm would give.
    norm_1xP = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0, keepdims=True))
    return kernel / jax.lax.stop_gradient(jnp.maximum(norm_1xP, 1e-12))


def _embed(params, batch_stats, views, config, axis_name):
    """Returns (features_NxD, L2-normalised z_Nxd, new batch_stats), N = crops x B, rows in crop order."""
    per_crop = bn_per_crop(config)
    _, head = networks(config, axis_name, head_bn_groups=len(views) if per_crop else 1)
    stats, feats, start = batch_stats["backbone"], [], 0
    while start < len(views):  # one backbone pass per run of same-size crops
        end = start
        while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
            end += 1
        backbone = common.backbone(config, axis_name, bn_groups=end - start if per_crop else 1)
        x = jnp.concatenate(views[start:end], axis=0).astype(common.compute_dtype(config))
        h, mutated = backbone.apply({"params": params["backbone"], "batch_stats": stats}, x, train=True,
                                    mutable=["batch_stats"])
        stats = mutated["batch_stats"]
        feats.append(h)
        start = end
    h = jnp.concatenate(feats, axis=0)
    z, h_vars = head.apply({"params": params["head"], "batch_stats": batch_stats["head"]}, h, train=True,
                           mutable=["batch_stats"])
    new_stats = {"backbone": stats, "head": h_vars.get("batch_stats", {})}
    return h, losses.l2_normalize(z.astype(jnp.float32)), new_stats


def _codes(scores_BxP, crop, protos_dxP, extras, use_queue, config, axis_name):
    """Returns Sinkhorn codes B x P of one large crop, with the queue's rows when `use_queue`."""
    sw = config.swav
    codes_BxP = losses.sinkhorn(scores_BxP, sw.epsilon, sw.sinkhorn_iterations, axis_name)
    if "queue" not in extras:
        return codes_BxP
    # Each device scores its own slice of the global queue; Sinkhorn's sums over replicas see all rows.
    rows = sw.queue_length // parallel.axis_size(axis_name)
    queue_RxD = jax.lax.dynamic_slice_in_dim(extras["queue"][crop], parallel.axis_index(axis_name) * rows, rows)
    queue_scores_RxP = jnp.matmul(jax.lax.stop_gradient(queue_RxD), protos_dxP, precision=_HIGHEST)
    all_scores = jnp.concatenate([queue_scores_RxP, scores_BxP], axis=0)
    with_queue_BxP = losses.sinkhorn(all_scores, sw.epsilon, sw.sinkhorn_iterations, axis_name)[rows:]
    return jnp.where(use_queue, with_queue_BxP, codes_BxP)


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"z": normalised projections B x crops x d, "scores": prototype scores B x crops x P,
    "features": the first large crop's backbone features}, (new BatchNorm statistics, {}))."""
    del extras, rng
    b, n_crops = views[0].shape[0], len(views)
    h, z, new_stats = _embed(params, batch_stats, views, config, axis_name)
    scores = jnp.matmul(z, prototype_matrix(params, progress, config), precision=_HIGHEST)
    per_example = lambda x: x.reshape(n_crops, b, x.shape[-1]).transpose(1, 0, 2)  # noqa: E731 (crop order -> rows)
    emb = {"z": per_example(z), "scores": per_example(scores),
           "features": jax.lax.stop_gradient(h[:b]).astype(jnp.float32)}
    return emb, (new_stats, {})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns the swapped-prediction loss (global mean), metrics and aux.

    aux: "features" (backbone features of the first large crop), "embeddings" (its normalised projection),
    "assignments" (num_large x B x P Sinkhorn codes, no gradient), "scores" (crops x B x P, no gradient);
    with a queue also "enqueue" (num_large x global B x d, the large crops' embeddings, global order).
    params are read for the prototypes that score the queue (no gradient: the official torch.no_grad()).
    """
    del side, rng
    sw = config.swav
    n_crops = emb["scores"].shape[1]
    protos_dxP = prototype_matrix(params, progress, config)
    scores_per_crop = [emb["scores"][:, v] for v in range(n_crops)]
    global_b = emb["scores"].shape[0] * parallel.axis_size(axis_name)
    use_queue = queue_active(config, progress, global_b) if "queue" in extras else False
    codes = [_codes(jax.lax.stop_gradient(scores_per_crop[i]), i, protos_dxP, extras, use_queue, config,
                    axis_name) for i in range(sw.num_large_crops)]
    value = losses.swav_loss(scores_per_crop, codes, sw.temperature, axis_name)

    n_frozen = freeze_steps(config, progress["steps_per_epoch"])
    metrics = {"prototypes_frozen": jnp.asarray(progress["step"] < n_frozen, jnp.float32)}
    aux = {"features": emb["features"], "embeddings": emb["z"][:, 0], "assignments": jnp.stack(codes),
           "scores": jax.lax.stop_gradient(jnp.stack(scores_per_crop))}
    if "queue" in extras:
        metrics["queue_active"] = jnp.asarray(use_queue, jnp.float32)
        large_BxLxd = jax.lax.stop_gradient(emb["z"][:, :sw.num_large_crops])
        aux["enqueue"] = parallel.all_gather_invariant(large_BxLxd, axis_name).transpose(1, 0, 2)
    return value, (metrics, aux)


loss = common.composed_loss(embed, embedding_loss)


def update_extras(params, extras, aux, progress, config):
    """Returns extras with this step's large-crop embeddings pushed onto the queue (from queue_start_epoch)."""
    del params
    if "queue" not in extras:
        return extras
    queue = extras["queue"]
    new = aux["enqueue"].astype(queue.dtype)
    shifted = jnp.concatenate([new, queue[:, :queue.shape[1] - new.shape[1]]], axis=1)
    started = progress["step"] >= config.swav.queue_start_epoch * progress["steps_per_epoch"]
    return {**extras, "queue": jnp.where(started, shifted, queue)}


def project_params(params, progress, config):
    """Returns params with unit-length prototype columns: the official in-place renormalisation.

    The trainer calls it after every optimizer update. Without it the forward's normalisation would give the
    same scores, but the optimizer would see drifting raw weights: their gradient scaled by 1 / ||w||, weight
    decay shrinking them during the freeze, and the effective step size of SGD/Adam changing with the norm.
    """
    del progress, config
    kernel = params["prototypes"]["kernel"]
    return {**params, "prototypes": {"kernel": losses.l2_normalize(kernel, axis=0)}}


feature_dim = common.feature_dim
encode = common.encode
