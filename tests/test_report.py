"""`ssl-jax report`: the table's cells from known fake runs, newest evaluation wins, plots are real PNGs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssl_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASH = "–"


TRAIN = "ssl-jax train --config configs/simclr.py:cifar10 --workdir runs/a --config.num_epochs=3"
TRAIN_MORE = "ssl-jax train --config configs/simclr.py:cifar10 --workdir runs/a --config.num_epochs=4"
KNN_OLD, KNN_NEW = ("ssl-jax eval --workdir runs/a --protocol knn", "ssl-jax eval --workdir runs/a --protocol knn "
                    "--config.eval.knn_k=20 --config.eval.note='a|b'")
LINEAR = "ssl-jax eval --workdir runs/a --protocol linear"


def _write_run(workdir, config, records, starts):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    for name, rows in (("metrics.jsonl", records), ("runs.jsonl", starts)):
        with open(os.path.join(workdir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _train(step, spe, loss, lr, elapsed):
    return {"step": step, "epoch": step / spe, "loss": loss, "lr": lr, "img_per_s": 1000.0, "grad_norm": 1.0,
            "param_norm": 10.0, "elapsed_s": elapsed, "probe_top1": 0.3}


@pytest.fixture
def runs(tmp_path):
    """Two runs with known numbers: A trained 4/4 epochs (10 steps each) on a GPU, B 1.5/100 on a TPU pod."""
    a, b = str(tmp_path / "simclr_r18"), str(tmp_path / "byol_r50x2")
    records_a = [_train(s, 10, 6.0 - 0.1 * s, 0.5 * s / 40, 90.0 * s) for s in (5, 10, 15, 20, 25, 30, 35, 40)]
    records_a.insert(2, {"step": 10, "epoch": 1.0, "knn_top1": 0.25, "knn_top5": 0.6})
    records_a.insert(7, {"step": 30, "epoch": 3.0, "knn_top1": 0.66, "knn_top5": 0.9})  # the best, not the newest
    records_a += [{"step": 40, "epoch": 4.0, "knn_top1": 0.5, "knn_top5": 0.9, "protocol": "knn",
                   "command": KNN_OLD},
                  {"step": 40, "epoch": 4.0, "linear_top1": 0.7123, "linear_top5": 0.95, "protocol": "linear",
                   "command": LINEAR},
                  {"step": 40, "epoch": 4.0, "knn_top1": 0.6249, "protocol": "knn",
                   "command": KNN_NEW}]  # re-run kNN at the same step: the newest wins
    _write_run(a, {"method": "simclr", "num_epochs": 4, "batch_size": 256,
                   "model": {"name": "resnet18", "width_multiplier": 1}, "data": {"name": "cifar10"}},
               records_a, [{"started": "2025-03-01T10:00:00+00:00", "start_step": 0, "devices": 1,
                            "device_kind": "NVIDIA H100", "processes": 1, "jax_version": "0.10.2", "command": TRAIN},
                           {"started": "2025-03-02T08:30:00+00:00", "start_step": 20, "devices": 1,
                            "device_kind": "NVIDIA H100", "processes": 1, "jax_version": "0.10.2", "command": TRAIN},
                           {"started": "2025-03-02T09:00:00+00:00", "start_step": 30, "devices": 1,
                            "device_kind": "NVIDIA H100", "processes": 1, "jax_version": "0.10.2",
                            "command": TRAIN_MORE}])
    records_b = [_train(5, 10, 2.0, 0.1, 1800.0), _train(10, 10, "nan", 0.2, 3600.0),  # non-finite: logged as text
                 _train(15, 10, 1.5, 0.3, 3725.4), {"step": 15, "epoch": 1.5, "semi10_top1": 0.40}]
    _write_run(b, {"method": "byol", "num_epochs": 100, "batch_size": 4096,
                   "model": {"name": "resnet50", "width_multiplier": 2, "sk_ratio": 0.0625},
                   "data": {"name": "imagenet"}},
               records_b, [{"started": "2025-04-05T23:59:59+02:00", "start_step": 0, "devices": 32,
                            "device_kind": "TPU v4", "processes": 4, "jax_version": "0.10.2"}])
    return a, b


def _tables(markdown):
    """Returns the Markdown tables of a document, each a list of rows of stripped cells (header first)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])  # "\|" is a pipe
        elif current:
            tables, current = tables + [current], []
    return tables


