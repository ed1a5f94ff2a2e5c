"""Evaluation protocols over a train state: the kNN monitor during training and `ssl-jax eval` afterwards.

Protocols (`ssl-jax eval --protocol P`): knn (its bank the whole training set: eval.knn_train_examples sizes
the monitor's bank, and the eval's only when given on its command line), linear (fast path: features once),
linear_full (features recomputed from augmented images every step), fewshot (ridge probes), semi1 / semi10
(fine-tuning on 1% / 10% of the labels). Eval keys read by the newer protocols and their defaults
(EVAL_DEFAULTS; a run's config may lack them, `with_eval_defaults` adds them, `--config.eval.KEY=VALUE`
overrides them):
  fewshot_shots=(1, 5, 10, 25)   examples per class of each ridge probe
  fewshot_l2=1024.0              ridge penalty on standardised features (big_vision's fixed 2^10)
  fewshot_seed=0                 draws the few-shot subsets (nested over shots)
  semi_seed=0                    draws the semi-supervised subset, written to DIR/subsets/semi{1,10}_seed{S}.txt
  semi_subset_file=""            a subset list to use instead (indices, or file names as SimCLR's ImageNet lists
                                 1percent.txt / 10percent.txt); its indices are written to
                                 DIR/subsets/semi{1,10}_from_<list name>.txt
  semi1_epochs=60, semi10_epochs=30   SimCLR's fine-tuning lengths for 1% and 10% of the labels
  semi_batch_size=256            clamped to the subset size
  semi_lr=0.05                   per 256 images (SimCLR: 0.05 x B / 256, no warm-up, cosine decay)
  semi_backbone_lr_factor=1.0    the backbone's lr relative to the head's
  semi_weight_decay=0.0          SimCLR fine-tunes without regularisation
linear_full reads the same linear_epochs / linear_lr / linear_batch_size / linear_weight_decay as linear.
"""
import functools
import os
import sys
import weakref

import jax
import numpy as np

from ssl_jax import augment, checkpoint, config as config_lib, metrics as metrics_lib
from ssl_jax import data as data_lib
from ssl_jax.data import pipeline
from ssl_jax.evaluators import features as features_lib, fewshot, finetune, knn, linear, subsets

PROTOCOLS = ("knn", "linear", "linear_full", "fewshot", "semi1", "semi10")
SEMI_PERCENTS = {"semi1": 1, "semi10": 10}
EVAL_DEFAULTS = dict(
    fewshot_shots=(1, 5, 10, 25), fewshot_l2=2.0 ** 10, fewshot_seed=0,
    semi_seed=0, semi_subset_file="", semi1_epochs=60, semi10_epochs=30, semi_batch_size=256, semi_lr=0.05,
    semi_backbone_lr_factor=1.0, semi_weight_decay=0.0)


def with_eval_defaults(config):
    """Returns `config` with the EVAL_DEFAULTS keys its eval section lacks added (values it has are kept)."""
    missing = {k: v for k, v in EVAL_DEFAULTS.items() if k not in config.eval}
    if missing:
        with config.eval.unlocked():
            for key, value in missing.items():
                config.eval[key] = value
    return config


@functools.lru_cache(maxsize=4)
def _source(data_json, split):
    return data_lib.get_source(config_lib.from_json_text(data_json), split)


def eval_source(config, split):
    """Returns the data source for `split`, loaded once per process for the same data config."""
    return _source(config_lib.to_json(config.data), split)


_ENCODERS = weakref.WeakKeyDictionary()  # Setup -> its jitted encoder: the kNN monitor compiles it once a run


def encoder(setup):
    """Returns encode(params, batch_stats, images_uint8) -> features, jitted; params are arguments, not constants."""
    if setup not in _ENCODERS:
        _ENCODERS[setup] = _make_encoder(setup)
    return _ENCODERS[setup]


def _make_encoder(setup):
    config, method = setup.config, setup.method
    size, mean, std = config.augment.crop_size, tuple(config.augment.mean), tuple(config.augment.std)

    @jax.jit
    def encode(params, batch_stats, images):
        return method.encode(params, batch_stats, augment.center_view(images, size, mean, std), config)

    return encode


def features(setup, state, source, limit=0, progress=False):
    """Returns (features_NxD, labels_N) of `source`, or when 0 < limit < len(source) of `limit` of its examples
    drawn at random (seed 0: the same ones at every evaluation of a run, and in every run of the dataset).

    Drawn, not the first `limit`: an ImageFolder's examples are sorted by class, so ImageNet's first 100,000
    (the imagenet preset's eval.knn_train_examples) were 78 of its 1000 classes, and the kNN monitor could not
    predict the other 922.
    """
    config = setup.config
    if limit and limit < len(source):
        chosen = np.sort(np.random.default_rng(0).choice(len(source), size=limit, replace=False))
        source = subsets.lazy_subset(source, chosen)  # read batch by batch: 100,000 ImageNet images are 20 GB
    encode = encoder(setup)
    params, stats = state["params"]["model"], state["batch_stats"]
    batch = config.eval.batch_size - config.eval.batch_size % setup.mesh.devices.size or setup.mesh.devices.size
    local_batches = pipeline.eval_batches(source, batch, jax.process_index(), jax.process_count())
    return features_lib.extract_features(
        lambda x: encode(params, stats, x), local_batches, setup.mesh,
        desc=f"features ({len(source)})", progress=progress)


