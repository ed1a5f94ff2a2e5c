"""Evaluation protocols over a train state: the kNN monitor during training and `ssl-jax eval` afterwards."""
import functools
import os
import sys

import jax
import numpy as np

from ssl_jax import augment, checkpoint, config as config_lib, metrics as metrics_lib
from ssl_jax import data as data_lib
from ssl_jax.data import pipeline
from ssl_jax.evaluators import features as features_lib, knn, linear

PROTOCOLS = ("knn", "linear")


@functools.lru_cache(maxsize=4)
def _source(data_json, split):
    return data_lib.get_source(config_lib.from_json_text(data_json), split)


def eval_source(config, split):
    """Returns the data source for `split`, loaded once per process for the same data config."""
    return _source(config_lib.to_json(config.data), split)


def encoder(setup):
    """Returns encode(params, batch_stats, images_uint8) -> features, jitted; params are arguments, not constants."""
    config, method = setup.config, setup.method
    size, mean, std = config.augment.crop_size, tuple(config.augment.mean), tuple(config.augment.std)

    @jax.jit
    def encode(params, batch_stats, images):
        return method.encode(params, batch_stats, augment.center_view(images, size, mean, std), config)

    return encode


def features(setup, state, source, limit=0, progress=False):
    """Returns (features_NxD, labels_N) of `source` (its first `limit` examples when limit > 0)."""
    config = setup.config
    if limit and limit < len(source):
        source = data_lib.subset(source, np.arange(limit))
    encode = encoder(setup)
    params, stats = state["params"]["model"], state["batch_stats"]
    batch = config.eval.batch_size - config.eval.batch_size % setup.mesh.devices.size or setup.mesh.devices.size
    return features_lib.extract_features(
        lambda x: encode(params, stats, x), pipeline.eval_batches(source, batch), setup.mesh,
        desc=f"features ({len(source)})", progress=progress)


def knn_eval(setup, state, progress=False):
    """Returns {'knn_top1', 'knn_top5'}: weighted kNN of test features against train features."""
    config = setup.config
    train_x, train_y = features(setup, state, setup.train_source, config.eval.knn_train_examples, progress)
    test_x, test_y = features(setup, state, eval_source(config, "test"), 0, progress)
    return knn.knn_accuracy(train_x, train_y, test_x, test_y, setup.train_source.num_classes,
                            k=config.eval.knn_k, temperature=config.eval.knn_temperature, mesh=setup.mesh)


def linear_eval(setup, state, progress=False):
    """Returns {'linear_top1', 'linear_top5', ...}: a linear classifier trained on frozen features."""
    config = setup.config
    train_x, train_y = features(setup, state, setup.train_source, 0, progress)
    test_x, test_y = features(setup, state, eval_source(config, "test"), 0, progress)
    return linear.train_linear(train_x, train_y, test_x, test_y, setup.train_source.num_classes,
                               epochs=config.eval.linear_epochs, lr=config.eval.linear_lr,
                               batch_size=config.eval.linear_batch_size,
                               weight_decay=config.eval.linear_weight_decay, seed=config.seed)


def monitor(setup, state):
    """Returns the metrics evaluated during training (the kNN monitor)."""
    return knn_eval(setup, state)


def evaluate_workdir(workdir, protocol, overrides=(), progress=True):
    """Evaluates the newest checkpoint of a run with `protocol`, appends the result to metrics.jsonl, returns it."""
    from ssl_jax import train as train_lib  # pylint: disable=import-outside-toplevel
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is not a training run: {config_path} does not exist")
    config = config_lib.from_json_file(config_path)
    for override in overrides:
        key, _, value = override.partition("=")
        config_lib.apply_override(config, key, value)
    setup = train_lib.build(config)
    manager = checkpoint.make_manager(workdir, async_save=False)
    try:
        step = checkpoint.latest_step(manager)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
        state = checkpoint.restore(manager, checkpoint.abstract_like(train_lib.initial_state(setup)), step)
    finally:
        manager.close()
    print(f"evaluating step {step} of {workdir} with the {protocol} protocol", file=sys.stderr)
    result = (knn_eval if protocol == "knn" else linear_eval)(setup, state, progress=progress)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    writer.write(step, {"epoch": step / setup.steps_per_epoch, **result})
    writer.close()
    return {"step": step, **result}
