"""MoCo v1/v2 (He et al., 2020; Chen et al., 2020): a momentum key encoder and a queue of negative keys.

The contract is simclr.py's (see its docstring); the networks, views and `encode` are SimCLR's (backbone plus
an MLPHead from config.head: one linear layer for v1, Linear-ReLU-Linear without BatchNorm for v2). Specific
to MoCo, following facebookresearch/moco (builder.py) and, for CIFAR-10, its colab demo
(colab/moco_cifar10_demo.ipynb) and lightly's CIFAR-10 benchmark:
- Key encoder: params are an EMA of the query params (`config.moco.momentum`), initialised as a copy; it
  runs in train mode (BatchNorm on batch statistics) and never carries gradient. Its running BatchNorm
  statistics live in extras["key_batch_stats"], updated by its own forward passes as the official key
  encoder's buffers are; nothing reads them (the evaluators use the query encoder), they are kept so that
  the key encoder is a complete network in the checkpoint.
- Loss: InfoNCE of each query against its key and the queue, in V directions (query view, key view): (0, 1),
  and (1, 0) too when `config.moco.symmetric`. The loss is the MEAN over directions, as lightly's
  0.5 (loss_1 + loss_2); the colab SUMS them. For SGD with momentum and coupled weight decay (torch's SGD,
  optim.name = "sgd") the sum at (lr, wd) takes exactly the steps of the mean at (2 lr, wd / 2): with g the
  mean's gradient, the sum's decayed gradient is 2 g + wd w = 2 (g + (wd / 2) w), the momentum buffer is
  linear in it (so twice the mean's, nesterov or not), and lr x 2 v = (2 lr) x v. Not so for LARS or Adam.
- Queue: extras["queue"] is V' x K x D L2-normalised keys, with the write position extras["queue_ptr"]; both
  are part of the checkpoint. Every direction scores against the queue as it was before this step's write.
  Asymmetric: V' = 1, and each step writes the global batch of N keys. Symmetric with `moco.shared_queue`
  false: V' = 2, one queue per direction (solo-learn's symmetric MoCo), each taking its direction's N keys.
  Symmetric with `moco.shared_queue` (the colab's single queue, lightly's single memory bank): V' = 1, both
  directions score against it, and each step writes 2N keys: direction 0's N, then direction 1's. Keys are
  gathered from every replica in global-batch order (replica 0 first) and written at ptr (FIFO ring), then
  ptr = (ptr + M) % K with M = N or 2N keys per step; K must be a multiple of M. The order within a step's
  2N rows does not matter (they are overwritten together); the colab writes view 0's keys (direction 1's)
  first. Lightly's second direction reads its bank after the first direction's N keys were written, so its
  negatives include this step's keys of the query's own view; here, as in the colab, both read the pre-step queue.
- Shuffled BatchNorm (`config.moco.shuffle_bn`): the key view of the global batch is permuted (a
  permutation drawn from the step's replicated rng, the same on every device), split into
  G = max(1, shuffle_groups // devices) groups per device, each group normalised with its own batch
  statistics, and the keys put back in the original order. With 8 devices and shuffle_groups = 8 this is the
  official per-GPU shuffled BatchNorm; on one device the same 8 groups are emulated with a vmap (the colab's
  and lightly's SplitBatchNorm, bn_splits / num_splits = 8). Either way the total number of groups is the
  same, so the result does not depend on the device count. With shuffle_bn off the key encoder normalises as
  the query encoder does without query_bn_groups: over the global batch when model.sync_bn, over each
  device's batch otherwise.
- Split BatchNorm for the queries (`config.moco.query_bn_groups`, 0 = off): each device's query view is
  normalised in G = max(1, query_bn_groups // devices) groups of consecutive (unshuffled) rows, each with its
  own batch statistics; the new running statistics are the mean over the groups, then over devices. The
  colab and lightly build the query encoder with the same 8-way SplitBatchNorm as the key encoder: one GPU
  emulating per-GPU BatchNorm on 8. Off, the query encoder normalises over the global batch when
  model.sync_bn, over each device's batch otherwise (the official ImageNet code: DDP without SyncBN, so
  8 GPUs give 8 groups, but one device one group).
- With gradient accumulation each chunk is normalised apart (ssl_jax/accumulate.py), so chunks count as
  devices: both G above divide by devices x grad_accum_steps, and the total number of groups stays the same.
- The momentum update follows the optimizer step (update_extras); the official code updates the key encoder
  at the start of the next forward pass, which is the same sequence of key encoders.
"""
import jax
import jax.numpy as jnp
import optax

