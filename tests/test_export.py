"""Backbone export: npz/safetensors round-trip exactly, torchvision names and shapes, and torch feature parity."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import augment, checkpoint, cli, config as config_lib, data, export, models, train

STEP = 7


def _assert_trees_equal(actual, expected):
    """Same nesting, keys, dtypes and values, bit for bit."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke SimCLR run directory with one checkpoint (step 7) whose BatchNorm statistics are not the init."""
    config = config_lib.load_config("configs/simclr.py:smoke", ["batch_size=16"])
    rs = np.random.RandomState(0)
    source = data.Source(rs.randint(0, 256, (32, 16, 16, 3)).astype(np.uint8),
                         (np.arange(32) % 4).astype(np.int32), list("abcd"), "t")
    setup = train.build(config, source)
    state = train.initial_state(setup)
    stats = jax.tree.map(lambda x: jnp.asarray(rs.uniform(0.5, 2.0, x.shape), x.dtype), state["batch_stats"])
    state = {**state, "batch_stats": stats}
    workdir = str(tmp_path_factory.mktemp("run"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    manager = checkpoint.make_manager(workdir, async_save=False)
    checkpoint.save(manager, STEP, state, force=True)
    manager.close()
    backbone = jax.device_get((state["params"]["model"]["backbone"], state["batch_stats"]["backbone"]))
    return workdir, config, backbone


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_flat_formats_round_trip_exactly_with_a_sidecar(run, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    workdir, config, (params, batch_stats) = run
    path = export.export_workdir(workdir, fmt)
    assert path == os.path.join(workdir, "export", f"backbone.{fmt}") and os.path.isfile(path)
    loaded_params, loaded_stats = export.load_backbone(path)
    _assert_trees_equal(loaded_params, params)
    _assert_trees_equal(loaded_stats, batch_stats)
    assert float(np.max(loaded_stats["bn1"]["var"])) > 1.0  # the checkpoint's statistics, not the init's ones
    # The loaded trees drop into a fresh state for fine-tuning: same structure as the method's own init.
    fresh_params, fresh_stats, _ = jax.eval_shape(lambda: train.get_method(config).init(
        jax.random.PRNGKey(1), config, np.zeros((1, 16, 16, 3), np.uint8)))
    assert jax.tree.structure(loaded_params) == jax.tree.structure(fresh_params["backbone"])
    assert jax.tree.structure(loaded_stats) == jax.tree.structure(fresh_stats["backbone"])
    # Flat '/'-joined keys, flax layouts (HWIO kernels).
    if fmt == "npz":
        with np.load(path) as f:
            keys = set(f.files)
            assert f["params/layer2_0/downsample_conv/kernel"].shape == (1, 1, 8, 16)
    else:
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        keys = set(load_file(path))
    assert "batch_stats/layer1_0/bn2/var" in keys and "params/bn1/scale" in keys
    assert len(keys) == len(jax.tree.leaves(params)) + len(jax.tree.leaves(batch_stats))
    info = json.load(open(path + ".json"))
    assert info["format"] == fmt and info["method"] == "simclr" and info["step"] == STEP
    assert info["model"] == {"name": "tiny", "width_multiplier": 1, "cifar_stem": True, "sk_ratio": 0.0,
                             "stem_relu": True, "project_first_block": False, "feature_dim": 16,
                             "torchvision_arch": None}
    assert info["input"]["size"] == 16 and info["input"]["channels"] == 3 and info["input"]["layout"] == "NHWC"
    np.testing.assert_allclose(info["input"]["mean"], config.augment.mean)
    np.testing.assert_allclose(info["input"]["std"], config.augment.std)


@pytest.mark.parametrize("fmt", ["npz", "torch"])
def test_load_model_gives_the_runs_own_evaluation_features(run, fmt, tmp_path):
    if fmt == "torch":
        pytest.importorskip("torch")
    workdir, config, (params, batch_stats) = run
    path = export.export_workdir(workdir, fmt, str(tmp_path / f"b{export.EXTENSIONS[fmt]}"))
    module, variables, info = export.load_model(path)
    images = np.random.RandomState(1).randint(0, 256, (6, 20, 20, 3)).astype(np.uint8)
    x = augment.center_view(images, info["input"]["size"], info["input"]["mean"], info["input"]["std"])
    got = module.apply(variables, x, train=False)
    state = {"params": {"model": {"backbone": params}}, "batch_stats": {"backbone": batch_stats}}
    expected = train.get_method(config).encode(state["params"]["model"], state["batch_stats"],
                                               augment.center_view(images, 16, config.augment.mean,
                                                                   config.augment.std), config)
    assert got.shape == (6, info["model"]["feature_dim"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    os.remove(path + ".json")
    with pytest.raises(FileNotFoundError, match="builds the network from the sidecar"):
        export.load_model(path)


def test_cli_export_writes_to_out_and_prints_the_path(run, tmp_path, capsys):
    workdir, _, (params, _) = run
    out = str(tmp_path / "weights" / "mine.npz")
    assert cli.main(["export", "--workdir", workdir, "--format", "npz", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"path": out}
    _assert_trees_equal(export.load_backbone(out)[0], params)
    assert json.load(open(out + ".json"))["step"] == STEP


def test_clear_errors(run, tmp_path, monkeypatch):
    workdir, _, _ = run
    with pytest.raises(ValueError, match="unknown export format"):
        export.export_workdir(workdir, "onnx")
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export.export_workdir(str(tmp_path), "npz")
    (tmp_path / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export.export_workdir(str(tmp_path), "npz")
    with pytest.raises(ValueError, match="cannot tell the format"):
        export.load_backbone(str(tmp_path / "w.h5"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(export.MissingDependencyError, match="pip install torch") as e:
        export.export_workdir(workdir, "torch", str(tmp_path / "w.pt"))
    assert isinstance(e.value, ValueError)  # the CLI reports ValueErrors as one line, no traceback


def test_out_must_end_in_the_formats_extension(run, tmp_path, capsys):
    workdir, _, _ = run
    out = tmp_path / "w.safetensors"
    assert cli.main(["export", "--workdir", workdir, "--format", "npz", "--out", str(out)]) == 2
    assert f"the npz export {out} must end in .npz" in capsys.readouterr().err and not os.listdir(tmp_path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "torch"])
def test_export_files_get_the_umasks_mode_and_replace_an_earlier_export_only_when_complete(run, tmp_path,
                                                                                            monkeypatch, fmt):
    pytest.importorskip({"npz": "numpy", "safetensors": "safetensors", "torch": "torch"}[fmt])
    workdir, _, (params, _) = run
    path = str(tmp_path / f"backbone{export.EXTENSIONS[fmt]}")
    old_umask = os.umask(0o027)
    try:
        export.export_workdir(workdir, fmt, path)
    finally:
        os.umask(old_umask)
    for written in (path, path + ".json"):  # as open() makes them under umask 027: group-readable, not private
        assert os.stat(written).st_mode & 0o777 == 0o640, written
    before = {p: open(p, "rb").read() for p in (path, path + ".json")}

    def fail(*args, **kwargs):  # the disk fills up halfway through the weights
        with open(args[2], "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_writer", lambda fmt: fail)
    with pytest.raises(OSError, match="No space left"):
        export.write_backbone(params, {}, fmt, path, {"step": 99})
    assert {p: open(p, "rb").read() for p in before} == before  # the earlier export, whole
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in before)  # no temporary left


def _random_backbone(name, cifar_stem, rs, stem_relu=True, project_first_block=False):
    """Returns (module, params, batch_stats) shaped like `name`, every leaf random (numpy, no compute)."""
    model, _ = models.get_backbone(name, cifar_stem=cifar_stem, stem_relu=stem_relu,
                                   project_first_block=project_first_block)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    leaf = lambda s: rs.standard_normal(s.shape).astype(s.dtype)  # noqa: E731
    return model, jax.tree.map(leaf, shapes["params"]), jax.tree.map(leaf, shapes["batch_stats"])


def test_torch_names_and_shapes_follow_torchvision_resnet50_and_invert_exactly():
    """Runs without torch: the state_dict is built in NumPy."""
    _, params, stats = _random_backbone("resnet50", False, np.random.RandomState(0))
    state_dict = export.torch_state_dict(params, stats, num_batches_tracked=5)
    # torchvision resnet50's state_dict has 320 entries; fc.weight and fc.bias are not exported.
    assert len(state_dict) == 318 and not any(k.startswith("fc.") for k in state_dict)
    expected_shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,),
                       "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                       "layer3.0.conv2.weight": (256, 256, 3, 3), "layer3.0.downsample.1.bias": (1024,),
                       "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.2.bn3.running_mean": (2048,),
                       "layer4.2.bn3.num_batches_tracked": ()}
    for key, shape in expected_shapes.items():
        assert state_dict[key].shape == shape, key
    assert state_dict["layer4.2.bn3.num_batches_tracked"] == 5
    assert state_dict["layer4.2.bn3.num_batches_tracked"].dtype == np.int64
    # HWIO -> OIHW, checked on one element: torch weight[o, i, h, w] is flax kernel[h, w, i, o].
    assert state_dict["layer3.0.conv2.weight"][5, 7, 2, 1] == params["layer3_0"]["conv2"]["kernel"][2, 1, 7, 5]
    np.testing.assert_array_equal(state_dict["layer2.0.downsample.1.running_var"],
                                  stats["layer2_0"]["downsample_bn"]["var"])
    back_params, back_stats = export.from_torch_state_dict(state_dict)
    _assert_trees_equal(back_params, params)
    _assert_trees_equal(back_stats, stats)


@pytest.mark.parametrize("name", ["resnet50", "resnet34"])
def test_torch_names_shapes_and_dtypes_equal_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    _, params, stats = _random_backbone(name, False, np.random.RandomState(0))
    exported = export.torch_state_dict(params, stats)
    reference = getattr(torchvision.models, name)().state_dict()
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in reference.items() if not k.startswith("fc.")} == {
        k: (v.shape, f"torch.{v.dtype}") for k, v in exported.items()}


def _trained_resnet18(cifar_stem, images_BxHxWx3, stem_relu=True, project_first_block=False):
    """Returns (module, params, batch_stats): random BN affine, running statistics from a few train passes."""
    rs = np.random.RandomState(1)
    model, params, _ = _random_backbone("resnet18", cifar_stem, rs, stem_relu, project_first_block)
    variables = model.init(jax.random.PRNGKey(0), images_BxHxWx3[:1], train=False)
    # Random BN scale/bias (zero-init residual scales would hide the residual branches), He-init convs.
    params = jax.tree.map_with_path(
        lambda path, init, rand: init if path[-1].key == "kernel" else
        (rand * 0.2 + (1.0 if path[-1].key == "scale" else 0.0)).astype(np.float32),
        variables["params"], params)

    @jax.jit
    def update(batch_stats, x):
        _, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return new["batch_stats"]

    stats = variables["batch_stats"]
    for i in range(4):
        stats = update(stats, images_BxHxWx3 * (1.0 + 0.2 * i))
    # ...then moved off the batch statistics, so eval mode differs from a train-mode forward.
    stats = jax.tree.map_with_path(
        lambda path, x: (x + 0.1 * rs.standard_normal(x.shape) if path[-1].key == "mean"
                         else x * np.exp(0.3 * rs.standard_normal(x.shape))).astype(np.float32),
        jax.device_get(stats))
    return model, jax.device_get(params), stats


@pytest.mark.parametrize("cifar_stem, stem_relu, project", [
    (False, True, False), (True, True, False), (True, False, False), (True, True, True)],
    ids=["imagenet_stem", "cifar_stem", "cifar_stem_without_relu", "simclr_v2_projecting_stage_1"])
def test_torchvision_resnet18_reproduces_the_jax_features(tmp_path, cifar_stem, stem_relu, project):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    size = 32 if cifar_stem else 64
    images = np.random.RandomState(2).standard_normal((4, size, size, 3)).astype(np.float32)
    model, params, stats = _trained_resnet18(cifar_stem, images, stem_relu, project)
    assert np.abs(stats["bn1"]["mean"]).max() > 0.01 and np.abs(stats["bn1"]["var"] - 1).max() > 0.01
    features_jax = np.asarray(model.apply({"params": params, "batch_stats": stats}, images, train=False))

    path = str(tmp_path / "backbone.pt")
    export.write_backbone(params, stats, "torch", path, {"step": 4})
    if project:  # SimCLR v2's preset (model.project_first_block): the sidecar's torch_setup, run as written
        info = export.describe(config_lib.load_config("configs/simclr_v2.py:cifar10"), 4, params, "torch")
        assert "model.layer1[0].downsample = " in info["torch_setup"] and info["model"]["project_first_block"]
        scope = {"torch": torch, "torchvision": torchvision, "path": path}
        exec(info["torch_setup"], scope)  # pylint: disable=exec-used
        net = scope["model"]
    else:
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()
        if cifar_stem:
            net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = torch.nn.Identity()
        if not stem_relu:  # as describe()'s torch_setup says
            net.relu = torch.nn.Identity()
        net.load_state_dict(torch.load(path), strict=True)
        net.eval()
    with torch.no_grad():
        features_torch = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert features_torch.shape == features_jax.shape == (4, 512)
    max_abs = float(np.max(np.abs(features_torch - features_jax)))
    print(f"resnet18 {'cifar' if cifar_stem else 'imagenet'} stem (ReLU {stem_relu}): "
          f"max |torch - jax| = {max_abs:.3g} "
          f"(features up to {np.abs(features_jax).max():.3g})")
    assert max_abs < 1e-3 and np.abs(features_jax).max() > 0.1
    back_params, back_stats = export.load_backbone(path)  # .pt back into flax trees, exactly
    _assert_trees_equal(back_params, params)
    _assert_trees_equal(back_stats, stats)


def test_sk_resnet_exports_under_torchvision_style_names_and_says_it_has_no_torchvision_model():
    model, _ = models.get_backbone("resnet50", sk_ratio=0.0625)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    rs = np.random.RandomState(0)
    params, stats = (jax.tree.map(lambda s: rs.standard_normal(s.shape).astype(s.dtype), shapes[k])
                     for k in ("params", "batch_stats"))
    state_dict = export.torch_state_dict(params, stats)
    assert state_dict["conv1b.weight"].shape == (32, 32, 3, 3) and state_dict["layer1.0.conv2.weight"].shape == (
        128, 64, 3, 3)  # the two streams' 3x3 conv has 2 x 64 outputs
    assert state_dict["layer3.5.sk_expand.weight"].shape == (512, 32, 1, 1)
    assert state_dict["layer4.2.sk_bn.running_var"].shape == (32,)
    back_params, back_stats = export.from_torch_state_dict(state_dict)
    _assert_trees_equal(back_params, params)
    _assert_trees_equal(back_stats, stats)
    config = config_lib.load_config("configs/simclr_v2.py:imagenet", ["model.sk_ratio=0.0625"])
    info = export.describe(config, 7, params, "torch")
    assert info["model"]["torchvision_arch"] is None and info["model"]["sk_ratio"] == 0.0625
    assert "<build by hand>" in info["torch_setup"] and info["input"]["channels"] == 3
    config.model.sk_ratio = 0.0
    assert export.describe(config, 7, params, "torch")["model"]["torchvision_arch"] == "resnet50"


def test_sidecar_says_how_to_drop_the_stem_relu_in_torchvision():
    _, params, _ = _random_backbone("resnet18", True, np.random.RandomState(0))
    for stem_relu in (True, False):
        config = config_lib.load_config("configs/simclr.py:cifar10", [f"model.stem_relu={stem_relu}"])
        info = export.describe(config, 7, params, "torch")
        assert info["model"]["stem_relu"] is stem_relu and info["model"]["torchvision_arch"] == "resnet18"
        assert ("model.relu = torch.nn.Identity()" in info["torch_setup"]) is (not stem_relu)


def _copy_of_run(workdir, tmp_path):
    """Returns (tmp_path/run holding `workdir`'s config.json and no checkpoint, the state of its step STEP)."""
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    source_manager = checkpoint.make_manager(workdir, async_save=False)
    state = source_manager.restore(STEP)
    source_manager.close()
    return copy, state


def test_exporting_a_run_still_training_reads_the_newest_checkpoint_when_the_listed_one_is_deleted(
        run, tmp_path, monkeypatch):
    """The run saves newer checkpoints and deletes the one the export listed before it was read: the export
    lists again and reads the newest, instead of failing."""
    workdir, config, backbone = run
    copy, state = _copy_of_run(workdir, tmp_path)
    writer = checkpoint.make_manager(str(copy), max_to_keep=1, async_save=False)
    checkpoint.save(writer, STEP, state, force=True)
    original, calls = export._restore_backbone_at, []  # pylint: disable=protected-access

    def racing(manager, step):
        calls.append(step)
        if len(calls) == 1:  # the training run saves step STEP + 1 and deletes step STEP meanwhile
            checkpoint.save(writer, STEP + 1, state, force=True)
        return original(manager, step)

    monkeypatch.setattr(export, "_restore_backbone_at", racing)
    _, step, params, batch_stats = export.restore_backbone(str(copy))
    writer.close()
    assert calls == [STEP, STEP + 1] and step == STEP + 1
    _assert_trees_equal((params, batch_stats), backbone)


def test_exporting_a_run_whose_newest_checkpoint_is_damaged_exports_the_previous_one_with_a_warning(run, tmp_path):
    """As `ssl-jax eval` does: one damaged save (a truncated copy, a bad sector) does not stop the export; the
    warning and the sidecar's step say which checkpoint was exported. The run's files are left as they were."""
    from test_checkpoint import damage_checkpoint  # pylint: disable=import-outside-toplevel
    workdir, _, backbone = run
    copy, state = _copy_of_run(workdir, tmp_path)
    writer = checkpoint.make_manager(str(copy), max_to_keep=2, async_save=False)
    for step in (STEP, STEP + 1):
        checkpoint.save(writer, step, state, force=True)
    writer.close()
    ckpt_dir = checkpoint.checkpoint_dir(str(copy))
    damage_checkpoint(os.path.join(ckpt_dir, str(STEP + 1)))
    with pytest.warns(RuntimeWarning, match=f"step {STEP + 1} .* could not be read"):
        path = export.export_workdir(str(copy), "npz")
    assert json.load(open(path + ".json"))["step"] == STEP
    _assert_trees_equal(export.load_backbone(path), backbone)
    assert sorted(os.listdir(ckpt_dir)) == [str(STEP), str(STEP + 1)]  # a reader sets nothing aside
