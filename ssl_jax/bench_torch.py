"""A plain PyTorch SimCLR step, timed as a user would write it: the baseline of `ssl-jax bench --torch`.

torchvision ResNet (CIFAR stem: 3x3 stride-1 conv1, no max-pool, when the config has one), the config's
MLP head, NT-Xent, bf16 autocast, channels_last, SGD with momentum; torchvision.transforms.v2 augmentation
(RandomResizedCrop, flip, ColorJitter, grayscale, blur when the config has it) in a DataLoader with one
worker per CPU core, over the same uint8 images as the JAX run. Two timings: `synthetic` (random views
already on the device: the network's cost) and `loader` (end to end from the DataLoader).

It runs in a child process (`python -m ssl_jax.bench_torch SPEC_JSON`, started before JAX touches the
accelerator): JAX preallocates most of the GPU's memory, and DataLoader workers must not be forked from a
process that runs JAX's threads. Nothing here imports torch or jax at module level; torch is the optional
extra `pip install ssl-jax[torch]`.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

INSTALL_HINT = "pip install 'ssl-jax[torch]' (torch and torchvision)"
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class MissingTorchError(ImportError):
    """PyTorch or torchvision is not installed."""


def check_installed():
    """Raises MissingTorchError naming the install command unless torch and torchvision import."""
    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingTorchError(f"--torch needs {' and '.join(missing)}: {INSTALL_HINT}")


def spec_from_config(config, images_path, steps, warmup, compile_model=False):
    """Returns the JSON-able description of the PyTorch run equivalent to a SimCLR `config`."""
    from ssl_jax import augment, augment_ops  # pylint: disable=import-outside-toplevel  (parent only)
    from ssl_jax.methods import simclr  # pylint: disable=import-outside-toplevel
    if config.method != "simclr":
        raise ValueError(f"--torch times the SimCLR step; got method {config.method!r} (use configs/simclr.py)")
    sk_ratio = config.model.get("sk_ratio", 0.0)
    if config.model.name not in TORCHVISION_RESNETS or config.model.width_multiplier != 1 or sk_ratio:
        raise ValueError(f"--torch builds a torchvision ResNet: model.name must be one of "
                         f"{', '.join(TORCHVISION_RESNETS)} with model.width_multiplier=1 and model.sk_ratio=0, "
                         f"got {config.model.name!r} x {config.model.width_multiplier}, sk_ratio {sk_ratio:g}")
    view = augment.spec_from_config(config.augment)
    return {
        "images": images_path, "steps": steps, "warmup": warmup, "batch_size": config.batch_size,
        "arch": config.model.name, "cifar_stem": bool(config.model.cifar_stem),
        "zero_init_residual": bool(config.model.get("zero_init_residual", True)),
        "conv_init": config.model.get("conv_init", "torchvision"),
        "stem_relu": bool(config.model.get("stem_relu", True)),
        "project_first_block": bool(config.model.get("project_first_block", False)),
        "bf16": config.model.dtype == "bfloat16", "compile": bool(compile_model),
        "head_layers": config.head.num_layers, "head_hidden": config.head.hidden_dim, "head_out": config.head.out_dim,
        "head_bn": bool(config.head.use_bn),
        "head_last_bn": bool(config.head.get("last_bn", False)),
        "head_last_bn_scale": bool(config.head.get("last_bn_scale", False)), "bn_per_view": simclr.bn_per_view(config),
        "temperature": config.loss.temperature, "lr": config.optim.lr, "weight_decay": config.optim.weight_decay,
        "crop_size": view.size, "scale": list(view.crop_scale), "flip_p": view.flip_p,
        "jitter": list(augment_ops.jitter_ranges(view.jitter or view.jitter_strength)), "jitter_p": view.jitter_p,
        "grayscale_p": view.grayscale_p, "blur_p": view.blur_p, "blur_sigma": list(view.blur_sigma),
        "blur_kernel": augment_ops.default_blur_kernel_size(view.size, view.blur_sigma[1]),
        "mean": list(view.mean), "std": list(view.std), "num_workers": len(os.sched_getaffinity(0)),
    }


def run_subprocess(config, images, steps, warmup, compile_model=False, max_images=16384):
    """Returns the PyTorch timings (see `run`) of `config`'s SimCLR step on `images` (uint8 NxHxWx3).

    At most `max_images` of them are written to a temporary .npy the child memory-maps (the loader cycles).
    """
    check_installed()
    with tempfile.TemporaryDirectory(prefix="ssl_jax_bench_torch_") as tmp:
        path = os.path.join(tmp, "images.npy")
        np.save(path, np.asarray(images[:max(min(len(images), max_images), config.batch_size)]))
        spec = spec_from_config(config, path, steps, warmup, compile_model)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run([sys.executable, "-m", "ssl_jax.bench_torch", json.dumps(spec)], env=env,
                              capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"the PyTorch benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def network(torch, torchvision, spec):
    """Returns torchvision's ResNet (fc removed, CIFAR stem if asked, each block's last BatchNorm scale at 0
    if the config's is, convs re-initialised with nn.Conv2d's default for conv_init "pytorch" or TF's
    VarianceScaling() for "tf", no stem ReLU for stem_relu False, a projection shortcut in stage 1's first block
    for project_first_block) followed by the projection MLP (hidden layers Linear -> BatchNorm -> ReLU with head_bn,
    else Linear with bias -> ReLU; the output Linear, or with head_last_bn Linear without bias -> BatchNorm whose
    bias stays 0 and whose scale is learned only with head_last_bn_scale, as models.MLPHead's last_bn)."""
    nn = torch.nn
    backbone = getattr(torchvision.models, spec["arch"])(zero_init_residual=spec.get("zero_init_residual", False))
    if spec["cifar_stem"]:
        backbone.conv1 = nn.Conv2d(3, backbone.conv1.out_channels, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    if not spec.get("stem_relu", True):  # torchvision applies `relu` in the stem only
        backbone.relu = nn.Identity()
    first = backbone.layer1[0]
    if spec.get("project_first_block", False) and first.downsample is None:  # basic blocks: stage 1 projects too
        c = first.conv1.in_channels
        first.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        nn.init.kaiming_normal_(first.downsample[0].weight, mode="fan_out", nonlinearity="relu")  # torchvision's
    conv_init = spec.get("conv_init", "torchvision")
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d) and conv_init == "pytorch":
            module.reset_parameters()
        elif isinstance(module, nn.Conv2d) and conv_init == "tf":  # VarianceScaling(): see models.resnet.CONV_INITS
            std = (1.0 / module.weight[0].numel()) ** 0.5 / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
    width, backbone.fc = backbone.fc.in_features, nn.Identity()
    hidden = spec["head_hidden"] or width
    layers, d = [], width
    for _ in range(spec["head_layers"] - 1):
        if spec.get("head_bn", True):
            layers += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
        d = hidden
    if not spec.get("head_last_bn", False):
        return nn.Sequential(backbone, *layers, nn.Linear(d, spec["head_out"]))
    out_bn = nn.BatchNorm1d(spec["head_out"])
    out_bn.bias.requires_grad_(False)  # center=False: the bias stays 0
    out_bn.weight.requires_grad_(spec.get("head_last_bn_scale", False))  # scale=False: the scale stays 1
    return nn.Sequential(backbone, *layers, nn.Linear(d, spec["head_out"], bias=False), out_bn)


def embed(torch, model, spec, device, v1, v2):
    """Returns the 2B embeddings [view 1; view 2] of two (pinned) host batches: each view copied as is, then
    one call on both views concatenated on the device (one BatchNorm batch), or with bn_per_view one call per
    view (BatchNorm statistics per view, as lightly's benchmark computes them)."""
    views = [v.to(device, non_blocking=True) for v in (v1, v2)]
    if spec.get("bn_per_view", False):
        return torch.cat([model(v.contiguous(memory_format=torch.channels_last)) for v in views])
    return model(torch.cat(views).contiguous(memory_format=torch.channels_last))


def nt_xent(torch, z_2BxD, temperature):
    """Returns SimCLR's NT-Xent of the 2B embeddings [view 1; view 2], both directions, float32."""
    z = torch.nn.functional.normalize(z_2BxD.float(), dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = (torch.arange(n, device=z.device) + n // 2) % n
    return torch.nn.functional.cross_entropy(logits, targets)


def loader(torch, spec, device):
    """Returns a DataLoader of (view_1, view_2) uint8 -> normalized float batches, one worker per core."""
    from torchvision.transforms import v2  # pylint: disable=import-outside-toplevel
    images = np.load(spec["images"], mmap_mode="r")
    b, c, s, h = spec["jitter"]
    ops = [v2.RandomResizedCrop(spec["crop_size"], scale=tuple(spec["scale"]), antialias=True),
           v2.RandomHorizontalFlip(spec["flip_p"]),
           v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=spec["jitter_p"]),
           v2.RandomGrayscale(spec["grayscale_p"])]
    if spec["blur_p"] > 0:
        kernel = spec["blur_kernel"]  # the size ssl_jax.augment blurs views of this side with
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(spec["blur_sigma"]))], p=spec["blur_p"]))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])]
    transform = v2.Compose(ops)

    class TwoViews(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            image = torch.from_numpy(np.array(images[i])).permute(2, 0, 1)  # uint8 CHW
            return transform(image), transform(image)

    workers = spec["num_workers"]
    return torch.utils.data.DataLoader(
        TwoViews(), batch_size=spec["batch_size"], shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def run(spec):
    """Returns {'synthetic': {...}, 'loader': {...}, 'device', 'torch', ...}: img/s and step ms of both ways."""
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    model = network(torch, torchvision, spec).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=spec["weight_decay"])
    forward = torch.compile(model) if spec["compile"] else model

    def step(v1, v2):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            z = embed(torch, forward, spec, device, v1, v2)
        loss = nt_xent(torch, z, spec["temperature"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def timed(batches):
        for _ in range(spec["warmup"]):
            step(*next(batches))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            loss = step(*next(batches))
        final = float(loss.item())  # waits for the device
        seconds = (time.perf_counter() - start) / spec["steps"]
        return {"img_per_s": round(spec["batch_size"] / seconds, 1), "step_ms": round(1000 * seconds, 3),
                "final_loss": final}

    s, b = spec["crop_size"], spec["batch_size"]
    views = [torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last) for _ in "12"]
    out = {"synthetic": timed(iter(lambda: views, None))}
    batches = loader(torch, spec, device)

    def endless():
        while True:
            yield from batches

    out["loader"] = timed(endless())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**out, "device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "num_workers": spec["num_workers"], "bf16_autocast": spec["bf16"], "channels_last": True,
            "compiled": spec["compile"], "arch": spec["arch"], "batch_size": b}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
