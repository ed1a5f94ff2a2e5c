"""`ssl-jax bench` and what makes a step fast: FLOP counts, peak table, compile-once, the PyTorch baseline."""
import collections
import importlib.util
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import bench, bench_torch, cli, config as config_lib, flops, models, train
from ssl_jax.methods import moco, simclr

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def _smoke(*overrides):
    return config_lib.load_config("configs/simclr.py:smoke", [
        "data.num_examples=128", "batch_size=32", "log_every_steps=2", *overrides])


def _count_traces(monkeypatch):
    """Returns the list that gets one entry (the axis_name) each time simclr.loss is traced."""
    traces, original = [], simclr.loss

    def counted(*args, **kwargs):
        traces.append(kwargs.get("axis_name"))
        return original(*args, **kwargs)

    monkeypatch.setattr(simclr, "loss", counted)
    return traces


def _compiles(caplog):
    """Returns {function name: number of XLA compilations} logged so far under jax.log_compiles()."""
    names = re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)
    return collections.Counter(names)


# --------------------------------------------------------------------------------- FLOPs and the peak table
def test_peak_table_by_device_kind():
    expected = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
                "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "TPU v4": 275.0,
                "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v4 lite": None, "cpu": None,
                "NVIDIA GeForce RTX 4090": None}
    assert {kind: flops.peak_tflops(kind) for kind in expected} == expected


def _conv_macs(size, k, c_in, c_out, stride=1):
    out = size // stride
    return out * out * k * k * c_in * c_out


def test_matmul_flops_counts_convs_and_dense_layers_like_a_hand_count():
    # The tiny ResNet (CIFAR stem) at 16x16, counted layer by layer: stem, layer1_0 (8 -> 8), layer2_0 (8 -> 16,
    # stride 2, with a 1x1 downsample).
    model, _ = models.get_backbone("tiny", cifar_stem=True)
    x = jax.ShapeDtypeStruct((5, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    macs = (_conv_macs(16, 3, 3, 8) + 2 * _conv_macs(16, 3, 8, 8)
            + _conv_macs(16, 3, 8, 16, 2) + _conv_macs(8, 3, 16, 16) + _conv_macs(16, 1, 8, 16, 2))
    assert flops.matmul_flops(jaxpr) == 2 * 5 * macs

    # dot_general, a scan body counted `length` times, the costlier branch of a cond.
    def f(a_4x6, b_6x3, flag):
        c = a_4x6 @ b_6x3
        c, _ = jax.lax.scan(lambda carry, _: (carry @ jnp.ones((3, 3)), None), c, None, length=5)
        return jax.lax.cond(flag, lambda c: c @ jnp.ones((3, 7)), lambda c: c[:, :1] * 2 @ jnp.ones((1, 7)), c)
    jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 6)), jnp.ones((6, 3)), True)
    assert flops.matmul_flops(jaxpr) == 2 * (4 * 6 * 3 + 5 * 4 * 3 * 3 + 4 * 3 * 7)


def test_resnet50_forward_macs_match_torchvision():
    # torchvision's published ResNet-50 cost is 4.09 GFLOPS (multiply-adds), fc (2048 x 1000) included.
    model, _ = models.get_backbone("resnet50")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    macs = flops.matmul_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)) / 2
    assert abs(macs + 2048 * 1000 - 4.09e9) < 0.005e9


