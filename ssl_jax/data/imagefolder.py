"""ImageFolder sources: <root>/{train, test or val}/<class>/<image> as a directory or a .tar/.tar.gz archive.

The split folders may sit at the top level or inside one top-level folder (`cifar10-jpeg/train/cat/1.jpg`).
Class names are the sorted class folders of train/; test/ (or val/) must have the same classes. Images are
decoded once with PIL, in parallel worker processes, into the uint8 cache of `ssl_jax.data`, or with
data.stream=True decoded again for every batch (`ssl_jax.data.stream`). The workers are spawned, not forked
(forking a process that runs JAX threads can deadlock), so a script that calls `get_source` needs the usual
`if __name__ == "__main__":` guard. A Source's file_names are the image paths relative to the directory or
archive root (`train/n01440764/n01440764_10026.JPEG`).
"""
import collections
import concurrent.futures
import ctypes
import gzip
import io
import multiprocessing
import os
import posixpath
import signal
import sys
import tarfile
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image

from ssl_jax import data as data_lib, metrics

# torchvision's ImageFolder extensions, so that the same files (and so the same labels and counts) are read
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TEST_DIRS = ("test", "val")
_MIN_IMAGES_FOR_POOL = 512  # below this, starting worker processes costs more than it saves
_IN_MEMORY_ARCHIVE_BYTES = 1 << 30  # .tar.gz archives up to this size are decompressed in memory
# What a decoding worker's death (imagefolder.decode_images, stream.DecodePool) is reported as.
WORKER_DIED = ("an image decoding worker process died: out of memory (try a lower data.num_workers), or it failed "
               "on start (its error is printed above; a script that loads data needs `if __name__ == "
               "\"__main__\":`)")
_CHUNK = 64  # images per worker task; a few tasks per worker are kept in flight
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def load(path, split, data_cfg):
    """Returns the Source of `split` ('train' | 'test') of the ImageFolder directory or archive at `path`."""
    abspath = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(abspath):
        raise data_lib.MissingDataError(f"data.path {path!r} does not exist (resolved to {abspath})")
    image_size = int(data_cfg.get("image_size", 0))
    label = _stem(abspath)
    name = label if data_cfg.name == "imagefolder" else data_cfg.name
    is_archive = os.path.isfile(abspath)
    if data_cfg.get("stream", False):
        from ssl_jax.data import stream  # pylint: disable=import-outside-toplevel
        return stream.imagefolder_source(abspath, split, data_cfg, name)
    if is_archive:
        stat = os.stat(abspath)
        key, paths = (stat.st_size, stat.st_mtime_ns), None
    else:
        paths, key = list_dir(abspath)
    cache = data_lib.cache_path(data_cfg, label, "imagefolder", abspath, key, image_size)
    source = data_lib.load_cache(cache, split, name)
    if source is not None:
        return source

    def decode_and_cache(files, class_names, items):
        print(f"decoding {len(files)} images from {abspath} ({split}) into cache {cache}", file=sys.stderr)
        decoded = decode_images(items, len(files), image_size, data_cfg.get("num_workers", 0), desc=f"decode {split}")
        return data_lib.write_cache(cache, split, decoded, len(files), class_names, name, abspath,
                                    file_names=[p for p, _ in files])

    if not is_archive:
        files, class_names = layout(paths, split, abspath)
        items = ((i, os.path.join(abspath, p), os.path.join(abspath, p), y) for i, (p, y) in enumerate(files))
        return decode_and_cache(files, class_names, items)
    with open_tar(abspath) as tar:
        members, folders = archive_members(tar, abspath)
        files, class_names = layout(list(members) + folders, split, abspath)
        # Read members in archive order (a compressed tar only streams forwards) but keep sorted indices.
        order = sorted(range(len(files)), key=lambda i: members[files[i][0]].offset_data)
        items = ((i, f"{abspath}:{files[i][0]}", tar.extractfile(members[files[i][0]]).read(), files[i][1])
                 for i in order)
        return decode_and_cache(files, class_names, items)


def open_tar(path):
    """Returns the open tarfile.TarFile of the .tar/.tar.gz archive at `path` (DataError if it is none)."""
    # tarfile parses headers through gzip's Python-level seek/read; decompressing a small archive into memory
    # first is faster (CIFAR-10: 0.4 s gunzip + 1.9 s listing instead of 3.4 s) and makes member reads cheap.
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == b"\x1f\x8b"
        if is_gzip and os.path.getsize(path) <= _IN_MEMORY_ARCHIVE_BYTES:
            with open(path, "rb") as f:
                return tarfile.open(fileobj=io.BytesIO(gzip.decompress(f.read())), mode="r:")
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise data_lib.DataError(f"data.path {path} is a file but not a readable .tar/.tar.gz archive: {e}") from e


