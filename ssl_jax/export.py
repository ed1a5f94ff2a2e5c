"""Backbone export: a run's newest weights as npz, safetensors or a torchvision ResNet state_dict, and back.

What is written is the backbone only (parameters and BatchNorm running statistics; no projection head,
no optimizer state), plus a JSON sidecar beside it (<file>.json, e.g. backbone.pt.json) that says how to
feed images: architecture, feature dimension, input size, normalization mean/std, method and step.

- npz / safetensors: flat '/'-joined keys of the flax trees, `params/layer2_0/conv1/kernel` (HWIO) and
  `batch_stats/layer2_0/bn1/mean`. `load_backbone` rebuilds the nested (params, batch_stats) that
  `state["params"]["model"]["backbone"]` and `state["batch_stats"]["backbone"]` hold, to fine-tune from.
- any format, in JAX: `load_model(path)` also builds the network from the sidecar; features as the run
  computes them for evaluation:

      module, variables, info = export.load_model(path)
      x = augment.center_view(images_uint8_BxHxWx3, info["input"]["size"], info["input"]["mean"],
                              info["input"]["std"])
      features_BxD = module.apply(variables, x, train=False)
- torch: a torchvision ResNet state_dict (conv weights OIHW; BN weight, bias, running_mean, running_var,
  num_batches_tracked = the training step) without `fc`. Load it as

      model = torchvision.models.resnet50()
      model.fc = torch.nn.Identity()        # the export has no classifier: the model returns features
      # CIFAR stem (config.model.cifar_stem) only: a 3x3 stride-1 stem conv and no max-pool
      model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      model.maxpool = torch.nn.Identity()
      model.load_state_dict(torch.load(path), strict=True)
      model.eval()

  A ResNet-18/34 trained with model.project_first_block (SimCLR v2's presets) also has
  `layer1.0.downsample`: give the model `model.layer1[0].downsample = torch.nn.Sequential(torch.nn.Conv2d(64, 64,
  1, bias=False), torch.nn.BatchNorm2d(64))` before loading (the sidecar's `torch_setup` says so).
  torchvision builds only width_multiplier=1 ResNets (its wide_resnet50_2 widens the bottleneck only) and
  none with selective kernels (model.sk_ratio); for those the names still follow torchvision's pattern
  (`layer2.0.sk_reduce.weight`, stem `conv1b`) but the model must be built by hand.
"""
import json
import os
import re

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax import checkpoint, config as config_lib, models

EXTENSIONS = {"npz": ".npz", "safetensors": ".safetensors", "torch": ".pt"}
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# The flax module names that torchvision spells differently (the rest differ only by '_' for '.').
_TO_TORCH_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_FROM_TORCH_MODULE = {v: k for k, v in _TO_TORCH_MODULE.items()}
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}


class MissingDependencyError(ImportError, ValueError):
    """The chosen format needs an optional package; a ValueError too, so the CLI prints a one-line error."""


def _require(module, fmt):
    """Returns the imported optional `module`, or raises MissingDependencyError naming the pip command."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        package = module.split(".")[0]
        raise MissingDependencyError(
            f"the {fmt!r} format needs the {package!r} package: pip install {package}") from e


# ----------------------------------------------------------------------------------------------
# Restore: the backbone of a run's newest checkpoint, without building the run (no data needed).
# ----------------------------------------------------------------------------------------------
def restore_backbone(workdir):
    """Returns (config, step, params, batch_stats): the newest readable checkpoint's backbone as NumPy trees.

    A damaged newest checkpoint is skipped with a warning and the previous one exported, as `ssl-jax eval` does
    (checkpoint.restore_newest); the sidecar's step says which one.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is not a training run: {config_path} does not exist")
    config = config_lib.from_json_file(config_path)
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    # read_only: the run may still be training; it never saves or deletes.
    manager = ocp.CheckpointManager(ckpt_dir, options=checkpoint.read_only_options(),
                                    item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        step, state = checkpoint.restore_newest(manager, lambda s: _restore_backbone_at(manager, s))
    finally:
        manager.close()
    return config, int(step), state["params"]["model"]["backbone"], state["batch_stats"]["backbone"]


def _restore_backbone_at(manager, step):
    meta = manager.item_metadata(step)
    tree = getattr(meta, "tree", meta)
    # Partial restore into host NumPy: only the backbone is read, and the devices the run was saved
    # from (8 GPUs, a pod slice) need not exist here.
    item = {"params": {"model": {"backbone": tree["params"]["model"]["backbone"]}},
            "batch_stats": {"backbone": tree["batch_stats"]["backbone"]}}
    restore_args = _map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return manager.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                             partial_restore=True))


