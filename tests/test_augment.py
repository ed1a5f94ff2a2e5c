"""Tests for ssl_jax.augment: each op against plain NumPy, crop statistics against a simulation of
torchvision's RandomResizedCrop, and the batched recipes' determinism and device-count invariance."""
import colorsys
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageFilter

from ssl_jax import augment
from ssl_jax import config as config_lib
from ssl_jax import augment_ops as ops

LUMA = np.array([0.299, 0.587, 0.114])
# Jitted once per shape: op-by-op dispatch would compile every primitive separately.
crop_and_resize = jax.jit(ops.crop_and_resize, static_argnums=2)
gaussian_blur = jax.jit(ops.gaussian_blur, static_argnums=2)
sample_crop_box = jax.jit(ops.sample_crop_box, static_argnums=(1, 2, 3, 4))
view_jit = jax.jit(augment.view, static_argnums=2)


def _image(seed, h=9, w=11):
    return np.random.default_rng(seed).uniform(size=(h, w, 3)).astype(np.float32)


def _uint8_images(seed, b, h, w):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# ------------------------------------------------------------------ NumPy references

def np_gray(x):
    return (x.astype(np.float64) @ LUMA)[..., None]


def np_brightness(x, f):
    return np.clip(x * f, 0, 1)


def np_contrast(x, f):
    return np.clip(f * x + (1 - f) * np_gray(x).mean(), 0, 1)


def np_saturation(x, f):
    return np.clip(f * x + (1 - f) * np_gray(x), 0, 1)


def np_hue(x, delta):
    out = np.empty(x.shape, np.float64)
    for idx in np.ndindex(x.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx].astype(np.float64))
        out[idx] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
    return np.clip(out, 0, 1)


def np_blur(x, sigma, k):
    r = k // 2
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g2 = np.outer(g, g) / np.outer(g, g).sum()  # full 2D kernel: independent of the separable code
    xp = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = x.shape[:2]
    return sum(g2[i, j] * xp[i:i + h, j:j + w] for i in range(k) for j in range(k))


