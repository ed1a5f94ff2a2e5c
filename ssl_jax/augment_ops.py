"""Single-image augmentation ops: pure, jittable functions on float32 HxWx3 images in [0, 1].

Randomness always comes from an explicit key, so `ssl_jax.augment` can vmap these ops over per-example
keys and a view never depends on how the batch is split over devices. Colour ops follow torchvision's
definitions (`torchvision.transforms.functional`) and clip to [0, 1]. Everything is elementwise work,
gathers and shifted sums: no matmuls or convolutions, whose float32 precision on GPUs (TF32) would
make results depend on the backend.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax

_LUMA_RGB = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back


# ---------------------------------------------------------------- random resized crop

def _fallback_box_hw(height, width, ratio):
    """torchvision's fallback: the whole image, clamped to the aspect-ratio range (static ints)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def sample_crop_box(key, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Returns an int32[4] crop box (y0, x0, h, w) sampled as torchvision's RandomResizedCrop."""
    # One draw for everything (each threefry call costs compile time): the tries are all sampled at
    # once and the first valid one is taken, so there is no loop on traced values.
    u = jax.random.uniform(key, (2 * _CROP_TRIES + 2,))
    u_area_T, u_ratio_T = u[:_CROP_TRIES], u[_CROP_TRIES:2 * _CROP_TRIES]
    area_T = height * width * (scale[0] + (scale[1] - scale[0]) * u_area_T)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect_T = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio_T)
    w_T = jnp.round(jnp.sqrt(area_T * aspect_T)).astype(jnp.int32)
    h_T = jnp.round(jnp.sqrt(area_T / aspect_T)).astype(jnp.int32)
    valid_T = (w_T > 0) & (w_T <= width) & (h_T > 0) & (h_T <= height)
    first = jnp.argmax(valid_T)  # 0 when no try is valid; `found` then selects the fallback
    found = valid_T[first]
    fb_h, fb_w = _fallback_box_hw(height, width, ratio)
    h = jnp.where(found, h_T[first], fb_h)
    w = jnp.where(found, w_T[first], fb_w)
    # Uniform integer offsets in [0, height - h] and [0, width - w].
    y0 = jnp.minimum(jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
    x0 = jnp.minimum(jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
    y0 = jnp.where(found, y0, (height - fb_h) // 2)
    x0 = jnp.where(found, x0, (width - fb_w) // 2)
    return jnp.stack([y0, x0, h, w]).astype(jnp.int32)


def _bilinear_taps(start, length, out_size):
    """Returns (lo, hi, frac) source indices and weights resizing [start, start+length) to out_size."""
    start, length = start.astype(jnp.float32), length.astype(jnp.float32)
    last = start + length - 1
    # Half-pixel centres (align_corners=False), clamped to the box, as cropping then resizing does.
    c = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (length / out_size) - 0.5
    c = jnp.clip(c, start, last)
    lo = jnp.floor(c)
    hi = jnp.minimum(lo + 1, last)
    return lo.astype(jnp.int32), hi.astype(jnp.int32), c - lo


def crop_and_resize(image, box, size):
    """Returns the float32 size x size x C bilinear resize (no antialias) of image[y0:y0+h, x0:x0+w].

    Values keep the input's scale (0..255 for uint8 input): the rows are gathered before the cast, so
    on uint8 input only size x W pixels are converted, not the whole image.
    """
    lo, hi, f = _bilinear_taps(box[0], box[2], size)
    # Indices are in bounds by construction; "clip" spares the out-of-bounds masking of the default.
    rows = (jnp.take(image, lo, axis=0, mode="clip").astype(jnp.float32) * (1 - f)[:, None, None]
            + jnp.take(image, hi, axis=0, mode="clip").astype(jnp.float32) * f[:, None, None])
    lo, hi, f = _bilinear_taps(box[1], box[3], size)
    return (jnp.take(rows, lo, axis=1, mode="clip") * (1 - f)[None, :, None]
            + jnp.take(rows, hi, axis=1, mode="clip") * f[None, :, None])


def random_resized_crop(key, image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Returns a float32 size x size x C random resized crop of image (HxWxC), as torchvision's."""
    box = sample_crop_box(key, image.shape[0], image.shape[1], scale, ratio)
    return crop_and_resize(image, box, size)


def flip_left_right(key, image, p=0.5):
    """Returns image (HxWxC) mirrored horizontally with probability p."""
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


# ---------------------------------------------------------------- colour

def to_grayscale(image):
    """Returns the HxWx3 luma (0.299 R + 0.587 G + 0.114 B) replicated to 3 channels."""
    gray = _luma(image)
    return jnp.broadcast_to(gray, image.shape)


def _luma(image):
    """Returns HxWx1 luma; a weighted sum, not a dot, to keep full float32 precision on GPUs."""
    r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
    return _LUMA_RGB[0] * r + _LUMA_RGB[1] * g + _LUMA_RGB[2] * b


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    """Returns image * factor clipped to [0, 1] (HxWx3)."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    """Returns image blended with the mean of its grayscale by factor, clipped (HxWx3)."""
    return _blend(image, jnp.mean(_luma(image)), factor)


def adjust_saturation(image, factor):
    """Returns image blended with its grayscale by factor, clipped (HxWx3)."""
    return _blend(image, _luma(image), factor)


def _rgb_to_hsv(image):
    """torchvision's _rgb2hsv on HxWx3; hue in [0, 1)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """HSV -> HxWx3 RGB by the closed form f(n) = v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    def channel(n):
        k = jnp.mod(n + 6.0 * h, 6.0)
        return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(image, delta):
    """Returns image with hue shifted by delta (in turns, |delta| <= 0.5) in HSV space (HxWx3)."""
    h, s, v = _rgb_to_hsv(image)
    return jnp.clip(_hsv_to_rgb(jnp.mod(h + delta, 1.0), s, v), 0.0, 1.0)