def test_table_rows_are_exact_and_newest_evaluation_wins(runs, tmp_path):
    a, b = runs
    out = report.write_report([a, b], str(tmp_path / "out"))
    assert out["runs"] == 2 and out["report"] == str(tmp_path / "out" / "report.md")
    summary, detail, commands = _tables(open(out["report"]).read())
    header, *rows = summary
    assert header == ["run", "method", "backbone", "epochs", "batch", "kNN top-1", "best kNN top-1 (epoch)",
                      "linear top-1",
                      "linear full top-1", "semi 1% top-1", "semi 10% top-1", "wall time", "device",
                      "started (UTC)"]
    assert [dict(zip(header, r)) for r in rows] == [
        {"run": "simclr_r18", "method": "simclr", "backbone": "resnet18", "epochs": "4/4", "batch": "256",
         "kNN top-1": "62.5", "best kNN top-1 (epoch)": "66.0 (3)",
         "linear top-1": "71.2", "linear full top-1": DASH, "semi 1% top-1": DASH,
         "semi 10% top-1": DASH, "wall time": "1:00:00", "device": "NVIDIA H100 x1",
         "started (UTC)": "2025-03-01 10:00"},
        {"run": "byol_r50x2", "method": "byol", "backbone": "resnet50 (2x, SK 0.0625)", "epochs": "1.5/100",
         "batch": "4096", "kNN top-1": DASH, "best kNN top-1 (epoch)": DASH,
         "linear top-1": DASH, "linear full top-1": DASH,
         "semi 1% top-1": DASH, "semi 10% top-1": "40.0", "wall time": "1:02:05",
         "device": "TPU v4 x32 (4 processes)", "started (UTC)": "2025-04-05 21:59"}]
    assert detail[0] == ["run", "metric", "value", "epoch"]
    assert ["simclr_r18", "knn_top1", "62.5", "4"] in detail and ["simclr_r18", "knn_top5", "90.0", "4"] in detail
    assert ["byol_r50x2", "semi10_top1", "40.0", "1.5"] in detail and len(detail) == 1 + 4 + 1
    # Each distinct training command in start order, then the newest command of each protocol; run B has none.
    assert commands == [["run", "what", "command"], ["simclr_r18", "train", f"`{TRAIN}`"],
                        ["simclr_r18", "train", f"`{TRAIN_MORE}`"], ["simclr_r18", "eval knn",
                                                                     f"`{KNN_NEW}`".replace("|", "\\|")],
                        ["simclr_r18", "eval linear", f"`{LINEAR}`"]]


def test_plots_are_embedded_png_files(runs, tmp_path):
    a, b = runs
    out = report.write_report([a, b], str(tmp_path / "out"))
    assert [os.path.basename(p) for p in out["plots"]] == ["loss.png", "lr.png", "knn_top1.png"]
    text = open(out["report"]).read()
    assert f"ssl-jax report --workdir {a} {b} --out {tmp_path / 'out'}" in text
    pixels = []
    for path in out["plots"]:
        assert f"]({os.path.basename(path)})" in text  # relative link, next to report.md
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (960, 600)
            pixels.append(np.asarray(image.convert("RGB")))
        assert len(np.unique(pixels[-1].reshape(-1, 3), axis=0)) > 50  # lines, text and legend, not a blank
    assert not np.array_equal(pixels[0], pixels[1])


def test_curves_keep_the_last_record_per_step_and_skip_non_finite(runs):
    _, b = runs
    run = report.load_run(b)
    assert report.curve(run["train"], "loss") == ([0.5, 1.5], [2.0, 1.5])
    assert report.curve(run["train"], "lr") == ([0.5, 1.0, 1.5], [0.1, 0.2, 0.3])
    rewound = [{"step": 2, "epoch": 1.0, "loss": 3.0}, {"step": 4, "epoch": 2.0, "loss": 2.0},
               {"step": 2, "epoch": 1.0, "loss": 2.5}]  # resumed from step 2's checkpoint
    assert report.curve(rewound, "loss") == ([1.0, 2.0], [2.5, 2.0])
    assert report.format_duration(0.4) == "0:00:00" and report.format_duration(90061) == "25:01:01"