def _map(fn, tree):
    """Returns the nested dict `tree` with fn applied to every leaf (metadata leaves are not JAX pytrees)."""
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


# ----------------------------------------------------------------------------------------------
# Flat '/'-joined keys (npz, safetensors).
# ----------------------------------------------------------------------------------------------
def flatten(params, batch_stats):
    """Returns {'params/<path>': array, 'batch_stats/<path>': array} of the two nested trees."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}/{key}", value)
            else:
                flat[f"{prefix}/{key}"] = np.ascontiguousarray(np.asarray(value))

    walk("params", params)
    walk("batch_stats", batch_stats)
    return flat


def unflatten(flat):
    """Returns (params, batch_stats) nested dicts rebuilt from `flatten`'s keys."""
    trees = {"params": {}, "batch_stats": {}}
    for key, value in flat.items():
        root, *path = key.split("/")
        if root not in trees or not path:
            raise ValueError(f"unexpected key {key!r}: expected params/... or batch_stats/...")
        node = trees[root]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(value)
    return trees["params"], trees["batch_stats"]


# ----------------------------------------------------------------------------------------------
# torchvision naming (NumPy only: torch is needed just to write or read the .pt file).
# ----------------------------------------------------------------------------------------------
def _torch_module(flax_path):
    """Returns torchvision's dotted module name for a flax module path such as ('layer2_0', 'downsample_bn')."""
    return ".".join(_TO_TORCH_MODULE.get(p) or re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", p) for p in flax_path)


def _flax_module(torch_module):
    """Returns the flax module path for torchvision's dotted name ('layer2.0.downsample.1' -> (...))."""
    parts, path = torch_module.split("."), []
    while parts:
        part = parts.pop(0)
        if parts and parts[0].isdigit() and (re.fullmatch(r"layer\d+", part) or part == "downsample"):
            part = _FROM_TORCH_MODULE.get(f"{part}.{parts[0]}", f"{part}_{parts[0]}")
            parts.pop(0)
        path.append(part)
    return tuple(path)


def _modules(tree, path=()):
    """Yields (module path, {leaf name: array}) for every module of a nested flax tree."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    if leaves:
        yield path, leaves
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _modules(value, path + (key,))


def torch_state_dict(params, batch_stats, num_batches_tracked=0):
    """Returns torchvision's ResNet state_dict as {name: NumPy array}: OIHW convs, BN weights and statistics."""
    out = {}
    stats = dict(_modules(batch_stats))
    for path, leaves in _modules(params):
        name = _torch_module(path)
        if "kernel" in leaves:  # bias-free conv: flax HWIO -> torch OIHW
            out[f"{name}.weight"] = np.ascontiguousarray(np.transpose(np.asarray(leaves["kernel"]), (3, 2, 0, 1)))
            continue
        if set(leaves) != set(_BN_PARAMS) or path not in stats:
            raise ValueError(f"{'/'.join(path)} is neither a bias-free conv nor a BatchNorm: {sorted(leaves)}")
        for flax_name, torch_name in _BN_PARAMS.items():
            out[f"{name}.{torch_name}"] = np.asarray(leaves[flax_name])
        for flax_name, torch_name in _BN_STATS.items():
            out[f"{name}.{torch_name}"] = np.asarray(stats[path][flax_name])
        out[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def from_torch_state_dict(state_dict):
    """Returns (params, batch_stats) nested flax trees from a torchvision-named {name: array} (fc ignored)."""
    params, batch_stats = {}, {}

    def put(tree, path, leaf, value):
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = value

    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module == "fc" or leaf == "num_batches_tracked":
            continue
        path, value = _flax_module(module), np.asarray(value)
        if value.ndim == 4:
            put(params, path, "kernel", np.transpose(value, (2, 3, 1, 0)))
        elif leaf in ("weight", "bias"):
            put(params, path, "scale" if leaf == "weight" else "bias", value)
        elif leaf in ("running_mean", "running_var"):
            put(batch_stats, path, leaf[len("running_"):], value)
        else:
            raise ValueError(f"unexpected state_dict entry {key!r} with shape {value.shape}")
    return params, batch_stats


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------
def describe(config, step, params, fmt):
    """Returns the sidecar dict: architecture, feature dim, input size and normalization, method, step."""
    m = config.model
    _, dim = models.backbone_from_config(m)
    plain = m.width_multiplier == 1 and not m.get("sk_ratio", 0.0)  # torchvision has no SK or ResNet-D
    torchvision_arch = m.name if m.name in TORCHVISION_ARCHS and plain else None
    size = config.augment.crop_size
    info = {
        "format": fmt, "method": config.method, "step": step,
        "model": {"name": m.name, "width_multiplier": m.width_multiplier, "cifar_stem": bool(m.cifar_stem),
                  "sk_ratio": float(m.get("sk_ratio", 0.0)), "stem_relu": bool(m.get("stem_relu", True)),
                  "project_first_block": bool(m.get("project_first_block", False)), "feature_dim": dim,
                  "torchvision_arch": torchvision_arch},
        "input": {"size": size, "channels": int(np.shape(params["conv1"]["kernel"])[2]),
                  "layout": "NCHW" if fmt == "torch" else "NHWC", "mean": list(config.augment.mean),
                  "std": list(config.augment.std)},
        "preprocess": (f"RGB scaled to [0, 1]; when not already {size}x{size}: resize the short side to "
                       f"{int(size / 0.875)} (bilinear, antialiased) and center-crop {size}x{size}; then "
                       "subtract mean and divide by std per channel"),
    }
    if fmt == "torch":
        _, _, c_in, c_out = np.shape(params["conv1"]["kernel"])
        stem = (f"; model.conv1 = torch.nn.Conv2d({c_in}, {c_out}, 3, 1, 1, bias=False); "
                "model.maxpool = torch.nn.Identity()") if m.cifar_stem else ""
        # torchvision's ResNet uses its `relu` module in the stem only (each block has its own)
        stem += "" if m.get("stem_relu", True) else "; model.relu = torch.nn.Identity()"
        if m.get("project_first_block", False) and "conv3" not in params["layer1_0"]:
            # a basic-block ResNet (no conv3): stage 1's first block projects its shortcut too
            c = np.shape(params["layer1_0"]["downsample_conv"]["kernel"])[3]
            stem += (f"; model.layer1[0].downsample = torch.nn.Sequential(torch.nn.Conv2d({c}, {c}, 1, bias=False), "
                     f"torch.nn.BatchNorm2d({c}))")
        info["torch_setup"] = (f"model = torchvision.models.{torchvision_arch or '<build by hand>'}(); "
                               f"model.fc = torch.nn.Identity(){stem}; "
                               "model.load_state_dict(torch.load(path), strict=True); model.eval()")
    return info


def write_backbone(params, batch_stats, fmt, path, info):
    """Writes the backbone to `path` in `fmt` and its sidecar to `path`.json; returns `path`.

    `path` must end in the format's extension (EXTENSIONS), by which `load_backbone` tells the format. Both files
    are written beside their destination under temporary names and then renamed over it: an export that fails
    (disk full, a missing optional package) leaves an earlier export at `path` as it was.
    """
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXTENSIONS)}")
    if os.path.splitext(path)[1] != EXTENSIONS[fmt]:
        raise ValueError(f"the {fmt} export {path} must end in {EXTENSIONS[fmt]}: the format is told by the "
                         "file's extension when it is loaded")
    writer = _writer(fmt)  # a missing optional package is an error before anything is written
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = {p: f"{p}.tmp-{os.getpid()}" for p in (path, path + ".json")}  # one sidecar per file: formats side by side
    try:
        writer(params, batch_stats, tmp[path], info)
        with open(tmp[path + ".json"], "w") as f:
            json.dump(info, f, indent=2)
        mode = 0o666 & ~_umask()  # what open() gives; some writers create their file private (0600)
        for final, temporary in tmp.items():
            os.chmod(temporary, mode)
            os.replace(temporary, final)
    finally:
        for temporary in tmp.values():
            if os.path.exists(temporary):
                os.remove(temporary)
    return path