def np_bilinear_crop_resize(x, box, size):
    """torch's upsample_bilinear2d (align_corners=False) applied to x[y0:y0+h, x0:x0+w]."""
    y0, x0, h, w = box
    crop = x[y0:y0 + h, x0:x0 + w].astype(np.float64)

    def taps(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    lo, hi, f = taps(h)
    rows = crop[lo] * (1 - f)[:, None, None] + crop[hi] * f[:, None, None]
    lo, hi, f = taps(w)
    return rows[:, lo] * (1 - f)[None, :, None] + rows[:, hi] * f[None, :, None]


def torchvision_crop_hw(rng, height, width, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed (sizes only)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


# ------------------------------------------------------------------ single-image ops

@pytest.mark.parametrize("f", [0.0, 0.4, 1.0, 1.7])
def test_colour_factors_match_numpy(f):
    x = _image(0)
    np.testing.assert_allclose(ops.adjust_brightness(x, f), np_brightness(x, f), atol=1e-6)
    np.testing.assert_allclose(ops.adjust_contrast(x, f), np_contrast(x, f), atol=1e-6)
    np.testing.assert_allclose(ops.adjust_saturation(x, f), np_saturation(x, f), atol=1e-6)


@pytest.mark.parametrize("delta", [-0.5, -0.13, 0.0, 0.2, 0.45])
def test_adjust_hue_matches_colorsys(delta):
    x = _image(1)
    x[0, 0] = [0.3, 0.3, 0.3]  # gray pixel: hue undefined, must stay unchanged
    x[0, 1] = [0.8, 0.8, 0.1]  # tie between two maxima
    np.testing.assert_allclose(ops.adjust_hue(x, delta), np_hue(x, delta), atol=2e-6)


def test_grayscale_matches_numpy():
    x = _image(2)
    g = np.asarray(ops.to_grayscale(x))
    np.testing.assert_allclose(g, np.repeat(np_gray(x), 3, axis=-1), atol=1e-6)
    np.testing.assert_array_equal(ops.random_grayscale(jax.random.PRNGKey(0), x, p=1.0), g)
    np.testing.assert_array_equal(ops.random_grayscale(jax.random.PRNGKey(0), x, p=0.0), x)


@pytest.mark.parametrize("sigma,k", [(0.1, 3), (0.7, 5), (2.0, 7)])
def test_gaussian_blur_matches_numpy_convolution(sigma, k):
    x = _image(3, 12, 10)
    np.testing.assert_allclose(gaussian_blur(x, sigma, k), np_blur(x, sigma, k), atol=1e-5)


def test_random_blur_default_kernel_and_probability():
    assert ops.default_blur_kernel_size(224) == 23  # SimCLR / BYOL at 224
    assert ops.default_blur_kernel_size(96) == 13  # SwAV's small crops: 3 sigma_max, not 10% (9)
    assert ops.default_blur_kernel_size(32, sigma_max=0.5) == 5
    x = _image(4, 20, 20)
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(ops.random_gaussian_blur(key, x, p=0.0), x)
    blurred = np.asarray(ops.random_gaussian_blur(key, x, p=1.0, sigma_range=(1.0, 1.0)))
    np.testing.assert_allclose(blurred, np_blur(x, 1.0, 7), atol=1e-5)


@pytest.mark.parametrize("side", [16, 32, 96])
def test_random_blur_has_the_drawn_sigma_on_small_views(side):
    # SwAV blurs its 96 px crops (and MoCo v2 / SimSiam / Barlow Twins any crop) with PIL's GaussianBlur(sigma),
    # whose support is about 3 sigma; SimCLR's 10% kernel alone would be 9, 3 and 1 taps wide here.
    x = np.zeros((side, side, 3), np.float32)
    x[side // 2, side // 2] = 1.0
    out = np.asarray(ops.random_gaussian_blur(jax.random.PRNGKey(0), x, p=1.0, sigma_range=(2.0, 2.0)))
    row = out[side // 2, :, 0] / out[side // 2, :, 0].sum()
    offset = np.arange(side) - side // 2
    assert abs(math.sqrt(np.sum(row * offset ** 2)) - 2.0) < 0.03
    if side == 96:  # against PIL on a step edge: within its uint8 rounding
        edge = np.zeros((side, side), np.uint8)
        edge[:, side // 2:] = 255
        pil = np.asarray(Image.fromarray(edge).filter(ImageFilter.GaussianBlur(2.0)), np.float64) / 255
        ours = ops.random_gaussian_blur(jax.random.PRNGKey(0), np.repeat(edge[..., None] / 255.0, 3, -1), p=1.0,
                                        sigma_range=(2.0, 2.0))
        np.testing.assert_allclose(np.asarray(ours)[side // 2, :, 0], pil[side // 2], atol=2.5 / 255)


def test_solarize_matches_numpy():
    x = _image(5)
    x[0, 0, 0] = 0.5  # exactly at the threshold: inverted (>=)
    expect = np.where(x >= 0.5, 1 - x, x)
    np.testing.assert_allclose(ops.solarize(x), expect, atol=0)
    np.testing.assert_allclose(ops.random_solarize(jax.random.PRNGKey(0), x, 1.0), expect, atol=0)
    np.testing.assert_array_equal(ops.random_solarize(jax.random.PRNGKey(0), x, 0.0), x)


def test_flip_matches_numpy_and_rate():
    x = _image(6)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(ops.flip_left_right(key, x, p=1.0), x[:, ::-1])
    np.testing.assert_array_equal(ops.flip_left_right(key, x, p=0.0), x)
    flipped = jax.jit(jax.vmap(lambda k: ops.flip_left_right(k, x)))(_keys(0, 400))
    rate = np.mean(np.all(np.asarray(flipped) == x[:, ::-1], axis=(1, 2, 3)))
    assert abs(rate - 0.5) < 0.1


@pytest.mark.parametrize("box,size", [((0, 0, 9, 11), 9), ((2, 3, 5, 7), 12), ((1, 0, 8, 11), 4),
                                      ((4, 6, 1, 1), 3)])
def test_crop_and_resize_matches_numpy_bilinear(box, size):
    x = _image(7)
    out = crop_and_resize(x, jnp.array(box), size)
    assert out.shape == (size, size, 3)
    np.testing.assert_allclose(out, np_bilinear_crop_resize(x, box, size), atol=1e-5)
    # uint8 input gives the same values on the 0..255 scale
    x8 = (x * 255).astype(np.uint8)
    np.testing.assert_allclose(crop_and_resize(x8, jnp.array(box), size),
                               np_bilinear_crop_resize(x8, box, size), atol=1e-3)


@pytest.mark.parametrize("height,width", [(32, 32), (48, 80)])
def test_crop_box_distribution_matches_torchvision(height, width):
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    sample = jax.jit(jax.vmap(lambda k: ops.sample_crop_box(k, height, width, scale, ratio)))
    y0, x0, h, w = np.asarray(sample(_keys(0, n))).T
    assert np.all((h > 0) & (w > 0) & (y0 >= 0) & (x0 >= 0))
    assert np.all((y0 + h <= height) & (x0 + w <= width))
    # Offsets uniform over the valid positions: (y0 + 0.5) / (H - h + 1) has mean 1/2.
    assert abs(np.mean((y0 + 0.5) / (height - h + 1)) - 0.5) < 0.03
    assert abs(np.mean((x0 + 0.5) / (width - w + 1)) - 0.5) < 0.03
    frac = h * w / (height * width)
    assert frac.min() >= 0.08 * 0.85 and frac.max() <= 1.0  # rounding moves tiny boxes a little
    # Aspect ratios stay in range up to the rounding of h and w to whole pixels.
    slack = 0.5 / np.minimum(h, w)
    assert np.all(w / h >= ratio[0] * (1 - slack) / (1 + slack))
    assert np.all(w / h <= ratio[1] * (1 + slack) / (1 - slack))
    # Mean area fraction and mean log-ratio against a simulation of torchvision's loop.
    rng = np.random.default_rng(0)
    sim = np.array([torchvision_crop_hw(rng, height, width, scale, ratio) for _ in range(20000)])
    sim_frac = sim[:, 0] * sim[:, 1] / (height * width)
    tol = 4 * math.sqrt(frac.var() / n + sim_frac.var() / len(sim_frac))
    assert abs(frac.mean() - sim_frac.mean()) < tol
    log_r, sim_log_r = np.log(w / h), np.log(sim[:, 1] / sim[:, 0])
    tol = 4 * math.sqrt(log_r.var() / n + sim_log_r.var() / len(sim_log_r))
    assert abs(log_r.mean() - sim_log_r.mean()) < tol


def test_crop_box_fallback_is_center_crop_clamped_to_ratio():
    # scale > 1 makes every try invalid, so torchvision falls back to a center crop.
    box = sample_crop_box(jax.random.PRNGKey(0), 32, 64, (2.0, 2.0), (3 / 4, 4 / 3))
    np.testing.assert_array_equal(box, [0, 10, 32, 43])  # w = round(32 * 4/3)
    box = sample_crop_box(jax.random.PRNGKey(0), 30, 36, (2.0, 2.0), (3 / 4, 4 / 3))
    np.testing.assert_array_equal(box, [0, 0, 30, 36])  # ratio 1.2 already in range: whole image


# ------------------------------------------------------------------ colour jitter

def test_apply_jitter_matches_numpy_in_sampled_order():
    x = _image(8)
    np_ops = (np_brightness, np_contrast, np_saturation, np_hue)

    @jax.jit
    @jax.vmap
    def jitter(key):  # vmapped, as in training: the per-example switch becomes a select
        factors, order = ops.sample_jitter(key, 1.0)
        return ops.apply_jitter(x, factors, order), factors, order

    for out, factors, order in zip(*map(np.asarray, jitter(_keys(1, 6)))):
        expect = x.astype(np.float64)
        for i in order:
            expect = np_ops[i](expect, float(factors[i]))
        np.testing.assert_allclose(out, expect, atol=1e-5)


def test_jitter_order_varies_and_matters():
    factors, orders = jax.jit(jax.vmap(lambda k: ops.sample_jitter(k, 0.5)))(_keys(2, 300))
    factors, orders = np.asarray(factors), np.asarray(orders)
    assert len({tuple(o) for o in orders}) >= 20  # of the 24 permutations
    assert np.all(np.sort(orders, axis=1) == np.arange(4))
    # s = 0.5: brightness/contrast/saturation in [0.6, 1.4], hue in [-0.1, 0.1]
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert np.abs(factors[:, 3]).max() <= 0.1
    # The same factors in two orders give different images (clipping does not commute).
    x = _image(9)
    f = jnp.array([1.6, 0.5, 1.4, 0.1])
    apply_jitter = jax.jit(ops.apply_jitter)
    a = apply_jitter(x, f, jnp.array([0, 1, 2, 3]))
    b = apply_jitter(x, f, jnp.array([1, 3, 2, 0]))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2


def test_color_jitter_probability():
    x = _image(10)
    out = jax.jit(jax.vmap(lambda k: ops.color_jitter(k, x, 1.0, p=0.8)))(_keys(3, 400))
    changed = np.any(np.asarray(out) != x, axis=(1, 2, 3))
    assert abs(changed.mean() - 0.8) < 0.08
    np.testing.assert_array_equal(ops.color_jitter(jax.random.PRNGKey(0), x, 1.0, p=0.0), x)


# ------------------------------------------------------------------ recipes

SPEC = augment.ViewSpec(size=16, blur_p=0.5, solarize_p=0.3)
_TRACES = []


@functools.partial(jax.jit, static_argnums=2)
def _view_batch_jit(keys_Bx2, images, spec):
    # One jitted function for all recipe tests, so equal shapes and specs share one compile.
    _TRACES.append(spec)
    return augment.view_batch(keys_Bx2, images, spec)


def test_view_batch_shapes_dtype_determinism_independence():
    images = _uint8_images(0, 6, 20, 24)
    keys = _keys(4, 6)
    out = np.asarray(_view_batch_jit(keys, images, SPEC))
    assert out.shape == (6, 16, 16, 3) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Normalized [0, 1] pixels lie in [(0 - mean) / std, (1 - mean) / std].
    lo = -np.array(SPEC.mean) / np.array(SPEC.std)
    hi = (1 - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
    np.testing.assert_array_equal(_view_batch_jit(keys, images, SPEC), out)  # same keys, same views
    other = np.asarray(_view_batch_jit(_keys(5, 6), images, SPEC))
    assert all(np.abs(other[i] - out[i]).max() > 1e-3 for i in range(6))
    # Same image, different keys: every example gets its own draw.
    same = np.asarray(_view_batch_jit(keys, np.repeat(images[:1], 6, axis=0), SPEC))
    assert all(np.abs(same[i] - same[j]).max() > 1e-3 for i in range(6) for j in range(i))


def test_view_batch_compiles_once():
    images = _uint8_images(0, 6, 20, 24)
    _view_batch_jit(_keys(0, 6), images, SPEC)
    n_traces = len(_TRACES)
    for seed in range(1, 4):
        # An equal spec built anew (lists included): hashing by value is what a static argument needs.
        spec = augment.ViewSpec(size=16, blur_p=0.5, solarize_p=0.3, crop_scale=[0.08, 1])
        _view_batch_jit(_keys(seed, 6), images + seed, spec).block_until_ready()
    assert len(_TRACES) == n_traces


@pytest.mark.parametrize("field,value", [("crop_scale", (1.0, 0.08)), ("crop_scale", (0.0, 1.0)),
                                         ("crop_ratio", (4 / 3, 3 / 4)), ("blur_sigma", (2.0, 0.1))])
def test_viewspec_ranges_must_be_ordered_and_positive(field, value):
    with pytest.raises(ValueError, match=f"ViewSpec.{field} must be \\(min, max\\) with 0 < min <= max"):
        augment.ViewSpec(size=16, **{field: value})


def test_view_dtype_bfloat16():
    image = _uint8_images(1, 1, 12, 12)[0]
    spec = augment.ViewSpec(size=8, jitter_p=0.0, grayscale_p=0.0, dtype="bfloat16")
    out = view_jit(jax.random.PRNGKey(0), image, spec)
    assert out.shape == (8, 8, 3) and out.dtype == jnp.bfloat16
    f32 = view_jit(jax.random.PRNGKey(0), image, dataclasses.replace(spec, dtype="float32"))
    np.testing.assert_allclose(np.asarray(out, np.float32), f32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("grayscale_first", [False, True])
def test_view_matches_manual_pipeline(grayscale_first):
    """view = crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalize, with its key split;
    grayscale_first (MoCo v1's order): crop -> flip -> grayscale -> jitter -> ..."""
    image = _uint8_images(1, 1, 20, 24)[0]
    key = jax.random.PRNGKey(7)
    spec = augment.ViewSpec(size=12, blur_p=1.0, solarize_p=1.0, grayscale_p=0.5, grayscale_first=grayscale_first)

    def manual(key, image):
        k = jax.random.split(key, 6)
        x = ops.random_resized_crop(k[0], image.astype(jnp.float32) / 255, 12, spec.crop_scale)
        x = ops.flip_left_right(k[1], x, spec.flip_p)
        if grayscale_first:
            x = ops.random_grayscale(k[3], x, spec.grayscale_p)
        x = ops.color_jitter(k[2], x, spec.jitter_strength, spec.jitter_p)
        if not grayscale_first:
            x = ops.random_grayscale(k[3], x, spec.grayscale_p)
        x = ops.random_gaussian_blur(k[4], x, 1.0)
        return ops.solarize(x)

    expect = (np.asarray(jax.jit(manual)(key, image)) - np.array(spec.mean)) / np.array(spec.std)
    out = view_jit(key, image, spec)
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_grayscale_first_makes_the_colour_jitter_act_on_the_gray_image():
    # Hue alone, always, then grayscale always: after the jitter the gray image of the hue-shifted colours;
    # before it, the hue shift leaves the gray image as it is (the crop and flip are the same either way).
    image = _uint8_images(3, 1, 16, 16)[0]
    spec = augment.ViewSpec(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                            jitter=(0.0, 0.0, 0.0, 0.5), jitter_p=1.0, grayscale_p=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    gray = np.asarray(ops.to_grayscale(image.astype(np.float32) / 255))
    first = np.asarray(view_jit(jax.random.PRNGKey(1), image, dataclasses.replace(spec, grayscale_first=True)))
    np.testing.assert_allclose(first, gray, atol=1e-5)
    after = np.asarray(view_jit(jax.random.PRNGKey(1), image, spec))
    assert np.abs(after - gray).max() > 1e-2
    c = config_lib.load_config("configs/moco_v1.py:imagenet")
    v1 = augment.spec_from_config(c.augment)
    assert (v1.grayscale_first, v1.jitter, v1.jitter_p, v1.grayscale_p, v1.crop_scale) == (
        True, (0.4, 0.4, 0.4, 0.4), 1.0, 0.2, (0.2, 1.0))


def test_view_batch_split_and_sharded_equal_whole_batch(threefry):  # pylint: disable=unused-argument
    """Per-example keys: the views do not depend on how the batch is split over devices."""
    images = _uint8_images(2, 12, 20, 24)
    keys = _keys(6, 12)
    whole = np.asarray(_view_batch_jit(keys, images, SPEC))
    halves = [_view_batch_jit(keys[a:b], images[a:b], SPEC) for a, b in ((0, 6), (6, 12))]
    # Equal up to float rounding: XLA may vectorize differently for different batch sizes.
    np.testing.assert_allclose(np.concatenate(halves), whole, atol=1e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(jax.shard_map(lambda k, im: augment.view_batch(k, im, SPEC), mesh=mesh,
                                    in_specs=(P("data"), P("data")), out_specs=P("data")))
    np.testing.assert_allclose(sharded(keys, images), whole, atol=1e-5)


def test_spec_from_config_and_presets():
    cfg = ml_collections.ConfigDict(dict(
        crop_size=32, min_scale=0.2, max_scale=1.0, jitter_strength=0.5, jitter_p=0.8,
        grayscale_p=0.2, blur_p=0.0, solarize_p=0.0, flip_p=0.5,
        mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261)))
    spec = augment.spec_from_config(cfg)
    assert spec == augment.ViewSpec(size=32, crop_scale=(0.2, 1.0), jitter_strength=0.5)
    hash(spec)
    assert augment.simclr_spec("cifar", 32) == augment.ViewSpec(size=32, jitter_strength=0.5)
    imnet = augment.simclr_spec("imagenet", 224)
    assert (imnet.jitter_strength, imnet.blur_p, imnet.crop_scale) == (1.0, 0.5, (0.08, 1.0))
    assert imnet.mean == (0.485, 0.456, 0.406) and imnet.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError):
        augment.simclr_spec("mnist", 28)


def test_center_view_equal_size_only_normalizes():
    images = _uint8_images(4, 3, 8, 8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = augment.center_view(images, 8, mean, std)
    expect = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, expect, atol=1e-5)


@pytest.mark.parametrize("h,w", [(40, 48), (60, 44)])
def test_center_view_resize_and_crop_matches_pil(h, w):
    images = _uint8_images(5, 2, h, w)
    out = np.asarray(augment.center_view(images, 32, (0, 0, 0), (1, 1, 1)))
    assert out.shape == (2, 32, 32, 3)
    short = int(32 / 0.875)  # 36
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    top, left = int(round((new_h - 32) / 2)), int(round((new_w - 32) / 2))
    for i in range(2):
        pil = Image.fromarray(images[i]).resize((new_w, new_h), Image.BILINEAR)
        expect = np.asarray(pil, np.float64)[top:top + 32, left:left + 32] / 255
        # PIL rounds to uint8 after each pass, hence a couple of 1/255 steps of slack.
        np.testing.assert_allclose(out[i], expect, atol=2.5 / 255)


def test_explicit_jitter_ranges_override_the_strength():
    assert ops.jitter_ranges(0.5) == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert ops.jitter_ranges((0.4, 0.4, 0.2, 0.1)) == (0.4, 0.4, 0.2, 0.1)
    with pytest.raises(ValueError, match="brightness, contrast, saturation, hue"):
        ops.jitter_ranges((0.4, 0.4))
    factors = jax.vmap(lambda k: ops.sample_jitter(k, (0.4, 0.4, 0.2, 0.1))[0])(
        jax.random.split(jax.random.PRNGKey(0), 2000))
    factors = np.asarray(factors)
    for i, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= factors[:, i].min() and factors[:, i].max() <= hi
        assert factors[:, i].min() < lo + 0.02 and factors[:, i].max() > hi - 0.02  # the whole range is used
    spec = augment.spec_from_config(ml_collections.ConfigDict(dict(
        crop_size=8, min_scale=0.5, max_scale=1.0, flip_p=0.5, jitter_strength=0.0, jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)))
    assert spec.jitter == (0.4, 0.4, 0.2, 0.1)
    images = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    plain = augment.view_batch(keys, images, dataclasses.replace(spec, jitter=(), jitter_strength=0.0))
    jittered = augment.view_batch(keys, images, spec)
    assert not np.allclose(plain, jittered)  # strength 0 alone would skip the jitter; the ranges apply it
