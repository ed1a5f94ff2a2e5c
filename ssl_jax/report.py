"""`ssl-jax report`: one Markdown table and PNG curves (loss, learning rate, kNN) comparing training runs."""
import datetime
import json
import math
import os
import sys

from ssl_jax import metrics as metrics_lib

MISSING = "–"
# (column header, metrics.jsonl key) of the evaluation results the summary table shows, newest value of each.
EVAL_COLUMNS = (("kNN top-1", "knn_top1"), ("linear top-1", "linear_top1"),
                ("linear full top-1", "linear_full_top1"), ("semi 1% top-1", "semi1_top1"),
                ("semi 10% top-1", "semi10_top1"))
# "best kNN top-1": the highest kNN over every evaluation of the run (the monitor's included) and its epoch, as
# lightly's benchmark reports kNN; the "kNN top-1" column is the newest.
HEADER = ("run", "method", "backbone", "epochs", "batch", EVAL_COLUMNS[0][0], "best kNN top-1 (epoch)",
          *(h for h, _ in EVAL_COLUMNS[1:]), "wall time", "device", "started (UTC)")
# (file stem, metrics.jsonl key, y label, whether the key comes from evaluation records).
PLOTS = (("loss", "loss", "training loss", False), ("lr", "lr", "learning rate", False),
         ("knn_top1", "knn_top1", "kNN top-1 (%)", True))


def _logged(value):
    """Returns a metric value as metrics.jsonl holds it: a number, or nan/inf for the text a non-finite one is
    written as; None for anything else."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else value


def _number(value):
    """Returns `value` if it is a finite number (not a bool), else None."""
    value = _logged(value)
    return value if value is not None and math.isfinite(value) else None


def _with_steps(records, path):
    """Returns the records that have an integer `step`, warning about the others (written by hand?)."""
    out = []
    for record in records:
        if metrics_lib.is_step(record.get("step")):
            out.append(record)
        else:
            print(f"warning: skipping a record of {path} without an integer step: {json.dumps(record)[:80]}",
                  file=sys.stderr)
    return out


def load_run(workdir, name=None):
    """Returns {'name', 'workdir', 'config', 'train', 'evals', 'starts'} read from a run directory."""
    paths = {f: os.path.join(workdir, f) for f in ("config.json", "metrics.jsonl", "runs.jsonl")}
    for f in ("config.json", "metrics.jsonl"):
        if not os.path.isfile(paths[f]):
            raise FileNotFoundError(f"{workdir} is not a training run: {paths[f]} does not exist")
    with open(paths["config.json"]) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{paths['config.json']} is not a JSON config (cut short or edited?): {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{paths['config.json']} is not a JSON config: it holds a {type(config).__name__}, "
                         f"not an object")
    records = _with_steps(metrics_lib.read_jsonl(paths["metrics.jsonl"]), paths["metrics.jsonl"])
    starts = metrics_lib.read_jsonl(paths["runs.jsonl"]) if os.path.isfile(paths["runs.jsonl"]) else []
    return {"name": name or os.path.basename(os.path.normpath(workdir)), "workdir": workdir, "config": config,
            "train": [r for r in records if "loss" in r], "evals": [r for r in records if "loss" not in r],
            "starts": starts}


def newest_evals(run):
    """Returns {metric: (value, epoch)}: the last value written of each evaluation metric (a re-run eval wins),
    nan or inf where that was not finite (an older finite value is not the newest)."""
    out = {}
    for record in run["evals"]:  # file order is write order
        for key, value in record.items():
            value = _logged(value)
            if key not in ("step", "epoch") and value is not None:
                out[key] = (value, record.get("epoch"))
    return out


def best_eval(run, key):
    """Returns (value, epoch) of the highest `key` over the run's evaluation records (the first on ties), or None."""
    best = None
    for record in run["evals"]:
        value = _number(record.get(key))
        if value is not None and (best is None or value > best[0]):
            best = (value, record.get("epoch"))
    return best


def _best_cell(best):
    if best is None:
        return MISSING
    epoch = _number(best[1])
    return f"{_percent(best[0])} ({MISSING if epoch is None else f'{round(epoch, 2):g}'})"


def curve(records, key):
    """Returns (epochs, values) of `key`, one point per step (the last written, after a resume), sorted by step."""
    by_step = {}
    for record in records:
        value, epoch = _number(record.get(key)), _number(record.get("epoch"))
        if value is not None and epoch is not None:
            by_step[record["step"]] = (epoch, value)
    points = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in points], [p[1] for p in points]


def format_duration(seconds):
    """Returns `seconds` as h:mm:ss (hours not wrapped at 24)."""
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _percent(value):
    if value is None:
        return MISSING
    return f"{100.0 * value:.1f}" if math.isfinite(value) else str(value)


def _epochs(run):
    """Returns 'trained/configured' epochs; trained is the newest step over the steps per epoch."""
    last = max((r for r in run["train"] + run["evals"] if _number(r.get("epoch")) is not None),
               key=lambda r: r["step"], default=None)
    trained = MISSING if last is None else f"{round(last['epoch'], 2):g}"
    configured = run["config"].get("num_epochs")
    return f"{trained}/{MISSING if configured is None else configured}"


def _backbone(config):
    model = config.get("model", {})
    name, width, sk = model.get("name", MISSING), model.get("width_multiplier", 1), model.get("sk_ratio", 0.0)
    variants = ([] if width == 1 else [f"{width:g}x"]) + ([f"SK {sk:g}"] if sk else [])
    return f"{name} ({', '.join(variants)})" if variants else name


