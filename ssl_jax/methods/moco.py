"""MoCo v1/v2 (He et al., 2020; Chen et al., 2020): a momentum key encoder and a queue of negative keys.

The contract is simclr.py's (see its docstring); the networks, views and `encode` are SimCLR's (backbone plus
an MLPHead from config.head: one linear layer for v1, Linear-ReLU-Linear without BatchNorm for v2). Specific
to MoCo, following facebookresearch/moco (builder.py):
- Key encoder: params are an EMA of the query params (`config.moco.momentum`), initialised as a copy; it
  runs in train mode (BatchNorm on batch statistics) and never carries gradient. Its running BatchNorm
  statistics live in extras["key_batch_stats"], updated by its own forward passes as the official key
  encoder's buffers are; nothing reads them (the evaluators use the query encoder), they are kept so that
  the key encoder is a complete network in the checkpoint.
- Queue: extras["queue"] is V x K x D (V = 2 when `config.moco.symmetric`, one queue per direction, as
  solo-learn's symmetric MoCo; else V = 1) of L2-normalised keys, with the write position
  extras["queue_ptr"]; both are part of the checkpoint. Each step writes the global batch of keys, gathered
  from every replica in global-batch order (replica 0 first), at ptr (FIFO ring), then ptr = (ptr + N) % K.
  K must be a multiple of the global batch N.
- Shuffled BatchNorm (`config.moco.shuffle_bn`): the key view of the global batch is permuted (a
  permutation drawn from the step's replicated rng, the same on every device), split into
  G = max(1, shuffle_groups // devices) groups per device, each group normalised with its own batch
  statistics, and the keys put back in the original order. With 8 devices and shuffle_groups = 8 this is
  the official per-GPU shuffled BatchNorm; on one device the same 8 groups are emulated with a vmap.
  Either way the total number of groups is the same, so the result does not depend on the device count.
  With shuffle_bn off the key encoder uses the query encoder's BatchNorm (synchronised when model.sync_bn).
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


def check_queue_size(queue_size, global_batch):
    """Raises ValueError unless the queue holds a whole number of global batches."""
    if queue_size <= 0 or queue_size % global_batch:
        raise ValueError(
            f"moco.queue_size={queue_size} must be a positive multiple of the global batch size "
            f"({global_batch}) so each step's keys fit at the write pointer without wrapping; e.g. "
            f"--config.moco.queue_size={max(1, queue_size // global_batch) * global_batch}")


def init(rng, config, sample_images):
    """Returns (params, batch_stats, extras): SimCLR-style networks plus key encoder copy, queue and pointer."""
    check_queue_size(config.moco.queue_size, config.batch_size)
    k_net, k_queue = jax.random.split(rng)
    params, batch_stats, _ = simclr.init(k_net, config, sample_images)
    num_queues = len(_directions(config))
    queue_VxKxD = losses.l2_normalize(jax.random.normal(
        k_queue, (num_queues, config.moco.queue_size, config.head.out_dim), jnp.float32))
    # Copies, not aliases: the key encoder is its own state (and donated buffers must not be shared).
    extras = {"key_params": jax.tree.map(jnp.copy, params), "key_batch_stats": jax.tree.map(jnp.copy, batch_stats),
              "queue": queue_VxKxD, "queue_ptr": jnp.zeros((), jnp.int32)}
    return params, batch_stats, extras


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
        groups = max(1, config.moco.shuffle_groups // parallel.axis_size(axis_name))
        if b % groups:
            raise ValueError(f"shuffled BatchNorm splits each device's batch of {b} into {groups} groups "
                             f"(moco.shuffle_groups={config.moco.shuffle_groups}); use a divisible batch size")
        x_N = parallel.all_gather(view, axis_name)
        n = x_N.shape[0]
        perm_N = jax.random.permutation(rng, n)
        mine_B = jax.lax.dynamic_slice_in_dim(perm_N, parallel.axis_index(axis_name) * b, b)
        x_Gxb = x_N[mine_B].reshape(groups, b // groups, *view.shape[1:])
        backbone, head = simclr.networks(config, None)  # BatchNorm over each group alone
        _, z_Gxb, stats_G = jax.vmap(
            lambda x: common.train_forward(backbone, head, key_params, key_stats, x))(x_Gxb)
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats_G)
        k_shuffled_BxD = losses.l2_normalize(z_Gxb.reshape(b, -1).astype(jnp.float32))
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
    backbone, head = simclr.networks(config, axis_name)
    key_stats = extras["key_batch_stats"]
    queries, keys, features = [], [], None
    for v, (qi, ki) in enumerate(_directions(config)):
        x = views[qi].astype(jnp.dtype(config.model.dtype))
        h, q_BxD, batch_stats = common.train_forward(backbone, head, params, batch_stats, x)
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

    aux["keys"]: V x N x D keys of the global batch for the queues, gathered in global-batch order;
    aux["key_batch_stats"]: the key encoder's new running statistics. The queue is read under stop_gradient.
    """
    del params, rng, progress
    queue_VxKxD = jax.lax.stop_gradient(extras["queue"])
    values, accs, keys = [], [], []
    for v in range(emb["q"].shape[1]):
        q_BxD, k_BxD = emb["q"][:, v], emb["k"][:, v]
        values.append(losses.info_nce(q_BxD, k_BxD, queue_VxKxD[v], config.loss.temperature, axis_name=axis_name))
        accs.append(_top1(q_BxD, k_BxD, queue_VxKxD[v], axis_name))
        keys.append(parallel.all_gather_invariant(k_BxD, axis_name))
    aux = {"features": emb["features"], "embeddings": emb["q"][:, 0], "keys": jnp.stack(keys),
           "key_batch_stats": side["key_batch_stats"]}
    return sum(values) / len(values), ({"contrastive_acc": sum(accs) / len(accs)}, aux)


loss = common.composed_loss(embed, embedding_loss)


def enqueue(queue_VxKxD, ptr, keys_VxNxD):
    """Returns (queue with keys written at rows ptr .. ptr+N-1, (ptr + N) % K): the FIFO ring buffer."""
    k, n = queue_VxKxD.shape[1], keys_VxNxD.shape[1]
    check_queue_size(k, n)
    queue = jax.lax.dynamic_update_slice(queue_VxKxD, keys_VxNxD.astype(queue_VxKxD.dtype), (0, ptr, 0))
    return queue, ((ptr + n) % k).astype(jnp.int32)


def update_extras(params, extras, aux, progress, config):
    """Returns extras with the key encoder moved toward the new params (EMA) and this step's keys enqueued."""
    del progress
    key_params = optax.incremental_update(params, extras["key_params"], step_size=1.0 - config.moco.momentum)
    queue, ptr = enqueue(extras["queue"], extras["queue_ptr"], aux["keys"])
    return {"key_params": key_params, "key_batch_stats": aux["key_batch_stats"], "queue": queue, "queue_ptr": ptr}