def test_analytic_step_flops_is_forward_and_backward_of_both_views():
    config = _smoke()
    step = flops.analytic_step_flops(simclr, config, (16, 16, 3))
    b, d = config.batch_size, config.head.out_dim
    stem = _conv_macs(16, 3, 3, 8)
    backbone = stem + 2 * _conv_macs(16, 3, 8, 8) + _conv_macs(16, 3, 8, 16, 2) \
        + _conv_macs(8, 3, 16, 16) + _conv_macs(16, 1, 8, 16, 2)
    head = 16 * config.head.hidden_dim + config.head.hidden_dim * d
    # Both views through backbone and head: forward, weight gradient and input gradient (x 3), but no input
    # gradient for the stem, whose input is the augmented image; x 2 FLOPs per MAC.
    model = 2 * 2 * b * (3 * (backbone + head) - stem)
    # The rest is NT-Xent's similarity matmuls and their gradients: a few (2B x 2B x d) products at most.
    assert model < step <= model + 3 * 2 * 4 * (2 * b) ** 2 * d
    # Rematerialization recomputes the forward: hardware work, not model FLOPs, so the count ignores it.
    assert flops.analytic_step_flops(simclr, _smoke("model.remat=true"), (16, 16, 3)) == step


def test_analytic_step_flops_charges_a_target_network_its_forward_only():
    """MoCo's key encoder runs forward only: an asymmetric step is one trained pass (3 forwards) + one key
    forward, about 2/3 of SimCLR's two trained passes; the symmetric loss does both directions, twice that."""
    def count(*overrides):
        c = config_lib.load_config("configs/moco_v2.py:smoke", ["batch_size=32", *overrides])
        return flops.analytic_step_flops(moco, c, (16, 16, 3))

    asym, sym = count("moco.symmetric=false"), count("moco.symmetric=true")
    assert sym == pytest.approx(2 * asym, rel=0.01)
    simclr_step = flops.analytic_step_flops(simclr, _smoke(), (16, 16, 3))
    assert asym / simclr_step == pytest.approx(2 / 3, rel=0.05)


def test_xla_flops_reads_dict_or_list_cost_analysis():
    class Compiled:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            return self.cost

    assert flops.xla_flops(Compiled({"flops": 10.0}), 8) == 80.0
    assert flops.xla_flops(Compiled([{"flops": 3.0}]), 2) == 6.0
    assert flops.xla_flops(Compiled({}), 2) is None and flops.xla_flops(Compiled([]), 2) is None
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 4)), jnp.ones((4, 2))).compile()
    assert flops.xla_flops(compiled, 1) == pytest.approx(2 * 8 * 4 * 2, rel=0.5)


def test_step_memory_bytes_is_none_where_the_backend_has_no_memory_analysis():
    class Missing:  # a backend that does not implement it, or has no such method
        def memory_analysis(self):
            raise NotImplementedError

    class Empty:
        def memory_analysis(self):
            return None

    assert flops.step_memory_bytes(Missing()) is None and flops.step_memory_bytes(object()) is None
    assert flops.step_memory_bytes(Empty()) is None
    compiled = jax.jit(lambda a: a * 2).lower(jnp.ones((256, 256))).compile()
    assert flops.step_memory_bytes(compiled) >= 256 * 256 * 4  # at least the argument (or output)


