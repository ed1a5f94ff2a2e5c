"""`ssl-jax bench`: the training step timed three ways in one run, with FLOPs, memory and a PyTorch baseline.

Ways (modes), each compiled once and timed over `steps` steps after `warmup` untimed ones:
  synthetic: random float views already on the device, no augmentation, no input (Setup.views_step_fn):
      the network's cost, the floor the other two are measured against.
  resident: the full step with the uint8 training set resident on the device; each step gathers its batch
      there and augments it on the device (data.resident=True): how CIFAR-size data trains.
  host: the full step fed by the host pipeline: uint8 batches from train.loader (prefetching thread) moved by
      parallel.put_batch, augmented on the device (data.resident=False): how ImageNet-size data trains.
overhead_percent of a mode = 100 x (its step time / the synthetic step time - 1): what input and
augmentation add. TFLOP/s and percent_of_peak use the analytic model FLOPs (ssl_jax/flops.py), the same
for all three modes; xla_tflops is XLA's own count of each compiled program, augmentation included.
Modes run in the order synthetic, host, resident, so each peak_bytes_in_use (the process's peak device
memory so far; JAX cannot reset it) covers that mode and the ones before it, and only the resident mode
holds the training set on the device.

Each phase (data, the PyTorch baseline, every mode's compilation and timing) logs one line with the seconds
since the start on stderr, also under --no-progress: a run that is stopped or runs out of memory shows how
far it got. Each mode's `compile_s` is in the report. With `profile_dir` (`--profile DIR`), each mode traces a
few more steps after its timed ones and reports where the device time went (ssl_jax/profiling.py).
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import bench_torch, flops, parallel, profiling, train
from ssl_jax import data as data_lib

MODES = ("synthetic", "resident", "host")
_RUN_ORDER = ("synthetic", "host", "resident")


def _sig(x, digits=4):
    """Returns x rounded to `digits` significant digits (None stays None)."""
    return None if x is None else float(f"{x:.{digits}g}")


def default_modes(config):
    """Returns the modes that fit `config`: resident only where the config keeps its data on the device."""
    return MODES if config.data.resident else ("synthetic", "host")


def synthetic_inputs(setup, seed=0):
    """Returns (views, labels_B): random N(0, 1) views of the shapes method.views makes, int32 labels,
    all sharded over "data"."""
    config, b = setup.config, setup.config.batch_size
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    keys = jax.ShapeDtypeStruct((b, *key.shape), key.dtype)
    images = jax.ShapeDtypeStruct((b, *setup.train_source.images.shape[1:]), jnp.uint8)
    shapes = jax.eval_shape(lambda k, x: setup.method.views(k, x, config), keys, images)
    num_classes = max(setup.train_source.num_classes, 1)

    def make(rng):
        leaves, treedef = jax.tree.flatten(shapes)
        rngs = jax.random.split(rng, len(leaves) + 1)
        views = [jax.random.normal(r, s.shape, s.dtype) for r, s in zip(rngs[1:], leaves)]
        return jax.tree.unflatten(treedef, views), jax.random.randint(rngs[0], (b,), 0, num_classes, jnp.int32)

    return jax.jit(make, out_shardings=parallel.batch_sharded(setup.mesh))(jax.random.PRNGKey(seed))


def peak_memory_bytes():
    """Returns the largest peak_bytes_in_use over this process's devices, or None where the backend has none."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max(peaks) if peaks and None not in peaks else None


class _PhaseLog:
    """Prints `bench [SECONDS s]: message` lines on a stream (stderr), seconds counted from its creation."""

    def __init__(self, stream=None):
        self.stream, self.start = stream or sys.stderr, time.perf_counter()

    def __call__(self, message):
        print(f"bench [{time.perf_counter() - self.start:.1f} s]: {message}", file=self.stream, flush=True)


def _time_mode(fn, state, next_args, steps, warmup, log=None, mode="", profile_dir=None, profile_steps=3):
    """Returns (seconds per step, final loss, compiled program, compile seconds) of `fn(state, *next_args())`
    repeated; `log(message)`, if given, hears when compilation and the timed steps begin and end. With
    `profile_dir`, `profile_steps` more steps run under jax.profiler after the timed ones."""
    log = log or (lambda message: None)
    args = next_args()
    log(f"{mode}: compiling the step")
    start = time.perf_counter()
    compiled = fn.lower(state, *args).compile()  # the same executable the calls below reuse from jit's cache
    compile_s = time.perf_counter() - start
    log(f"{mode}: compiled in {compile_s:.1f} s; {warmup} warm-up and {steps} timed steps")
    for _ in range(warmup):
        state, metrics = fn(state, *args)
        args = next_args()
    jax.block_until_ready((state, metrics) if warmup else state)
    start = time.perf_counter()
    for _ in range(steps):
        # As in training: the next input is prepared while the device runs; metrics are not fetched.
        state, metrics = fn(state, *args)
        args = next_args()
    loss = float(jax.device_get(metrics["loss"]))
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / steps
    log(f"{mode}: {1000 * step_s:.2f} ms per step")
    if profile_dir:  # after the timing, never during it
        log(f"{mode}: tracing {profile_steps} more steps into {profile_dir}")
        try:
            jax.profiler.start_trace(profile_dir)
        except (RuntimeError, ValueError, OSError) as e:  # no profiler here: the timings still stand
            log(f"{mode}: the profiler did not start ({type(e).__name__}: {e})")
            return step_s, loss, compiled, compile_s
        try:
            for _ in range(profile_steps):
                state, metrics = fn(state, *args)
                args = next_args()
            jax.block_until_ready(state)
        finally:
            jax.profiler.stop_trace()
    return step_s, loss, compiled, compile_s


