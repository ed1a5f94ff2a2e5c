"""Where a step's device time goes: a JAX profiler trace of a few steps, summarised without TensorBoard.

`ssl-jax bench --profile DIR` traces `--profile-steps` more steps of each mode after its timed ones (so the
timing is never traced) with `jax.profiler` and reads back the Chrome-trace JSON it writes
(`DIR/<mode>/plugins/profile/<run>/*.trace.json.gz`; open it in ui.perfetto.dev, or the `.xplane.pb` beside
it in XProf, for the timeline):

- on a GPU or TPU, the device's own events: on a GPU each kernel on each stream (processes named
  "/device:GPU:N", threads "Stream #..."), whose `args.hlo_op` names the HLO instruction that launched it;
  the derived lines beside them (XLA Ops, XLA Modules, Steps, ...) repeat the same time and are left out.
  A TPU has no streams: there the XLA Ops line is the work;
- on a CPU, where no device process exists, the XLA runtime's threads of the host process (thunk and
  fusion events; the Python thread and thread-pool bookkeeping are left out).

The summary: device busy time per step (the union of event intervals: overlapping streams count once), the
share of the traced window the device was busy (low means the device waits for the host), time by kind of
work (convolution, matmul, fusion, copy, collective, other: a name test below, `kind_of`), and the
operations (HLO op, else the event name) that take the most time.
"""
import collections
import glob
import gzip
import json
import os
import re

# Tested in this order on "kernel name | hlo op", lower case; the first that matches names the kind.
_KINDS = (
    ("convolution", re.compile(r"conv(?!ert)|cudnn|fprop|dgrad|wgrad|implicit_?gemm|xmma")),
    ("matmul", re.compile(r"gemm|cublas|nvjet|cutlass|\bdot\b|dot[._]|matmul")),
    # psum: the CPU backend's cross-device sums; Rendezvous and Wait: its replicas waiting for each other
    ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|psum|"
                              r"rendezvous|^wait: pending")),
    ("copy", re.compile(r"memcpy|memset|^copy|\|copy|transpose")),
    ("fusion", re.compile(r"fusion|reduce|^loop_|^input_|triton")),
)
KINDS = tuple(k for k, _ in _KINDS) + ("other",)
# Host threads and events that are scheduling, not work (the CPU backend's trace).
_HOST_SKIP_THREADS = re.compile(r"^python$|^MainThread$|Python", re.I)
_HOST_SKIP_EVENTS = re.compile(r"ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|^end: |PjRt|Await|"
                               r"Execute|Allocate|Handle |Parse|Donat|GarbageCollect|^\$", re.I)
_DEVICE = re.compile(r"^/device:|^/?(gpu|tpu):", re.I)
_DERIVED_LINES = re.compile(r"XLA Ops|XLA Modules|Steps|Source|Framework|TraceMe|Launch Stats", re.I)


def kind_of(name, hlo_op=""):
    """Returns the kind of work ("convolution", "matmul", ..., "other") an event's names say it is."""
    text = f"{name}|{hlo_op}".lower()
    return next((kind for kind, pattern in _KINDS if pattern.search(text)), "other")


def find_trace(log_dir):
    """Returns the newest `*.trace.json.gz` jax.profiler wrote under `log_dir`."""
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    paths = [p for p in paths if not os.path.basename(p).startswith("perfetto")] or paths
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}: did jax.profiler write a trace there?")
    return max(paths, key=os.path.getmtime)


def load_events(path):
    """Returns the trace's event list (a Chrome-trace JSON file, gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def work_events(events):
    """Returns (the complete events that are device work, "device" or "host"): see the module docstring."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e.get("args", {}).get("name", "")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_events = []
    for pid in (pid for pid, name in procs.items() if _DEVICE.search(name)):
        lines = {tid: name for (p, tid), name in threads.items() if p == pid}
        # A GPU's kernels are on its streams; a TPU has none and its work is the XLA Ops line.
        use = ({tid for tid, name in lines.items() if name.startswith("Stream")}
               or {tid for tid, name in lines.items() if name == "XLA Ops"}
               or {tid for tid, name in lines.items() if not _DERIVED_LINES.search(name)})
        device_events += [e for e in complete if e["pid"] == pid and e["tid"] in use]
    if device_events:
        return device_events, "device"
    return [e for e in complete if not _HOST_SKIP_THREADS.search(threads.get((e["pid"], e["tid"]), ""))
            and not _HOST_SKIP_EVENTS.search(e["name"])], "host"