def knn_eval(setup, state, progress=False, train_examples=None):
    """Returns {'knn_top1', 'knn_top5'}: weighted kNN of test features against train features.

    The bank is `train_examples` training examples drawn at random (0: all of them); None reads the monitor's
    eval.knn_train_examples.
    """
    config = setup.config
    limit = config.eval.knn_train_examples if train_examples is None else train_examples
    train_x, train_y = features(setup, state, setup.train_source, limit, progress)
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


def fewshot_eval(setup, state, progress=False):
    """Returns {'fewshot_{k}shot_top1'}: ridge probes on k seeded training examples per class."""
    config = with_eval_defaults(setup.config)
    source = setup.train_source
    shots = tuple(int(k) for k in config.eval.fewshot_shots)
    for warning in fewshot.short_classes_warnings(source.labels, shots, source.num_classes):
        print(warning, file=sys.stderr)
    by_shots = fewshot.fewshot_indices(source.labels, shots, config.eval.fewshot_seed)
    union = np.unique(np.concatenate(list(by_shots.values())))  # nested subsets: the largest one, encoded once
    train_x, train_y = features(setup, state, subsets.lazy_subset(source, union), 0, progress)
    test_x, test_y = features(setup, state, eval_source(config, "test"), 0, progress)
    rows = {k: np.searchsorted(union, idx) for k, idx in by_shots.items()}
    return fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, source.num_classes, shots=shots,
                                    l2=config.eval.fewshot_l2, indices=rows)


def semi_subset(config, workdir, source, percent):
    """Returns (sorted train indices, path of the subset in DIR/subsets/): the eval.semi_subset_file list (its
    indices written there), else the file of the seed (drawn and written if new). A seed's file that differs from
    what this training set draws (the set changed since: its indices would name other images) is drawn again and
    written over, with a warning."""
    config = with_eval_defaults(config)
    if config.eval.semi_subset_file:
        given = os.path.expanduser(config.eval.semi_subset_file)
        if not os.path.isfile(given):
            raise FileNotFoundError(f"eval.semi_subset_file {given!r} does not exist")
        indices = subsets.read_subset(given, source)
        stem = os.path.splitext(os.path.basename(given))[0]
        path = os.path.join(workdir, "subsets", f"semi{percent}_from_{stem}.txt")
        if jax.process_index() == 0:
            subsets.write_subset(path, indices)
        return indices, path
    path = os.path.join(workdir, "subsets", f"semi{percent}_seed{config.eval.semi_seed}.txt")
    indices = subsets.balanced_subset(source.labels, percent / 100.0, config.eval.semi_seed)
    if os.path.isfile(path):
        try:
            kept = subsets.read_subset(path, source)
        except ValueError:  # empty, or indices past the end of a smaller set
            kept = None
        if kept is not None and np.array_equal(kept, indices):
            return kept, path
        print(f"warning: {path} is not the subset seed {config.eval.semi_seed} draws from this training set of "
              f"{len(source)} (it changed since, or the file was edited; eval.semi_subset_file takes a list of "
              f"your own): drawn again and written over it", file=sys.stderr)
    if jax.process_index() == 0:
        subsets.write_subset(path, indices)
    return indices, path


def semi_eval(setup, state, protocol, workdir, progress=False):
    """Returns {'semiP_top1', 'semiP_top5', ...}: the whole network fine-tuned on P% of the labels."""
    config = with_eval_defaults(setup.config)
    percent = SEMI_PERCENTS[protocol]
    indices, path = semi_subset(config, workdir, setup.train_source, percent)
    given = f" (from {config.eval.semi_subset_file})" if config.eval.semi_subset_file else ""
    print(f"{protocol}: fine-tuning on {len(indices)} labelled examples listed in {path}{given}", file=sys.stderr)
    share = 100.0 * len(indices) / len(setup.train_source)
    if not percent / 1.5 <= share <= percent * 1.5:
        print(f"warning: {protocol}: the subset holds {share:.3g}% of the {len(setup.train_source)} training "
              f"examples, not {percent}%; {protocol}_top1 is not a {percent}%-label result", file=sys.stderr)
    source = subsets.lazy_subset(setup.train_source, indices)
    batch = min(config.eval.semi_batch_size, len(source))
    # The batch finetune.fit takes (a multiple of the devices), so that the lr is scaled by the batch it trains
    # with; 0 is left to fit, which says why it cannot run.
    batch = batch // setup.mesh.devices.size * setup.mesh.devices.size or batch
    recipe = finetune.Recipe(
        epochs=config.eval[f"{protocol}_epochs"], batch_size=batch, lr=config.eval.semi_lr * batch / 256,
        weight_decay=config.eval.semi_weight_decay, backbone_lr_factor=config.eval.semi_backbone_lr_factor,
        seed=config.seed)
    model = finetune.Model(config, state["params"]["model"], state["batch_stats"],
                           setup.train_source.num_classes, train_backbone=True)
    history = finetune.fit(model, config, source, setup.mesh, recipe, progress)
    result = finetune.evaluate(model, config, eval_source(config, "test"), setup.mesh, config.eval.batch_size,
                               progress)
    return {**{f"{protocol}_{k}": v for k, v in result.items()},
            f"{protocol}_train_top1": history[-1] if history else 0.0, f"{protocol}_labelled": float(len(indices))}


