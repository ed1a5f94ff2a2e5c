"""Few-shot, semi-supervised and full linear protocols: subsets, the ridge probe, fine-tuning, `ssl-jax eval`."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ssl_jax import cli, config as config_lib, data, metrics, train as train_lib
from ssl_jax.data import pipeline, synthetic
from ssl_jax.evaluators import fewshot, finetune, protocols, subsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "simclr.py") + ":smoke"


# ----------------------------------------------------------------------------------------------- subsets
def _labels(seed=0, n=1000, c=7):
    # Unequal class sizes: a balanced subset must not simply follow the class frequencies.
    return np.random.default_rng(seed).choice(c, size=n, p=np.arange(1, c + 1) / np.arange(1, c + 1).sum())


def test_balanced_subset_is_class_balanced_and_seeded():
    labels = _labels()
    idx = subsets.balanced_subset(labels, 0.1, seed=0)
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    counts = np.bincount(labels[idx], minlength=7)
    assert np.all(counts == round(0.1 * 1000 / 7)), counts  # 14 of every class, whatever its size
    np.testing.assert_array_equal(idx, subsets.balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(idx, subsets.balanced_subset(labels, 0.1, seed=1))
    assert np.all(np.bincount(labels[subsets.balanced_subset(labels, 3, seed=5)], minlength=7) == 3)
    # Nested over the per-class count: 2 shots contain the 1-shot draw of the same seed.
    assert set(subsets.balanced_subset(labels, 1, 4)) <= set(subsets.balanced_subset(labels, 2, 4))
    # A class smaller than the request contributes all it has.
    small = np.array([0] * 10 + [1] * 2)
    assert np.bincount(small[subsets.balanced_subset(small, 5, 0)]).tolist() == [5, 2]
    with pytest.raises(ValueError):
        subsets.balanced_subset(labels, 1.5, 0)


def test_subset_file_round_trip_and_file_names(tmp_path):
    labels = _labels()
    source = synthetic.make_synthetic(1000, 7)
    idx = subsets.balanced_subset(source.labels, 0.05, seed=3)
    path = subsets.write_subset(str(tmp_path / "sub" / "semi5.txt"), idx)
    assert open(path).read().split() == [str(i) for i in idx]
    np.testing.assert_array_equal(subsets.read_subset(path, source), idx)
    # SimCLR-style lists name files; they are matched by base name against the source's file names.
    source.file_names = [f"train/n{labels[i]:03d}/img_{i:05d}.JPEG" for i in range(1000)]
    names = tmp_path / "1percent.txt"
    names.write_text("".join(f"img_{i:05d}.JPEG\n" for i in idx[::-1]))
    np.testing.assert_array_equal(subsets.read_subset(str(names), source), idx)
    (tmp_path / "bad.txt").write_text("5000\n")
    with pytest.raises(ValueError, match="index 5000"):
        subsets.read_subset(str(tmp_path / "bad.txt"), source)
    lazy = subsets.lazy_subset(source, idx)
    np.testing.assert_array_equal(lazy.images[3:7], source.images[idx[3:7]])
    np.testing.assert_array_equal(lazy.labels, source.labels[idx])


def test_subset_file_names_match_by_base_name_or_folders_and_errors_name_them(tmp_path):
    source = synthetic.make_synthetic(40, 4)
    (tmp_path / "names.txt").write_text("n00000002_3.JPEG\n")
    with pytest.raises(ValueError, match="'synthetic' source has no file names"):
        subsets.read_subset(str(tmp_path / "names.txt"), source)
    # ImageFolder-style names; base names of the last class repeat those of the first in another folder.
    source.file_names = [f"train/n{i // 10:08d}/n{i // 10 % 3:08d}_{i % 10}.JPEG" for i in range(40)]
    (tmp_path / "ok.txt").write_text("n00000002_3.JPEG\n./n00000003/n00000000_1.JPEG\n"
                                     "train/n00000000/n00000000_1.JPEG\nn00000001_0.JPEG\n\n")
    assert subsets.read_subset(str(tmp_path / "ok.txt"), source).tolist() == [1, 10, 23, 31]
    (tmp_path / "ambiguous.txt").write_text("n00000000_1.JPEG\nn00000001_1.JPEG\n")
    with pytest.raises(ValueError, match="1 names match several.*'n00000000_1.JPEG'"):
        subsets.read_subset(str(tmp_path / "ambiguous.txt"), source)
    missing = [f"n01440764_{i}.JPEG" for i in range(7)]
    (tmp_path / "missing.txt").write_text("\n".join(["n00000001_0.JPEG"] + missing))
    with pytest.raises(ValueError, match=r"7 of 8 names are not in the training set .*'n01440764_0.JPEG', "
                                         r"'n01440764_1.JPEG', .*'n01440764_4.JPEG' and 2 more"):
        subsets.read_subset(str(tmp_path / "missing.txt"), source)


# ----------------------------------------------------------------------------------------------- few-shot
def test_ridge_matches_numpy_closed_form():
    rng = np.random.default_rng(0)
    x_NxD, y_N = rng.normal(size=(40, 12)).astype(np.float32), rng.integers(0, 5, 40)
    t_MxD = rng.normal(size=(9, 12)).astype(np.float32)
    got_x, got_t = fewshot.standardize(x_NxD, t_MxD)
    w = np.asarray(fewshot.ridge_weights(got_x, y_N, 5, 3.0))
    mean, std = x_NxD.astype(np.float64).mean(0), np.sqrt(x_NxD.astype(np.float64).var(0) + 1e-6)
    xs, ts = (x_NxD - mean) / std, (t_MxD - mean) / std
    targets = 2.0 * np.eye(5)[y_N] - 1.0
    want = np.linalg.solve(xs.T @ xs + 3.0 * np.eye(12), xs.T @ targets)
    np.testing.assert_allclose(np.asarray(got_t), ts, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w, want, rtol=1e-3, atol=1e-4)


def test_fewshot_separable_features_reach_high_accuracy():
    rng = np.random.default_rng(1)
    centres_CxD = rng.normal(size=(6, 32)) * 3.0
    y_tr, y_te = rng.integers(0, 6, 600), rng.integers(0, 6, 300)
    x_tr = centres_CxD[y_tr] + rng.normal(size=(600, 32))
    x_te = centres_CxD[y_te] + rng.normal(size=(300, 32))
    got = fewshot.fewshot_accuracy(x_tr, y_tr, x_te, y_te, 6, shots=(1, 5, 10), l2=1.0)
    assert set(got) == {"fewshot_1shot_top1", "fewshot_5shot_top1", "fewshot_10shot_top1"}
    assert got["fewshot_5shot_top1"] > 0.95 and got["fewshot_10shot_top1"] > 0.95, got
    # Random labels: chance level, so the probe is not reading the test labels.
    chance = fewshot.fewshot_accuracy(x_tr, rng.permutation(y_tr), x_te, y_te, 6, shots=(10,), l2=1.0)
    assert chance["fewshot_10shot_top1"] < 0.45


# ----------------------------------------------------------------------------------------------- fine-tuning
def test_finetuning_changes_the_backbone_and_fits_the_labels():
    config = config_lib.load_config(SMOKE, ["data.num_examples=256"])
    setup = train_lib.build(config)
    state = train_lib.initial_state(setup)
    params, stats = state["params"]["model"], state["batch_stats"]
    model = finetune.Model(config, params, stats, 4, train_backbone=True)
    recipe = finetune.Recipe(epochs=6, batch_size=64, lr=0.2, seed=0)
    history = finetune.fit(model, config, setup.train_source, setup.mesh, recipe)
    assert len(history) == 6 and history[-1] > history[0] + 0.2 and history[-1] > 0.7, history
    before, after = jax.device_get(params["backbone"]), jax.device_get(model.variables["params"]["backbone"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))
    assert sum(m > 0 for m in moved) >= 0.9 * len(moved) and max(moved) > 1e-3  # the whole network trained
    # Frozen: the backbone is bit-identical after training the classifier.
    frozen = finetune.Model(config, params, stats, 4, train_backbone=False)
    finetune.fit(frozen, config, setup.train_source, setup.mesh, finetune.Recipe(epochs=1, batch_size=64, lr=0.1))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(frozen.variables["params"]["backbone"]))):
        np.testing.assert_array_equal(a, b)


def _indexed_source(n, num_classes=4):
    """Returns a Source whose image i has pixel (0, 0, 0) = i, so a batch tells which examples it holds."""
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return data.Source(images, (np.arange(n) % num_classes).astype(np.int32), list("abcd"), "indexed")


def test_finetuning_sees_every_epoch_of_the_labelled_set_whatever_the_batch_remainder(monkeypatch):
    """Each epoch dropped its partial batch: 40 examples in batches of 16 trained on 32 a epoch, and 1% of CIFAR-10
    (500 examples, batch 256) on 256, half of SimCLR's 60 epochs. The run now takes ceil(epochs x N / B) steps of B
    distinct examples, as SimCLR's fine-tuning on a repeated dataset."""
    config = config_lib.load_config(SMOKE, ["data.num_examples=64"])
    setup = train_lib.build(config)
    state = train_lib.initial_state(setup)
    batches = []

    class Recording(pipeline.HostLoader):
        def __next__(self):
            batch = super().__next__()
            batches.append(np.asarray(batch["image"][:, 0, 0, 0], np.int64))
            return batch

    monkeypatch.setattr(pipeline, "HostLoader", Recording)
    model = finetune.Model(config, state["params"]["model"], state["batch_stats"], 4, train_backbone=False)
    history = finetune.fit(model, config, _indexed_source(40), setup.mesh,
                           finetune.Recipe(epochs=3, batch_size=16, lr=0.1, train_backbone=False))
    assert len(history) == 3
    assert len(batches) == 8  # ceil(3 x 40 / 16); 6 before
    assert all(len(np.unique(b)) == len(b) == 16 for b in batches)  # no example twice in a batch
    seen = np.bincount(np.concatenate(batches), minlength=40)
    assert seen.sum() >= 3 * 40 and seen.min() >= 1