# ------------------------------------------------------------------------------ no recompilation, and bench
def test_training_traces_and_compiles_the_step_once(tmp_path, monkeypatch, caplog):
    # Two epochs with a checkpoint and a kNN monitor run after each: the step is traced and compiled once.
    traces = _count_traces(monkeypatch)
    config = _smoke("num_epochs=2", "data.num_examples=64", "checkpoint.every_epochs=1", "checkpoint.keep=3",
                    "eval.knn_every_epochs=1")
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        state = train.train(config, str(tmp_path), progress=False)
    assert int(state["step"]) == 2 * (64 // 32)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    knn_rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "knn_top1" in r]
    assert [r["step"] for r in knn_rows] == [2, 4]
    assert traces == ["data"]
    assert _compiles(caplog)["step"] == 1
    assert _compiles(caplog)["encode"] == 1  # the kNN monitor's encoder too, over both of its runs


def test_cli_bench_times_three_modes_each_compiled_once(monkeypatch, caplog, capsys):
    traces = _count_traces(monkeypatch)
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        code = cli.main(["bench", "--config", "configs/simclr.py:smoke", "--steps", "2", "--warmup", "1",
                         "--config.data.num_examples=64", "--config.batch_size=32"])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    modes = report["modes"]
    assert list(modes) == ["synthetic", "resident", "host"]
    for r in modes.values():
        assert r["img_per_s"] > 0 and r["finite"] and np.isfinite(r["final_loss"])
        assert r["step_ms"] == pytest.approx(1000 * 32 / r["img_per_s"], rel=1e-3)
        assert r["epoch_s"] == pytest.approx(r["step_ms"] * 2 / 1000, rel=1e-3)  # 64 / 32 steps per epoch
        assert r["tflops"] == pytest.approx(report["flops"]["analytic_per_step"] / r["step_ms"] / 1e9, rel=1e-3)
        assert r["percent_of_peak"] is None and r["peak_bytes_in_use"] is None  # CPU: no peak, no memory stats
        assert r["xla_tflops"] > 0 and r["step_bytes"] > 0 and r["compile_s"] > 0
    # Each phase logs one line on stderr, in run order, with the seconds since the start.
    phases = [line.split("]: ", 1)[1] for line in err.splitlines() if line.startswith("bench [")]
    assert phases[0] == "training images ready: 64 x 16x16x3"
    for mode in ("synthetic", "host", "resident"):
        i = phases.index(f"{mode}: building the initial state")
        assert phases[i + 1] == f"{mode}: compiling the step"
        compiled = phases[i + 2].split(f"{mode}: compiled in ")[1]
        assert compiled.endswith(" s; 1 warm-up and 2 timed steps")
        assert float(compiled.split(" s;")[0]) == pytest.approx(modes[mode]["compile_s"], abs=0.06)
        assert phases[i + 3].startswith(f"{mode}: ") and phases[i + 3].endswith(" ms per step")
    seconds = [float(line.split("[")[1].split(" s]")[0]) for line in err.splitlines() if line.startswith("bench [")]
    assert seconds == sorted(seconds)
    for mode in ("resident", "host"):
        want = 100 * (modes[mode]["step_ms"] / modes["synthetic"]["step_ms"] - 1)
        assert modes[mode]["overhead_percent"] == pytest.approx(want, rel=0.01, abs=0.01)
    assert report["devices"] == 8 and report["flops"]["percent_of_peak_uses"] == "analytic"
    # One trace of the sharded loss per mode (the analytic count traces it once more, unsharded) and one
    # compilation per program: nothing recompiles over the 3 calls of each.
    assert traces.count("data") == 3 and traces.count(None) == 1
    assert report["flops"]["analytic_per_step"] == flops.analytic_step_flops(simclr, _smoke(), (16, 16, 3))
    compiles = _compiles(caplog)
    assert compiles["step"] == 2 and compiles["views_step"] == 1  # resident and host steps; synthetic
    assert "overhead %" in err and all(f"\n{mode:>9}" in err for mode in modes)  # the table, on stderr
    # ...and the BENCHMARKS.md row, with the command that produced it, the device and the date.
    assert report["command"].startswith("ssl-jax bench --config configs/simclr.py:smoke --steps 2")
    row = err.split("BENCHMARKS.md rows:\n")[1].splitlines()[0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "tiny / 16x16 / 32" and cells[5] == "-"  # CPU: no memory statistics
    assert [float(c.replace(",", "")) for c in cells[1:5]] == pytest.approx(
        [modes["synthetic"]["img_per_s"], modes["resident"]["img_per_s"], modes["host"]["img_per_s"],
         modes["resident"]["epoch_s"]], rel=0.01)
    assert cells[6] == f"`{report['command']}`" and cells[7] == f"8 x {report['device_kind']}"
    assert cells[8] == report["date"] and len(report["date"]) == 10


def test_bench_reports_gradient_accumulation():
    report = bench.bench(_smoke("grad_accum_steps=2"), steps=1, warmup=0, modes=("synthetic",))
    assert report["grad_accum_steps"] == 2 and report["modes"]["synthetic"]["finite"]
    row = bench.markdown_rows({**report, "command": "c", "date": "d"})[0]
    assert row.startswith("| tiny / 16x16 / 32 in 2 chunks | ")


def test_bench_mode_errors():
    with pytest.raises(ValueError, match="unknown bench modes"):
        bench.bench(_smoke(), modes=("fast",))
    assert bench.default_modes(_smoke("data.resident=false")) == ("synthetic", "host")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and torchvision (pip install 'ssl-jax[torch]')")
def test_pytorch_simclr_step_runs_on_the_same_images():
    config = _smoke("model.name=resnet18", "batch_size=8")
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    result = bench_torch.run_subprocess(config, images, steps=1, warmup=0)
    assert result["arch"] == "resnet18" and result["channels_last"] and result["num_workers"] >= 1
    for way in ("synthetic", "loader"):
        r = result[way]
        assert r["img_per_s"] > 0 and np.isfinite(r["final_loss"])
        # NT-Xent of 2B = 16 embeddings: at most log(15) plus slack for an untrained network; never below 0.
        assert 0.0 < r["final_loss"] < np.log(15) + 1.0
    spec = bench_torch.spec_from_config(config, "x.npy", 1, 1)
    assert spec["jitter"] == pytest.approx([0.4, 0.4, 0.4, 0.1]) and spec["scale"] == pytest.approx([0.3, 1.0])
    # The torchvision network starts its blocks' last BatchNorm scales as the config's ResNet does.
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
    for zero in (True, False):
        spec = bench_torch.spec_from_config(
            config_lib.load_config("configs/simclr.py:cifar10", [f"model.zero_init_residual={zero}"]), "x.npy", 1, 1)
        net = bench_torch.network(torch, torchvision, spec)
        assert spec["zero_init_residual"] is zero
        assert float(net[0].layer1[0].bn2.weight.detach().abs().max()) == (0.0 if zero else 1.0)
        assert float(net[0].layer1[0].bn1.weight.detach().min()) == 1.0
    # conv_init "pytorch": every conv back at nn.Conv2d's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for conv_init in ("torchvision", "pytorch"):
        spec = bench_torch.spec_from_config(
            config_lib.load_config("configs/simclr.py:cifar10", [f"model.conv_init={conv_init}"]), "x.npy", 1, 1)
        w = bench_torch.network(torch, torchvision, spec)[0].layer1[0].conv1.weight.detach().numpy()
        bound = 1.0 / np.sqrt(w[0].size)
        assert bool(np.abs(w).max() <= bound * (1.0 + 1e-6)) is (conv_init == "pytorch")
    # The cifar10 preset's head (lightly's: Linear with bias -> ReLU -> Linear, no BatchNorm) and one network
    # call per view; with head.use_bn the hidden Linear loses its bias to a BatchNorm1d.
    for use_bn in (False, True):
        spec = bench_torch.spec_from_config(
            config_lib.load_config("configs/simclr.py:cifar10", [f"head.use_bn={use_bn}"]), "x.npy", 1, 1)
        assert spec["bn_per_view"] is True and spec["head_bn"] is use_bn
        head = bench_torch.network(torch, torchvision, spec)[1:]
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head) is use_bn
        assert (head[0].bias is None) is use_bn and head[-1].out_features == 128
    net = bench_torch.network(torch, torchvision, spec).train()
    gen = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen) * 2 + 1
    with torch.no_grad():
        per_view = bench_torch.embed(torch, net, spec, torch.device("cpu"), v1, v2)
        joint = bench_torch.embed(torch, net, {**spec, "bn_per_view": False}, torch.device("cpu"), v1, v2)
        # embed feeds channels_last, these references NCHW: other conv kernels, float32 rounding (~2e-5 of
        # outputs near 1.5 seen); pooling the views' statistics instead moves them by far more (below).
        assert torch.allclose(per_view, torch.cat([net(v1), net(v2)]), rtol=1e-4, atol=1e-4)
        assert torch.allclose(joint, net(torch.cat([v1, v2])), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(per_view, joint, atol=1e-3)
    # head.last_bn (SimCLR v2's head, and v1's imagenet preset): the output Linear has no bias and a BatchNorm
    # follows it whose bias stays 0 and whose scale learns only with last_bn_scale, as models.MLPHead's.
    for spec_name, scale in (("configs/simclr_v2.py:cifar10", True), ("configs/simclr.py:imagenet", True)):
        for overrides in ((), ("head.last_bn_scale=false",)):
            spec = bench_torch.spec_from_config(config_lib.load_config(spec_name, list(overrides)), "x.npy", 1, 1)
            out_linear, out_bn = bench_torch.network(torch, torchvision, spec)[-2:]
            assert isinstance(out_bn, torch.nn.BatchNorm1d) and out_linear.bias is None
            assert not out_bn.bias.requires_grad and out_bn.weight.requires_grad is (scale and not overrides)
    # stem_relu false: torchvision's `relu` module (used by the stem only) becomes the identity.
    for stem_relu in (True, False):
        spec = bench_torch.spec_from_config(
            config_lib.load_config("configs/simclr.py:cifar10", [f"model.stem_relu={stem_relu}"]), "x.npy", 1, 1)
        relu = bench_torch.network(torch, torchvision, spec)[0].relu
        assert isinstance(relu, torch.nn.Identity if not stem_relu else torch.nn.ReLU)
    # SimCLR v2's network choices: stage 1's projection shortcut, TF's VarianceScaling() conv init.
    spec = bench_torch.spec_from_config(config_lib.load_config(
        "configs/simclr.py:cifar10", ["model.project_first_block=true", "model.conv_init=tf"]), "x.npy", 1, 1)
    backbone = bench_torch.network(torch, torchvision, spec)[0]
    assert backbone.layer1[0].downsample[0].weight.shape == (64, 64, 1, 1) and backbone.layer1[1].downsample is None
    w = backbone.layer3[1].conv2.weight.detach().numpy()
    std = np.sqrt(1.0 / w[0].size)
    assert np.abs(w).max() <= 2.0 * std / 0.87962566103423978 * (1 + 1e-6) and abs(w.std() / std - 1) < 0.02


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and torchvision (pip install 'ssl-jax[torch]')")
@pytest.mark.parametrize("preset, crop, kernel", [("cifar10", 32, 13), ("imagenet", 224, 23)])
def test_pytorch_loader_blurs_with_the_kernel_of_ssl_jax_views(preset, crop, kernel):
    # The 10% rule alone gave the PyTorch side a 3-tap kernel at 32 px where ssl_jax blurs with 13 taps.
    config = config_lib.load_config(f"configs/simclr.py:{preset}", ["augment.blur_p=0.5"])
    spec = bench_torch.spec_from_config(config, "x.npy", 1, 1)
    assert spec["crop_size"] == crop and spec["blur_kernel"] == kernel


def test_missing_torch_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(bench_torch.MissingTorchError, match=r"pip install 'ssl-jax\[torch\]'"):
        bench_torch.check_installed()
    with pytest.raises(ValueError, match="SimCLR"):
        bench_torch.spec_from_config(config_lib.load_config("configs/byol.py:smoke"), "x.npy", 1, 1)
    with pytest.raises(ValueError, match=r"torchvision ResNet: model.name must be one of resnet18, .* got 'tiny' x 1"):
        bench_torch.spec_from_config(_smoke(), "x.npy", 1, 1)  # the smoke preset's tiny network
    with pytest.raises(ValueError, match=r"model.sk_ratio=0, got 'resnet50' x 1, sk_ratio 0.0625"):
        bench_torch.spec_from_config(config_lib.load_config(
            "configs/simclr.py:imagenet", ["model.sk_ratio=0.0625"]), "x.npy", 1, 1)  # torchvision has no SK