def linear_full_eval(setup, state, progress=False):
    """Returns {'linear_full_top1', 'linear_full_top5', ...}: a linear classifier on a frozen backbone, augmented."""
    config = setup.config
    recipe = finetune.Recipe(epochs=config.eval.linear_epochs, batch_size=config.eval.linear_batch_size,
                             lr=config.eval.linear_lr, weight_decay=config.eval.linear_weight_decay,
                             train_backbone=False, seed=config.seed)
    model = finetune.Model(config, state["params"]["model"], state["batch_stats"],
                           setup.train_source.num_classes, train_backbone=False)
    history = finetune.fit(model, config, setup.train_source, setup.mesh, recipe, progress)
    result = finetune.evaluate(model, config, eval_source(config, "test"), setup.mesh, config.eval.batch_size,
                               progress)
    return {**{f"linear_full_{k}": v for k, v in result.items()},
            "linear_full_train_top1": history[-1] if history else 0.0}


def run_protocol(setup, state, protocol, workdir, progress=False, knn_train_examples=0):
    """Returns the metrics of `protocol` (one of PROTOCOLS) for `state`.

    knn: the bank is the whole training set, as the published kNN numbers (InstDisc, DINO, solo-learn) use,
    not the monitor's eval.knn_train_examples draw (100,000 images in the imagenet preset: a lower figure
    under the same name); `knn_train_examples` > 0 asks for such a draw.
    """
    if protocol in SEMI_PERCENTS:
        return semi_eval(setup, state, protocol, workdir, progress)
    if protocol == "knn":
        n = len(setup.train_source)
        bank = knn_train_examples if 0 < knn_train_examples < n else n
        print(f"knn: k={setup.config.eval.knn_k}, T={setup.config.eval.knn_temperature:g}, a bank of {bank} of "
              f"the {n} training examples", file=sys.stderr)
        return knn_eval(setup, state, progress=progress, train_examples=knn_train_examples)
    fn = {"linear": linear_eval, "linear_full": linear_full_eval, "fewshot": fewshot_eval}
    return fn[protocol](setup, state, progress=progress)


def monitor(setup, state):
    """Returns the metrics evaluated during training (the kNN monitor)."""
    return knn_eval(setup, state)


def evaluate_workdir(workdir, protocol, overrides=(), progress=True, command=None, step=None):
    """Evaluates the checkpoint of `step` (None: the newest) of a run with `protocol`, appends the result to
    metrics.jsonl under that step, returns it.

    The appended record also carries `protocol`, and `command` when given (the command line, for reports).
    """
    from ssl_jax import train as train_lib  # pylint: disable=import-outside-toplevel
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is not a training run: {config_path} does not exist")
    config = with_eval_defaults(config_lib.from_json_file(config_path))
    knn_limit_given = False
    for override in overrides:
        key, _, value = override.partition("=")
        config_lib.apply_override(config, key, value)
        knn_limit_given |= key.strip() == "eval.knn_train_examples"
    try:
        setup = train_lib.build(config)
    except data_lib.MissingDataError as e:
        raise data_lib.moved_data_error(e, config_path) from e
    abstract_state = checkpoint.abstract_like(train_lib.initial_state(setup))  # before listing the checkpoints
    manager = checkpoint.make_manager(workdir, read_only=True)  # the run may still be training
    try:
        # The newest checkpoint that reads back (a damaged one is skipped with a warning, as when training; one
        # that a run still training deletes meanwhile is passed over for the newer ones); none at all is a
        # FileNotFoundError.
        if step is not None and step not in manager.all_steps():
            kept = ", ".join(map(str, sorted(manager.all_steps()))) or "none"
            raise FileNotFoundError(f"{workdir} has no checkpoint of step {step} (it has: {kept}; a run keeps its "
                                    f"newest checkpoint.keep ones)")
        state = checkpoint.restore(manager, abstract_state, step)
        step = int(state["step"])
    finally:
        manager.close()
    print(f"evaluating step {step} of {workdir} with the {protocol} protocol", file=sys.stderr)
    # The kNN bank: the whole training set unless this command asks for a draw (the run's own
    # eval.knn_train_examples only sizes the monitor's, which trades accuracy for time during training).
    result = run_protocol(setup, state, protocol, workdir, progress=progress,
                          knn_train_examples=config.eval.knn_train_examples if knn_limit_given else 0)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    provenance = {"protocol": protocol, **({"command": command} if command else {})}
    writer.write(step, {"epoch": step / setup.steps_per_epoch, **result, **provenance})
    writer.close()
    return {"step": step, **result}