from ssl_jax import losses, parallel
from ssl_jax.methods import common, simclr

feature_dim = simclr.feature_dim
encode = simclr.encode  # the query encoder's backbone, as the official linear evaluation uses encoder_q
views = simclr.views  # two views, both with config.augment (MoCo v2's recipe adds blur there)


def _directions(config):
    """Returns the (query view, key view) pairs: (0, 1), and (1, 0) too when the loss is symmetric."""
    return ((0, 1), (1, 0)) if config.moco.symmetric else ((0, 1),)


def _shared_queue(config):
    """Returns whether both directions of a symmetric loss use one queue (moco.shared_queue)."""
    return bool(config.moco.symmetric and config.moco.shared_queue)


def check_queue_size(queue_size, global_batch, shared=False):
    """Raises ValueError unless the queue holds a whole number of steps' keys: N each step, 2N when `shared`."""
    per_step = 2 * global_batch if shared else global_batch
    if queue_size <= 0 or queue_size % per_step:
        what = (f"twice the global batch size (2 x {global_batch} = {per_step}: the shared queue takes both "
                f"directions' keys each step)" if shared else f"the global batch size ({global_batch})")
        fit = max(1, queue_size // per_step) * per_step
        raise ValueError(f"moco.queue_size={queue_size} must be a positive multiple of {what} so each step's keys "
                         f"fit at the write pointer without wrapping; e.g. --config.moco.queue_size={fit}")


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras): SimCLR-style networks plus key encoder copy, queue and pointer."""
    check_queue_size(config.moco.queue_size, config.batch_size, _shared_queue(config))
    k_net, k_queue = jax.random.split(rng)
    params, batch_stats, _ = simclr.init(k_net, config, sample_images)
    num_queues = 1 if _shared_queue(config) else len(_directions(config))
    queue_VxKxD = losses.l2_normalize(jax.random.normal(
        k_queue, (num_queues, config.moco.queue_size, config.head.out_dim), jnp.float32))
    # Copies, not aliases: the key encoder is its own state (and donated buffers must not be shared).
    extras = {"key_params": jax.tree.map(jnp.copy, params), "key_batch_stats": jax.tree.map(jnp.copy, batch_stats),
              "queue": queue_VxKxD, "queue_ptr": jnp.zeros((), jnp.int32)}
    return params, batch_stats, extras


def _groups(requested, name, b, config, axis_name):
    """Returns G = max(1, requested // (devices x grad_accum_steps)), checked to divide this pass's b rows."""
    groups = max(1, requested // (parallel.axis_size(axis_name) * config.get("grad_accum_steps", 1)))
    if b % groups:
        raise ValueError(f"moco.{name}={requested} splits each device's batch of {b} images (per gradient "
                         f"accumulation chunk) into {groups} BatchNorm groups; use a divisible batch size")
    return groups


def _grouped_forward(params, batch_stats, x, groups, config):
    """Returns (features, head outputs, running stats) of x in `groups` consecutive groups of rows.

    Each group is normalised with its own batch statistics (BatchNorm over no device axis); the returned
    running statistics are the mean over the groups of each group's update.
    """
    b = x.shape[0]
    backbone, head = simclr.networks(config, None)
    h_G, z_G, stats_G = jax.vmap(lambda xg: common.train_forward(backbone, head, params, batch_stats, xg))(
        x.reshape(groups, b // groups, *x.shape[1:]))
    rows = lambda a: a.reshape(b, *a.shape[2:])  # noqa: E731 (groups x rows -> rows)
    return rows(h_G), rows(z_G), jax.tree.map(lambda s: jnp.mean(s, axis=0), stats_G)


def query_forward(params, batch_stats, x, config, axis_name):
    """Returns (features_B, queries_BxD, new batch_stats) of this device's query view in train mode.

    moco.query_bn_groups = 0: BatchNorm over the batch (synchronised when model.sync_bn). > 0: split BatchNorm
    over G groups of consecutive rows (see the module docstring); statistics then pmean over devices.
    """
    if not config.moco.query_bn_groups:
        backbone, head = simclr.networks(config, axis_name)
        return common.train_forward(backbone, head, params, batch_stats, x)
    groups = _groups(config.moco.query_bn_groups, "query_bn_groups", x.shape[0], config, axis_name)
    h, q, stats = _grouped_forward(params, batch_stats, x, groups, config)
    return h, q, jax.tree.map(lambda s: parallel.pmean(s, axis_name), stats)


def key_embeddings(key_params, key_stats, view, rng, config, axis_name):
    """Returns (keys_NxD of the global batch in batch order, this device's keys_BxD, new key batch_stats).

    Keys are L2-normalised float32 without gradient; keys_NxD and the statistics are identical on every
    device. With config.moco.shuffle_bn the global batch is reordered by jax.random.permutation(rng, N)
    before the key encoder (BatchNorm per group of the shuffled batch, see the module docstring) and the keys
    are returned in the original order.
    """
    key_params, key_stats = jax.lax.stop_gradient((key_params, key_stats))
    view = jax.lax.stop_gradient(view).astype(jnp.dtype(config.model.dtype))
    b = view.shape[0]
    if not config.moco.shuffle_bn:
        backbone, head = simclr.networks(config, axis_name)
        _, z_BxD, stats = common.train_forward(backbone, head, key_params, key_stats, view)
        k_BxD = losses.l2_normalize(z_BxD.astype(jnp.float32))
        k_NxD = parallel.all_gather_invariant(k_BxD, axis_name)
    else:
        groups = _groups(config.moco.shuffle_groups, "shuffle_groups", b, config, axis_name)
        x_N = parallel.all_gather(view, axis_name)
        n = x_N.shape[0]
        perm_N = jax.random.permutation(rng, n)
        mine_B = jax.lax.dynamic_slice_in_dim(perm_N, parallel.axis_index(axis_name) * b, b)
        _, z_B, stats = _grouped_forward(key_params, key_stats, x_N[mine_B], groups, config)
        k_shuffled_BxD = losses.l2_normalize(z_B.astype(jnp.float32))
        # Row j of the gathered keys belongs to example perm[j]: the inverse permutation restores batch order.
        k_NxD = parallel.all_gather_invariant(k_shuffled_BxD, axis_name)[jnp.argsort(perm_N)]
        k_BxD = jax.lax.dynamic_slice_in_dim(k_NxD, parallel.axis_index(axis_name) * b, b)
    # Per-device (or per-group) running statistics are averaged, so the replicated state stays identical.
    stats = jax.tree.map(lambda s: parallel.pmean(s, axis_name), stats)
    return jax.lax.stop_gradient((k_NxD, k_BxD, stats))


def _top1(q_BxD, k_BxD, queue_KxD, axis_name):
    """Returns the global fraction of queries whose positive key beats every key in the queue."""
    q = losses.l2_normalize(q_BxD.astype(jnp.float32))
    pos_B = jnp.sum(q * k_BxD, axis=1)
    hits = pos_B > jnp.max(q @ queue_KxD.T, axis=1)
    return parallel.pmean(jnp.mean(hits.astype(jnp.float32)), axis_name)


def embed(params, batch_stats, extras, views, rng, progress, *, config, axis_name):
    """Returns ({"q": queries B x V x D, "k": their keys B x V x D (no gradient), "features"}, (stats, side)).

    V directions (see _directions); side["key_batch_stats"]: the key encoder's new running statistics.
    """
    del progress
    extras = jax.lax.stop_gradient(extras)
    key_stats = extras["key_batch_stats"]
    queries, keys, features = [], [], None
    for v, (qi, ki) in enumerate(_directions(config)):
        x = views[qi].astype(jnp.dtype(config.model.dtype))
        h, q_BxD, batch_stats = query_forward(params, batch_stats, x, config, axis_name)
        _, k_BxD, key_stats = key_embeddings(extras["key_params"], key_stats, views[ki],
                                             jax.random.fold_in(rng, v), config, axis_name)
        queries.append(q_BxD)
        keys.append(k_BxD)
        # The first view's query: the online probe's features, the collapse monitor's input.
        features = jax.lax.stop_gradient(h).astype(jnp.float32) if features is None else features
    emb = {"q": jnp.stack(queries, axis=1), "k": jnp.stack(keys, axis=1), "features": features}
    return emb, (batch_stats, {"key_batch_stats": key_stats})


def embedding_loss(params, emb, side, extras, rng, progress, *, config, axis_name):
    """Returns InfoNCE of queries against their keys and the queue (mean over directions), metrics and aux.

    Every direction reads the queue as it was before this step (its own queue, or the shared one).
    aux["keys"]: the keys for enqueue, each direction's N keys gathered in global-batch order: V x N x D
    (one row per queue), or 1 x 2N x D with the shared queue (direction 0's N, then direction 1's);
    aux["key_batch_stats"]: the key encoder's new running statistics. The queue is read under stop_gradient.
    """
    del params, rng, progress
    queue_VxKxD = jax.lax.stop_gradient(extras["queue"])
    shared = _shared_queue(config)
    values, accs, keys = [], [], []
    for v in range(emb["q"].shape[1]):
        q_BxD, k_BxD, queue_KxD = emb["q"][:, v], emb["k"][:, v], queue_VxKxD[0 if shared else v]
        values.append(losses.info_nce(q_BxD, k_BxD, queue_KxD, config.loss.temperature, axis_name=axis_name))
        accs.append(_top1(q_BxD, k_BxD, queue_KxD, axis_name))
        keys.append(parallel.all_gather_invariant(k_BxD, axis_name))
    keys = jnp.concatenate(keys)[None] if shared else jnp.stack(keys)
    aux = {"features": emb["features"], "embeddings": emb["q"][:, 0], "keys": keys,
           "key_batch_stats": side["key_batch_stats"]}
    return sum(values) / len(values), ({"contrastive_acc": sum(accs) / len(accs)}, aux)


loss = common.composed_loss(embed, embedding_loss)


def enqueue(queue_VxKxD, ptr, keys_VxMxD):
    """Returns (queues with keys_VxMxD written at rows ptr .. ptr+M-1, (ptr + M) % K): the FIFO ring buffer."""
    k, m = queue_VxKxD.shape[1], keys_VxMxD.shape[1]
    if k % m:
        raise ValueError(f"a queue of {k} rows cannot take {m} keys per step at the write pointer without "
                         f"wrapping (see check_queue_size)")
    queue = jax.lax.dynamic_update_slice(queue_VxKxD, keys_VxMxD.astype(queue_VxKxD.dtype), (0, ptr, 0))
    return queue, ((ptr + m) % k).astype(jnp.int32)


def update_extras(params, extras, aux, progress, config):
    """Returns extras with the key encoder moved toward the new params (EMA) and this step's keys enqueued."""
    del progress
    key_params = optax.incremental_update(params, extras["key_params"], step_size=1.0 - config.moco.momentum)
    queue, ptr = enqueue(extras["queue"], extras["queue_ptr"], aux["keys"])
    return {"key_params": key_params, "key_batch_stats": aux["key_batch_stats"], "queue": queue, "queue_ptr": ptr}
