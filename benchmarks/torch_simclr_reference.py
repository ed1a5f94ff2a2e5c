"""A plain PyTorch SimCLR with the recipe of `configs/simclr.py:cifar10`, as a reference for ssl_jax's run on
the same data: is a gap to a published number (lightly's 84.8% kNN at 200 epochs) ours or the data's?

Everything a recipe decides comes from the same config (`--config.KEY=VALUE` overrides as for `ssl-jax train`):
torchvision ResNet with the CIFAR stem and the config's MLP head (`ssl_jax.bench_torch`, the `--torch`
baseline of `ssl-jax bench`), called once per view with `simclr.bn_per_view` (else once on both views),
NT-Xent at the config's temperature, bf16 autocast and channels_last when the
config computes in bf16, SGD with momentum, the learning rate scaled with the batch, linear warm-up then
cosine decay per step (`ssl_jax.optim.make_schedule` itself), weight decay on every parameter or, as ssl_jax by
default (`optim.exclude_bias_and_norm`), not on biases and BatchNorm parameters; torchvision.transforms.v2
augmentation with the config's parameters in a DataLoader with one worker per CPU core. kNN (k and
temperature from the config) on backbone features, computed by ssl_jax's own evaluator on the CPU, before
training and every `--knn-every` epochs. torch's default initialisations (torchvision's for the ResNet).

usage (from the repository root; one JSON line per logged step and per kNN evaluation goes to OUT):
  python benchmarks/torch_simclr_reference.py --out OUT.jsonl [--epochs 200] [--knn-every 10]
      [--archive ../shared/data/cifar10-jpeg.tar.gz] [--workers N] [--steps-per-epoch N] [--knn-examples N]
      [--config.KEY=VALUE ...]
Compare with `ssl-jax train --config configs/simclr.py:cifar10 --config.num_epochs=E ...` for the same E.
`--steps-per-epoch` and `--knn-examples` are for a quick check on a CPU (the schedule follows the shorter
epochs). Checked so on 2026-11-23 (2-core CPU, torch 2.14.1): see BENCHMARKS.md, "Open questions".
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the kNN runs on the CPU: the GPU is PyTorch's

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from ssl_jax import bench_torch, config as config_lib, data, optim  # noqa: E402
from ssl_jax.evaluators import knn  # noqa: E402


def parse(argv):
    """Returns (args, config overrides)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON lines: logged steps and kNN evaluations")
    p.add_argument("--epochs", type=int, default=0, help="default: the config's num_epochs")
    p.add_argument("--knn-every", type=int, default=10, help="epochs between kNN evaluations")
    p.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz", help="the config's data.path")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="DataLoader processes")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cut epochs short (a check on a CPU)")
    p.add_argument("--knn-examples", type=int, default=0,
                   help="kNN on N random training and N random test images (a check on a CPU; default all)")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for a in rest:
        if not a.startswith("--config.") or "=" not in a:
            p.error(f"unknown argument {a} (overrides are --config.KEY=VALUE)")
        overrides.append(a[len("--config."):])
    return args, overrides


def main(argv):
    args, overrides = parse(argv)
    cfg = config_lib.load_config("configs/simclr.py:cifar10", [f"data.path={args.archive}", *overrides])
    if cfg.optim.name != "sgd":
        raise SystemExit(f"this reference implements SGD only; the config asks for {cfg.optim.name!r}")
    epochs = args.epochs or cfg.num_epochs
    train_src, test_src = data.get_source(cfg.data, "train"), data.get_source(cfg.data, "test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True

    tmp = tempfile.TemporaryDirectory(prefix="torch_simclr_reference_")
    images_path = os.path.join(tmp.name, "train.npy")
    np.save(images_path, np.asarray(train_src.images))
    spec = bench_torch.spec_from_config(cfg, images_path, steps=0, warmup=0)
    spec["num_workers"] = args.workers
    model = bench_torch.network(torch, torchvision, spec).to(device, memory_format=torch.channels_last)
    loader = bench_torch.loader(torch, spec, device)
    batches = iter(loader)  # the workers fork now, before JAX starts its threads in the kNN below
    backbone = model[0]

    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            exclude = cfg.optim.exclude_bias_and_norm and (
                name == "bias" or isinstance(module, torch.nn.modules.batchnorm._BatchNorm))
            (no_decay if exclude else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=0.0, momentum=cfg.optim.momentum)
    steps_per_epoch = args.steps_per_epoch or len(loader)
    schedule = optim.make_schedule(cfg.optim, cfg.batch_size, steps_per_epoch, epochs)  # ssl_jax's own
    peak = optim.scaled_learning_rate(cfg.optim.lr, cfg.batch_size, cfg.optim.lr_scaling)
    warmup = int(round(steps_per_epoch * cfg.optim.warmup_epochs))
    mean = torch.tensor(spec["mean"], device=device)[:, None, None]
    std = torch.tensor(spec["std"], device=device)[:, None, None]

    @torch.no_grad()
    def features(u8_NHWC):
        backbone.eval()
        out = []
        for i in range(0, len(u8_NHWC), 1000):
            x = torch.from_numpy(np.array(u8_NHWC[i:i + 1000])).to(device).permute(0, 3, 1, 2).float() / 255
            out.append(backbone(((x - mean) / std).contiguous(memory_format=torch.channels_last)).float().cpu())
        backbone.train()
        return torch.cat(out).numpy()

    log = open(args.out, "a")

    def write(record):
        print(json.dumps(record), file=log, flush=True)
        print(json.dumps(record), file=sys.stderr, flush=True)

    def subset(source):  # all, or --knn-examples of each, drawn at random (the archive is sorted by class)
        n = len(source.labels)
        rows = np.sort(np.random.default_rng(0).permutation(n)[:args.knn_examples]) if args.knn_examples else None
        return (source.images, source.labels) if rows is None else (source.images[rows], source.labels[rows])

    (train_x, train_y), (test_x, test_y) = subset(train_src), subset(test_src)

    def evaluate(epoch, elapsed):
        r = knn.knn_accuracy(features(train_x), train_y, features(test_x), test_y, train_src.num_classes,
                             k=min(cfg.eval.knn_k, len(train_y)), temperature=cfg.eval.knn_temperature)
        write({"epoch": epoch, "knn_top1": r["knn_top1"], "knn_top5": r.get("knn_top5"), "elapsed_s": elapsed})

    write({"reference": "torch SimCLR", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "torchvision": torchvision.__version__, "epochs": epochs,
           "steps_per_epoch": steps_per_epoch, "peak_lr": peak, "warmup_steps": warmup,
           "overrides": overrides, "command": " ".join([sys.argv[0], *argv])})
    evaluate(0, 0.0)
    step, train_s, start = 0, 0.0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            try:
                v1, v2 = next(batches)
            except StopIteration:
                batches = iter(loader)
                v1, v2 = next(batches)
            for g in opt.param_groups:
                g["lr"] = float(schedule(step))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
                z = bench_torch.embed(torch, model, spec, device, v1, v2)
            loss = bench_torch.nt_xent(torch, z, spec["temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.log_every_steps == 0:
                loss_value = float(loss.item())
                if not math.isfinite(loss_value):
                    raise SystemExit(f"non-finite loss {loss_value} at step {step}")
                write({"step": step, "epoch": step / steps_per_epoch, "loss": loss_value,
                       "lr": opt.param_groups[0]["lr"], "elapsed_s": train_s + time.perf_counter() - start})
        if epoch % args.knn_every == 0 or epoch == epochs:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - start
            evaluate(epoch, train_s)
            start = time.perf_counter()
    tmp.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