def test_finetune_evaluate_breaks_ties_as_argmax_and_never_credits_non_finite_logits():
    """The accuracy counted the true class as predicted when no logit was *higher*: the zero-initialised output
    layer (all logits equal) scored 100%, and so did NaN logits."""
    config = config_lib.load_config(SMOKE, ["data.num_examples=64"])
    setup = train_lib.build(config)
    state = train_lib.initial_state(setup)
    model = finetune.Model(config, state["params"]["model"], state["batch_stats"], 4, train_backbone=False)
    source = _indexed_source(40)
    got = finetune.evaluate(model, config, source, setup.mesh, 16)  # untrained: every logit is 0
    assert got == {"top1": pytest.approx(np.mean(source.labels == 0))}
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    assert finetune.class_rank(logits, np.array([2, 0, 3, 3])).tolist() == [1, 0, 4, 0]


class _Captured(Exception):
    pass


def test_semi_recipe_crop_lr_and_subset_share_are_the_protocols_whatever_the_run(monkeypatch, tmp_path, capsys):
    """Three ways the fine-tuning protocols depended on things they should not: the crop scale came from the
    pretraining recipe (0.2 for MoCo and SimSiam, 0.14 for SwAV: not torchvision's 0.08 of every official linear
    evaluation); the lr was scaled by the batch before fit rounded it to the devices (52 -> 48 on 8); and a
    list of 0.6% of the labels fine-tuned silently under `semi10_top1`."""
    config = config_lib.load_config(SMOKE, ["data.num_examples=512", "augment.min_scale=0.2"])
    assert finetune._train_spec(config).crop_scale == (0.08, 1.0)  # pylint: disable=protected-access
    setup = train_lib.build(config)
    state = train_lib.initial_state(setup)
    recipes = []

    def capture(model, config, source, mesh, recipe, progress=False):
        recipes.append((len(source), recipe))
        raise _Captured()

    monkeypatch.setattr(finetune, "fit", capture)
    capsys.readouterr()
    with pytest.raises(_Captured):  # 10% of 512: 13 of each of 4 classes; the batch of 256 clamped to 52, then 48
        protocols.semi_eval(setup, state, "semi10", str(tmp_path))
    assert "warning" not in capsys.readouterr().err
    (n, recipe), = recipes
    assert n == 52 and recipe.batch_size == 48 and recipe.lr == pytest.approx(0.05 * 48 / 256)
    (tmp_path / "three.txt").write_text("1\n2\n3\n")
    with setup.config.eval.unlocked():
        setup.config.eval.semi_subset_file = str(tmp_path / "three.txt")
    with pytest.raises(_Captured):
        protocols.semi_eval(setup, state, "semi10", str(tmp_path))
    assert "warning: semi10: the subset holds 0.586% of the 512 training examples, not 10%" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("protocols"))
    assert cli.main(["train", "--config", SMOKE, "--workdir", workdir, "--no-progress",
                     "--config.num_epochs=1", "--config.optim.warmup_epochs=0",
                     "--config.eval.knn_every_epochs=0"]) == 0
    return workdir