# Order of the factors returned by `sample_jitter` and of the branches `apply_jitter` switches over.
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_ranges(strength):
    """Returns (brightness, contrast, saturation, hue) ranges: SimCLR's (0.8s, 0.8s, 0.8s, 0.2s) for a scalar
    strength s, or the 4-tuple itself (e.g. BYOL's 0.4, 0.4, 0.2, 0.1)."""
    if isinstance(strength, (tuple, list)):
        if len(strength) != 4:
            raise ValueError(f"colour jitter needs (brightness, contrast, saturation, hue), got {strength!r}")
        return tuple(float(v) for v in strength)
    return (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)


def _jitter_from_uniform(u_8, strength):
    """Maps 8 uniforms to jitter factors (brightness, contrast, saturation, hue) and a random op order."""
    ranges = jitter_ranges(strength)
    x_3 = jnp.asarray(ranges[:3], jnp.float32)
    lo_3 = jnp.maximum(0.0, 1.0 - x_3)
    bcs_3 = lo_3 + (1.0 + x_3 - lo_3) * u_8[:3]
    hue = ranges[3] * (2.0 * u_8[3] - 1.0)
    # argsort of i.i.d. uniforms is a uniformly random permutation
    return jnp.concatenate([bcs_3, hue[None]]), jnp.argsort(u_8[4:]).astype(jnp.int32)


def sample_jitter(key, strength):
    """Returns (factors_4, order_4): brightness/contrast/saturation/hue draws and op order (see jitter_ranges)."""
    return _jitter_from_uniform(jax.random.uniform(key, (8,)), strength)


def apply_jitter(image, factors_4, order_4):
    """Returns image with JITTER_OPS[order_4[i]](., factors_4[order_4[i]]) applied for i = 0..3."""
    def step(i, x):
        # Under vmap the switch becomes a select over all four ops; a loop (not unrolled) keeps
        # that body compiled once.
        return lax.switch(order_4[i], JITTER_OPS, x, factors_4[order_4[i]])
    return lax.fori_loop(0, 4, step, image)


def color_jitter(key, image, strength, p=0.8):
    """Returns image (HxWx3) colour-jittered in random order with probability p; strength as jitter_ranges."""
    u = jax.random.uniform(key, (9,))
    jittered = apply_jitter(image, *_jitter_from_uniform(u[:8], strength))
    return jnp.where(u[8] < p, jittered, image)


def random_grayscale(key, image, p=0.2):
    """Returns to_grayscale(image) with probability p, else image (HxWx3)."""
    return jnp.where(jax.random.bernoulli(key, p), to_grayscale(image), image)


# ---------------------------------------------------------------- blur and solarize

def gaussian_blur(image, sigma, kernel_size):
    """Returns image (HxWxC) blurred by a separable kernel_size Gaussian (odd size, reflect padding)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    radius = kernel_size // 2
    x_K = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k_K = jnp.exp(-0.5 * jnp.square(x_K / sigma))
    k_K = k_K / jnp.sum(k_K)
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="reflect")
        n = image.shape[axis]
        # Shifted sums rather than a convolution: the kernel is per-example (traced sigma) under vmap.
        image = sum(k_K[i] * lax.slice_in_dim(padded, i, i + n, axis=axis)
                    for i in range(kernel_size))
    return image


def default_blur_kernel_size(side, sigma_max=2.0):
    """Returns the odd blur kernel size for an image side: SimCLR's ~10% of it (23 for 224), or 2 ceil(3 sigma_max) + 1
    where that is larger (13 for sigma_max = 2 below 120 px)."""
    # The 10% rule alone cuts the Gaussian short on small views: at SwAV's 96 px crops (kernel 9) sigma = 2 would
    # blur like sigma = 1.85, below 20 px (kernel 1) not at all. PIL's GaussianBlur, which SwAV, MoCo v2, SimSiam
    # and Barlow Twins use at every crop size, reaches about 3 sigma.
    return max(2 * (side // 20) + 1, 2 * math.ceil(3 * sigma_max) + 1)


def random_gaussian_blur(key, image, p, sigma_range=(0.1, 2.0), kernel_size=None):
    """Returns image (HxWxC) blurred with sigma ~ U(sigma_range) with probability p."""
    if kernel_size is None:
        kernel_size = default_blur_kernel_size(min(image.shape[0], image.shape[1]), sigma_range[1])
    u = jax.random.uniform(key, (2,))
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u[0]
    blurred = gaussian_blur(image, sigma, kernel_size)
    return jnp.where(u[1] < p, blurred, image)


def solarize(image, threshold=0.5):
    """Returns image with pixels >= threshold inverted to 1 - x."""
    return jnp.where(image >= threshold, 1.0 - image, image)


def random_solarize(key, image, p, threshold=0.5):
    """Returns solarize(image, threshold) with probability p, else image."""
    return jnp.where(jax.random.bernoulli(key, p), solarize(image, threshold), image)
