"""Exact gradient accumulation for every method, contrastive losses included (config.grad_accum_steps).

Averaging the gradients of k small batches is not the gradient of one large batch when the loss couples the
examples: NT-Xent's denominator, MoCo's and SwAV's global sums, Barlow Twins' cross-correlation. Here each
device's batch is split into k chunks and (the GradCache scheme of Gao et al., 2021):
  1. every chunk is embedded without gradient (`method.embed`), and the embeddings of all rows are kept;
  2. the loss of the whole batch is computed once from them (`method.embedding_loss`, collectives over
     devices as usual), with its gradient w.r.t. every embedding;
  3. each chunk is embedded again and backpropagated with its rows' embedding gradients (a vjp), and the
     parameter gradients are summed.
Only one chunk's activations are alive at a time, so a one-GPU user can follow a batch-4096 recipe. The
result equals the large-batch step whose BatchNorm statistics are taken over the same sub-batches: BatchNorm
is the one thing chunking changes (each chunk is normalised with its own statistics, like unsynchronised
BatchNorm over k devices). The running statistics are updated once per step with the mean of the chunks'
updates, which is what k devices with unsynchronised BatchNorm give too (tests/test_accumulate.py checks
1 device x k chunks against k devices). Augmentation runs inside each pass on the chunk's uint8 images with
their per-example keys, so both passes see identical views and no view batch of the full size is stored.
"""
import jax
import jax.numpy as jnp


def check_chunks(method, local_batch, chunks):
    """Raises ValueError unless `method` can be accumulated and the per-device batch splits into `chunks`."""
    if chunks < 1:
        raise ValueError(f"grad_accum_steps={chunks} must be >= 1")
    if chunks > 1 and not (hasattr(method, "embed") and hasattr(method, "embedding_loss")):
        raise ValueError(f"grad_accum_steps={chunks}: method {method.__name__} has no embed/embedding_loss pair "
                         f"(see ssl_jax/methods/simclr.py), so its loss cannot be accumulated exactly")
    if local_batch % chunks:
        raise ValueError(f"grad_accum_steps={chunks} does not divide the per-device batch of {local_batch} "
                         f"(batch_size / devices); choose a divisor of {local_batch}")


def value_and_grad(method, params, batch_stats, extras, inputs, keys_Bx2, make_views, rng, progress, *, config,
                   axis_name, chunks):
    """Returns ((loss, (batch_stats, metrics, aux)), grads) like jax.value_and_grad(method.loss, has_aux=True).

    inputs: pytree whose leaves have this device's B rows first (uint8 images, or ready views); keys_Bx2 the
    per-example keys; make_views(keys, inputs) -> the views method.embed takes. `chunks` must divide B.
    """
    b = keys_Bx2.shape[0]
    split = lambda x: x.reshape(chunks, b // chunks, *x.shape[1:])  # noqa: E731 (rows -> chunks x rows)
    merge = lambda x: x.reshape(b, *x.shape[2:])  # noqa: E731
    chunk_rngs = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(chunks))
    xs = (jax.tree.map(split, inputs), split(keys_Bx2), chunk_rngs)

    def embed_chunk(p, chunk):
        chunk_inputs, chunk_keys, chunk_rng = chunk
        return method.embed(p, batch_stats, extras, make_views(chunk_keys, chunk_inputs), chunk_rng, progress,
                            config=config, axis_name=axis_name)

    # 1. Embeddings of every chunk, no gradient; every chunk starts from the same running statistics.
    _, (emb_k, stats_k, side_k) = jax.lax.scan(
        lambda _, chunk: (None, _flatten(embed_chunk(params, chunk))), None, xs)
    emb = jax.tree.map(merge, emb_k)
    new_stats, side = jax.tree.map(lambda s: jnp.mean(s, axis=0), (stats_k, side_k))

    # 2. The whole batch's loss and its gradient w.r.t. every row's embeddings.
    def loss_of(emb):
        return method.embedding_loss(jax.lax.stop_gradient(params), emb, side, extras, rng, progress,
                                     config=config, axis_name=axis_name)

    (value, (metrics, aux)), emb_grads = jax.value_and_grad(loss_of, has_aux=True)(emb)

    # 3. Backpropagate chunk by chunk with those gradients; the parameter gradients add up. The params are
    # typed per-device (pcast) for the vjp, so each chunk's gradient stays this device's share and the shares
    # are summed over devices once at the end, not once per chunk.
    local_params = params if axis_name is None else jax.lax.pcast(params, axis_name, to="varying")

    def backward(total, chunk_and_cotangent):
        chunk, cotangent = chunk_and_cotangent
        _, vjp = jax.vjp(lambda p: embed_chunk(p, chunk)[0], local_params)
        return jax.tree.map(jnp.add, total, vjp(cotangent)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, local_params)
    grads, _ = jax.lax.scan(backward, zeros, (xs, jax.tree.map(split, emb_grads)))
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
    return (value, (new_stats, metrics, aux)), grads


def _flatten(embed_output):
    """Returns (emb, batch_stats, side) from embed's (emb, (batch_stats, side))."""
    emb, (stats, side) = embed_output
    return emb, stats, side