def _run_mode(mode, setup, state, steps, warmup, log=None, **profile):
    """Returns (seconds per step, final loss, compiled program, compile seconds) of one mode on `setup`."""
    if mode == "synthetic":
        views, labels = synthetic_inputs(setup)
        return _time_mode(setup.views_step_fn, state, lambda: (views, labels), steps, warmup, log, mode, **profile)
    batches = train.loader(setup, 0)
    try:
        return _time_mode(setup.step_fn, state,
                          lambda: (setup.dataset, parallel.put_batch(next(batches), setup.mesh)), steps, warmup,
                          log, mode, **profile)
    finally:
        batches.close()


def bench(config, steps=50, warmup=3, modes=None, torch=False, torch_compile=False, profile_dir=None,
          profile_steps=3):
    """Returns the report: {'modes': {mode: timings, FLOPs, memory}, 'flops': ..., 'torch': ... (if torch), ...}.

    With `profile_dir`, each mode also traces `profile_steps` steps into profile_dir/<mode> after its timed
    ones, and its report gains `profile` (ssl_jax/profiling.py: busy time, kinds of work, top operations).
    """
    if steps < 1 or warmup < 0 or profile_steps < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and profile_steps >= 1, got steps={steps}, "
                         f"warmup={warmup}, profile_steps={profile_steps}")
    modes = tuple(modes or default_modes(config))
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown bench modes {unknown}; choose from {', '.join(MODES)}")
    log = _PhaseLog()
    source = data_lib.get_source(config.data, "train")
    log(f"training images ready: {source.images.shape[0]} x {'x'.join(map(str, source.images.shape[1:]))}")
    report = {}
    if torch:  # first: JAX has not touched the accelerator yet, so PyTorch gets all of its memory
        log("PyTorch baseline (child process)")
        report["torch"] = bench_torch.run_subprocess(config, source.images, steps, warmup, torch_compile)
        log("PyTorch baseline done")

    setups = {}

    def setup_for(resident):
        if resident not in setups:
            c = config.copy_and_resolve_references()
            c.data.resident = resident
            setups[resident] = train.build(c, source)
        return setups[resident]

    n_dev = len(jax.devices())
    kind = jax.devices()[0].device_kind
    peak = flops.peak_tflops(kind)
    method = setup_for(False).method
    model_flops = flops.analytic_step_flops(method, config, source.images.shape[1:])
    results = {}
    for mode in (m for m in _RUN_ORDER if m in modes):
        setup = setup_for(mode == "resident")
        # Both setups make the same state (data.resident changes only the step): one init program for all modes.
        log(f"{mode}: building the initial state")
        state = train.initial_state(setup_for(False))
        mode_dir = os.path.join(profile_dir, mode) if profile_dir else None
        step_s, loss, compiled, compile_s = _run_mode(mode, setup, state, steps, warmup, log,
                                                      profile_dir=mode_dir, profile_steps=profile_steps)
        xla = flops.xla_flops(compiled, n_dev)
        tflops = model_flops / step_s / 1e12
        results[mode] = {
            "img_per_s": _sig(config.batch_size / step_s, 5), "step_ms": _sig(1000 * step_s, 5),
            "epoch_s": _sig(step_s * setup.steps_per_epoch), "tflops": _sig(tflops),
            "percent_of_peak": _sig(100 * tflops / (peak * n_dev), 3) if peak else None,
            "xla_tflops": _sig(xla / step_s / 1e12) if xla else None,
            "peak_bytes_in_use": peak_memory_bytes(), "step_bytes": flops.step_memory_bytes(compiled),
            "final_loss": loss, "finite": bool(np.isfinite(loss)), "compile_s": _sig(compile_s, 3)}
        if mode_dir:  # a trace that cannot be read costs its summary, never the timings above
            try:
                results[mode]["profile"] = profiling.summarize_dir(mode_dir, profile_steps)
                log(profiling.format_summary(results[mode]["profile"], f"{mode} profile: "))
            except (OSError, ValueError, KeyError, TypeError) as e:
                results[mode]["profile"] = {"error": f"{type(e).__name__}: {e}", "dir": mode_dir}
                log(f"{mode} profile: not summarised ({type(e).__name__}: {e}); the trace is in {mode_dir}")
    if "synthetic" in results:
        base_ms = results["synthetic"]["step_ms"]
        for mode in ("resident", "host"):
            if mode in results:
                results[mode]["overhead_percent"] = _sig(100 * (results[mode]["step_ms"] / base_ms - 1), 3)
    report.update({
        "modes": {m: results[m] for m in MODES if m in results},
        "flops": {"analytic_per_step": model_flops, "analytic_per_image": model_flops / config.batch_size,
                  "percent_of_peak_uses": "analytic", "peak_tflops_per_device": peak},
        "method": config.method, "model": config.model.name, "remat": bool(config.model.get("remat", False)),
        "dtype": config.model.dtype, "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
        "image_shape": list(source.images.shape[1:]),
        "steps_per_epoch": setup_for(False).steps_per_epoch, "steps": steps, "warmup": warmup,
        "devices": n_dev, "device_kind": kind, "jax": jax.__version__,
    })
    return report


