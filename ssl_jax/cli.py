"""`ssl-jax train|eval|bench|report|export`: the only place that reads command-line flags."""
import argparse
import datetime
import json
import os
import shlex
import sys
import traceback

USAGE_OVERRIDES = "overrides: --config.KEY=VALUE (e.g. --config.optim.lr=0.5 --config.num_epochs=100)"


def _parser():
    p = argparse.ArgumentParser(prog="ssl-jax", description="Self-supervised representation learning in JAX.",
                                epilog=USAGE_OVERRIDES)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--cpu-devices", type=int, default=0,
                        help="fake this many CPU devices per process (try the sharded path without accelerators)")
        sp.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        sp.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (several processes: TPU VM slices, SLURM, "
                             "multi-node GPU); with no coordinator flags JAX detects the cluster itself")
        sp.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
        sp.add_argument("--num-processes", type=int, default=None, help="processes in the job (with --distributed)")
        sp.add_argument("--process-id", type=int, default=None,
                        help="this process's index, 0 .. num-processes - 1 (with --distributed)")

    def host_only(sp):  # it reads files into host memory: device and cluster flags would be accepted and ignored
        sp.set_defaults(cpu_devices=0, no_progress=True, distributed=False, coordinator=None, num_processes=None,
                        process_id=None)

    t = sub.add_parser("train", help="pretrain (resumes from DIR's newest checkpoint)", epilog=USAGE_OVERRIDES)
    t.add_argument("--config", default=None, help="configs/<method>.py:<preset>, or a run's config.json "
                   "(default: WORKDIR/config.json, to resume a run with the config it was started with)")
    t.add_argument("--workdir", required=True, help="run directory: config.json, metrics.jsonl, checkpoints")
    common(t)
    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint", epilog=USAGE_OVERRIDES)
    e.add_argument("--workdir", required=True)
    e.add_argument("--protocol", required=True, help="knn | linear | linear_full | fewshot | semi1 | semi10")
    e.add_argument("--step", type=int, default=None, help="evaluate the checkpoint of this step (default: the "
                   "newest; a run keeps its newest --config.checkpoint.keep ones)")
    common(e)
    r = sub.add_parser("report", help="Markdown table and PNG plots comparing runs")
    r.add_argument("--workdir", required=True, nargs="+", help="one or more run directories")
    r.add_argument("--out", default="", help="output directory (default: the first workdir's report/)")
    host_only(r)
    x = sub.add_parser("export", help="write the backbone weights for use elsewhere")
    x.add_argument("--workdir", required=True)
    x.add_argument("--format", required=True, choices=("npz", "safetensors", "torch"))
    x.add_argument("--out", default="", help="output file (default: DIR/export/backbone.<ext>)")
    host_only(x)
    b = sub.add_parser("bench", help="time the training step three ways: synthetic inputs, resident data, host "
                       "pipeline (JSON on stdout, a table on stderr)", epilog=USAGE_OVERRIDES)
    b.add_argument("--config", required=True)
    b.add_argument("--steps", type=int, default=50, help="timed steps after warm-up, per mode")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first, per mode (after compilation)")
    b.add_argument("--modes", default="", help="comma-separated subset of synthetic,resident,host (default: all "
                   "three, or synthetic,host when the config's data.resident is false)")
    b.add_argument("--torch", action="store_true",
                   help="also time a plain PyTorch SimCLR step on the same images (needs ssl-jax[torch])")
    b.add_argument("--torch-compile", action="store_true", help="with --torch: wrap the PyTorch model in torch.compile")
    b.add_argument("--profile", default="", metavar="DIR",
                   help="after each mode's timed steps, trace --profile-steps more with jax.profiler into DIR/<mode> "
                   "and summarise where the device time goes (report: modes.<mode>.profile)")
    b.add_argument("--profile-steps", type=int, default=3, help="steps traced per mode with --profile")
    common(b)
    return p


def _split_overrides(extra, parser, command):
    """Returns KEY=VALUE strings from `--config.KEY=VALUE` / `--config.KEY VALUE` arguments."""
    takes_overrides = command in ("train", "eval", "bench")
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            hint = f"; {USAGE_OVERRIDES}" if takes_overrides else f" (see ssl-jax {command} --help)"
            parser.error(f"unrecognized argument {arg!r}{hint}")
        if not takes_overrides:  # report and export read each run's own config.json
            parser.error(f"{command} takes no --config overrides (it uses the run's config.json), got "
                         f"{' '.join(extra)}")
        body = arg[len("--config."):]
        if "=" not in body:
            if i + 1 >= len(extra):
                parser.error(f"{arg} needs a value")
            body, i = f"{body}={extra[i + 1]}", i + 1
        out.append(body)
        i += 1
    return out


