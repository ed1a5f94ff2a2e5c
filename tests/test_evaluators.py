"""Evaluators: kNN, offline linear probe and feature extraction, against plain NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import metrics
from ssl_jax.evaluators import features, knn, linear


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _knn_scores_reference(train_NxD, train_labels_N, test_MxD, num_classes, k, temperature):
    """Plain float64 weighted kNN: cosine similarity, top-k, exp(sim / T) votes summed per class."""
    train = train_NxD.astype(np.float64)
    test = test_MxD.astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    sim_MxN = test @ train.T
    k = min(k, len(train))
    scores = np.zeros((len(test), num_classes))
    for i in range(len(test)):
        nearest = np.argsort(-sim_MxN[i])[:k]
        for j in nearest:
            scores[i, train_labels_N[j]] += np.exp(sim_MxN[i, j] / temperature)
    return scores


def _knn_data(seed=0, n=300, m=37, d=16, c=7):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n),
            rng.normal(size=(m, d)).astype(np.float32), rng.integers(0, c, m))


# ----------------------------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("k", [1, 20, 200, 1000])
@pytest.mark.parametrize("chunk_size", [1024, 8])
def test_knn_scores_match_numpy(k, chunk_size):
    tr, ytr, te, _ = _knn_data()
    got = np.asarray(knn.knn_predict(tr, ytr, te, 7, k=k, temperature=0.1, chunk_size=chunk_size))
    want = _knn_scores_reference(tr, ytr, te, 7, k, 0.1)
    assert got.shape == (37, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_knn_k_larger_than_bank_clamps_to_bank_size():
    tr, ytr, te, _ = _knn_data()
    np.testing.assert_allclose(np.asarray(knn.knn_predict(tr, ytr, te, 7, k=10_000)),
                               np.asarray(knn.knn_predict(tr, ytr, te, 7, k=300)), rtol=1e-6)
    # With every training row voting, each class's score is the sum over all its rows.
    want = _knn_scores_reference(tr, ytr, te, 7, 300, 0.1)
    np.testing.assert_allclose(np.asarray(knn.knn_predict(tr, ytr, te, 7, k=10_000)), want, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1024, 4])
def test_knn_on_8_devices_matches_one_device(chunk_size):
    assert jax.device_count() == 8
    tr, ytr, te, yte = _knn_data(seed=1)
    one = knn.knn_predict(tr, ytr, te, 7, k=20, chunk_size=chunk_size)
    eight = knn.knn_predict(tr, ytr, te, 7, k=20, chunk_size=chunk_size, mesh=_mesh())
    assert eight.shape == (37, 7)
    np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=1e-6)
    assert (knn.knn_accuracy(tr, ytr, te, yte, 7, k=20, mesh=_mesh())
            == knn.knn_accuracy(tr, ytr, te, yte, 7, k=20))


def test_knn_accuracy_top1_top5_match_numpy():
    tr, ytr, te, yte = _knn_data(seed=2, c=10)
    want = _knn_scores_reference(tr, ytr, te, 10, 20, 0.1)
    got = knn.knn_accuracy(tr, ytr, te, yte, 10, k=20)
    assert got["knn_top1"] == pytest.approx(np.mean(want.argmax(1) == yte))
    top5_M = np.argsort(-want, axis=1)[:, :5]
    voted_M = want[np.arange(len(yte)), yte] > 0
    assert got["knn_top5"] == pytest.approx(np.mean((top5_M == yte[:, None]).any(1) & voted_M))
    assert 0.0 <= got["knn_top1"] <= got["knn_top5"] <= 1.0


def test_knn_top5_ignores_classes_without_votes_and_needs_five_classes():
    tr, ytr, te, yte = _knn_data(seed=3, c=10)
    # With k=1 only one class gets a vote, so top-5 cannot credit unvoted (tied at zero) classes.
    got = knn.knn_accuracy(tr, ytr, te, yte, 10, k=1)
    assert got["knn_top5"] == got["knn_top1"]
    assert set(knn.knn_accuracy(tr, ytr % 4, te, yte % 4, 4)) == {"knn_top1"}
    # Hand-made case: test row 0 lies on training row 0 (class 2), so its top-1 is class 2.
    bank = np.eye(3, dtype=np.float32)
    got = knn.knn_accuracy(bank, np.array([2, 0, 1]), bank[:1] + 0.01, np.array([2]), 3, k=1)
    assert got == {"knn_top1": 1.0}


def test_knn_accuracy_breaks_ties_as_argmax_so_a_collapsed_representation_scores_chance():
    """A collapsed encoder (every image the same feature, e.g. all zeros) gives every class of a balanced bank the
    same score. Counting the true class as predicted when no class scores *higher* credited all tied classes at
    once: kNN top-1 and top-5 of 100% for a representation that carries nothing."""
    rng = np.random.default_rng(4)
    y_tr, y_te = np.arange(400) % 10, rng.integers(0, 10, 100)
    for feature in (np.zeros, np.ones):
        got = knn.knn_accuracy(feature((400, 16), np.float32), y_tr, feature((100, 16), np.float32), y_te, 10, k=400)
        # Ties go to the lowest class index, as argmax (and top_k) break them: class 0 is predicted everywhere.
        assert got["knn_top1"] == pytest.approx(np.mean(y_te == 0))
        assert got["knn_top5"] == pytest.approx(np.mean(y_te < 5))


def _knn_argmax_reference_log(train_NxD, train_labels_N, test_MxD, num_classes, k, temperature):
    """Returns the float64 weighted-kNN prediction, the class scores summed in log space (no overflow)."""
    train = train_NxD / np.linalg.norm(train_NxD, axis=1, keepdims=True)
    test = test_MxD / np.linalg.norm(test_MxD, axis=1, keepdims=True)
    sim_MxN = test.astype(np.float64) @ train.astype(np.float64).T
    out = []
    for i in range(len(test)):
        nearest = np.argsort(-sim_MxN[i])[:k]
        log_scores = np.full(num_classes, -np.inf)
        for j in nearest:
            log_scores[train_labels_N[j]] = np.logaddexp(log_scores[train_labels_N[j]], sim_MxN[i, j] / temperature)
        out.append(log_scores.argmax())
    return np.asarray(out)


def test_knn_accuracy_at_a_small_temperature_does_not_overflow_into_ties():
    """exp(sim / T) is inf in float32 from sim / T > 88: at T = 0.005 every neighbour closer than 0.45 voted inf,
    the classes they voted for tied at inf, and all of them counted as correct (78% on random labels)."""
    tr, ytr, te, yte = _knn_data(seed=5, n=400, m=100, c=10)
    want = _knn_argmax_reference_log(tr, ytr, te, 10, 200, 0.005)
    got = knn.knn_accuracy(tr, ytr, te, yte, 10, k=200, temperature=0.005)
    assert got["knn_top1"] == pytest.approx(np.mean(want == yte))
    assert got["knn_top1"] < 0.3  # random labels: chance is 0.1
    # The documented scores (exp(cos / T)) rank as the relative ones at a temperature where neither overflows.
    plain = np.asarray(knn.knn_predict(tr, ytr, te, 10, k=50, temperature=0.1))
    relative = np.asarray(knn.knn_predict(tr, ytr, te, 10, k=50, temperature=0.1, relative=True))
    np.testing.assert_array_equal(plain.argmax(1), relative.argmax(1))
    np.testing.assert_allclose(relative / relative.max(1, keepdims=True), plain / plain.max(1, keepdims=True),
                               rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------- linear probe
def _blobs(rng, n, centers_CxD, noise):
    labels = rng.integers(0, len(centers_CxD), n)
    noise_NxD = noise * rng.normal(size=(n, centers_CxD.shape[1]))
    return (centers_CxD[labels] + noise_NxD).astype(np.float32), labels


def test_linear_separable_blobs_reach_high_accuracy_despite_scale_and_offset():
    rng = np.random.default_rng(0)
    centers = 5.0 * rng.normal(size=(10, 32))
    x_tr, y_tr = _blobs(rng, 2000, centers, 1.0)
    x_te, y_te = _blobs(rng, 500, centers, 1.0)
    # Standardisation must undo a large offset and scale that would stall unnormalised SGD at lr 0.1.
    got = linear.train_linear(x_tr * 300 + 1000, y_tr, x_te * 300 + 1000, y_te, 10, epochs=10, batch_size=256)
    assert set(got) == {"linear_top1", "linear_top5", "linear_train_top1"}
    assert got["linear_top1"] >= 0.98
    assert got["linear_top5"] >= got["linear_top1"]


def _numpy_logistic_regression_accuracy(x_tr, y_tr, x_te, y_te, num_classes, steps=300, lr=1.0):
    """Full-batch gradient descent on standardised features; returns test accuracy."""
    mean, std = x_tr.mean(0), x_tr.std(0)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    w, b = np.zeros((x_tr.shape[1], num_classes)), np.zeros(num_classes)
    onehot = np.eye(num_classes)[y_tr]
    for _ in range(steps):
        logits = x_tr @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x_tr)
        w -= lr * x_tr.T @ g
        b -= lr * g.sum(0)
    return np.mean((x_te @ w + b).argmax(1) == y_te)


def test_linear_matches_numpy_logistic_regression_on_overlapping_blobs():
    rng = np.random.default_rng(1)
    centers = 0.3 * rng.normal(size=(10, 32))
    x_tr, y_tr = _blobs(rng, 1500, centers, 1.0)
    x_te, y_te = _blobs(rng, 1000, centers, 1.0)
    want = _numpy_logistic_regression_accuracy(x_tr, y_tr, x_te, y_te, 10)
    got = linear.train_linear(x_tr, y_tr, x_te, y_te, 10, epochs=20, batch_size=256)
    assert 0.3 < want < 0.95  # a problem where the classifier's quality shows
    assert abs(got["linear_top1"] - want) < 0.02


def test_linear_random_labels_fit_train_not_test_and_weight_decay_spares_bias():
    rng = np.random.default_rng(2)
    x_tr, x_te = rng.normal(size=(128, 64)).astype(np.float32), rng.normal(size=(512, 64)).astype(np.float32)
    y_tr, y_te = rng.integers(0, 4, 128), rng.integers(0, 4, 512)
    free = linear.train_linear(x_tr, y_tr, x_te, y_te, 4, epochs=30, batch_size=32)
    assert set(free) == {"linear_top1", "linear_train_top1"}  # no top-5 with 4 classes
    assert free["linear_train_top1"] > 0.9 and free["linear_top1"] < 0.35
    # Strong decay flattens the weights; the undecayed bias then predicts the majority class everywhere.
    decayed = linear.train_linear(x_tr, y_tr, x_te, y_te, 4, epochs=30, batch_size=32, weight_decay=10.0)
    assert decayed["linear_train_top1"] == pytest.approx(np.bincount(y_tr).max() / len(y_tr), abs=0.02)
    assert decayed["linear_top1"] == pytest.approx(np.mean(y_te == np.bincount(y_tr).argmax()), abs=0.02)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # lr 1e50 is inf in float32: the point
def test_linear_non_finite_classifier_is_an_error_not_a_chance_level_result():
    """A learning rate that overflows float32 left NaN weights; top_k of NaN logits picks the first classes, and a
    chance-like 'linear_top1' was reported as if measured."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(256, 16)).astype(np.float32), rng.integers(0, 10, 256)
    with pytest.raises(ValueError, match="not finite after 2 epochs .*lower learning rate"):
        linear.train_linear(x, y, x[:50], y[:50], 10, epochs=2, batch_size=64, lr=1e50)
    bad = x.copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="features hold NaN or inf"):
        linear.train_linear(bad, y, x[:50], y[:50], 10, epochs=1, batch_size=64)


