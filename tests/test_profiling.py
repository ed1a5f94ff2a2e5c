"""`ssl-jax bench --profile`: the trace summary (busy time, kinds of work, top operations) on a GPU-shaped
trace written here by hand, and a real trace of the smoke step on the CPU."""
import collections
import gzip
import json
import logging
import os
import re

import jax
import pytest

from ssl_jax import bench, cli, config as config_lib, profiling


def _meta(pid, tid, process, thread):
    return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}},
            {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}]


def _x(pid, tid, name, ts, dur, hlo=None):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
            "args": {"hlo_op": hlo} if hlo else {}}


def _gpu_trace():
    """Two steps of 1,000 us each on GPU 0: a convolution kernel (400 us), a fusion (100 us) and a
    device-to-device copy on a second stream that overlaps the convolution (50 us); the XLA Ops line repeats
    the kernels, and the host's own events must not count either."""
    gpu = "/device:GPU:0"
    events = (_meta(1, 13, gpu, "Stream #13(Compute)") + _meta(1, 14, gpu, "Stream #14(MemcpyD2D)")
              + _meta(1, 101, gpu, "XLA Ops") + _meta(701, 5, "/host:CPU", "python"))
    for step in range(2):
        t = 1000 * step
        events += [
            _x(1, 13, "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_nhwckrsc", t, 400, "cudnn-conv.1"),
            _x(1, 13, "loop_add_fusion", t + 500, 100, "add_fusion.3"),
            _x(1, 14, "Memcpy DtoD (Device -> Device)", t + 300, 50, "copy.2"),
            _x(1, 101, "cudnn-conv.1", t, 400), _x(1, 101, "add_fusion.3", t + 500, 100),
            _x(701, 5, "PjitFunction(step)", t, 900),
        ]
    return events


def test_gpu_trace_summary_counts_device_kernels_once():
    s = profiling.summarize(_gpu_trace(), steps=2)
    assert s["source"] == "device"
    # Busy: 0-400 and 500-600 per step (the copy at 300-350 overlaps the convolution): 500 us; the traced
    # window runs from 0 to 1,600 us.
    assert s["busy_ms_per_step"] == pytest.approx(0.5)
    assert s["busy_percent"] == pytest.approx(100 * 1000 / 1600)
    assert s["kinds"] == {"convolution": {"ms_per_step": pytest.approx(0.4), "percent": pytest.approx(400 / 5.5)},
                          "copy": {"ms_per_step": pytest.approx(0.05), "percent": pytest.approx(50 / 5.5)},
                          "fusion": {"ms_per_step": pytest.approx(0.1), "percent": pytest.approx(100 / 5.5)}}
    assert [(r["op"], r["kind"], r["count_per_step"]) for r in s["top"]] == [
        ("cudnn-conv.1", "convolution", 1), ("add_fusion.3", "fusion", 1), ("copy.2", "copy", 1)]
    assert s["top"][0]["ms_per_step"] == pytest.approx(0.4)
    assert len(profiling.summarize(_gpu_trace(), steps=2, top=1)["top"]) == 1
    text = profiling.format_summary(s, "synthetic profile: ")
    assert text.startswith("synthetic profile: device busy 0.50 ms per step, 62.5% of the traced window (2 steps)")
    assert "convolution 72.7%, fusion 18.2%, copy 9.1%" in text


def test_a_tpu_has_no_streams_and_its_xla_ops_line_is_the_work():
    events = (_meta(2, 3, "/device:TPU:0", "XLA Ops") + _meta(2, 4, "/device:TPU:0", "XLA Modules")
              + [_x(2, 3, "convolution.3", 0, 30), _x(2, 3, "fusion.1", 40, 10), _x(2, 4, "jit_step", 0, 50)])
    s = profiling.summarize(events, steps=1)
    assert s["source"] == "device" and [r["op"] for r in s["top"]] == ["convolution.3", "fusion.1"]
    assert s["busy_ms_per_step"] == pytest.approx(0.04) and s["busy_percent"] == pytest.approx(80)


def test_without_a_device_process_the_xla_runtime_threads_count():
    events = (_meta(701, 1, "/host:CPU", "tf_XLAPjRtCpuClient/1") + _meta(701, 2, "/host:CPU", "python")
              + [_x(701, 1, "fusion.4", 0, 100), _x(701, 1, "ThreadpoolListener::StartRegion", 0, 1),
                 _x(701, 2, "PjitFunction(step)", 0, 150)])
    s = profiling.summarize(events, steps=1)
    assert s["source"] == "host" and [r["op"] for r in s["top"]] == ["fusion.4"]
    with pytest.raises(ValueError, match="no device or XLA runtime events"):
        profiling.summarize(_meta(701, 2, "/host:CPU", "python") + [_x(701, 2, "PjitFunction(step)", 0, 1)], 1)


def test_nested_events_count_their_self_time():
    # parent 0-100 holds a child 10-30 (which holds 12-20) and a child 50-60; another thread overlaps freely.
    events = [_x(1, 1, "a", 0, 100), _x(1, 1, "b", 10, 20), _x(1, 1, "c", 12, 8), _x(1, 1, "d", 50, 10),
              _x(1, 2, "e", 5, 100)]
    assert profiling.self_times(events) == [70, 12, 8, 10, 100]