def main(argv=None):
    """Runs the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser, args.command)
    if args.command == "bench" and args.torch_compile and not args.torch:
        parser.error("--torch-compile needs --torch (it compiles the PyTorch model that --torch times)")
    cluster_flags = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and any(f is not None for f in cluster_flags):
        parser.error("--coordinator, --num-processes and --process-id need --distributed")
    if args.cpu_devices < 0:
        parser.error(f"--cpu-devices must be >= 0 (0: the devices the machine has), got {args.cpu_devices}")
    if args.num_processes is not None and args.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or float("inf")):
        last = "num-processes - 1" if args.num_processes is None else f"{args.num_processes - 1} (--num-processes " \
            f"{args.num_processes})"
        parser.error(f"--process-id must be in 0 .. {last}, got {args.process_id}")
    import jax  # pylint: disable=import-outside-toplevel  (after parsing: --help stays fast)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from ssl_jax import parallel  # pylint: disable=import-outside-toplevel
    if args.distributed:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    # pylint: disable-next=import-outside-toplevel
    from ssl_jax import checkpoint, config as config_lib, data, metrics, train
    metrics.show_progress(not args.no_progress)
    expected = (config_lib.ConfigError, data.DataError, train.NonFiniteLossError, checkpoint.CheckpointSaveError,
                checkpoint.CheckpointReadError, metrics.MetricsWriteError, OSError, ValueError)
    command = "ssl-jax " + shlex.join(argv)
    code, error = 0, None
    try:
        code = _run_command(args, overrides, command)
    except expected as e:
        code, error = 2, f"ssl-jax {args.command}: error: {e}"
    except KeyboardInterrupt:  # Ctrl-C; `train` has saved a checkpoint first (a second Ctrl-C does not wait)
        code, error = 130, f"ssl-jax {args.command}: interrupted"
    except Exception as e:  # pylint: disable=broad-except
        if not args.distributed:
            raise
        code, error = 1, f"ssl-jax {args.command}: {type(e).__name__}: {e}"
        if not parallel.another_process_failed():
            traceback.print_exc()
    if args.distributed and code and parallel.another_process_failed():
        code, error = 1, None  # a consequence (a collective lost its peer): the failed process said why
    if error:
        print(error, file=sys.stderr)
    if args.distributed and code not in (0, 130):  # 130: every process saved and stopped at one step
        parallel.leave_failed_job(error or f"exit status {code}", code)  # the others stop too; never returns
    return code


def _run_command(args, overrides, command):
    """Runs the parsed command; returns its exit status (errors are raised)."""
    # pylint: disable-next=import-outside-toplevel
    from ssl_jax import config as config_lib, data, train, workdir as workdir_lib
    if args.command == "train":
        workdir_lib.check_workdir(args.workdir)
        spec = args.config or os.path.join(args.workdir, "config.json")
        if not args.config and not os.path.isfile(spec):
            raise config_lib.ConfigError(f"--config is needed: {args.workdir} holds no run to resume ({spec} "
                                         f"does not exist)")
        config = config_lib.load_config(spec, overrides)
        try:
            train.train(config, args.workdir, progress=not args.no_progress, command=command)
        except data.MissingDataError as e:
            if args.config:
                raise
            raise data.moved_data_error(e, spec) from e  # the run's own config.json: the data may have moved
    elif args.command == "eval":
        from ssl_jax.evaluators import protocols  # pylint: disable=import-outside-toplevel
        result = protocols.evaluate_workdir(args.workdir, args.protocol, overrides, progress=not args.no_progress,
                                            command=command, step=args.step)
        print(json.dumps(result))
    elif args.command == "report":
        from ssl_jax import report  # pylint: disable=import-outside-toplevel
        print(json.dumps(report.write_report(args.workdir, args.out or None)))
    elif args.command == "export":
        from ssl_jax import export  # pylint: disable=import-outside-toplevel
        print(json.dumps({"path": export.export_workdir(args.workdir, args.format, args.out or None)}))
    elif args.command == "bench":
        from ssl_jax import bench  # pylint: disable=import-outside-toplevel
        from ssl_jax import bench_torch  # pylint: disable=import-outside-toplevel
        config = config_lib.load_config(args.config, overrides)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] or None
        try:
            report = bench.bench(config, steps=args.steps, warmup=args.warmup, modes=modes, torch=args.torch,
                                 torch_compile=args.torch_compile, profile_dir=args.profile or None,
                                 profile_steps=args.profile_steps)
        except bench_torch.MissingTorchError as e:
            print(f"ssl-jax bench: error: {e}", file=sys.stderr)
            return 2
        report["command"] = command
        report["date"] = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        print(bench.format_table(report), file=sys.stderr)
        print("BENCHMARKS.md rows:", *bench.markdown_rows(report),
              sep="\n", file=sys.stderr)
        print(json.dumps(report))
    return 0


def run():
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
