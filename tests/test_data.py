"""Tests for ssl_jax.data: ImageFolder dirs and archives, the uint8 cache, tfds, synthetic data, host pipeline."""
import collections
import io
import multiprocessing
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax import data, metrics
from ssl_jax.data import imagefolder, pipeline, synthetic, tfds_source

CIFAR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _cfg(tmp_path, **overrides):
    cfg = dict(name="imagefolder", path="", image_size=8, cache_dir=str(tmp_path / "cache"), num_workers=1,
               num_examples=0, num_classes=10, tfds_data_dir="")
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _pixels(seed, height=8, width=8):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_tree(root, test_dir="test"):
    """Writes an ImageFolder tree under root/top/ and returns {relative path: image written}."""
    top = root / "top"
    files = {
        "train/cat/b.png": _pixels(1), "train/cat/a.png": _pixels(2), "train/cat/c.jpg": _pixels(3),
        "train/ant/x.PNG": _pixels(4), "train/ant/wide.png": _pixels(5, 8, 14),  # cropped to the middle 8 columns
        "train/bee/flat.png": np.full((16, 16, 3), (10, 200, 30), np.uint8),  # resized 16 -> 8
        f"{test_dir}/cat/t.png": _pixels(6), f"{test_dir}/ant/t.png": _pixels(7), f"{test_dir}/bee/t.png": _pixels(8),
    }
    for rel, array in files.items():
        _save(top / rel, array)
    _save(top / "train/bee/gray.png", _pixels(9)[..., 0])  # grayscale (mode L)
    files["train/bee/gray.png"] = np.repeat(_pixels(9)[..., :1], 3, axis=-1)
    _save(top / "train/bee/rgba.png", np.dstack([_pixels(10), np.full((8, 8), 128, np.uint8)]))
    files["train/bee/rgba.png"] = _pixels(10)
    (top / "train/cat/._a.png").write_bytes(b"\0resource fork")  # macOS junk: skipped
    (top / "train/cat/notes.txt").write_text("not an image")
    return top, files


def _expected(files, split_dir, top):
    """Returns (images, labels) the loader should produce: the arrays written (JPEGs decoded by PIL), cropped
    or resized with plain NumPy."""
    classes = ["ant", "bee", "cat"]
    rows = sorted((classes.index(rel.split("/")[1]), rel) for rel in files if rel.startswith(split_dir + "/"))
    images = []
    for _, rel in rows:
        img = np.asarray(Image.open(top / rel)) if rel.endswith(".jpg") else files[rel]
        if img.shape[1] == 14:
            img = img[:, 3:11]  # shorter side already 8: centre crop only
        elif img.shape[0] == 16:
            img = np.full((8, 8, 3), (10, 200, 30), np.uint8)  # a flat colour stays flat under bilinear resizing
        images.append(img)
    return np.stack(images), np.array([y for y, _ in rows], np.int32)


def _expected_names(files, split_dir):
    classes = ["ant", "bee", "cat"]
    return [rel for _, rel in sorted((classes.index(rel.split("/")[1]), rel) for rel in files
                                     if rel.startswith(split_dir + "/"))]


def _tar(top, out):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    return out


# ---------------------------------------------------------------------------------------------------------
# ImageFolder and the cache
# ---------------------------------------------------------------------------------------------------------

def test_imagefolder_dir_and_tar_decode_like_pil(tmp_path):
    top, files = _make_tree(tmp_path / "tree")
    archive = _tar(top, tmp_path / "tree.tar.gz")
    for path in (top, tmp_path / "tree", archive):  # the split folders under a top-level folder, too
        for split, split_dir in (("train", "train"), ("test", "test")):
            source = data.get_source(_cfg(tmp_path, path=str(path)), split)
            want_images, want_labels = _expected(files, split_dir, top)
            assert source.class_names == ["ant", "bee", "cat"] and source.num_classes == 3
            assert source.images.dtype == np.uint8 and source.images.shape == (len(want_labels), 8, 8, 3)
            np.testing.assert_array_equal(source.labels, want_labels)
            np.testing.assert_array_equal(source.images, want_images)
            assert len(source) == len(want_labels) and source.labels.dtype == np.int32
            # File names: relative to the directory or archive given, in the images' order.
            prefix = "" if path == top else "top/"
            assert list(source.file_names) == [prefix + rel for rel in _expected_names(files, split_dir)]


