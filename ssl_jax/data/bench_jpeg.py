"""JPEG decoding throughput of the streamed host pipeline, on generated JPEGs of ImageNet-like size.

    python -m ssl_jax.data.bench_jpeg --num 512 --size 500x375 --workers 1,2 --transports shm,pickle

Writes `--num` JPEGs (photo-like: noise at every scale, so they compress like photographs) into a temporary
ImageFolder and reports images/s: decoded in this process alone, then through a `stream.DecodePool` as the
training loader uses it (global batches in the epoch's shuffled order, `--batch` images each, the pool's
default batches in flight, resized and centre-cropped to `--image-size`) for every worker count and transport.
The files sit in the page cache, so this measures decoding, not disk reads. Worker start-up
and the first few batches are not timed.

Wall-clock rates depend on what else the machine runs; CPU time does much less, so the table also gives the
decoding CPU time per image (in the workers, from getrusage of the exited workers) and the CPU time the
consuming process spends per image (collecting and copying batches: the transport's cost). A host that must
feed a device X images/s needs about X * (worker ms/image) / 1000 cores for decoding.
"""
import argparse
import io
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from ssl_jax.data import imagefolder, pipeline, stream


def photo_like(rng, width, height):
    """Returns image_HxWx3 uint8: Gaussian noise summed over octave scales (amplitude falling as 1/sqrt(scale))."""
    image = np.zeros((height, width, 3), np.float32)
    scale = 4
    while scale <= max(width, height):
        shape = (max(2, height * scale // max(width, height)), max(2, width * scale // max(width, height)))
        noise = rng.normal(0, 1, shape + (3,)).astype(np.float32)
        image += np.stack([np.asarray(Image.fromarray(noise[..., c]).resize((width, height), Image.BICUBIC))
                           for c in range(3)], -1) * (60.0 / scale ** 0.5)
        scale *= 2
    image += rng.normal(0, 12, (height, width, 1)) + rng.normal(0, 6, (height, width, 3))  # grain, texture
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def write_jpegs(root, num, width, height, quality=90, num_classes=8, seed=0):
    """Writes num JPEGs as root/train/c<k>/img_<i>.JPEG; returns their mean size in bytes."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(num):
        folder = os.path.join(root, "train", f"c{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(photo_like(rng, width, height)).save(buffer, format="JPEG", quality=quality)
        with open(os.path.join(folder, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
    return float(np.mean(sizes))


def in_process_rate(images, rows):
    """Returns (images/s, CPU ms per image) of decoding `rows` of EncodedImages one by one in this process."""
    out = np.empty((len(rows),) + images.shape[1:], np.uint8)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (_, ref) in enumerate(images.refs(rows)):
        out[i] = imagefolder.decode_image(ref, images.image_size)
    return len(rows) / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu_start) / len(rows)


def pool_rate(images, batch_size, num_workers, transport, epochs, seed=0):
    """Returns (images/s, workers' CPU ms per image, this process's CPU ms per image) of a DecodePool delivering
    `epochs` epochs of global batches; worker start-up and the first `in_flight` batches (the first writes into
    each shared buffer, slow in a VM) are not counted."""
    warmup = stream.DecodePool.DEFAULT_IN_FLIGHT
    steps = epochs * pipeline.steps_per_epoch(len(images), batch_size)
    if steps <= warmup:
        raise ValueError(f"{steps} batches: measure more than the {warmup} warm-up batches (raise --epochs)")

    def run(steps):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        batches = (pipeline.batch_indices(seed, len(images), batch_size, s) for s in range(steps))
        start, count = None, 0
        with stream.DecodePool(images, num_workers=num_workers, transport=transport, in_flight=warmup) as pool:
            for k, (_, decoded) in enumerate(pool.map(batches)):
                if k == warmup - 1:
                    start, cpu_start = time.perf_counter(), time.process_time()
                count += len(decoded) if k >= warmup else 0
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers have exited and been waited for
        return count, wall, cpu, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    *_, warmup_cpu = run(warmup)  # start-up (imports) and the warm-up batches: subtracted from the workers' time
    count, wall, cpu, workers_cpu = run(steps)
    return count / wall, 1e3 * (workers_cpu - warmup_cpu) / count, 1e3 * cpu / count


def main(argv=None):
    """Generates the JPEGs, measures and prints a Markdown table; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--num", type=int, default=512, help="JPEGs to generate")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--image-size", type=int, default=256, help="stored size (data.image_size): resize + crop")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--epochs", type=int, default=3, help="passes over the JPEGs per measurement")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--transports", default="shm,pickle", help=f"comma-separated, of {','.join(stream.TRANSPORTS)}")
    p.add_argument("--dir", default="", help="where to write the JPEGs (default: a temporary directory)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(dir=args.dir or None) as root:
        mean_bytes = write_jpegs(root, args.num, width, height, args.quality)
        paths, _ = imagefolder.list_dir(root)
        files, _ = imagefolder.layout(paths, "train", root)
        images = stream.EncodedImages(root, [f for f, _ in files], args.image_size)
        print(f"{args.num} JPEGs {width}x{height} quality {args.quality}, mean {mean_bytes / 1e3:.1f} kB, decoded "
              f"to {args.image_size}x{args.image_size}, batch {args.batch}; {os.cpu_count()} CPUs", file=sys.stderr)
        print("| decoder | workers | transport | images/s | images/s per worker | decode CPU ms/image "
              "| consumer CPU ms/image |")
        print("|---|---|---|---|---|---|---|")
        rate, cpu = in_process_rate(images, np.arange(len(images)))
        print(f"| in process | 1 | - | {rate:.0f} | {rate:.0f} | {cpu:.2f} | - |", flush=True)
        for workers in (int(w) for w in args.workers.split(",")):
            for transport in args.transports.split(","):
                rate, cpu, consumer = pool_rate(images, args.batch, workers, transport, args.epochs)
                print(f"| DecodePool | {workers} | {transport} | {rate:.0f} | {rate / workers:.0f} | {cpu:.2f} "
                      f"| {consumer:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
