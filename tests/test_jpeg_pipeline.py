"""Streamed JPEGs (data.stream=True): worker processes decode each batch as the uint8 cache would have stored it."""
import multiprocessing
import os
import tarfile
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_jax import data
from ssl_jax.data import bench_jpeg, pipeline, stream
from ssl_jax.evaluators import subsets

CLASSES = ("n01", "n02", "n03")


def _cfg(tmp_path, path, **overrides):
    cfg = dict(name="imagefolder", path=str(path), image_size=16, cache_dir=str(tmp_path / "cache"), num_workers=2,
               stream=False, num_examples=0, num_classes=0, tfds_data_dir="")
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """An ImageFolder of 30 train and 6 test JPEGs of several sizes and aspect ratios, and its plain .tar."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("test", 2)):
        for c in CLASSES:
            os.makedirs(root / "tree" / split / c)
            for i in range(per_class):
                height, width = rng.integers(16, 48, 2)  # wider and taller than 16: resized, then centre-cropped
                Image.fromarray(bench_jpeg.photo_like(rng, int(width), int(height))).save(
                    root / "tree" / split / c / f"{c}_{i}.JPEG", quality=90)
    with tarfile.open(root / "tree.tar", "w") as tar:
        tar.add(root / "tree", arcname="tree")
    return root


def _children():
    return {p.pid for p in multiprocessing.active_children()}


def test_streamed_batches_equal_cached_batches(jpeg_tree, tmp_path):
    cached = data.get_source(_cfg(tmp_path, jpeg_tree / "tree"), "train")
    streamed = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True), "train")
    in_tar = data.get_source(_cfg(tmp_path, jpeg_tree / "tree.tar", stream=True), "train")
    assert isinstance(streamed.images, stream.EncodedImages) and streamed.images.shape == (30, 16, 16, 3)
    assert list(streamed.file_names) == list(cached.file_names) == [
        f"train/{c}/{c}_{i}.JPEG" for c in CLASSES for i in sorted(range(10), key=str)]
    assert list(in_tar.file_names) == ["tree/" + n for n in cached.file_names]
    np.testing.assert_array_equal(streamed.labels, cached.labels)
    np.testing.assert_array_equal(in_tar.labels, cached.labels)
    assert streamed.class_names == in_tar.class_names == list(CLASSES)
    # Batch order: the same global batches (epoch permutation) for the same seed; 9 steps cross 2 epochs.
    before = _children()
    with pipeline.HostLoader(cached, 8, seed=3, start_step=2) as want, \
            pipeline.HostLoader(streamed, 8, seed=3, start_step=2) as got, \
            pipeline.HostLoader(in_tar, 8, seed=3, start_step=2, prefetch=1) as got_tar:
        for step in range(2, 11):
            expected = next(want)
            np.testing.assert_array_equal(expected["image"], cached.images[pipeline.batch_indices(3, 30, 8, step)])
            for batch in (next(got), next(got_tar)):
                np.testing.assert_array_equal(batch["image"], expected["image"])
                np.testing.assert_array_equal(batch["label"], expected["label"])
                assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        assert len(_children() - before) == 4  # two decoding processes (num_workers=2) per streamed loader
    assert _children() <= before
    # Each process of a multi-process run decodes only its half of the same global batch.
    halves = []
    for process in range(2):
        with pipeline.HostLoader(streamed, 8, 3, 5, process_index=process, process_count=2) as part:
            halves.append(next(part)["image"])
    np.testing.assert_array_equal(np.concatenate(halves), cached.images[pipeline.batch_indices(3, 30, 8, 5)])
    # Evaluation batches (padded at the end) and whole-array reads decode the same pixels.
    for (x, y, v), (x2, y2, v2) in zip(pipeline.eval_batches(cached, 16), pipeline.eval_batches(streamed, 16)):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(v, v2)
    np.testing.assert_array_equal(np.asarray(in_tar.images), cached.images)


def test_encoded_images_index_like_an_array(jpeg_tree, tmp_path, monkeypatch):
    cached = data.get_source(_cfg(tmp_path, jpeg_tree / "tree"), "train")
    images = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True), "train").images
    np.testing.assert_array_equal(images[7], cached.images[7])
    np.testing.assert_array_equal(images[[9, 2, 2]], cached.images[[9, 2, 2]])
    np.testing.assert_array_equal(images[3:20:4], cached.images[3:20:4])
    np.testing.assert_array_equal(images[cached.labels == 1], cached.images[cached.labels == 1])
    assert images[5:5].shape == (0, 16, 16, 3)
    np.testing.assert_array_equal(images.take([4, 0])[1], cached.images[0])
    monkeypatch.setattr(stream, "_IN_PROCESS_ROWS", 4)  # larger reads go through a pool of processes
    np.testing.assert_array_equal(images[::-1], cached.images[::-1])
    # Subsets of a streamed source stay encoded (decoded by the pipeline's processes) and keep their names.
    source = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True), "train")
    for part in (data.subset(source, [12, 3]), subsets.lazy_subset(source, [12, 3])):
        assert isinstance(part.images, stream.EncodedImages)
        np.testing.assert_array_equal(np.asarray(part.images), cached.images[[12, 3]])
        assert list(part.file_names) == [cached.file_names[12], cached.file_names[3]]


def test_transports_agree_and_in_flight_is_bounded(jpeg_tree, tmp_path):
    images = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True), "test").images
    want = images[np.arange(6)]
    rows = [np.array([5, 0, 3]), np.array([1]), np.array([], np.int64), np.array([2, 4, 1, 0])]
    for transport in stream.TRANSPORTS:
        with stream.DecodePool(images, num_workers=2, transport=transport, in_flight=2) as pool:
            for (got_rows, got), r in zip(pool.map(rows), rows):
                assert got_rows is r and got.shape == (len(r), 16, 16, 3)
                np.testing.assert_array_equal(got, want[r])
            if transport == "shm":
                pool.submit([0])
                pool.submit([1])
                with pytest.raises(RuntimeError, match="in_flight=2"):
                    pool.submit([2])
    with pytest.raises(ValueError, match="transport"):
        stream.DecodePool(images, transport="carrier pigeon")


def test_corrupt_jpeg_is_named_and_the_workers_stop(jpeg_tree, tmp_path):
    tree = tmp_path / "tree"
    for c in CLASSES[:2]:
        for i in range(4):
            os.makedirs(tree / "train" / c, exist_ok=True)
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tree / "train" / c / f"{i}.jpg")
    good = (tree / "train/n02/3.jpg").read_bytes()
    (tree / "train/n02/3.jpg").write_bytes(good[:len(good) // 2])  # truncated mid-scan
    before = _children()
    source = data.get_source(_cfg(tmp_path, tree, stream=True), "train")
    loader = pipeline.HostLoader(source, 8, seed=0, start_step=0)
    with pytest.raises(data.DataError, match=r"cannot decode image .*train/n02/3\.jpg"):
        next(loader)
    assert not loader._thread.is_alive() and _children() <= before
    (tree / "train/n01/0.jpg").write_bytes(b"not a JPEG at all")
    with pytest.raises(data.DataError, match=r"train/n01/0\.jpg: UnidentifiedImageError"):
        source.images[[1, 0]]


def test_close_stops_the_workers_without_hanging(jpeg_tree, tmp_path):
    source = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True, num_workers=2), "train")
    before = _children()
    loader = pipeline.HostLoader(source, 6, seed=1, start_step=0, prefetch=3)
    next(loader)
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    time.sleep(0.2)  # batches are decoding and waiting in the queue
    start = time.perf_counter()
    loader.close()
    assert time.perf_counter() - start < 10
    assert not loader._thread.is_alive() and not any(p.is_alive() for p in workers)
    for p in workers:
        with pytest.raises(ProcessLookupError):  # exited and reaped, not left as zombies
            os.kill(p.pid, 0)
    with pytest.raises(StopIteration):
        next(loader)


class _KillsTheWorker:
    """A file reference whose unpickling in a decoding worker ends that process, as the kernel's OOM killer does."""

    def __reduce__(self):
        return os._exit, (3,)