def test_name_with_path_reads_imagefolder(tmp_path):
    top, _ = _make_tree(tmp_path / "tree")
    source = data.get_source(_cfg(tmp_path, name="cifar10", path=str(top)), "test")
    assert source.name == "cifar10" and source.class_names == ["ant", "bee", "cat"]
    # ...also under the smoke preset's name: the path given is read, not silently replaced by synthetic images.
    source = data.get_source(_cfg(tmp_path, name="synthetic", path=str(top), num_examples=512, num_classes=4), "test")
    assert source.class_names == ["ant", "bee", "cat"] and len(source) < 512


def test_cache_is_reused_and_memory_mapped(tmp_path, monkeypatch):
    top, _ = _make_tree(tmp_path / "tree")
    archive = _tar(top, tmp_path / "tree.tar.gz")
    first = data.get_source(_cfg(tmp_path, path=str(archive)), "train")
    first_images = np.array(first.images)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagefolder, "decode_images", fail)
    again = data.get_source(_cfg(tmp_path, path=str(archive)), "train")
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, first_images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert list(again.file_names) == list(first.file_names) and again.file_names[0] == "top/train/ant/wide.png"
    # Another image size is another cache entry, so it must decode.
    with pytest.raises(AssertionError, match="decoded again"):
        data.get_source(_cfg(tmp_path, path=str(archive), image_size=4), "train")


def test_cache_notices_added_files(tmp_path):
    top, _ = _make_tree(tmp_path / "tree")
    before = data.get_source(_cfg(tmp_path, path=str(top)), "train")
    _save(top / "train/ant/y.png", _pixels(11))
    after = data.get_source(_cfg(tmp_path, path=str(top)), "train")
    assert len(after) == len(before) + 1
    np.testing.assert_array_equal(after.images[2], _pixels(11))  # ant: wide.png, x.PNG, y.png


def test_interrupted_decode_leaves_no_cache(tmp_path, monkeypatch):
    top, _ = _make_tree(tmp_path / "tree")
    real = imagefolder.decode_images

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(imagefolder, "decode_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.get_source(_cfg(tmp_path, path=str(top)), "train")
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []
    monkeypatch.setattr(imagefolder, "decode_images", real)
    assert len(data.get_source(_cfg(tmp_path, path=str(top)), "train")) == 8


def test_temporaries_of_a_killed_decode_are_removed_by_the_next_one(tmp_path):
    """A decode killed outright (SIGKILL, a preempted VM) runs no cleanup; its temporaries (ImageNet's are tens of
    GB) must not pile up with every restart. A live writer's stay (several hosts may share one cache)."""
    top, _ = _make_tree(tmp_path / "tree")
    cfg = _cfg(tmp_path, path=str(top))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    folder = data.get_source(cfg, "test")  # creates the cache folder (its test split)
    del folder
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    killed = cache / f"train_images.npy.tmp-{host}-{dead.pid}-0123abcd"  # this host, process gone
    live = cache / f"train_images.npy.tmp-{host}-{os.getpid()}-4567abcd"  # this host, still running
    other_old = cache / "train_labels.npy.tmp-otherhost-12-89abcdef"  # another host, untouched for two hours
    other_new = cache / "train_labels.npy.tmp-otherhost-13-89abcdef"  # another host, being written
    legacy = cache / "train_meta.json.tmp-4242-0123abcd"  # an older ssl_jax's name, two hours old
    # this host, process gone a moment ago: perhaps a live writer in another PID namespace of the same host name
    just_now = cache / f"train_labels.npy.tmp-{host}-{dead.pid}-fedc0123"
    for path in (killed, live, other_old, other_new, legacy, just_now):
        path.write_bytes(b"x" * 100)
    for path in (other_old, legacy):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    for path in (killed, live):
        os.utime(path, (time.time() - 600, time.time() - 600))
    assert len(data.get_source(cfg, "train")) == 8
    left = sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name)
    assert left == sorted([live.name, other_new.name, just_now.name])