@pytest.mark.parametrize("name, hlo, kind", [
    ("sm90_xmma_dgrad_implicit_gemm", "", "convolution"), ("whatever", "cudnn-conv-bias-activation.7", "convolution"),
    ("loop_convert_fusion", "convert_fusion.1", "fusion"), ("nvjet_tst_128x256", "dot.12", "matmul"),
    ("ncclDevKernel_AllReduce_Sum_f32", "all-reduce.3", "collective"), ("input_reduce_fusion", "", "fusion"),
    ("loop_transpose_fusion", "", "copy"), ("Memset (Device)", "", "copy"), ("rng_bit_generator", "", "other"),
    ("Rendezvous", "", "collective"), ("psum_invariant.315", "", "collective")])
def test_kind_of(name, hlo, kind):
    assert profiling.kind_of(name, hlo) == kind


def test_find_and_load_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz under"):
        profiling.find_trace(str(tmp_path))
    run = tmp_path / "plugins" / "profile" / "2026_11_23"
    run.mkdir(parents=True)
    with gzip.open(run / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": _gpu_trace()}, f)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:  # jax writes this one too; the other is read
        json.dump([], f)
    path = profiling.find_trace(str(tmp_path))
    assert path == str(run / "vm.trace.json.gz") and profiling.load_events(path) == _gpu_trace()
    s = profiling.summarize_dir(str(tmp_path), steps=2)
    assert s["trace"] == path and s["busy_ms_per_step"] == pytest.approx(0.5)


def test_cli_bench_profile_traces_after_the_timed_steps_without_recompiling(tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        code = cli.main(["bench", "--config", "configs/simclr.py:smoke", "--steps", "2", "--warmup", "1",
                         "--modes", "synthetic", "--profile", str(tmp_path / "prof"), "--profile-steps", "2",
                         "--config.data.num_examples=64", "--config.batch_size=32", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0
    profile = json.loads(out.strip().splitlines()[-1])["modes"]["synthetic"]["profile"]
    assert profile["trace"].startswith(str(tmp_path / "prof" / "synthetic")) and os.path.exists(profile["trace"])
    assert profile["source"] == "host" and profile["steps"] == 2  # the CPU: the XLA runtime's threads
    assert profile["busy_ms_per_step"] > 0 and 0 < profile["busy_percent"] <= 100
    assert sum(k["percent"] for k in profile["kinds"].values()) == pytest.approx(100)
    # The step's own work shows: the smoke ResNet's convolutions.
    assert profile["kinds"]["convolution"]["ms_per_step"] > 0 and profile["top"]
    phases = [line.split("]: ", 1)[1] for line in err.splitlines() if line.startswith("bench [")]
    timed = next(i for i, p in enumerate(phases) if p.endswith(" ms per step"))
    assert phases[timed + 1] == f"synthetic: tracing 2 more steps into {tmp_path / 'prof' / 'synthetic'}"
    assert phases[timed + 2].startswith("synthetic profile: host busy ")
    names = collections.Counter(re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text))
    assert names["views_step"] == 1  # the traced steps reuse the timed program


def test_a_trace_that_cannot_be_summarised_costs_only_the_summary(tmp_path, monkeypatch):
    def unreadable(log_dir, steps):
        raise ValueError("the trace holds no device or XLA runtime events to summarise")

    monkeypatch.setattr(profiling, "summarize_dir", unreadable)
    config = config_lib.load_config("configs/simclr.py:smoke", ["data.num_examples=64", "batch_size=32"])
    report = bench.bench(config, steps=1, warmup=0, modes=("synthetic",), profile_dir=str(tmp_path), profile_steps=1)
    r = report["modes"]["synthetic"]
    assert r["img_per_s"] > 0 and r["finite"]
    assert r["profile"] == {"error": "ValueError: the trace holds no device or XLA runtime events to summarise",
                            "dir": str(tmp_path / "synthetic")}


def test_a_profiler_that_does_not_start_costs_only_the_summary(tmp_path, monkeypatch, capsys):
    def busy(log_dir):
        raise RuntimeError("Profile has already been started. Only one profile may be run at a time.")

    monkeypatch.setattr(jax.profiler, "start_trace", busy)
    config = config_lib.load_config("configs/simclr.py:smoke", ["data.num_examples=64", "batch_size=32"])
    report = bench.bench(config, steps=1, warmup=0, modes=("synthetic",), profile_dir=str(tmp_path), profile_steps=1)
    r = report["modes"]["synthetic"]
    assert r["img_per_s"] > 0 and r["profile"]["error"].startswith("FileNotFoundError: no *.trace.json.gz under")
    assert "synthetic: the profiler did not start (RuntimeError: Profile has already been started" in (
        capsys.readouterr().err)


def test_profile_steps_must_be_positive():
    config = config_lib.load_config("configs/simclr.py:smoke")
    with pytest.raises(ValueError, match="profile_steps >= 1"):
        bench.bench(config, steps=1, profile_dir="unused", profile_steps=0)