def _jpeg_folder(root, per_class):
    """Writes an ImageFolder of 16x16 JPEGs, one colour per class: train/n0000000C/n0000000C_I.JPEG, test/ 2 each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(4):
            os.makedirs(root / split / f"n{c:08d}")
            for i in range(count):
                pixels = np.clip(rng.normal(60 * c + 40, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def _eval(capsys, workdir, protocol, *overrides):
    capsys.readouterr()
    code = cli.main(["eval", "--workdir", workdir, "--protocol", protocol, "--no-progress", *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_eval_fewshot_semi_and_linear_full_append_results(smoke_run, capsys, tmp_path):
    workdir = smoke_run
    path = os.path.join(workdir, "metrics.jsonl")

    out, err = _eval(capsys, workdir, "fewshot", "--config.eval.fewshot_shots=(1,5)")
    assert set(out) >= {"fewshot_1shot_top1", "fewshot_5shot_top1"} and out["step"] == 8
    assert "warning" not in err
    assert metrics.read_jsonl(path)[-1]["fewshot_5shot_top1"] == out["fewshot_5shot_top1"]
    # 200 shots of a class of 128 synthetic images: all 128 are used, and the eval says so.
    _, err = _eval(capsys, workdir, "fewshot", "--config.eval.fewshot_shots=(1,200)")
    assert ("warning: fewshot_200shot_top1: 4 of 4 classes have fewer than 200 training examples (the smallest has "
            "128)") in err and "fewshot_1shot" not in err

    out, err = _eval(capsys, workdir, "semi10", "--config.eval.semi10_epochs=2", "--config.eval.semi_batch_size=16")
    subset_file = os.path.join(workdir, "subsets", "semi10_seed0.txt")
    written = np.loadtxt(subset_file, dtype=np.int64)
    assert subset_file in err and len(written) == 4 * round(0.1 * 512 / 4)  # 13 of each of the 4 classes
    assert np.isfinite(out["semi10_top1"]) and 0.0 <= out["semi10_top1"] <= 1.0
    assert metrics.read_jsonl(path)[-1]["semi10_top1"] == out["semi10_top1"]
    # Asked again, the subset is read back from the file, not drawn again (the file is left untouched).
    mtime = os.stat(subset_file).st_mtime_ns
    config = config_lib.from_json_file(os.path.join(workdir, "config.json"))
    again, again_path = protocols.semi_subset(config, workdir, synthetic.make_synthetic(512, 4), 10)
    assert again_path == subset_file and os.stat(subset_file).st_mtime_ns == mtime
    np.testing.assert_array_equal(again, written)
    # On a training set that changed since (more images), the file's indices would name other images: the
    # subset is drawn again from the new set and written over the file, with a warning.
    capsys.readouterr()
    redrawn, _ = protocols.semi_subset(config, workdir, synthetic.make_synthetic(640, 4), 10)
    assert "drawn again" in capsys.readouterr().err and len(redrawn) == 4 * round(0.1 * 640 / 4)
    np.testing.assert_array_equal(np.loadtxt(subset_file, dtype=np.int64), redrawn)
    (tmp_path / "other.txt").write_text("1\n2\n3\n")  # a given list wins over the drawn one
    with config.eval.unlocked():
        config.eval.semi_subset_file = str(tmp_path / "other.txt")
    assert protocols.semi_subset(config, workdir, synthetic.make_synthetic(512, 4), 10)[0].tolist() == [1, 2, 3]

    # A SimCLR-style list of file names (ImageNet's 1percent.txt) selects exactly those images of an ImageFolder
    # (4 classes, as the run was trained with), and their indices are written to the workdir.
    folder, listed = _jpeg_folder(tmp_path / "folder", per_class=17), []
    for c in range(4):
        listed += [f"n{c:08d}_{i}.JPEG" for i in (16, 2, 9, 0)]
    (tmp_path / "1percent.txt").write_text("\n".join(listed[::-1]) + "\n")
    data_args = ["--config.data.name=imagefolder", f"--config.data.path={folder}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}"]
    out, err = _eval(capsys, workdir, "semi1", *data_args,
                     f"--config.eval.semi_subset_file={tmp_path / '1percent.txt'}",
                     "--config.eval.semi1_epochs=1", "--config.eval.semi_batch_size=16")
    written = os.path.join(workdir, "subsets", "semi1_from_1percent.txt")
    # ImageFolder order: classes sorted, then file names sorted as strings (_0, _1, _10, ..., _16, _2, ...).
    order = sorted(f"n{0:08d}_{i}.JPEG" for i in range(17))
    want = sorted(int(n[1:9]) * 17 + order.index(f"n{0:08d}_{n.split('_')[1]}") for n in listed)
    assert np.loadtxt(written, dtype=np.int64).tolist() == want and written in err
    assert out["semi1_labelled"] == 16.0 and np.isfinite(out["semi1_top1"])
    (tmp_path / "wrong.txt").write_text("n00000000_1.JPEG\nn09999999_1.JPEG\nn09999999_2.JPEG\n")
    config = config_lib.from_json_file(os.path.join(workdir, "config.json"))
    for arg in data_args + [f"--config.eval.semi_subset_file={tmp_path / 'wrong.txt'}"]:
        config_lib.apply_override(protocols.with_eval_defaults(config), *arg[len("--config."):].split("=", 1))
    with pytest.raises(ValueError, match="2 of 3 names are not in the training set.*'n09999999_1.JPEG', "
                                         "'n09999999_2.JPEG'"):
        protocols.semi_subset(config, workdir, data.get_source(config.data, "train"), 1)

    out, _ = _eval(capsys, workdir, "linear_full", "--config.eval.linear_epochs=1",
                   "--config.eval.linear_batch_size=64")
    assert np.isfinite(out["linear_full_top1"]) and "linear_full_top5" not in out  # 4 classes: no top-5
    assert metrics.read_jsonl(path)[-1]["linear_full_top1"] == out["linear_full_top1"]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # semi_lr 1e50 is inf in float32: the point
def test_eval_errors_in_one_line_and_knn_uses_the_whole_training_set(smoke_run, capsys, tmp_path, monkeypatch):
    """A diverged fine-tuning raised FloatingPointError, which `ssl-jax eval` printed as a traceback. And `eval
    --protocol knn` took its bank from the monitor's eval.knn_train_examples (100,000 of ImageNet's 1.28M in the
    imagenet preset), so the run's final `knn_top1` was a smaller-bank kNN than the published protocol's."""
    capsys.readouterr()
    code = cli.main(["eval", "--workdir", smoke_run, "--protocol", "semi10", "--no-progress",
                     "--config.eval.semi_lr=1e50", "--config.eval.semi10_epochs=2"])
    err = capsys.readouterr().err
    assert code == 2 and "error: non-finite fine-tuning loss in epoch" in err and "Traceback" not in err

    workdir = str(tmp_path / "run")  # the smoke run with a monitor that draws 40 of its 512 training examples
    shutil.copytree(smoke_run, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    config["eval"]["knn_train_examples"] = 40
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    limits, features = [], protocols.features

    def recording(setup, state, source, limit=0, progress=False):
        limits.append(limit)
        return features(setup, state, source, limit, progress)

    monkeypatch.setattr(protocols, "features", recording)
    _, err = _eval(capsys, workdir, "knn")
    assert limits == [0, 0] and "a bank of 512 of the 512 training examples" in err  # train bank, test set
    _, err = _eval(capsys, workdir, "knn", "--config.eval.knn_train_examples=40")  # asked for on the command line
    assert limits[2:] == [40, 0] and "a bank of 40 of the 512 training examples" in err
    setup = train_lib.build(config_lib.from_json_file(os.path.join(workdir, "config.json")))
    protocols.monitor(setup, train_lib.initial_state(setup))  # the monitor keeps its draw
    assert limits[4:] == [40, 0]


def test_eval_step_evaluates_an_earlier_checkpoint(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert cli.main(["train", "--config", SMOKE, "--workdir", workdir, "--no-progress", "--config.num_epochs=2",
                     "--config.optim.warmup_epochs=0", "--config.eval.knn_every_epochs=0",
                     "--config.checkpoint.every_epochs=1"]) == 0
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(steps) == 2
    errs = [_eval(capsys, workdir, "knn", "--step", str(s))[1] for s in steps]  # the step restored is the state's
    assert f"evaluating step {steps[0]} of" in errs[0] and f"evaluating step {steps[1]} of" in errs[1]
    records = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("protocol") == "knn"]
    assert [r["step"] for r in records] == steps
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", workdir, "--protocol", "knn", "--step", "3", "--no-progress"]) == 2
    assert f"has no checkpoint of step 3 (it has: {steps[0]}, {steps[1]};" in capsys.readouterr().err


def test_knn_train_examples_are_drawn_from_every_class_and_read_lazily():
    """eval.knn_train_examples (100,000 in the imagenet preset) took the *first* examples: an ImageFolder is
    sorted by class, so ImageNet's kNN monitor saw 78 of 1000 classes. They are now a fixed random draw, with the
    features the whole set gives those examples."""
    config = config_lib.load_config(SMOKE, ["data.num_examples=256"])
    setup = train_lib.build(config)
    state = train_lib.initial_state(setup)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 64).astype(np.int32)  # sorted by class, as an ImageFolder is
    source = data.Source(rng.integers(0, 256, (256, 16, 16, 3), dtype=np.uint8), labels, list("abcd"), "sorted")
    all_x, all_y = protocols.features(setup, state, source)
    sub_x, sub_y = protocols.features(setup, state, source, limit=40)
    assert len(sub_y) == 40 and set(sub_y.tolist()) == {0, 1, 2, 3}
    again_x, again_y = protocols.features(setup, state, source, limit=40)
    np.testing.assert_array_equal(again_y, sub_y)  # the same draw every time
    np.testing.assert_array_equal(again_x, sub_x)
    # Each drawn example has the features (and label) it has in the whole set.
    rows = [int(np.flatnonzero((all_x == x).all(axis=1))[0]) for x in sub_x]
    assert rows == sorted(rows) and len(set(rows)) == 40
    np.testing.assert_array_equal(all_y[rows], sub_y)


def test_fewshot_warns_of_each_shot_count_some_class_is_short_of():
    labels = np.array([0] * 30 + [1] * 8 + [2] * 30)
    warnings = fewshot.short_classes_warnings(labels, (5, 10, 25, 40, 10), 3)
    assert [w.split(":")[1].strip() for w in warnings] == ["fewshot_10shot_top1", "fewshot_25shot_top1",
                                                           "fewshot_40shot_top1"]
    assert "1 of 3 classes have fewer than 10" in warnings[0] and "3 of 3 classes have fewer than 40" in warnings[2]
    # a class with no training example at all counts as short
    assert "1 of 4 classes" in fewshot.short_classes_warnings(labels, (1,), 4)[0]