def _device(starts):
    """Returns e.g. 'NVIDIA H100 x8' (several distinct ones joined when a run resumed on other hardware)."""
    kinds = []
    for start in starts:
        kind = f"{start.get('device_kind', '?')} x{start.get('devices', '?')}"
        if start.get("processes", 1) > 1:
            kind += f" ({start['processes']} processes)"
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds) or MISSING


def _started(starts):
    try:
        when = datetime.datetime.fromisoformat(starts[0]["started"])
    except (IndexError, KeyError, TypeError, ValueError):  # none, or not an ISO time (written by hand?)
        return MISSING
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M")


def table_row(run):
    """Returns the summary table's cells (strings, in HEADER order) for one run."""
    evals = newest_evals(run)
    elapsed = [v for v in (_number(r.get("elapsed_s")) for r in run["train"]) if v is not None]
    return (run["name"], run["config"].get("method", MISSING), _backbone(run["config"]), _epochs(run),
            str(run["config"].get("batch_size", MISSING)),
            _percent(evals.get(EVAL_COLUMNS[0][1], (None,))[0]), _best_cell(best_eval(run, EVAL_COLUMNS[0][1])),
            *(_percent(evals.get(key, (None,))[0]) for _, key in EVAL_COLUMNS[1:]),
            format_duration(elapsed[-1]) if elapsed else MISSING, _device(run["starts"]), _started(run["starts"]))


def commands(run):
    """Returns [(what, command)]: each distinct training command in start order, then per protocol the command
    of its newest evaluation. Runs and evaluations from before commands were recorded have none."""
    out = []
    for start in run["starts"]:
        if start.get("command") and ("train", start["command"]) not in out:
            out.append(("train", start["command"]))
    newest = {}
    for record in run["evals"]:  # file order is write order: a re-run evaluation replaces the older one
        if record.get("command"):
            newest[record.get("protocol") or "eval"] = record["command"]
    return out + [(f"eval {protocol}", cmd) for protocol, cmd in newest.items()]


def _markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(runs, out_dir):
    """Writes one PNG per entry of PLOTS that has data (all runs on one figure); returns their paths."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    paths = []
    for stem, key, ylabel, from_evals in PLOTS:
        fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = []
        for i, run in enumerate(runs):  # a run keeps its colour across the figures
            epochs, values = curve(run["evals"] if from_evals else run["train"], key)
            if not values:
                continue
            if from_evals:
                values = [100.0 * v for v in values]
            ax.plot(epochs, values, color=f"C{i % 10}", label=run["name"], linewidth=1.6,
                    marker="o" if len(values) <= 30 else None, markersize=4)
            drawn += values
        if not drawn:
            continue
        if key == "loss" and min(drawn) > 0 and max(drawn) / min(drawn) > 100:
            ax.set_yscale("log")  # losses of different methods differ by orders of magnitude
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(title="run", fontsize="small")
        paths.append(os.path.join(out_dir, f"{stem}.png"))
        fig.savefig(paths[-1])
    return paths


def _names(workdirs):
    """Returns one name per run: the directory name, or its last two path parts where names would collide."""
    base = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return [b if base.count(b) == 1 else os.path.join(*os.path.normpath(w).split(os.sep)[-2:])
            for b, w in zip(base, workdirs)]


def write_report(workdirs, out_dir=None):
    """Writes report.md and PNG plots for the runs; returns {'report': path, 'plots': [paths], 'runs': n}."""
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("report needs at least one run directory")
    runs = [load_run(w, n) for w, n in zip(workdirs, _names(workdirs))]
    command = "ssl-jax report --workdir " + " ".join(workdirs) + (f" --out {out_dir}" if out_dir else "")
    out_dir = out_dir or os.path.join(workdirs[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    plots = plot_curves(runs, out_dir)

    detail = [(run["name"], key, _percent(value) if "top" in key else f"{value:.4g}",
               MISSING if epoch is None else f"{round(epoch, 2):g}")
              for run in runs for key, (value, epoch) in sorted(newest_evals(run).items())]
    lines = ["# Run report", "", f"Written by `{command}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             "Accuracies are top-1 in %, the newest evaluation of each run, except best kNN: the highest of all "
             "its kNN evaluations (the monitor's included) and the epoch of it, as lightly's benchmark reports kNN (a "
             "choice made on the test set, so an optimistic figure: the newest is the one to compare); "
             "epochs are trained/configured; wall time is the training processes' over all restarts (compilation, "
             f"checkpoint saves and the kNN monitor included); {MISSING} means not measured.", "",
             _markdown_table(HEADER, [table_row(r) for r in runs]), "", "## Curves", ""]
    titles = {f"{stem}.png": f"{label} vs epoch" for stem, _, label, _ in PLOTS}
    for p in plots:  # a blank line between images: one figure per row when rendered
        lines += [f"![{titles[os.path.basename(p)]}]({os.path.basename(p)})", ""]
    if not any(p.endswith("knn_top1.png") for p in plots):
        lines.append("No kNN evaluations logged yet.")
    lines += ["", "## All evaluation results (newest of each)", ""]
    lines.append(_markdown_table(("run", "metric", "value", "epoch"), detail) if detail else "None logged yet.")
    command_rows = [(run["name"], what, f"`{cmd}`") for run in runs for what, cmd in commands(run)]
    lines += ["", "## Commands", "", "The command line of each training (re)start with other arguments, and of the "
              "newest evaluation of each protocol, as typed: relative paths are from where it ran.", ""]
    lines.append(_markdown_table(("run", "what", "command"), command_rows) if command_rows else "None recorded.")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"report": path, "plots": plots, "runs": len(runs)}