# ------------------------------------------------------------------------------- feature extraction
def test_extract_features_drops_padding_and_matches_numpy_on_8_devices():
    mesh = _mesh()
    rng = np.random.default_rng(0)
    n, batch = 37, 16
    images = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)

    def batches():
        for start in range(0, n, batch):
            imgs, labs = images[start:start + batch], labels[start:start + batch]
            valid = np.arange(batch) < len(imgs)
            pad = batch - len(imgs)
            # Padding rows carry garbage so a leak into the output would show.
            yield (np.concatenate([imgs, np.full((pad, 4, 4, 3), 255, np.uint8)]),
                   np.concatenate([labs, np.full(pad, -1)]), valid)

    seen_shardings = []

    @jax.jit
    def encode(images_BxHxWx3):
        seen_shardings.append(images_BxHxWx3.shape)
        return images_BxHxWx3.astype(jnp.float32).mean(axis=(1, 2))

    feats, labs = features.extract_features(encode, batches(), mesh, progress=False)
    assert feats.dtype == np.float32 and labs.dtype == np.int32
    assert feats.shape == (n, 3)
    np.testing.assert_allclose(feats, images.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(labs, labels)
    assert len(seen_shardings) == 1  # traced once: the static batch shape means one compilation

    # A plain (unjitted) encoder is called as given and gives the same features.
    plain = lambda x: x.astype(jnp.float32).mean(axis=(1, 2))
    feats2, _ = features.extract_features(plain, batches(), mesh, progress=False)
    np.testing.assert_array_equal(feats2, feats)


def test_extract_features_closes_its_batches_when_encoding_fails(monkeypatch, capsys):
    # eval_batches holds a pool of decode worker processes until the generator is closed: an error midway (here
    # the encoder's; a device OOM, Ctrl-C) must not leave them running as long as its traceback is kept. A shown
    # progress bar (tqdm iterates with a plain for loop then) did not pass the close on.
    monkeypatch.setattr(metrics, "_show_progress", True)
    closed = []

    def batches():
        try:
            while True:
                yield np.zeros((8, 4, 4, 3), np.uint8), np.zeros(8, np.int32), np.ones(8, bool)
        finally:
            closed.append(True)

    def failing(images_BxHxWx3):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory") as e:
        features.extract_features(failing, batches(), _mesh(), progress=True)
    assert closed == [True] and e.value.__traceback__ is not None


def test_shard_batch_splits_over_devices_and_rejects_uneven_batches():
    mesh = _mesh()
    x = features.shard_batch(np.arange(16 * 2).reshape(16, 2), mesh)
    assert len(x.addressable_shards) == 8
    assert all(s.data.shape == (2, 2) for s in x.addressable_shards)
    with pytest.raises(ValueError, match="divisible"):
        features.shard_batch(np.zeros((12, 2)), mesh)
