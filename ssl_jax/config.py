"""Config files (`configs/<method>.py:<preset>`) and `--config.KEY=VALUE` overrides.

A config file defines `get_config(arg)` returning an `ml_collections.ConfigDict`. Overrides are parsed with the
type of the field they replace; unknown keys and values of the wrong type are errors that name the key.
"""
import ast
import copy
import difflib
import importlib.util
import json
import os
import sys

import ml_collections

REQUIRED_KEYS = ("method", "seed", "num_epochs", "batch_size", "data.name", "data.path")


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used."""


def load_config(spec, overrides=()):
    """Returns the locked ConfigDict for `path.py[:arg]`, or for a run's `config.json`, with `KEY=VALUE`
    overrides applied."""
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise ConfigError(f"config file not found: {spec!r}")
        try:
            config = from_json_file(spec)
        except ValueError as e:  # json.JSONDecodeError
            raise ConfigError(f"{spec} is not a run's config.json: {e}") from e
        return _finish(config, overrides)
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_ssl_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    # A config may build on another: `import simclr` (a file beside it) or `from configs import simclr` (from the
    # working directory). `python -m ssl_jax` has the working directory on sys.path and the `ssl-jax` script
    # does not; during the import both do.
    added = [d for d in (os.path.dirname(os.path.abspath(path)), os.getcwd()) if d not in sys.path]
    sys.path[:0] = added
    try:
        module_spec.loader.exec_module(module)
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return _finish(config, overrides)


def _finish(config, overrides):
    """Locks `config`, applies the `KEY=VALUE` overrides, validates it and returns it."""
    config.lock()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} is not of the form KEY=VALUE")
        apply_override(config, key, value)
    validate(config)
    return config


def _lookup(config, key):
    """Returns (parent ConfigDict, leaf name) for a dotted key, raising ConfigError for unknown keys."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, known, n=3)
            prefix = ".".join(parts[:i]) or "<top level>"
            msg = f"unknown config key {key!r}: {prefix} has no field {part!r}"
            raise ConfigError(msg + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _parse(key, text, current):
    """Returns `text` converted to the type of `current`, or raises ConfigError naming the key."""
    kind = type(current)
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            return kind(value)
        if current is None:
            return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    raise ConfigError(f"config key {key!r} expects a {kind.__name__}, got {text!r}")


def apply_override(config, key, text):
    """Sets `config.<key>` from the string `text`, typed like the existing value."""
    parent, leaf = _lookup(config, key)
    current = parent[leaf]
    if key == "method" and text != current:
        raise ConfigError(f"config key 'method' cannot be overridden ({current!r} -> {text!r}): a method's settings "
                          f"come with its config file; use --config configs/<method>.py:<preset>")
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its fields: {', '.join(current.keys())}")
    value = _parse(key, text, current)
    with parent.unlocked():
        parent[leaf] = value


# Where each number may lie, as an interval: "[" / "]" include the bound, "(" / ")" exclude it (for a tuple, each
# of its numbers). A rule applies wherever its key exists, so the methods' own sections (loss, head, moco, swav,
# ...) and the eval keys that evaluators.protocols.EVAL_DEFAULTS adds are checked with the shared ones; 0 is
# allowed where it is documented to mean "off" or "the default".
RANGES = {
    "seed": "[0, inf)", "num_epochs": "[1, inf)", "batch_size": "[1, inf)", "grad_accum_steps": "[1, inf)",
    "log_every_steps": "[1, inf)",
    "data.image_size": "[0, inf)", "data.num_workers": "[0, inf)", "data.num_examples": "[0, inf)",
    "data.num_classes": "[0, inf)",
    "model.width_multiplier": "[1, inf)", "model.sk_ratio": "[0, 1)",
    "augment.crop_size": "[1, inf)", "augment.mean": "[0, 1]", "augment.std": "(0, inf)",
    "augment.min_scale": "(0, 1]", "augment.max_scale": "(0, 1]", "augment.jitter": "[0, inf)",
    "augment.flip_p": "[0, 1]", "augment.jitter_strength": "[0, inf)", "augment.jitter_p": "[0, 1]",
    "augment.grayscale_p": "[0, 1]", "augment.blur_p": "[0, 1]", "augment.solarize_p": "[0, 1]",
    "optim.lr": "(0, inf)", "optim.weight_decay": "[0, inf)", "optim.momentum": "[0, 1)",
    "optim.warmup_epochs": "[0, inf)", "optim.end_lr_factor": "[0, 1]", "optim.trust_coefficient": "(0, inf)",
    "optim.bias_lr_factor": "[0, inf)", "optim.step_factor": "(0, 1]", "optim.step_milestones": "(0, inf)",
    "checkpoint.every_epochs": "[1, inf)", "checkpoint.keep": "[1, inf)",
    "eval.knn_every_epochs": "[0, inf)", "eval.knn_k": "[1, inf)", "eval.knn_temperature": "(0, inf)",
    "eval.knn_train_examples": "[0, inf)", "eval.batch_size": "[1, inf)", "eval.linear_epochs": "[1, inf)",
    "eval.linear_lr": "(0, inf)", "eval.linear_batch_size": "[1, inf)", "eval.linear_weight_decay": "[0, inf)",
    "eval.fewshot_shots": "[1, inf)", "eval.fewshot_l2": "(0, inf)", "eval.fewshot_seed": "[0, inf)",
    "eval.semi_seed": "[0, inf)", "eval.semi1_epochs": "[1, inf)", "eval.semi10_epochs": "[1, inf)",
    "eval.semi_batch_size": "[1, inf)", "eval.semi_lr": "(0, inf)", "eval.semi_backbone_lr_factor": "[0, inf)",
    "eval.semi_weight_decay": "[0, inf)",
    "loss.temperature": "(0, inf)", "loss.scale": "(0, inf)", "loss.chunk_size": "[0, inf)",
    "loss.lambd": "(0, inf)",
    "head.hidden_dim": "[0, inf)", "head.out_dim": "[1, inf)", "head.num_layers": "[1, inf)",
    "head.init_std": "[0, inf)", "head.finetune_layer": "[0, inf)",
    "projector.hidden_dim": "[1, inf)", "projector.out_dim": "[1, inf)", "projector.num_layers": "[1, inf)",
    "predictor.hidden_dim": "[1, inf)",
    "moco.momentum": "[0, 1]", "moco.queue_size": "[1, inf)", "moco.shuffle_groups": "[0, inf)",
    "moco.query_bn_groups": "[0, inf)",
    "byol.tau_base": "[0, 1]", "byol.view2_blur_p": "[0, 1]", "byol.view2_solarize_p": "[0, 1]",
    "barlow_twins.view2_blur_p": "[0, 1]", "barlow_twins.view2_solarize_p": "[0, 1]",
    "swav.epsilon": "(0, inf)", "swav.temperature": "(0, inf)", "swav.sinkhorn_iterations": "[1, inf)",
    "swav.num_prototypes": "[1, inf)", "swav.num_large_crops": "[1, inf)", "swav.num_small_crops": "[0, inf)",
    "swav.small_crop_size": "[1, inf)", "swav.small_min_scale": "(0, 1]", "swav.small_max_scale": "(0, 1]",
    "swav.queue_length": "[0, inf)", "swav.queue_start_epoch": "[0, inf)", "swav.freeze_prototypes_epochs": "[0, inf)",
}
# Tuple-valued keys: the lengths each may have (None: any) and the type of its entries. "increasing" keys must be
# strictly increasing (a repeated milestone would apply its factor once, where torch's MultiStepLR applies it twice).
TUPLES = {
    "augment.mean": ((3,), float), "augment.std": ((3,), float),
    "augment.jitter": ((0, 4), float),  # () or (brightness, contrast, saturation, hue)
    "optim.step_milestones": (None, float), "optim.fixed_lr_prefixes": (None, str),
    "eval.fewshot_shots": (None, int),
}
INCREASING = ("optim.step_milestones",)
MAX_HUE = 0.5  # a hue shift is in turns of the colour wheel: torchvision's ColorJitter allows [0, 0.5]
# Pairs (low key, high key) whose values must be ordered low <= high.
ORDERED = (("augment.min_scale", "augment.max_scale"), ("swav.small_min_scale", "swav.small_max_scale"))
DTYPES = ("float32", "bfloat16", "float16")
# String keys with a fixed set of values (and those the modules define: module_choices).
CHOICES = {"model.dtype": DTYPES, "byol.head_init": ("torch", "haiku")}


def module_choices():
    """Returns {key: allowed values} of the string keys whose values the modules define (a typo such as
    model.conv_init=foo then fails at load time, naming the key, not when the network is built)."""
    # pylint: disable=import-outside-toplevel  (they pull in jax and flax, which reading a config needs not)
    from ssl_jax import optim
    from ssl_jax.methods import byol
    from ssl_jax.models import resnet
    return {"optim.name": optim.OPTIMIZERS, "optim.lr_scaling": optim.LR_SCALINGS,
            "optim.lars_style": optim.LARS_STYLES, "model.name": tuple(resnet.ARCHS),
            "model.conv_init": tuple(resnet.CONV_INITS), "model.remat_policy": tuple(resnet.REMAT_POLICIES),
            "byol.tau_schedule": byol.TAU_SCHEDULES}


def _get(config, key):
    """Returns config.<key>, or None when a section or field of the dotted key is absent."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def in_range(value, interval):
    """Returns whether the number `value` lies in `interval` ("[0, 1)", "(0, inf)", ...)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_tuple(key, value, lengths, kind):
    """Raises ConfigError unless `value` (absent: None) is a tuple of `lengths` entries of type `kind`."""
    if value is None:
        return
    entries = "numbers" if kind is float else "whole numbers" if kind is int else "strings"
    if lengths is None:
        shape = f"a tuple of {entries}"
    else:
        shape = " or ".join("()" if n == 0 else f"{n} {entries}" for n in lengths)
    allowed = (int, float) if kind is float else kind  # a whole number is a number too
    ok = isinstance(value, (tuple, list)) and (lengths is None or len(value) in lengths) and all(
        isinstance(v, allowed) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"config key {key!r} must be {shape}, got {value!r}")
    if key in INCREASING and any(b <= a for a, b in zip(value, value[1:])):
        raise ConfigError(f"config key {key!r} must be strictly increasing, got {value!r}")
    if key == "augment.jitter" and value and value[3] > MAX_HUE:
        raise ConfigError(f"config key 'augment.jitter' has hue {value[3]!r}; a hue range is in [0, {MAX_HUE}] "
                          f"(turns of the colour wheel), as in torchvision's ColorJitter")


def validate(config):
    """Raises ConfigError when a required key is missing, a value is out of its range (RANGES, ORDERED) or a
    tuple has the wrong shape (TUPLES)."""
    for key in REQUIRED_KEYS:
        _lookup(config, key)
    for key, (lengths, kind) in TUPLES.items():
        _check_tuple(key, _get(config, key), lengths, kind)
    for key, interval in RANGES.items():
        value = _get(config, key)
        for number in value if isinstance(value, (tuple, list)) else (value,):  # a tuple: each of its numbers
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not in_range(number, interval):
                raise ConfigError(f"config key {key!r} must be in {interval}, got {value!r}")
    for low_key, high_key in ORDERED:
        low, high = _get(config, low_key), _get(config, high_key)
        if low is not None and high is not None and low > high:
            raise ConfigError(f"config key {low_key!r} ({low!r}) must not exceed {high_key!r} ({high!r})")
    for key, choices in {**CHOICES, **module_choices()}.items():
        value = _get(config, key)
        if value is not None and value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def to_json(config):
    """Returns the config as pretty JSON text (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


PATH_KEYS = ("data.path", "data.cache_dir", "data.tfds_data_dir")


def with_absolute_paths(config):
    """Returns a copy of `config` whose PATH_KEYS that name local paths are absolute (`~` expanded), so a run's
    config.json still finds its data when `ssl-jax eval` or a resume starts in another directory. Empty values
    (the defaults) and URLs (gs://...) are kept as they are."""
    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        try:
            parent, leaf = _lookup(config, key)
        except ConfigError:  # a config of one's own may leave the optional ones out
            continue
        value = parent[leaf]
        if isinstance(value, str) and value and "://" not in value:
            parent[leaf] = os.path.abspath(os.path.expanduser(value))
    return config


def differences(old, new):
    """Returns [(dotted key, old value, new value)] for every leaf where two configs differ, sorted by key.

    Both are compared as their JSON (tuples and lists alike); a key only one of them has shows the string
    '<absent>' on the other side.
    """
    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    a = flat(json.loads(to_json(old)) if isinstance(old, ml_collections.ConfigDict) else old)
    b = flat(json.loads(to_json(new)) if isinstance(new, ml_collections.ConfigDict) else new)
    absent = "<absent>"
    pairs = ((k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)))
    return [(k, old_value, new_value) for k, old_value, new_value in pairs if old_value != new_value]


def from_json_file(path):
    """Returns a locked ConfigDict read back from a run's `config.json`, tuples restored."""
    with open(path) as f:
        return from_json_text(f.read())


def from_json_text(text):
    """Returns a locked ConfigDict from JSON text written by `to_json`, tuples restored."""
    raw = json.loads(text)

    def fix(node):
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return tuple(fix(v) for v in node)
        return node

    config = ml_collections.ConfigDict(fix(raw))
    config.lock()
    return config