def test_a_cache_that_does_not_fit_on_its_disk_is_an_error_before_writing(tmp_path, monkeypatch):
    """The cache is written through a memory map; a full disk then kills the process with SIGBUS, no message."""
    top, _ = _make_tree(tmp_path / "tree")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(data.DataError, match=r"the cache needs 0\.00 GB in .* but its disk has 0\.00 GB free; set "
                                             r"data\.cache_dir"):
        data.get_source(_cfg(tmp_path, path=str(top)), "train")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_worker_pool_matches_in_process_decoding(tmp_path, monkeypatch):
    top, _ = _make_tree(tmp_path / "tree")
    archive = _tar(top, tmp_path / "tree.tar.gz")
    serial = data.get_source(_cfg(tmp_path, path=str(archive), cache_dir=str(tmp_path / "c1")), "train")
    monkeypatch.setattr(imagefolder, "_MIN_IMAGES_FOR_POOL", 0)
    monkeypatch.setattr(imagefolder, "_CHUNK", 3)
    pooled = data.get_source(_cfg(tmp_path, path=str(archive), cache_dir=str(tmp_path / "c2"), num_workers=2),
                             "train")
    np.testing.assert_array_equal(pooled.images, serial.images)
    np.testing.assert_array_equal(pooled.labels, serial.labels)
    # A corrupt file decoded in a worker process is reported by name in this one.
    (top / "train/bee/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(data.DataError, match="top/train/bee/broken.jpg"):
        data.get_source(_cfg(tmp_path, path=str(_tar(top, tmp_path / "b.tgz")), num_workers=2), "train")


class _KillsTheWorker:
    """A payload whose unpickling in a decoding worker ends that process at once, as the kernel's OOM killer does."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_dies_is_an_error_not_a_hang(monkeypatch):
    # multiprocessing.Pool, which decoded before, waits forever for a task whose worker died.
    monkeypatch.setattr(imagefolder, "_MIN_IMAGES_FOR_POOL", 0)
    items = [(i, f"img{i}.png", _pixels(i), 0) for i in range(8)] + [(8, "img8.png", _KillsTheWorker(), 0)]
    decoded, raised = imagefolder.decode_images(items, len(items), 8, num_workers=2), []

    def consume():
        try:
            list(decoded)
        except Exception as e:  # pylint: disable=broad-except  (checked below)
            raised.append(e)

    thread = threading.Thread(target=consume, daemon=True)  # a daemon, so that a hang fails instead of hanging
    thread.start()
    thread.join(300)
    assert not thread.is_alive(), "decoding still waits 300 s after its worker died"
    assert len(raised) == 1 and isinstance(raised[0], data.DataError), raised
    assert "decoding worker process died" in str(raised[0])


def _wait_until_no_worker_lives(timeout=120):
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_worker_that_died_before_the_next_chunk_is_read_is_named(monkeypatch):
    """After a worker's death the executor refuses new chunks with a bare BrokenProcessPool; decoding stops with the
    DataError that says what to do, whether it is noticed on a result or on the next submission."""
    monkeypatch.setattr(imagefolder, "_MIN_IMAGES_FOR_POOL", 0)
    monkeypatch.setattr(imagefolder, "_CHUNK", 1)

    def items():
        yield 0, "img0.png", _KillsTheWorker(), 0
        _wait_until_no_worker_lives()  # the pool has broken while the next item was read (a slow disk, say)
        for i in range(1, 4):
            yield i, f"img{i}.png", _pixels(i), 0

    with pytest.raises(data.DataError, match="decoding worker process died"):
        list(imagefolder.decode_images(items(), 4, 8, num_workers=2))


def test_a_script_that_loads_data_without_a_main_guard_fails_with_a_clear_error(tmp_path):
    # Decoding workers are spawned and run the parent's script again as __mp_main__; this one loads data at its
    # top level, so each worker starts a decode of its own, which Python refuses while the worker bootstraps.
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from ssl_jax.data import imagefolder
        imagefolder._MIN_IMAGES_FOR_POOL = 0
        items = [(i, "img%d.png" % i, np.zeros((8, 8, 3), np.uint8), 0) for i in range(8)]
        print(len(list(imagefolder.decode_images(items, 8, 8, num_workers=2))))
    """))
    def run():
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              cwd=pathlib.Path(__file__).resolve().parents[1])

    done = run()
    assert done.returncode != 0
    assert "DataError: an image decoding worker process died" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    # Guarded, the same script works.
    guarded = script.read_text().replace("items =", "if __name__ == '__main__':\n    items =").replace(
        "\nprint(", "\n    print(")
    script.write_text(guarded)
    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"


def test_val_folder_is_the_test_split(tmp_path):
    top, files = _make_tree(tmp_path / "tree", test_dir="val")
    source = data.get_source(_cfg(tmp_path, path=str(top)), "test")
    want_images, want_labels = _expected(files, "val", top)
    np.testing.assert_array_equal(source.images, want_images)
    np.testing.assert_array_equal(source.labels, want_labels)