def _gib(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def _num(x):
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def markdown_rows(report):
    """Returns BENCHMARKS.md table rows for `report` (with its `command` and `date`, which the CLI adds): the
    method's row, then PyTorch's row if it ran.

    Method row: | model / image px / batch (and "in K chunks" with gradient accumulation) | synthetic img/s |
    resident img/s | host img/s | epoch s (resident way, else host) | peak device memory GiB | command | device |
    date |. PyTorch row: | PyTorch eager or
    + torch.compile | random views img/s | DataLoader img/s | command | device | date |. A way that did not
    run, or memory the backend does not report, is "-".
    """
    modes, command, date = report["modes"], report["command"], report["date"]
    size = "x".join(str(d) for d in report["image_shape"][:2])
    img = {m: _num(modes[m]["img_per_s"]) if m in modes else "-" for m in MODES}
    way = next(m for m in ("resident", "host", "synthetic") if m in modes)  # bench runs at least one
    peaks = [r["peak_bytes_in_use"] for r in modes.values() if r["peak_bytes_in_use"] is not None]
    device = f"{report['devices']} x {report['device_kind']}"
    chunks = report.get("grad_accum_steps", 1)
    batch = f"{report['batch_size']}" + (f" in {chunks} chunks" if chunks > 1 else "")
    rows = [f"| {report['model']} / {size} / {batch} | {img['synthetic']} | {img['resident']} | "
            f"{img['host']} | {_num(modes[way]['epoch_s'])} | "
            f"{_gib(max(peaks)) + ' GiB' if peaks else '-'} | `{command}` | {device} | {date} |"]
    torch = report.get("torch")
    if torch:
        name = "PyTorch + torch.compile" if torch.get("compiled") else "PyTorch eager"
        rows.append(f"| {name} {torch.get('torch', '')} | {_num(torch['synthetic']['img_per_s'])} | "
                    f"{_num(torch['loader']['img_per_s'])} | `{command}` | {torch.get('device', device)} | {date} |")
    return rows


def format_table(report):
    """Returns the report as a fixed-width text table (one row per mode, plus PyTorch's rows)."""
    head = ("mode", "img/s", "step ms", "epoch s", "TFLOP/s", "% peak", "XLA TFLOP/s", "overhead %",
            "peak GiB", "step GiB")
    rows = []
    for mode, r in report["modes"].items():
        pct = "-" if r["percent_of_peak"] is None else f"{r['percent_of_peak']:.1f}"
        rows.append((mode, f"{r['img_per_s']:.1f}", f"{r['step_ms']:.2f}", f"{r['epoch_s']:.2f}",
                     f"{r['tflops']:.3g}", pct, "-" if r["xla_tflops"] is None else f"{r['xla_tflops']:.3g}",
                     f"{r['overhead_percent']:.1f}" if "overhead_percent" in r else "-",
                     _gib(r["peak_bytes_in_use"]), _gib(r["step_bytes"])))
    for way, r in report.get("torch", {}).items():
        if isinstance(r, dict):
            rows.append((f"pytorch {way}", f"{r['img_per_s']:.1f}", f"{r['step_ms']:.2f}") + ("-",) * 7)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in (head, *rows)]
    title = (f"{report['method']} {report['model']} batch {report['batch_size']} {report['dtype']} on "
             f"{report['devices']} x {report['device_kind']} (jax {report['jax']}); % peak from the analytic "
             f"{report['flops']['analytic_per_image'] / 1e9:.3g} GFLOP per image")
    return "\n".join([title, *lines])