def _stem(path):
    base = os.path.basename(path.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


def member_path(name):
    """Returns a tar member's name as a normalized relative path."""
    return posixpath.normpath(name).lstrip("/")


def archive_members(tar, origin):
    """Returns ({relative path: TarInfo of its bytes}, [relative folder paths ending in '/']) of an open archive.

    An image stored as a link (tar writes a second hard link to a file as one; symbolic links are kept as such)
    maps to its target's member, as extracting the archive would give; a link to nothing in it is a DataError.
    """
    try:
        all_members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated archive fails here, not on opening
        raise data_lib.DataError(f"data.path {origin}: cannot list the archive (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
    files = {member_path(m.name): m for m in all_members if m.isfile()}
    links = {member_path(m.name): m for m in all_members if m.islnk() or m.issym()}
    for path, link in links.items():
        if _is_image(path):
            files[path] = _link_target(path, link, files, links, origin)
    return files, [member_path(m.name) + "/" for m in all_members if m.isdir()]


def _link_target(path, link, files, links, origin):
    name = path
    for _ in range(32):  # a chain of symbolic links, which may loop
        if link.issym() and link.linkname.startswith("/"):
            break  # points outside the archive
        target = member_path(link.linkname if link.islnk() else posixpath.join(posixpath.dirname(path), link.linkname))
        if target in files:
            return files[target]
        if target not in links:
            break
        path, link = target, links[target]
    raise data_lib.DataError(f"{origin}:{name} is a link to {link.linkname!r}, which is no file in the archive")


def _is_hidden(path):
    return any(p.startswith(".") or p == "__MACOSX" for p in path.split("/"))  # macOS resource forks, hidden files


def _is_image(path):
    return not _is_hidden(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def list_dir(root):
    """Returns (relative paths of the files and of the folders (ending in '/'), cache key) of a directory tree."""
    paths, dir_times = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        paths.extend(rel + d + "/" for d in dirnames)  # so that an empty class folder is seen
        # Adding, removing or renaming a file changes its folder's mtime; editing a file in place does not
        # (delete the cache folder then). Stat-ing folders, not files, keeps this cheap for ImageNet.
        dir_times.append((rel, os.stat(dirpath).st_mtime_ns))
        paths.extend(rel + f for f in filenames)
    return paths, sorted(dir_times)


def layout(paths, split, origin):
    """Returns ([(relative path, label)] sorted by class then path, class_names) of `split` in `paths` (relative
    paths of files, and of folders ending in '/')."""
    entries = [p for p in paths if not _is_hidden(p)]
    paths = [p for p in entries if p.lower().endswith(IMAGE_EXTENSIONS)]
    roots = set()
    for p in paths:
        parts = p.split("/")
        if len(parts) >= 3 and parts[0] == "train":
            roots.add("")
        elif len(parts) >= 4 and parts[1] == "train":
            roots.add(parts[0] + "/")
    if not roots:
        raise data_lib.DataError(f"{origin}: no train/<class>/<image> folder found (looked at the top level and "
                                 f"inside one top-level folder; image types: {', '.join(IMAGE_EXTENSIONS)})")
    if "" not in roots and len(roots) > 1:
        raise data_lib.DataError(f"{origin}: several top-level folders hold a train/ folder: {sorted(roots)}")
    root = "" if "" in roots else roots.pop()
    train = _by_class(paths, root + "train/")
    _check_no_empty_class(entries, root + "train/", train, origin)
    class_names = sorted(train)
    if split == "train":
        by_class = train
    else:
        found = [(d, _by_class(paths, f"{root}{d}/")) for d in _TEST_DIRS]
        found = [(d, c) for d, c in found if c]
        if not found:
            flat = [d for d in _TEST_DIRS if any(p.startswith(f"{root}{d}/") and "/" not in p[len(root) + len(d) + 1:]
                                                 for p in paths)]
            hint = (f"; {root}{flat[0]}/ holds images directly, without class folders (as ImageNet's validation "
                    f"set is distributed: sort it into {root}{flat[0]}/<class>/ first, as the PyTorch ImageNet "
                    f"example's valprep.sh does)") if flat else ""
            raise data_lib.DataError(f"{origin}: no test split: neither {root}test/ nor {root}val/ holds "
                                     f"<class>/<image> files{hint}")
        split_dir, by_class = found[0]
        _check_no_empty_class(entries, f"{root}{split_dir}/", by_class, origin)
        if sorted(by_class) != class_names:
            missing, extra = sorted(set(class_names) - set(by_class)), sorted(set(by_class) - set(class_names))
            raise data_lib.DataError(f"{origin}: {root}{split_dir}/ must have the classes of {root}train/; "
                                     f"missing {missing}, extra {extra}")
    files = [(p, y) for y, c in enumerate(class_names) for p in sorted(by_class[c])]
    return files, class_names


def _check_no_empty_class(entries, prefix, by_class, origin):
    """Raises DataError naming the class folders under `prefix` that hold no image: skipping one would give every
    later class another label than torchvision's ImageFolder does (which refuses them too)."""
    folders = {p[len(prefix):].split("/", 1)[0] for p in entries if p.startswith(prefix) and "/" in p[len(prefix):]}
    empty = sorted(folders - set(by_class))
    if empty:
        raise data_lib.DataError(f"{origin}: class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
                                 f"{', '.join(prefix + c + '/' for c in empty)}; remove them or add images (labels "
                                 f"are the positions of the sorted class folders)")


def _by_class(paths, prefix):
    out = collections.defaultdict(list)
    for p in paths:
        if p.startswith(prefix) and "/" in p[len(prefix):]:
            out[p[len(prefix):].split("/", 1)[0]].append(p)
    return out


# ----------------------------------------------------------------------------------------------------------
# Decoding (also used by tfds_source).
# ----------------------------------------------------------------------------------------------------------

def decode_image(payload, image_size):
    """Returns image_HxWx3 uint8 from encoded bytes, a file path or an array; resized and center-cropped to
    image_size x image_size when image_size > 0 (shorter side resized bilinearly)."""
    if isinstance(payload, np.ndarray):
        array = payload[..., 0] if payload.ndim == 3 and payload.shape[-1] == 1 else payload
        img = Image.fromarray(np.asarray(array, np.uint8))
    else:
        img = Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
        if image_size and img.format == "JPEG":
            img.draft("RGB", (image_size, image_size))  # let libjpeg downscale by 2/4/8 while staying >= size
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PNG, TIFF; mode I in older Pillow): convert("RGB") would clip it to white. Keep the
        # high byte.
        img = Image.fromarray(np.clip(np.asarray(img) >> 8, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is dropped below
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, ...
    if image_size:
        img = _resize_center_crop(img, image_size)
    return np.asarray(img, dtype=np.uint8)


def _resize_center_crop(img, size):
    width, height = img.size
    if (width, height) == (size, size):
        return img
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def init_decode_worker():
    """Worker-process initializer: returns None after making the worker ignore SIGINT and glibc keep freed decode
    buffers for reuse.

    Ctrl-C in a terminal signals the whole process group: the parent stops (training saves a checkpoint first)
    and shuts the pool down; a worker killed by the signal would print its traceback and break the pool under
    a run that is still saving.

    A decoded JPEG (a 500x375 one is 0.56 MB) is larger than glibc's initial mmap threshold and the freed heap
    top is trimmed, so every image's buffers came from fresh pages: the page faults cost a fifth of a worker's
    time in a VM (3.9 -> 3.1 CPU ms per 500x375 JPEG decoded to 256 px, `python -m ssl_jax.data.bench_jpeg`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit systems
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # no glibc (macOS has no mallopt): keep the allocator's defaults
        pass


def _decode_batch(items, image_size):
    """Returns ([(index, name, label)], images stacked when of one size (cheaper to pickle), error or None)."""
    meta, images = [], []
    for index, name, payload, label in items:
        try:
            images.append(decode_image(payload, image_size))
        except Exception as e:  # pylint: disable=broad-except  (re-raised with the file's name by the parent)
            return meta, images, f"cannot decode image {name}: {type(e).__name__}: {e}"
        meta.append((index, name, label))
    if len({im.shape for im in images}) == 1:
        images = np.stack(images)
    return meta, images, None


def _ready(value):
    """Returns a finished Future holding `value`: a batch decoded in this process, queued like the pool's."""
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


def decode_images(items, count, image_size, num_workers=0, desc="decode"):
    """Yields (index, name, image_HxWx3 uint8, label) for items (index, name, bytes | path | array, label).

    Items are read in the calling thread (e.g. from a tar stream) and decoded by `num_workers` processes
    (0 = all CPUs), a bounded number of batches ahead; a file that fails to decode raises DataError naming it.
    """
    num_workers = num_workers or data_lib.default_num_workers()
    pool = None
    if num_workers > 1 and count >= _MIN_IMAGES_FOR_POOL:
        pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=init_decode_worker)
    bar = metrics.progress_bar(count, desc=desc, unit="img", mininterval=0.5)
    try:
        pending = collections.deque()
        for chunk in _chunks(items, _CHUNK):
            pending.append(submit(pool, _decode_batch, chunk, image_size) if pool
                           else _ready(_decode_batch(chunk, image_size)))
            while pending and (len(pending) > 4 * num_workers or pending[0].done()):
                yield from _drain(pending.popleft(), bar)
        while pending:
            yield from _drain(pending.popleft(), bar)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def submit(pool, fn, *args):
    """Returns pool.submit(fn, *args); DataError(WORKER_DIED) when a worker has died since the last result (the
    executor then refuses new work with a BrokenProcessPool that says nothing of why)."""
    try:
        return pool.submit(fn, *args)
    except BrokenProcessPool as e:
        raise data_lib.DataError(WORKER_DIED) from e


def _drain(future, bar):
    try:
        meta, images, error = future.result()
    except BrokenProcessPool as e:
        # A worker that dies (killed for memory, or failing on start) breaks the executor's futures. It fails on
        # start when the parent's main script, which a spawned process runs again as __mp_main__, loads data
        # outside an `if __name__ == "__main__":` block.
        raise data_lib.DataError(WORKER_DIED) from e
    for (index, name, label), image in zip(meta, images):
        yield index, name, image, label
    if error is not None:
        raise data_lib.DataError(error)
    bar.update(len(meta))


def _chunks(iterable, size):
    chunk = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