def test_corrupt_image_is_named(tmp_path):
    top, _ = _make_tree(tmp_path / "tree")
    (top / "train/cat/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(data.DataError, match="bad.jpg"):
        data.get_source(_cfg(tmp_path, path=str(top)), "train")
    with pytest.raises(data.DataError, match=r"tree\.tar\.gz:top/train/cat/bad\.jpg"):
        data.get_source(_cfg(tmp_path, path=str(_tar(top, tmp_path / "tree.tar.gz"))), "train")


def test_missing_path_split_and_classes(tmp_path):
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(data.MissingDataError, match="nowhere.tar.gz") as info:
        data.get_source(_cfg(tmp_path, path=str(missing)), "train")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, data.DataError)

    only_train = tmp_path / "only_train"
    _save(only_train / "train/a/1.png", _pixels(1))
    assert len(data.get_source(_cfg(tmp_path, path=str(only_train)), "train")) == 1
    with pytest.raises(data.DataError, match="no test split.*test/.*val/") as info:
        data.get_source(_cfg(tmp_path, path=str(only_train)), "test")
    assert "without class folders" not in str(info.value)
    # ImageNet's validation set as distributed: the images directly in val/, labels in another file.
    _save(only_train / "val/ILSVRC2012_val_00000001.JPEG", _pixels(3))
    with pytest.raises(data.DataError, match=r"val/ holds images directly, without class folders.*valprep\.sh"):
        data.get_source(_cfg(tmp_path, path=str(only_train)), "test")
    os.remove(only_train / "val/ILSVRC2012_val_00000001.JPEG")

    _save(only_train / "test/b/1.png", _pixels(2))
    with pytest.raises(data.DataError, match=r"missing \['a'\], extra \['b'\]"):
        data.get_source(_cfg(tmp_path, path=str(only_train)), "test")

    no_train = tmp_path / "no_train"
    _save(no_train / "test/a/1.png", _pixels(1))
    with pytest.raises(data.DataError, match="no train/"):
        data.get_source(_cfg(tmp_path, path=str(no_train)), "train")
    with pytest.raises(data.DataError, match="needs data.path"):
        data.get_source(_cfg(tmp_path), "train")


def test_an_empty_class_folder_is_an_error_not_a_label_shift(tmp_path):
    """torchvision's ImageFolder numbers every class folder (and refuses an empty one); skipping it silently gave
    each later class the label of the one before it."""
    root = tmp_path / "tree"
    for rel in ("train/a/1.png", "train/c/1.png", "test/a/1.png", "test/b/1.png", "test/c/1.png"):
        _save(root / rel, _pixels(1))
    (root / "train/b").mkdir()
    (root / "train/.ipynb_checkpoints").mkdir()  # hidden: not a class
    archive = _tar(root, tmp_path / "tree.tar.gz")  # holds train/b/ as a folder member
    for path in (root, archive):
        for split in ("train", "test"):
            with pytest.raises(data.DataError, match=r"class folders without images .*: (tree/)?train/b/; remove"):
                data.get_source(_cfg(tmp_path, path=str(path)), split)
    (root / "train/b/notes.txt").write_text("not an image")  # a class folder of other files is empty too
    with pytest.raises(data.DataError, match="train/b/"):
        data.get_source(_cfg(tmp_path, path=str(root)), "train")
    _save(root / "train/b/1.png", _pixels(2))
    (root / "test/c/1.png").unlink()
    with pytest.raises(data.DataError, match=r"without images .*: test/c/"):
        data.get_source(_cfg(tmp_path, path=str(root)), "test")
    _save(root / "test/c/1.png", _pixels(3))
    source = data.get_source(_cfg(tmp_path, path=str(root)), "train")
    assert source.class_names == ["a", "b", "c"] and list(source.labels) == [0, 1, 2]


def test_torchvision_image_extensions_are_read(tmp_path):
    root = tmp_path / "tree"
    for i, ext in enumerate((".png", ".tif", ".TIFF", ".ppm", ".webp")):
        _save(root / f"train/a/{i}{ext}", _pixels(i))
    _save(root / "train/b/gray.pgm", _pixels(9)[..., 0])
    source = data.get_source(_cfg(tmp_path, path=str(root)), "train")
    assert list(source.file_names) == ["train/a/0.png", "train/a/1.tif", "train/a/2.TIFF", "train/a/3.ppm",
                                       "train/a/4.webp", "train/b/gray.pgm"]
    np.testing.assert_array_equal(source.images[:4], np.stack([_pixels(i) for i in range(4)]))
    np.testing.assert_array_equal(source.images[5], np.repeat(_pixels(9)[..., :1], 3, axis=-1))


