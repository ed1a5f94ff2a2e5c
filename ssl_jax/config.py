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
    module_spec.loader.exec_module(module)
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


def validate(config):
    """Raises ConfigError when a required key is missing or a number is out of range."""
    for key in REQUIRED_KEYS:
        _lookup(config, key)
    if config.batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    if config.num_epochs <= 0:
        raise ConfigError(f"num_epochs must be positive, got {config.num_epochs}")


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
