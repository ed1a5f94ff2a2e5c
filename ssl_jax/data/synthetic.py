"""Synthetic images for smoke tests: each class has its own colour and stripe pattern, plus noise.

The class is learnable from colour alone (a linear probe on raw pixels separates it) and from the stripes'
orientation and frequency (which survive grayscale and colour jitter), so a short pretraining run has
something to find. Class patterns are fixed; `seed` draws the examples (phase, brightness, noise).
"""
import numpy as np

from ssl_jax import data as data_lib

DEFAULT_NUM_EXAMPLES = 1024
DEFAULT_IMAGE_SIZE = 16
_PATTERN_SEED = 1234  # the same class patterns in every split and run
_CHUNK_BYTES = 64 << 20  # images are made this many pixel bytes at a time (float64 intermediates: 8x that)


def make_synthetic(num_examples, num_classes, image_size=DEFAULT_IMAGE_SIZE, seed=0):
    """Returns a Source of num_examples images_NxSxSx3 uint8 (S = image_size), balanced labels, seeded."""
    if num_examples < 1 or num_classes < 1 or image_size < 1:
        raise ValueError(f"synthetic data needs positive sizes, got num_examples={num_examples}, "
                         f"num_classes={num_classes}, image_size={image_size}")
    patterns = np.random.default_rng(_PATTERN_SEED)
    colour_Cx3 = patterns.uniform(0.15, 0.85, (num_classes, 3))
    angle_C = np.pi * np.arange(num_classes) / num_classes + patterns.uniform(0, 0.2, num_classes)
    cycles_C = 1.0 + 3.0 * ((np.arange(num_classes) * 0.618034) % 1.0)  # stripes per image: 1 .. 4

    rng = np.random.default_rng(seed)
    labels_N = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    phase_N = rng.uniform(0, 2 * np.pi, num_examples)
    brightness_N = rng.uniform(0.85, 1.15, num_examples)
    grid_S = np.arange(image_size) / image_size
    y_SxS, x_SxS = np.meshgrid(grid_S, grid_S, indexing="ij")
    angle_N, cycles_N = angle_C[labels_N], cycles_C[labels_N]
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    # In chunks: the float64 intermediates of 4096 images of 256 px would take tens of GB at once. The
    # noise is drawn chunk after chunk from the same generator, the same numbers as one draw for all.
    chunk = max(1, _CHUNK_BYTES // (image_size * image_size * 3))
    for lo in range(0, num_examples, chunk):
        sl = slice(lo, min(lo + chunk, num_examples))
        proj_NxSxS = (np.cos(angle_N[sl])[:, None, None] * x_SxS + np.sin(angle_N[sl])[:, None, None] * y_SxS)
        stripes_NxSxS = 0.5 + 0.5 * np.sin(
            2 * np.pi * cycles_N[sl, None, None] * proj_NxSxS + phase_N[sl, None, None])
        image_NxSxSx3 = (colour_Cx3[labels_N[sl]][:, None, None, :] * (0.5 + 0.5 * stripes_NxSxS[..., None])
                         * brightness_N[sl, None, None, None])
        image_NxSxSx3 += rng.normal(0, 0.05, image_NxSxSx3.shape)
        images[sl] = np.round(np.clip(image_NxSxSx3, 0, 1) * 255)
    return data_lib.Source(images, labels_N, [f"class_{c}" for c in range(num_classes)], "synthetic")