def test_links_in_an_archive_are_read_as_their_targets(tmp_path):
    """tar stores the second hard link to a file (and any symbolic link) as a link member; those images were
    silently left out."""
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        for rel, seed in (("train/a/1.png", 1), ("train/b/2.png", 2)):
            png = io.BytesIO()
            Image.fromarray(_pixels(seed)).save(png, format="PNG")
            info = tarfile.TarInfo(rel)
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
        for rel, kind, target in (("train/a/hard.png", tarfile.LNKTYPE, "train/b/2.png"),
                                  ("train/b/sym.png", tarfile.SYMTYPE, "../a/1.png"),
                                  ("train/b/chain.png", tarfile.SYMTYPE, "sym.png")):
            info = tarfile.TarInfo(rel)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    for stream in (False, True):  # decoded into the cache, or streamed from the links' targets' bytes
        source = data.get_source(_cfg(tmp_path, path=str(archive), stream=stream), "train")
        assert list(source.file_names) == ["train/a/1.png", "train/a/hard.png", "train/b/2.png", "train/b/chain.png",
                                           "train/b/sym.png"]
        np.testing.assert_array_equal(source.images[:], np.stack([_pixels(s) for s in (1, 2, 2, 1, 1)]))
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("train/b/gone.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/elsewhere/gone.png"
        tar.addfile(info)
    with pytest.raises(data.DataError, match=r"links\.tar:train/b/gone\.png is a link to '/elsewhere/gone\.png'"):
        data.get_source(_cfg(tmp_path, path=str(archive)), "train")


def test_a_truncated_archive_is_an_error_naming_it(tmp_path):
    top, _ = _make_tree(tmp_path / "tree")
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(top, arcname="top")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    for stream in (False, True):
        with pytest.raises(data.DataError, match=r"cut\.tar: cannot list the archive \(truncated or corrupt\?\)"):
            data.get_source(_cfg(tmp_path, path=str(cut), stream=stream), "train")


def test_native_size_must_be_uniform(tmp_path):
    root = tmp_path / "mixed"
    _save(root / "train/a/1.png", _pixels(1, 8, 8))
    _save(root / "train/a/2.png", _pixels(2, 6, 8))
    with pytest.raises(data.DataError, match="image_size"):
        data.get_source(_cfg(tmp_path, path=str(root), image_size=0), "train")
    _save(root / "train/a/2.png", _pixels(2, 8, 8))  # the failed decode cached nothing, so this is read
    source = data.get_source(_cfg(tmp_path, path=str(root), image_size=0), "train")
    np.testing.assert_array_equal(source.images, np.stack([_pixels(1), _pixels(2)]))


def test_decode_image_modes_and_resize():
    cmyk = io.BytesIO()
    Image.fromarray(_pixels(1)).convert("CMYK").save(cmyk, format="JPEG")
    assert imagefolder.decode_image(cmyk.getvalue(), 0).shape == (8, 8, 3)
    tall = np.zeros((20, 10, 3), np.uint8)
    tall[5:15] = 255  # the middle 10 rows survive the centre crop to 10x10 unchanged
    np.testing.assert_array_equal(imagefolder.decode_image(tall, 10), np.full((10, 10, 3), 255, np.uint8))
    big = _pixels(3, 24, 36)
    want = np.asarray(Image.fromarray(big).resize((18, 12), Image.BILINEAR))[:, 3:15]
    np.testing.assert_array_equal(imagefolder.decode_image(big, 12), want)
    # 16-bit grayscale keeps its high byte; converting it to RGB directly clipped every value above 255 to white.
    deep = np.random.default_rng(4).integers(0, 1 << 16, (8, 8), dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        encoded = io.BytesIO()
        Image.fromarray(deep).save(encoded, format=fmt)
        np.testing.assert_array_equal(imagefolder.decode_image(encoded.getvalue(), 0),
                                      np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=-1))


def test_synthetic_images_do_not_depend_on_the_chunk_size(monkeypatch):
    whole = synthetic.make_synthetic(23, 3, 8, seed=5)
    monkeypatch.setattr(synthetic, "_CHUNK_BYTES", 8 * 8 * 3 * 4)  # 4 images a chunk, the last one short
    chunked = synthetic.make_synthetic(23, 3, 8, seed=5)
    np.testing.assert_array_equal(chunked.images, whole.images)
    np.testing.assert_array_equal(chunked.labels, whole.labels)


def test_subset():
    source = synthetic.make_synthetic(20, 4, 8, seed=0)
    part = data.subset(source, [3, 1, 7])
    np.testing.assert_array_equal(part.images, source.images[[3, 1, 7]])
    np.testing.assert_array_equal(part.labels, source.labels[[3, 1, 7]])
    assert source.file_names is None and part.file_names is None
    source.file_names = [f"f{i}.jpg" for i in range(20)]
    assert list(data.subset(source, [3, 1, 7]).file_names) == ["f3.jpg", "f1.jpg", "f7.jpg"]


@pytest.fixture(scope="session")
def cifar_test_split(tmp_path_factory):
    """Decodes the 10,000-image test split of the real CIFAR-10 archive once per session (about 5 s)."""
    cfg = _cfg(tmp_path_factory.mktemp("cifar"), name="cifar10", path=str(CIFAR), image_size=0, num_workers=0)
    return cfg, data.get_source(cfg, "test")


@pytest.mark.skipif(not CIFAR.exists(), reason=f"{CIFAR} not present")
def test_cifar10_archive(cifar_test_split):
    cfg, source = cifar_test_split
    assert source.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"]
    assert source.images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(source.labels), np.full(10, 1000))
    with tarfile.open(CIFAR, "r|gz") as tar:  # test/airplane/ comes first in the archive
        for member in tar:
            if member.name == "cifar10-jpeg/test/airplane/0001.jpg":
                want = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
                break
    np.testing.assert_array_equal(source.images[1], want)
    again = data.get_source(cfg, "test")
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images[::997], source.images[::997])