def _umask():
    """Returns the process's umask (read by setting it, then set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _writer(fmt):
    """Returns fn(params, batch_stats, path, info) that writes the backbone as `fmt` to `path`."""
    if fmt == "npz":
        def write(params, batch_stats, path, info):  # pylint: disable=unused-argument
            with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to other names
                np.savez(f, **flatten(params, batch_stats))
    elif fmt == "safetensors":
        safetensors_numpy = _require("safetensors.numpy", fmt)

        def write(params, batch_stats, path, info):
            safetensors_numpy.save_file(flatten(params, batch_stats), path, metadata={"ssl_jax": json.dumps(info)})
    else:
        torch = _require("torch", fmt)

        def write(params, batch_stats, path, info):
            state_dict = torch_state_dict(params, batch_stats, info.get("step", 0))
            torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    return write


def export_workdir(workdir, fmt, out=None):
    """Writes the newest checkpoint's backbone as `fmt` to `out` (default DIR/export/backbone.<ext>); returns out."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXTENSIONS)}")
    config, step, params, batch_stats = restore_backbone(workdir)
    path = out or os.path.join(workdir, "export", "backbone" + EXTENSIONS[fmt])
    return write_backbone(params, batch_stats, fmt, path, describe(config, step, params, fmt))


def load_model(path):
    """Returns (flax backbone module, {"params", "batch_stats"}, sidecar dict) of an export in any format.

    The module is built from the sidecar's `model` fields (written beside every export), in float32;
    `module.apply(variables, x_BxHxWx3, train=False)` returns the features of NHWC images prepared as the
    sidecar's `input` says (`augment.center_view` does it: see this module's docstring).
    """
    sidecar = path + ".json"
    if not os.path.isfile(sidecar):
        raise FileNotFoundError(f"{sidecar} does not exist: load_model builds the network from the sidecar that "
                                f"`ssl-jax export` writes beside {os.path.basename(path)}")
    with open(sidecar) as f:
        info = json.load(f)
    module, _ = models.backbone_from_config(ml_collections.ConfigDict(info["model"]))
    params, batch_stats = load_backbone(path)
    return module, {"params": params, "batch_stats": batch_stats}, info


def load_backbone(path):
    """Returns (params, batch_stats) nested NumPy trees from an exported .npz, .safetensors or torch .pt file."""
    ext = os.path.splitext(path)[1]
    if ext == ".npz":
        with np.load(path) as f:
            return unflatten({k: f[k] for k in f.files})
    if ext == ".safetensors":
        return unflatten(_require("safetensors.numpy", "safetensors").load_file(path))
    if ext == ".pt":
        torch = _require("torch", "torch")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return from_torch_state_dict({k: v.numpy() for k, v in state_dict.items()})
    raise ValueError(f"cannot tell the format of {path}: expected .npz, .safetensors or .pt")
