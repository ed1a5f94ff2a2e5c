"""On-device view recipes: uint8 NHWC batches in, augmented and normalized float views out.

Every example draws its randomness from its own key (`keys_Bx2`, raw `jax.random.PRNGKey`-style keys),
so a batch split over any number of devices yields the same views as the whole batch on one device.
A `ViewSpec` is frozen and hashable: pass it as a static argument, or close over it, inside `jax.jit`.
The single-image ops live in `ssl_jax.augment_ops` and are re-exported here.

Typical use inside a training step:

    spec = augment.spec_from_config(config.augment)    # or augment.ViewSpec(size=32, ...)
    keys_Bx2 = parallel.example_keys(rng, images_BxHxWx3.shape[0], axis_name)  # one key per example
    k1_Bx2 = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, 1)             # one key per example and view
    v1_BxSxSx3 = augment.view_batch(k1_Bx2, images_BxHxWx3, spec)

Images are uint8 (0..255), or floats already in [0, 1].
"""
import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax.augment_ops import (  # noqa: F401  (re-exported public API)
    JITTER_OPS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_jitter,
    color_jitter,
    crop_and_resize,
    default_blur_kernel_size,
    flip_left_right,
    gaussian_blur,
    random_gaussian_blur,
    random_grayscale,
    random_resized_crop,
    random_solarize,
    sample_crop_box,
    sample_jitter,
    solarize,
    to_grayscale,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # ImageNet convention: resize to 256, center crop 224

_TUPLE_FIELDS = ("crop_scale", "crop_ratio", "blur_sigma", "mean", "std", "jitter")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How to draw one augmented view; frozen and hashable so it can be a static jit argument.

    size: output side in pixels. crop_scale: (min, max) area of the random crop as a fraction of the image's
    area; crop_ratio: (min, max) aspect ratio, width / height (torchvision's RandomResizedCrop).
    flip_p, jitter_p, grayscale_p, blur_p, solarize_p: probabilities. jitter_strength s: SimCLR's colour
    jitter strength, ranges (0.8 s, 0.8 s, 0.8 s, 0.2 s) for brightness, contrast, saturation and hue
    (`augment_ops.jitter_ranges`). blur_sigma: (min, max) Gaussian sigma in pixels of the output view.
    mean, std: per-channel normalisation of [0, 1] values. dtype: of the returned views.
    """

    size: int
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter: tuple = ()  # explicit (brightness, contrast, saturation, hue) ranges; overrides jitter_strength
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False  # grayscale before the colour jitter (MoCo v1's order), not after it
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    dtype: str = "float32"

    def __post_init__(self):
        # Lists (e.g. from a config) would make the spec unhashable and break static jit arguments.
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "grayscale_first", bool(self.grayscale_first))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"ViewSpec.{name} must be (min, max) with 0 < min <= max, got {(low, high)}")


def _to_unit_float(image):
    """Returns image as float32 in [0, 1]: integer images are divided by 255, floats pass through."""
    if jnp.issubdtype(image.dtype, jnp.integer):
        return image.astype(jnp.float32) * (1.0 / 255.0)
    return image.astype(jnp.float32)


def normalize(image, mean, std):
    """Returns (image - mean) / std per channel (...x3, float32)."""
    return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def view(key, image, spec):
    """Returns one augmented, normalized SxSx3 view (spec.dtype) of a uint8 HxWx3 image."""
    k_crop, k_flip, k_jitter, k_gray, k_blur, k_solarize = jax.random.split(key, 6)
    # Crop first: the crop gathers uint8 rows, so only S x W pixels are converted, not H x W.
    x = random_resized_crop(k_crop, image, spec.size, spec.crop_scale, spec.crop_ratio)
    if jnp.issubdtype(image.dtype, jnp.integer):
        x = x * (1.0 / 255.0)
    # Ops with probability 0 are skipped at trace time (the spec is static), not computed and discarded.
    if spec.flip_p > 0:
        x = flip_left_right(k_flip, x, spec.flip_p)
    strength = spec.jitter or spec.jitter_strength
    gray = spec.grayscale_p > 0
    if gray and spec.grayscale_first:
        x = random_grayscale(k_gray, x, spec.grayscale_p)
    if spec.jitter_p > 0 and (spec.jitter or spec.jitter_strength > 0):
        x = color_jitter(k_jitter, x, strength, spec.jitter_p)
    if gray and not spec.grayscale_first:
        x = random_grayscale(k_gray, x, spec.grayscale_p)
    if spec.blur_p > 0:
        x = random_gaussian_blur(k_blur, x, spec.blur_p, spec.blur_sigma)
    if spec.solarize_p > 0:
        x = random_solarize(k_solarize, x, spec.solarize_p)
    return normalize(x, spec.mean, spec.std).astype(spec.dtype)


def view_batch(keys_Bx2, images_BxHxWx3, spec):
    """Returns B x S x S x 3 views, view(keys_Bx2[i], images_BxHxWx3[i], spec) for each example."""
    return jax.vmap(lambda k, im: view(k, im, spec))(keys_Bx2, images_BxHxWx3)


def spec_from_config(aug_cfg):
    """Returns the ViewSpec described by an augmentation ConfigDict (crop_size, min_scale, ...)."""
    return ViewSpec(
        size=aug_cfg.crop_size,
        crop_scale=(aug_cfg.min_scale, aug_cfg.max_scale),
        flip_p=aug_cfg.flip_p,
        jitter_strength=aug_cfg.jitter_strength,
        jitter=tuple(aug_cfg.get("jitter", ()) or ()),
        jitter_p=aug_cfg.jitter_p,
        grayscale_p=aug_cfg.grayscale_p,
        grayscale_first=bool(aug_cfg.get("grayscale_first", False)),
        blur_p=aug_cfg.blur_p,
        solarize_p=aug_cfg.solarize_p,
        mean=tuple(aug_cfg.mean),
        std=tuple(aug_cfg.std),
        dtype=aug_cfg.get("dtype", "float32"),
    )


def simclr_spec(preset, size):
    """Returns SimCLR's ViewSpec: 'cifar' (s=0.5, no blur) or 'imagenet' (s=1, blur p=0.5)."""
    if preset == "cifar":
        return ViewSpec(size=size, jitter_strength=0.5, blur_p=0.0,
                        mean=CIFAR_MEAN, std=CIFAR_STD)
    if preset == "imagenet":
        return ViewSpec(size=size, jitter_strength=1.0, blur_p=0.5,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    raise ValueError(f"unknown SimCLR augmentation preset {preset!r}; use 'cifar' or 'imagenet'")


def center_view(images_BxHxWx3, size, mean, std):
    """Returns B x size x size x 3 float32 evaluation views: resize, center crop, normalize."""
    x = _to_unit_float(images_BxHxWx3)
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        # ImageNet convention (torchvision Resize(int(size / 0.875)) + CenterCrop(size)); antialiased
        # bilinear like PIL, since evaluation images are often much larger than the crop.
        short = int(size / EVAL_CROP_FRACTION)
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = jax.image.resize(x, (b, new_h, new_w, c), method="bilinear", antialias=True)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[:, top:top + size, left:left + size, :]
    return normalize(x, mean, std)