# ---------------------------------------------------------------------------------------------------------
# tfds (no TensorFlow): a real array_record dataset built here, tfds's mock data, split names
# ---------------------------------------------------------------------------------------------------------

def _tiny_image(index):
    return np.random.default_rng(100 + index).integers(0, 256, (8, 8, 3), dtype=np.uint8)


class SslJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """Train and validation splits of 8x8 PNGs; prepared without TensorFlow because images arrive encoded."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                                 "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
                                                 "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(7)), "validation": self._generate_examples(range(7, 11))}

    def _generate_examples(self, indices):
        for i in indices:
            png = io.BytesIO()
            Image.fromarray(_tiny_image(i)).save(png, format="PNG")
            png.seek(0)
            yield i, {"image": png, "label": i % 3, "file_name": f"n{i % 3:08d}_{i}.JPEG"}


def test_tfds_data_source_without_tensorflow(tmp_path):
    data_dir = tmp_path / "tfds"
    SslJaxTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    cfg = _cfg(tmp_path, name="ssl_jax_tiny_images", image_size=0, tfds_data_dir=str(data_dir))
    for split, indices in (("train", range(7)), ("test", range(7, 11))):  # no test split: validation is used
        source = data.get_source(cfg, split)
        reference = tfds.data_source("ssl_jax_tiny_images", split="train" if split == "train" else "validation",
                                     data_dir=str(data_dir))
        want = np.stack([reference[i]["image"] for i in range(len(reference))])
        assert sorted(map(tuple, want.reshape(len(want), -1))) == sorted(
            tuple(_tiny_image(i).reshape(-1)) for i in indices)  # tfds shuffles the order; the set is ours
        np.testing.assert_array_equal(source.images, want)
        np.testing.assert_array_equal(source.labels, [reference[i]["label"] for i in range(len(reference))])
        assert source.class_names == ["x", "y", "z"]
        # The records' file names, in the images' order, kept beside the cache.
        names = [reference[i]["file_name"].decode() for i in range(len(reference))]
        assert list(source.file_names) == names and sorted(names) == sorted(
            f"n{i % 3:08d}_{i}.JPEG" for i in indices)
        assert list(data.get_source(cfg, split).file_names) == names
    resized = data.get_source(_cfg(tmp_path, name="ssl_jax_tiny_images", image_size=4, tfds_data_dir=str(data_dir)),
                              "train")
    assert resized.images.shape == (7, 4, 4, 3)


def test_tfds_prepares_a_data_dir_without_tensorflow_and_its_bars_follow_no_progress(tmp_path, capfd, monkeypatch):
    from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(tqdm_utils, "_active", True)  # tfds's own switch, put back after the test
    errs = []
    # Prepared on first use (download=True) into data.tfds_data_dir, a new folder each time: as array_record (tfds's
    # default there is TFRecord, which needs TensorFlow to write and which tfds.data_source cannot read).
    for shown in (True, False):
        monkeypatch.setattr(metrics, "_show_progress", shown)
        data_dir = tmp_path / f"tfds_{shown}"
        source = data.get_source(_cfg(tmp_path / f"c_{shown}", name="ssl_jax_tiny_images", image_size=0,
                                      tfds_data_dir=str(data_dir)), "train")
        assert len(source.images) == 7
        errs.append(capfd.readouterr().err)
    assert "Generating" in errs[0] and "Generating" not in errs[1], errs  # tfds's "Generating splits..." bar


def test_tfds_mock_cifar10(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        source = data.get_source(_cfg(tmp_path, name="cifar10", image_size=0), "test")
        reference = tfds.data_source("cifar10", split="test")
        np.testing.assert_array_equal(source.images, np.stack([reference[i]["image"] for i in range(6)]))
        np.testing.assert_array_equal(source.labels, [reference[i]["label"] for i in range(6)])
        # Unprepared (mocked) cifar10 has not read its class names from the download: they are '0' .. '9'.
        assert source.class_names == list(reference.dataset_info.features["label"].names) and source.num_classes == 10
        assert source.name == "cifar10" and source.file_names is None  # cifar10 records have no file names
        assert data.get_source(_cfg(tmp_path, name="cifar10", image_size=16), "train").images.shape == (6, 16, 16, 3)


def test_tfds_errors_and_split_names(tmp_path):
    with pytest.raises(data.DataError, match="image_size"):  # imagenet2012 has images of many sizes
        data.get_source(_cfg(tmp_path, name="imagenet2012", image_size=0), "train")
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.get_source(_cfg(tmp_path, name="no_such_dataset_xyz"), "train")
    labelled, withheld = [{"label": 3}], [{"label": -1}]
    assert tfds_source.resolve_split("d", "test", {"train": labelled, "test": labelled}, "label") == "test"
    assert tfds_source.resolve_split("d", "test", {"train": labelled, "validation": labelled}, "label") == "validation"
    assert tfds_source.resolve_split("d", "test", {"test": withheld, "validation": labelled}, "label") == "validation"
    with pytest.raises(data.DataError, match="no labelled split"):
        tfds_source.resolve_split("d", "test", {"train": labelled}, "label")


def test_examples_to_items_on_plain_dicts():
    examples = [{"image": _tiny_image(0), "label": 2}, {"image": np.array(b"\x89PNG", dtype=object), "label": 0}]
    items = list(tfds_source.examples_to_items(examples, "image", "label", "fake"))
    assert [(i, name, label) for i, name, _, label in items] == [(0, "fake[0]", 2), (1, "fake[1]", 0)]
    np.testing.assert_array_equal(items[0][2], _tiny_image(0))
    assert items[1][2] == b"\x89PNG"
    for example, file_name in zip(examples, (b"n1_1.JPEG", np.array("n2_2.JPEG", dtype=object))):
        example["file_name"] = file_name
    file_names = [None, None]
    items = list(tfds_source.examples_to_items(examples, "image", "label", "fake", file_names))
    assert file_names == ["n1_1.JPEG", "n2_2.JPEG"] and items[1][1] == "fake[1] (n2_2.JPEG)"


# ---------------------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_learnable(tmp_path):
    cfg = _cfg(tmp_path, name="synthetic", image_size=0, num_examples=400, num_classes=5)
    train, again, test = data.get_source(cfg, "train"), data.get_source(cfg, "train"), data.get_source(cfg, "test")
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.labels, again.labels)
    assert train.images.shape == (400, 16, 16, 3) and train.images.dtype == np.uint8 and len(test) == 100
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(5, 80))
    assert not np.array_equal(train.images[:100], test.images)
    # Nearest class mean on raw pixels, fitted on train, classifies the independently drawn test split.
    x_train = train.images.reshape(len(train), -1).astype(np.float64)
    means = np.stack([x_train[train.labels == c].mean(0) for c in range(5)])
    x_test = test.images.reshape(len(test), -1).astype(np.float64)
    predicted = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test.labels).mean() > 0.9


# ---------------------------------------------------------------------------------------------------------
# Host pipeline
# ---------------------------------------------------------------------------------------------------------

def test_epoch_permutation_and_batches_cover_an_epoch():
    perm = pipeline.epoch_permutation(3, 0, 103)
    assert perm.dtype == np.int64
    np.testing.assert_array_equal(np.sort(perm), np.arange(103))
    np.testing.assert_array_equal(perm, pipeline.epoch_permutation(3, 0, 103))
    assert not np.array_equal(perm, pipeline.epoch_permutation(3, 1, 103))
    assert not np.array_equal(perm, pipeline.epoch_permutation(4, 0, 103))
    steps = 103 // 10
    epoch0 = np.concatenate([pipeline.batch_indices(3, 103, 10, s) for s in range(steps)])
    np.testing.assert_array_equal(epoch0, perm[:100])  # 3 examples dropped, none repeated
    assert len(np.unique(epoch0)) == 100
    np.testing.assert_array_equal(pipeline.batch_indices(3, 103, 10, steps + 2),
                                  pipeline.epoch_permutation(3, 1, 103)[20:30])


def test_local_slices_concatenate_to_global_batch():
    global_B = pipeline.batch_indices(0, 50, 12, 7)
    parts = [pipeline.local_slice(global_B, p, 2) for p in range(2)]
    assert all(len(p) == 6 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), global_B)
    with pytest.raises(ValueError, match="12.*5"):
        pipeline.local_slice(global_B, 0, 5)
    for process in (2, -1):  # a process index past the end gave an empty share, not an error
        with pytest.raises(ValueError, match="process_index"):
            pipeline.local_slice(global_B, process, 2)


def test_host_loader_matches_direct_computation_and_resumes():
    source = synthetic.make_synthetic(57, 3, 4, seed=0)
    with pipeline.HostLoader(source, 8, seed=5, start_step=0) as loader:
        full = [next(loader) for _ in range(15)]  # crosses the epoch boundary at step 7
    for step, batch in enumerate(full):
        idx = pipeline.batch_indices(5, 57, 8, step)
        np.testing.assert_array_equal(batch["image"], source.images[idx])
        np.testing.assert_array_equal(batch["label"], source.labels[idx])
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    with pipeline.HostLoader(source, 8, seed=5, start_step=9) as resumed:
        for step in range(9, 15):
            np.testing.assert_array_equal(next(resumed)["image"], full[step]["image"])
    for process in range(2):
        with pipeline.HostLoader(source, 8, 5, 3, process_index=process, process_count=2, resident=True) as part:
            batch = next(part)
            expected = pipeline.batch_indices(5, 57, 8, 3)[4 * process:4 * (process + 1)]
            np.testing.assert_array_equal(batch["index"], expected)
            assert batch["index"].dtype == np.int32 and set(batch) == {"index", "label"}
    with pytest.raises(ValueError, match="8.*3"):
        pipeline.HostLoader(source, 8, 5, 0, process_count=3)


class _FailingImages:
    shape = (100, 4, 4, 3)

    def __getitem__(self, index):
        raise RuntimeError("disk on fire")


def test_host_loader_reraises_worker_errors_and_closes():
    source = data.Source(_FailingImages(), np.zeros(100, np.int32), ["a"], "broken")
    loader = pipeline.HostLoader(source, 10, 0, 0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(loader)
    assert not loader._thread.is_alive()
    ok = pipeline.HostLoader(synthetic.make_synthetic(40, 2, 4), 10, 0, 0, prefetch=1)
    next(ok)
    ok.close()
    assert not ok._thread.is_alive()
    with pytest.raises(StopIteration):
        next(ok)


def test_eval_batches_cover_everything_once():
    source = synthetic.make_synthetic(23, 3, 4, seed=1)
    batches = list(pipeline.eval_batches(source, 8))
    assert len(batches) == 3 and all(images.shape == (8, 4, 4, 3) for images, _, _ in batches)
    mask = np.concatenate([m for _, _, m in batches])
    assert mask.sum() == 23 and not mask[23:].any()
    np.testing.assert_array_equal(np.concatenate([x for x, _, _ in batches])[mask], source.images)
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches])[mask], source.labels)
    assert not np.concatenate([x for x, _, _ in batches])[~mask].any()
    halves = [list(pipeline.eval_batches(source, 8, process_index=p, process_count=2)) for p in range(2)]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][b][0], halves[1][b][0]]), batches[b][0])
        np.testing.assert_array_equal(np.concatenate([halves[0][b][2], halves[1][b][2]]), batches[b][2])