def self_times(events):
    """Returns each event's self time in us, in the order given: its duration less that of the events
    nested in it on the same thread (the CPU runtime nests, e.g. a rendezvous inside its all-reduce; a GPU
    stream's kernels do not, so there self time is the duration)."""
    self_us = [float(e["dur"]) for e in events]
    by_thread = collections.defaultdict(list)
    for i, e in enumerate(events):
        by_thread[(e["pid"], e["tid"])].append(i)
    for indices in by_thread.values():
        stack = []  # open events: (end, index)
        for i in sorted(indices, key=lambda i: (events[i]["ts"], -events[i]["dur"])):
            start = events[i]["ts"]
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                self_us[stack[-1][1]] -= events[i]["dur"]
            stack.append((start + events[i]["dur"], i))
    return self_us


def _union_us(intervals):
    """Returns the total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarize(events, steps, top=15):
    """Returns the summary of a trace's events over `steps` steps: {"source", "busy_ms_per_step",
    "busy_percent", "kinds": {kind: {"ms_per_step", "percent"}}, "top": [{"op", "kind", "ms_per_step",
    "percent", "count_per_step"}]}.

    busy: the union of the events' intervals (streams or threads that overlap count once), against the
    traced window from the first event's start to the last one's end. Kinds and ops: self time summed over
    all streams or threads (so with concurrent streams they add up to more than the busy time), and their
    percentages of that sum.
    """
    work, source = work_events(events)
    if not work:
        raise ValueError("the trace holds no device or XLA runtime events to summarise")
    by_kind, by_op, counts = collections.Counter(), collections.Counter(), collections.Counter()
    kinds = {}
    for e, us in zip(work, self_times(work)):
        hlo = e.get("args", {}).get("hlo_op", "")
        op = hlo or e["name"]
        kinds[op] = kind_of(e["name"], hlo)
        by_kind[kinds[op]] += us
        by_op[op] += us
        counts[op] += 1
    total = sum(by_kind.values())
    span = max(e["ts"] + e["dur"] for e in work) - min(e["ts"] for e in work)
    busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in work])

    def share(us):
        return {"ms_per_step": us / 1000 / steps, "percent": 100 * us / total if total else 0.0}

    return {
        "source": source, "steps": steps, "busy_ms_per_step": busy / 1000 / steps,
        "busy_percent": 100 * busy / span if span else 0.0,
        "kinds": {k: share(by_kind[k]) for k in KINDS if by_kind[k]},
        "top": [{"op": op, "kind": kinds[op], **share(us), "count_per_step": counts[op] / steps}
                for op, us in by_op.most_common(top)],
    }


def summarize_dir(log_dir, steps, top=15):
    """Returns `summarize` of the newest trace under `log_dir`, with its path under "trace"."""
    path = find_trace(log_dir)
    return {"trace": path, **summarize(load_events(path), steps, top)}


def format_summary(summary, title=""):
    """Returns the summary as text: busy time, the kinds of work, then the top operations."""
    where = f"; {summary['trace']}" if "trace" in summary else ""
    lines = [f"{title}{summary['source']} busy {summary['busy_ms_per_step']:.2f} ms per step, "
             f"{summary['busy_percent']:.1f}% of the traced window ({summary['steps']} steps{where})"]
    lines.append("  " + ", ".join(f"{k} {v['percent']:.1f}%" for k, v in
                                  sorted(summary["kinds"].items(), key=lambda kv: -kv[1]["percent"])))
    width = max((len(r["op"][:60]) for r in summary["top"]), default=2)
    for r in summary["top"]:
        lines.append(f"  {r['op'][:60]:<{width}}  {r['kind']:<11}  {r['ms_per_step']:8.3f} ms  "
                     f"{r['percent']:5.1f}%  x{r['count_per_step']:g}")
    return "\n".join(lines)
