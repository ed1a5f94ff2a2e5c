"""SimCLR v1 (Chen et al., 2020). Presets: `cifar10`, `imagenet`, `smoke`.

Run (CIFAR-10 from the ImageFolder archive; drop `data.path` to get CIFAR-10 from tensorflow-datasets):

  ssl-jax train --config configs/simclr.py:cifar10 --workdir runs/simclr_cifar10 \
      --config.data.path=../shared/data/cifar10-jpeg.tar.gz

Results:
  cifar10 (ResNet-18, batch 512, 200 epochs): kNN top-1 not yet measured on a GPU (see BENCHMARKS.md).
  smoke: finishes in well under a minute on a 2-core CPU (see README.md for the measured time).

Recipe notes. cifar10 follows the SimCLR paper's CIFAR appendix and lightly's CIFAR-10 benchmark setting
(ResNet-18 CIFAR stem, 2-layer 512-128 projection head, temperature 0.5, colour strength 0.5, no blur,
SGD momentum 0.9 with weight decay 5e-4 and cosine decay). imagenet is the paper's: ResNet-50, batch 4096, LARS,
lr 0.3 x batch/256, weight decay 1e-6, temperature 0.1, 100 epochs, 10 warm-up epochs, blur with p = 0.5.
"""
import ml_collections

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def base_config():
    """Returns the fields every SimCLR preset sets; presets change values, never add keys."""
    c = ml_collections.ConfigDict()
    c.method = "simclr"
    c.seed = 0
    c.num_epochs = 200
    c.batch_size = 512
    c.log_every_steps = 50

    c.data = ml_collections.ConfigDict(dict(
        name="cifar10", path="", image_size=0, resident=True, cache_dir="", num_workers=0,
        num_examples=0, num_classes=10, tfds_data_dir=""))
    c.model = ml_collections.ConfigDict(dict(
        name="resnet18", width_multiplier=1, cifar_stem=True, dtype="bfloat16", sync_bn=True))
    c.head = ml_collections.ConfigDict(dict(num_layers=2, hidden_dim=512, out_dim=128, use_bn=True, last_bn=False))
    c.loss = ml_collections.ConfigDict(dict(temperature=0.5))
    c.augment = ml_collections.ConfigDict(dict(
        crop_size=32, min_scale=0.08, max_scale=1.0, flip_p=0.5, jitter_strength=0.5, jitter_p=0.8,
        grayscale_p=0.2, blur_p=0.0, solarize_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD))
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.12, lr_scaling="linear", weight_decay=5e-4, momentum=0.9, nesterov=False,
        warmup_epochs=10, end_lr_factor=0.0, trust_coefficient=0.001))
    c.checkpoint = ml_collections.ConfigDict(dict(every_epochs=10, keep=2))
    c.eval = ml_collections.ConfigDict(dict(
        knn_every_epochs=10, knn_k=200, knn_temperature=0.1, knn_train_examples=0, batch_size=1024,
        linear_epochs=100, linear_lr=0.1, linear_batch_size=1024, linear_weight_decay=0.0))
    return c


def get_config(arg="cifar10"):
    """Returns the preset named `arg`: cifar10, imagenet or smoke."""
    c = base_config()
    if arg == "cifar10":
        return c
    if arg == "imagenet":
        c.num_epochs, c.batch_size = 100, 4096
        c.data.update(dict(name="imagenet2012", image_size=256, resident=False, num_classes=1000))
        c.model.update(dict(name="resnet50", cifar_stem=False))
        c.head.update(dict(hidden_dim=2048, out_dim=128))
        c.loss.temperature = 0.1
        c.augment.update(dict(crop_size=224, jitter_strength=1.0, blur_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD))
        c.optim.update(dict(name="lars", lr=0.3, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10))
        c.checkpoint.every_epochs = 1
        c.eval.update(dict(knn_every_epochs=10, knn_train_examples=100_000))
        return c
    if arg == "smoke":
        c.num_epochs, c.batch_size, c.log_every_steps = 2, 64, 4
        c.data.update(dict(name="synthetic", image_size=16, num_examples=512, num_classes=4))
        c.model.update(dict(name="tiny", dtype="float32"))
        c.head.update(dict(hidden_dim=32, out_dim=16))
        c.augment.update(dict(crop_size=16, min_scale=0.3))
        c.optim.update(dict(lr=0.1, warmup_epochs=1))
        c.checkpoint.every_epochs = 1
        c.eval.update(dict(knn_every_epochs=1, knn_k=20, batch_size=128))
        return c
    raise ValueError(f"unknown preset {arg!r} for simclr; choose cifar10, imagenet or smoke")