def test_default_out_dir_and_run_without_evaluations_or_runs_jsonl(tmp_path):
    workdir = str(tmp_path / "fresh")
    _write_run(workdir, {"method": "moco", "num_epochs": 2, "batch_size": 8, "model": {"name": "tiny"}},
               [_train(4, 4, 5.0, 0.1, 2.0), _train(8, 4, 4.0, 0.2, 4.0)], [])
    os.remove(os.path.join(workdir, "runs.jsonl"))
    out = report.write_report([workdir])
    assert out["report"] == os.path.join(workdir, "report", "report.md")
    assert [os.path.basename(p) for p in out["plots"]] == ["loss.png", "lr.png"]  # no kNN data: no empty plot
    text = open(out["report"]).read()
    assert _tables(text)[0][1] == ["fresh", "moco", "tiny", "2/2", "8", DASH, DASH, DASH, DASH, DASH, DASH,
                                   "0:00:04", DASH, DASH]
    assert "No kNN evaluations logged yet." in text
    assert "## Commands\n\nThe command line of each training" in text and text.rstrip().endswith("None recorded.")


def test_missing_files_name_the_directory(runs, tmp_path):
    a, _ = runs
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty} is not a training run: {empty}/config.json")):
        report.write_report([a, str(empty)])
    os.remove(os.path.join(a, "metrics.jsonl"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{a} is not a training run: {a}/metrics.jsonl")):
        report.write_report([a])


def test_cli_report(runs, tmp_path):
    a, b = runs
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out_dir = str(tmp_path / "cli_out")
    proc = subprocess.run([sys.executable, "-m", "ssl_jax", "report", "--workdir", a, b, "--out", out_dir],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"report": os.path.join(out_dir, "report.md"), "runs": 2,
                   "plots": [os.path.join(out_dir, f) for f in ("loss.png", "lr.png", "knn_top1.png")]}
    assert all(os.path.getsize(p) > 10_000 for p in out["plots"])
    assert "| simclr_r18 | simclr | resnet18 | 4/4 |" in open(out["report"]).read()


def test_a_non_finite_newest_evaluation_is_shown_as_logged(tmp_path):
    """metrics.jsonl's newest kNN is nan: the report says nan, not the older 50.0 and not "not measured"."""
    workdir = str(tmp_path / "diverged")
    _write_run(workdir, {"method": "simclr", "num_epochs": 2, "batch_size": 8, "model": {"name": "tiny"}},
               [_train(4, 4, 5.0, 0.1, 2.0), {"step": 4, "epoch": 1.0, "knn_top1": 0.5},
                _train(8, 4, 4.0, 0.2, 4.0), {"step": 8, "epoch": 2.0, "knn_top1": "nan"}], [])
    text = open(report.write_report([workdir])["report"]).read()
    summary, detail = _tables(text)[:2]
    row = dict(zip(summary[0], summary[1]))
    assert row["kNN top-1"] == "nan" and row["best kNN top-1 (epoch)"] == "50.0 (1)"
    assert detail[1] == ["diverged", "knn_top1", "nan", "2"]


@pytest.mark.parametrize("damage", ["config_cut_short", "config_not_an_object", "record_without_step",
                                    "start_time_not_iso"])
def test_a_damaged_run_is_a_one_line_error_or_reported_without_the_damaged_part(runs, damage, capsys):
    """Through the CLI: a config.json that is not a JSON object is an error naming the file; a metrics.jsonl
    record without a step (written by hand) is skipped with a warning; a runs.jsonl start time that is not an
    ISO time shows as not known. Never a traceback."""
    from ssl_jax import cli  # pylint: disable=import-outside-toplevel
    a, _ = runs
    config_path = os.path.join(a, "config.json")
    if damage == "config_cut_short":
        text = open(config_path).read()
        with open(config_path, "w") as f:
            f.write(text[:20])
    elif damage == "config_not_an_object":
        with open(config_path, "w") as f:
            f.write("[]")
    elif damage == "record_without_step":
        with open(os.path.join(a, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": 4.0, "loss": 1.0}) + "\n")
    else:
        with open(os.path.join(a, "runs.jsonl"), "w") as f:
            f.write(json.dumps({"started": "yesterday", "device_kind": "cpu", "devices": 1}) + "\n")
    code = cli.main(["report", "--workdir", a, "--out", os.path.join(os.path.dirname(a), "out")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if damage.startswith("config"):
        assert code == 2 and f"ssl-jax report: error: {config_path} is not a JSON config" in err
        assert len(err.strip().splitlines()) == 1
        return
    assert code == 0
    row = _tables(open(os.path.join(os.path.dirname(a), "out", "report.md")).read())[0][1]
    if damage == "record_without_step":
        assert "warning: skipping a record of" in err and row[3] == "4/4"
    else:
        assert row[-1] == DASH and row[-2] == "cpu x1"
