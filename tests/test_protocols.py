"""Few-shot, semi-supervised and full linear protocols: subsets, the ridge probe, fine-tuning, `ssl-jax eval`."""
import json
import os

import jax
import numpy as np
import pytest

from ssl_jax import cli, config as config_lib, metrics, train as train_lib
from ssl_jax.data import synthetic
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


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("protocols"))
    assert cli.main(["train", "--config", SMOKE, "--workdir", workdir, "--no-progress",
                     "--config.num_epochs=1", "--config.optim.warmup_epochs=0",
                     "--config.eval.knn_every_epochs=0"]) == 0
    return workdir


def _eval(capsys, workdir, protocol, *overrides):
    capsys.readouterr()
    code = cli.main(["eval", "--workdir", workdir, "--protocol", protocol, "--no-progress", *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_eval_fewshot_semi_and_linear_full_append_results(smoke_run, capsys, tmp_path):
    workdir = smoke_run
    path = os.path.join(workdir, "metrics.jsonl")

    out, _ = _eval(capsys, workdir, "fewshot", "--config.eval.fewshot_shots=(1,5)")
    assert set(out) >= {"fewshot_1shot_top1", "fewshot_5shot_top1"} and out["step"] == 8
    assert metrics.read_jsonl(path)[-1]["fewshot_5shot_top1"] == out["fewshot_5shot_top1"]

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
    (tmp_path / "other.txt").write_text("1\n2\n3\n")  # a given list wins over the drawn one
    with config.eval.unlocked():
        config.eval.semi_subset_file = str(tmp_path / "other.txt")
    assert protocols.semi_subset(config, workdir, synthetic.make_synthetic(512, 4), 10)[0].tolist() == [1, 2, 3]

    out, _ = _eval(capsys, workdir, "linear_full", "--config.eval.linear_epochs=1",
                   "--config.eval.linear_batch_size=64")
    assert np.isfinite(out["linear_full_top1"]) and "linear_full_top5" not in out  # 4 classes: no top-5
    assert metrics.read_jsonl(path)[-1]["linear_full_top1"] == out["linear_full_top1"]