class _DeadlyImages:
    image_size, num_workers = 4, 1

    def refs(self, rows):
        return [(f"img{r}.jpg", _KillsTheWorker()) for r in rows]


def test_a_batch_submitted_after_a_worker_died_is_a_clear_error():
    """The executor refuses work after a worker's death with a bare BrokenProcessPool, which says nothing of why."""
    for transport in stream.TRANSPORTS:
        before = _children()
        with stream.DecodePool(_DeadlyImages(), transport=transport) as pool:
            pool.submit([0])
            deadline = time.monotonic() + 120
            while _children() - before and time.monotonic() < deadline:  # the worker died, the pool broke
                time.sleep(0.05)
            with pytest.raises(data.DataError, match="decoding worker process died"):
                pool.submit([1])


def test_stream_settings_errors(jpeg_tree, tmp_path):
    with pytest.raises(data.DataError, match="image_size > 0"):
        data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True, image_size=0), "train")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(jpeg_tree / "tree", arcname="tree")
    with pytest.raises(data.DataError, match="compressed.*unpack it"):
        data.get_source(_cfg(tmp_path, tmp_path / "tree.tar.gz", stream=True), "train")
    with pytest.raises(data.DataError, match="stream=True reads ImageFolder"):
        data.get_source(_cfg(tmp_path, "", name="imagenet2012", stream=True), "train")
    # The test split streams too (val/ or test/).
    test = data.get_source(_cfg(tmp_path, jpeg_tree / "tree", stream=True), "test")
    assert len(test) == 6 and test.file_names[0] == "test/n01/n01_0.JPEG"


def test_bench_jpeg_runs(tmp_path, capsys):
    assert bench_jpeg.main(["--num", "24", "--size", "50x40", "--image-size", "16", "--batch", "8", "--epochs", "2",
                            "--workers", "2", "--transports", "shm", "--dir", str(tmp_path)]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[1].strip() for r in rows] == ["in process", "DecodePool"]
    assert all(float(r[4]) > 0 for r in rows)


def test_decoding_workers_ignore_ctrl_c():
    """Ctrl-C signals the whole process group; the parent stops (training saves first) and shuts the pool down.
    A worker that took the signal itself died with a traceback and broke the pool under the saving run."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    import signal  # pylint: disable=import-outside-toplevel
    from ssl_jax.data import imagefolder  # pylint: disable=import-outside-toplevel
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=imagefolder.init_decode_worker) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN
