"""launch/: every script parses (`bash -n`), prints its usage, and in DRY_RUN=1 mode prints the exact
`ssl-jax train` command with the config and overrides passed through (and `--distributed` where there are
several processes). The GPU restart loop is run for real against a fake `ssl-jax`, tpu_vm.sh against a
stand-in `gcloud` (its workers' commands run here, its bucket is a folder), the SLURM script against stand-in
`srun`/`scancel`/`scontrol` and container.sh against a stand-in `docker`: signals sent as SLURM, a VM shutting
down, a supervisor or a terminal's Ctrl-C send them."""
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_vm.sh", "gpu_single_node.sh", "slurm_multinode.sbatch", "container.sh"]
ALL_SCRIPTS = SCRIPTS + ["method_table.sh"]
CONFIG = "configs/simclr.py:imagenet"
OVERRIDES = ["--config.optim.lr=0.5", "--config.data.path=/data/my images.tar"]  # a space must survive


def _run(script, *args, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("WORKDIR", "TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "SYNC_TO", "NFS_SHARE", "SHARED_WORKDIR",
                "SYNC_EVERY", "STOP_WAIT", "STOP_TIMEOUT"):
        full_env.pop(key, None)
    full_env.update(env or {})
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _commands(stdout):
    """Returns the argv of every `+ ...` line a DRY_RUN printed."""
    return [shlex.split(line[2:]) for line in stdout.splitlines()
            if line.startswith("+ ") and not line.startswith("+ export ")]


def _train_argv(argv):
    """Returns the `ssl-jax train ...` part of a command line (from the executable on)."""
    i = next(i for i, a in enumerate(argv) if a.endswith("ssl-jax") and argv[i + 1] == "train")
    return argv[i:]


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True, timeout=10)
    with open(os.path.join(LAUNCH, script)) as f:
        text = f.read()
    assert "set -euo pipefail" in text and "DRY_RUN" in text


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_prints_usage_and_exits_0(script):
    proc = _run(script, "-h")
    assert "usage:" in proc.stdout and "DRY_RUN" in proc.stdout
    assert "set -euo" not in proc.stdout and "#SBATCH" not in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_is_an_error(script):
    args = {"tpu_vm.sh": ["train"], "container.sh": ["train"]}.get(script, [])
    proc = _run(script, *args, env={"DRY_RUN": "1"}, check=False)
    assert proc.returncode == 2 and "error" in proc.stderr
    proc = _run(script, *args, CONFIG, "--bogus", env={"DRY_RUN": "1"}, check=False)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_gpu_single_node_dry_run():
    proc = _run("gpu_single_node.sh", "--gpus", "0,1", CONFIG, *OVERRIDES, "--config.num_epochs", "3",
                env={"DRY_RUN": "1"})
    assert "+ export CUDA_VISIBLE_DEVICES=0,1" in proc.stdout
    (argv,) = _commands(proc.stdout)
    assert argv == ["ssl-jax", "train", "--config", CONFIG, "--workdir", "runs/simclr_imagenet", *OVERRIDES,
                    "--config.num_epochs=3"]
    proc = _run("gpu_single_node.sh", "--preemptible", "--workdir", "w", CONFIG, env={"DRY_RUN": "1"})
    assert "restart loop" in proc.stdout
    assert _commands(proc.stdout) == [["ssl-jax", "train", "--config", CONFIG, "--workdir", "w"]]


def test_slurm_dry_run_one_task_per_gpu_and_requeue():
    proc = _run("slurm_multinode.sbatch", CONFIG, *OVERRIDES, env={"DRY_RUN": "1"})
    (argv,) = _commands(proc.stdout)
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert _train_argv(argv) == ["ssl-jax", "train", "--config", CONFIG, "--workdir", "runs/simclr_imagenet",
                                 "--distributed", "--no-progress", *OVERRIDES]
    # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: it is passed on explicitly
    proc = _run("slurm_multinode.sbatch", CONFIG, env={"DRY_RUN": "1", "SLURM_CPUS_PER_TASK": "11"})
    (argv,) = _commands(proc.stdout)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=11"]
    with open(os.path.join(LAUNCH, "slurm_multinode.sbatch")) as f:
        header = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    assert "--requeue" in header and "--signal=B:USR1@120" in header
    per_node = {h.split("=")[0]: h.split("=")[1] for h in header if "per-node" in h}
    assert per_node["--ntasks-per-node"] == per_node["--gpus-per-node"]  # JAX: one process per GPU


def test_slurm_time_limit_saves_then_requeues_and_a_preemption_does_not(tmp_path):
    """The real path against stand-in srun/scancel/scontrol: USR1 (the time limit near) gets the trainers a
    SIGTERM through scancel, and the job is requeued once they saved and exited; a SIGTERM (a preemption,
    which SLURM sends to the trainers itself) is waited out and requeues nothing (--requeue does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "srun": f"""echo "srun $*" >> {tmp_path}/calls; echo $$ > {tmp_path}/srun.pid
trap 'sleep 0.3; echo saved >> {tmp_path}/calls; exit 0' TERM
touch {tmp_path}/started
for i in $(seq 100); do sleep 0.1; done; exit 1""",
        "scancel": f'echo "scancel $*" >> {tmp_path}/calls; kill -TERM "$(cat {tmp_path}/srun.pid)"',
        "scontrol": f'echo "scontrol $*" >> {tmp_path}/calls'}
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(tmp_path / "no_venv"), SLURM_JOB_ID="42",
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8",
               SLURM_CPUS_PER_TASK="11")
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        for name in ("calls", "started"):
            (tmp_path / name).unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm_multinode.sbatch"), CONFIG], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(tmp_path / "started")
        proc.send_signal(sig)
        if sig == signal.SIGTERM:  # SLURM signals every process of the job
            os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        calls = (tmp_path / "calls").read_text().splitlines()
        assert proc.returncode == 0, err
        assert calls[0].startswith("srun --kill-on-bad-exit=1 --cpus-per-task=11 ssl-jax train")
        assert calls[1:] == (["scancel --signal=TERM 42", "saved", "scontrol requeue 42"]
                             if sig == signal.SIGUSR1 else ["saved"]), calls
    env["SLURM_NTASKS_PER_NODE"] = "1"  # one task per node: JAX would use GPU 0 of each node only
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_multinode.sbatch"), CONFIG], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "must equal the GPUs per node" in proc.stderr


def test_tpu_vm_dry_run_up():
    env = {"DRY_RUN": "1", "TPU_NAME": "t1", "ZONE": "us-west4-a", "ACCELERATOR_TYPE": "v5litepod-8"}
    proc = _run("tpu_vm.sh", "up", CONFIG, *OVERRIDES, env=env)
    cmds = _commands(proc.stdout)
    gcloud = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh"]  # create, copy, install, train, logs
    create = gcloud[0]
    assert "t1" in create and "--zone=us-west4-a" in create and "--accelerator-type=v5litepod-8" in create
    assert "--version=v2-alpha-tpuv5-lite" in create
    install, train, logs = gcloud[2], gcloud[3], gcloud[4]
    assert "--worker=all" in install and "--worker=all" in train and "--worker=0" in logs
    remote_install = next(a for a in install if a.startswith("--command="))
    assert "jax[tpu]" in remote_install.replace("\\", "") and "-e ~/ssl_jax" in remote_install
    remote = shlex.split(next(a for a in train if a.startswith("--command="))[len("--command="):])
    train_argv = _train_argv(remote)
    assert train_argv[:len(OVERRIDES) + 7] == ["~/ssl_jax_venv/bin/ssl-jax", "train", "--config", CONFIG, "--workdir",
                                               "runs/simclr_imagenet", "--distributed", *OVERRIDES]
    assert train_argv[len(OVERRIDES) + 7] == ">"  # the rest redirects the log and records the pid


def test_tpu_vm_workdir_rules():
    env = {"DRY_RUN": "1", "NO_FOLLOW": "1"}
    proc = _run("tpu_vm.sh", "train", CONFIG, "--workdir", "gs://b/run", env=env, check=False)
    assert proc.returncode == 2 and "gs://" in proc.stderr
    proc = _run("tpu_vm.sh", "train", CONFIG, "--accelerator-type", "v4-32", env=env, check=False)
    assert proc.returncode == 2 and "shared" in proc.stderr  # multi-host needs a shared workdir
    proc = _run("tpu_vm.sh", "train", CONFIG, "--accelerator-type", "v4-32",
                env={**env, "NFS_SHARE": "10.0.0.2:/vol1", "SYNC_TO": "gs://b/run"})
    ssh = [c for c in _commands(proc.stdout) if c[4] == "ssh"]
    assert [next(a for a in c if a.startswith("--worker=")) for c in ssh] == ["--worker=0", "--worker=all",
                                                                              "--worker=0"]
    assert "gcloud storage rsync -r gs://b/run /mnt/ssl_jax/runs/simclr_imagenet" in ssh[0][-1]
    assert "--workdir /mnt/ssl_jax/runs/simclr_imagenet --distributed" in ssh[1][-1]
    for verb in ("logs", "stop", "delete"):
        assert _commands(_run("tpu_vm.sh", verb, env=env).stdout)
    # SHARED_WORKDIR=1 without a workdir on the shared filesystem would use each worker's local disk
    for workdir in ([], ["--workdir", "runs/x"]):
        proc = _run("tpu_vm.sh", "train", CONFIG, "--accelerator-type", "v4-32", *workdir,
                    env={**env, "SHARED_WORKDIR": "1"}, check=False)
        assert proc.returncode == 2 and "SHARED_WORKDIR=1 needs --workdir" in proc.stderr, proc.stderr
    proc = _run("tpu_vm.sh", "train", CONFIG, "--accelerator-type", "v4-32", "--workdir", "/shared/run",
                env={**env, "SHARED_WORKDIR": "1"})
    assert "--workdir /shared/run --distributed" in _commands(proc.stdout)[0][-1]


def test_tpu_vm_zone_follows_the_accelerator_type():
    """The default zone offers the type (v4 only in us-central2-b); ZONE wins; other types need ZONE."""
    for accelerator, zone in (("v4-8", "us-central2-b"), ("v5litepod-8", "us-west4-a"), ("v5p-8", "us-east5-a"),
                              ("v6e-8", "us-east5-b")):
        (create,) = _commands(_run("tpu_vm.sh", "create", env={"DRY_RUN": "1", "ACCELERATOR_TYPE": accelerator}).stdout)
        assert f"--zone={zone}" in create and f"--accelerator-type={accelerator}" in create
    (create,) = _commands(_run("tpu_vm.sh", "create", "--accelerator-type", "v6e-8",
                               env={"DRY_RUN": "1", "ZONE": "europe-west4-a"}).stdout)
    assert "--zone=europe-west4-a" in create
    proc = _run("tpu_vm.sh", "create", env={"DRY_RUN": "1", "ACCELERATOR_TYPE": "v3-8"}, check=False)
    assert proc.returncode == 2 and "set ZONE" in proc.stderr


# ----------------------------------------------------------------------------------------------
# tpu_vm.sh run for real against a stand-in gcloud: `ssh --command=C` runs C here as the one worker (HOME is
# tmp_path/home, so ~/ssl_jax is there), `storage ls|rsync` use tmp_path/gcs/<bucket>/<path> as the bucket.
# ----------------------------------------------------------------------------------------------
_FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$SSL_JAX_FAKE/gcloud_calls"
gcs() { echo "$SSL_JAX_FAKE/gcs/${1#gs://}"; }
case "$1 $2 $4" in
  "compute tpus ssh") for a; do [[ "$a" == --command=* ]] && cmd="${a#--command=}"; done; exec bash -c "$cmd" ;;
  "compute tpus create")
    if [[ -e "$SSL_JAX_FAKE/tpu_exists" ]]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: Resource 'projects/p/locations/z/nodes/t'" \
           "already exists" >&2; exit 1
    fi; touch "$SSL_JAX_FAKE/tpu_exists" ;;
esac
[[ "$1" == storage && -e "$SSL_JAX_FAKE/gcs_down" ]] && { echo "ERROR: (gcloud.storage.$2) HTTPError 503" >&2; exit 1; }
if [[ "$1 $2" == "storage ls" ]]; then
  [[ -n "$(ls -A "$(gcs "$3")" 2>/dev/null)" ]] && { echo "$3/"; exit 0; }
  echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2; exit 1
elif [[ "$1 $2" == "storage rsync" ]]; then
  [[ -e "$SSL_JAX_FAKE/rsync_down" ]] && { echo "ERROR: (gcloud.storage.rsync) HTTPError 503" >&2; exit 1; }
  src="${@: -2:1}"; dst="${@: -1}"; what=pull; [[ "$dst" == gs://* ]] && what=push
  [[ "$src" == gs://* ]] && src="$(gcs "$src")"; [[ "$dst" == gs://* ]] && dst="$(gcs "$dst")"
  [[ " $* " == *" --delete-unmatched-destination-objects "* ]] && rm -rf "$dst"
  [[ "$what" == push && -e "$SSL_JAX_FAKE/slow_push" ]] && sleep "$(cat "$SSL_JAX_FAKE/slow_push")"
  mkdir -p "$dst" && cp -a "$src/." "$dst/" && echo "$what $(date +%s.%N)" >> "$SSL_JAX_FAKE/storage_log"
fi
exit 0
"""
# The trainer: `train --config C --workdir W ...`; saves step 2 on SIGTERM, or (SSL_JAX_FAKE/quick) step 1 and exits.
_FAKE_TRAINER = r"""#!/usr/bin/env bash
wd="$5"; echo "$*" >> "$SSL_JAX_FAKE/trainer_calls"; mkdir -p "$wd/checkpoints"
trap 'mkdir -p "$wd/checkpoints/2"; echo step2 >> "$wd/metrics.jsonl"; exit 0' TERM
if [[ -e "$SSL_JAX_FAKE/quick" ]]; then mkdir -p "$wd/checkpoints/1"; echo step1 >> "$wd/metrics.jsonl"; exit 0; fi
touch "$SSL_JAX_FAKE/started"
for i in $(seq 300); do sleep 0.1; done
"""


def _fake_processes(fake):
    """Returns {pid: command line} of the live processes started under this stand-in (by their environment)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"SSL_JAX_FAKE={fake}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _sync_loops(fake):
    """Returns the pids of the running sync loops; not the loop's own subshells (`$(date +%s)`, `$(cat ...)`),
    which have its command line for the moment they run (one was counted as a second loop on a loaded machine)."""
    loops = [pid for pid, cmd in _fake_processes(fake).items()
             if "while" in cmd and "--delete-unmatched-destination-objects" in cmd]
    return [pid for pid in loops if _parent(pid) not in loops]


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state, past the command's ")"
    except (OSError, IndexError, ValueError):
        return None


@pytest.fixture
def tpu_fake(tmp_path):
    """Runs tpu_vm.sh with the stand-in gcloud; yields (run(*args, check=True), tmp_path, home); kills what the
    test left running (the trainers and sync loops it started) at the end."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "ssl_jax").mkdir(parents=True)
    (home / "ssl_jax_venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "gcloud", _FAKE_GCLOUD), (home / "ssl_jax_venv" / "bin" / "ssl-jax", _FAKE_TRAINER)):
        path.write_text(text)
        path.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SSL_JAX_FAKE": str(tmp_path),
           "NO_FOLLOW": "1", "SYNC_TO": "gs://bucket/run", "SYNC_EVERY": "600", "STOP_WAIT": "20"}

    def run(*args, check=True, **extra):
        return _run("tpu_vm.sh", *args, env={**env, **extra}, check=check)

    yield run, tmp_path, home
    for pid in _fake_processes(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_for(path, seconds=10):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), path


def test_tpu_vm_stop_waits_for_the_save_and_the_final_push(tpu_fake):
    """The sync loop pushes as soon as the trainer exits (not after SYNC_EVERY), and stop returns only after
    that push: stop then delete keeps the last checkpoint."""
    run, fake, home = tpu_fake
    run("train", CONFIG)
    _wait_for(fake / "started")
    t0 = time.time()
    proc = run("stop")
    assert (fake / "gcs" / "bucket" / "run" / "checkpoints" / "2").is_dir()  # the step saved on SIGTERM
    assert "SIGTERM sent" in proc.stdout and "waiting" in proc.stdout and "stopped" in proc.stdout
    assert time.time() - t0 < 15 and not _sync_loops(fake)
    proc = run("stop")  # nothing left to wait for
    assert "no trainer running" in proc.stdout and time.time() - t0 < 20


def test_tpu_vm_sync_pulls_only_into_a_workdir_without_checkpoints(tpu_fake):
    run, fake, home = tpu_fake
    (fake / "quick").touch()
    bucket = fake / "gcs" / "bucket" / "run"
    (bucket / "checkpoints" / "1").mkdir(parents=True)
    (bucket / "metrics.jsonl").write_text("bucket\n")
    # stop, then train: the workdir, bound to SYNC_TO by the first train, is newer than the bucket's copy.
    local = home / "ssl_jax" / "runs" / "simclr_imagenet"
    (local / "checkpoints" / "1").mkdir(parents=True)
    (local / "metrics.jsonl").write_text("bucket\nlocal, not pushed yet\n")
    (local / ".sync_to").write_text("gs://bucket/run\n")
    proc = run("train", CONFIG)
    assert (local / "metrics.jsonl").read_text().startswith("bucket\nlocal, not pushed yet\n")  # not replaced
    assert "resuming from them, nothing pulled" in proc.stdout
    run("stop")
    assert (bucket / "metrics.jsonl").read_text() == "bucket\nlocal, not pushed yet\nstep1\n"
    # A new VM (an empty workdir): the bucket's run is pulled before the trainer starts, then pushed back.
    fresh = home / "ssl_jax" / "runs" / "fresh"
    proc = run("train", CONFIG, "--workdir", "runs/fresh")
    assert "pulling gs://bucket/run" in proc.stdout
    run("stop")
    assert (fresh / "metrics.jsonl").read_text() == "bucket\nlocal, not pushed yet\nstep1\nstep1\n"
    assert (bucket / "metrics.jsonl").read_text() == (fresh / "metrics.jsonl").read_text()
    assert [line.split()[0] for line in (fake / "storage_log").read_text().splitlines()] == ["push", "pull", "push"]


def test_tpu_vm_sync_never_starts_from_scratch_beside_a_bucket_it_could_not_read(tpu_fake):
    run, fake, home = tpu_fake
    (fake / "quick").touch()
    bucket = fake / "gcs" / "bucket" / "run"
    (bucket / "checkpoints" / "7").mkdir(parents=True)
    for flag, message in (("gcs_down", "cannot list gs://bucket/run"),
                          ("rsync_down", "pulling gs://bucket/run failed")):
        (fake / flag).touch()
        proc = run("train", CONFIG, check=False)
        (fake / flag).unlink()
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert not (fake / "trainer_calls").exists() and not (fake / "storage_log").exists()
    # A workdir with checkpoints of its own (trained without SYNC_TO) is not pushed over the bucket's run.
    (home / "ssl_jax" / "runs" / "other" / "checkpoints" / "3").mkdir(parents=True)
    proc = run("train", CONFIG, "--workdir", "runs/other", check=False)
    assert proc.returncode != 0 and "refusing to mix two runs" in proc.stderr
    assert sorted(os.listdir(bucket / "checkpoints")) == ["7"] and not (fake / "trainer_calls").exists()
    proc = run("sync", CONFIG, "--workdir", "runs/other", check=False)
    assert proc.returncode != 0 and "not bound to SYNC_TO" in proc.stderr
    # An empty bucket path is a new run: it starts, and its pushes create the copy.
    proc = run("train", CONFIG, "--workdir", "runs/other", SYNC_TO="gs://bucket/new")
    assert "gs://bucket/new is empty" in proc.stdout
    run("stop")
    assert sorted(os.listdir(fake / "gcs" / "bucket" / "new" / "checkpoints")) == ["1", "3"]


def test_tpu_vm_train_replaces_an_earlier_sync_loop(tpu_fake):
    """train again at once after the trainer ended: the first loop finishes its push, and only one loop runs."""
    run, fake, home = tpu_fake
    (fake / "quick").touch()
    (fake / "slow_push").write_text("5")
    run("train", CONFIG)
    trainer = int((home / "ssl_jax_train.pid").read_text())
    deadline = time.time() + 10  # until the trainer is reaped, as systemd does at once on a VM
    while os.path.exists(f"/proc/{trainer}") and time.time() < deadline:
        time.sleep(0.05)
    first = _sync_loops(fake)  # its final push still going on
    (fake / "slow_push").unlink()
    run("train", CONFIG)
    loops = _sync_loops(fake)
    assert len(first) == 1 and len(loops) <= 1 and first[0] not in loops, (first, loops)
    run("stop")


def test_tpu_vm_train_mounts_the_nfs_share(tpu_fake):
    """A rebooted worker has lost the NFS mount: train mounts it again (unless mounted) before starting."""
    run, fake, home = tpu_fake
    (fake / "quick").touch()
    for name, body in (("mountpoint", "exit 1"), ("sudo", f'echo "$*" >> {fake}/sudo_calls')):
        (fake / "bin" / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake / "bin" / name).chmod(0o755)
    run("train", CONFIG, "--workdir", "runs/nfs", NFS_SHARE="10.0.0.2:/vol1", SYNC_TO="")
    assert (fake / "sudo_calls").read_text().splitlines() == [
        "mkdir -p /mnt/ssl_jax", "mount -t nfs -o rw,hard 10.0.0.2:/vol1 /mnt/ssl_jax"]
    _wait_for(fake / "trainer_calls")  # then it started


def test_tpu_vm_sync_loop_outlives_the_shutdowns_sigterm(tpu_fake):
    """A VM shutting down (Spot preemption) sends SIGTERM to every process: the trainer saves, and the sync loop
    must live on to push that checkpoint."""
    run, fake, home = tpu_fake
    run("train", CONFIG)
    _wait_for(fake / "started")
    _wait_for(home / "ssl_jax_sync.pid")  # written once the loop runs (its first command set up the trap)
    for pid in _fake_processes(fake):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    pushed = fake / "gcs" / "bucket" / "run" / "checkpoints" / "2"  # the step saved on SIGTERM
    _wait_for(pushed)
    assert pushed.is_dir(), "the sync loop died with the trainer: the checkpoint saved on SIGTERM was not pushed"


def test_tpu_vm_install_failure_is_not_hidden_by_the_nfs_mount(tpu_fake):
    """install with NFS_SHARE: a failed install (here: the copied archive is missing) fails the command and
    mounts nothing, rather than exiting 0 with the mount's status and letting up start trainers."""
    run, fake, home = tpu_fake
    for name, body in (("mountpoint", "exit 1"), ("sudo", f'echo "$*" >> {fake}/sudo_calls')):
        (fake / "bin" / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake / "bin" / name).chmod(0o755)
    proc = run("install", NFS_SHARE="10.0.0.2:/vol1", TMPDIR=str(fake), check=False)
    assert proc.returncode != 0 and not (fake / "sudo_calls").exists(), (proc.returncode, proc.stderr)


def test_tpu_vm_create_says_how_to_resume_a_preempted_vm(tpu_fake):
    run, fake, home = tpu_fake
    run("create")
    proc = run("create", check=False)  # e.g. a preempted Spot VM, which stays until deleted
    assert proc.returncode == 1 and "ALREADY_EXISTS" in proc.stdout + proc.stderr
    assert "launch/tpu_vm.sh delete" in proc.stderr and "`up` again with the same SYNC_TO" in proc.stderr


def test_container_dry_run_and_dockerfile_entrypoint():
    proc = _run("container.sh", "train", "--gpus", "0,1", CONFIG, *OVERRIDES, env={"DRY_RUN": "1"})
    (argv,) = _commands(proc.stdout)
    assert argv[:2] == ["docker", "run"] and argv[argv.index("--gpus") + 1] == '"device=0,1"'
    assert argv[argv.index("--stop-timeout") + 1] == "120"  # docker stop's 10 s is too short to save
    (longer,) = _commands(_run("container.sh", "train", CONFIG, env={"DRY_RUN": "1", "STOP_TIMEOUT": "300"}).stdout)
    assert longer[longer.index("--stop-timeout") + 1] == "300"
    i = argv.index("ssl-jax:latest")
    assert argv[i + 1:] == ["train", "--config", CONFIG, "--workdir", "runs/simclr_imagenet", *OVERRIDES]
    (build,) = _commands(_run("container.sh", "build", env={"DRY_RUN": "1"}).stdout)
    assert build[:4] == ["docker", "build", "-f", os.path.join(LAUNCH, "Dockerfile")]
    with open(os.path.join(LAUNCH, "Dockerfile")) as f:
        dockerfile = f.read()
    assert 'ENTRYPOINT ["ssl-jax"]' in dockerfile and "jax[cuda12]" in dockerfile
    for copied in ("setup.py", "ssl_jax", "configs"):
        assert f"COPY {copied}" in dockerfile


def test_launch_readme_covers_the_audited_gaps():
    """launch/README.md: what the scripts take, zones per TPU type, Spot preemption, Python 3.11+, ImageNet
    for tfds and its cache, SLURM's grace time, docker's stop timeout."""
    with open(os.path.join(LAUNCH, "README.md")) as f:
        text = f.read()
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")}
    tpu, gpu = sections["TPU VM: two commands"], sections["One machine with N GPUs"]
    slurm, container = sections["SLURM, several GPU nodes: two commands"], sections["Container"]
    assert "exactly as `ssl-jax train` does" not in text and "positional" in text
    for zone in ("us-central2-b", "us-west4-a", "us-east5-a", "us-east5-b"):  # the script's defaults per type
        assert f"`{zone}`" in tpu
    assert "ALREADY_EXISTS" in tpu and "launch/tpu_vm.sh delete" in tpu and "STOP_WAIT" in tpu
    assert "3.11 or newer" in gpu and "3.11 or newer" in slurm
    assert "--config.data.name=imagenet2012" not in slurm and "downloads/manual" in slurm
    assert "--config.data.tfds_data_dir" in slurm and "252 GB" in slurm and "~/.cache/ssl_jax" in slurm
    assert "GraceTime" in slurm and "--cpus-per-task" in slurm
    assert "--stop-timeout 120" in container


def _fake_ssl_jax(tmp_path, script):
    path = tmp_path / "ssl-jax"
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_preemptible_loop_restarts_after_sigterm_stop_and_crash(tmp_path):
    count = tmp_path / "count"
    fake = _fake_ssl_jax(tmp_path, f"""
n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}
echo "$@" >> {tmp_path}/argv
case $n in
  1) echo "stop requested (SIGTERM): saved step 5, exiting" >&2; exit 0 ;;
  2) exit 137 ;;
  *) echo "done" >&2; exit 0 ;;
esac
""")
    proc = _run("gpu_single_node.sh", "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG, *OVERRIDES,
                env={"SSL_JAX": fake, "RESTART_DELAY": "0"})
    assert count.read_text().strip() == "3" and "restart 2/20" in proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert len(set(argv)) == 1 and argv[0].startswith(f"train --config {CONFIG} --workdir")


def test_preemptible_loop_does_not_retry_exit_2(tmp_path):
    fake = _fake_ssl_jax(tmp_path, f"echo x >> {tmp_path}/calls; exit 2\n")
    proc = _run("gpu_single_node.sh", "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG,
                env={"SSL_JAX": fake, "RESTART_DELAY": "0"}, check=False)
    assert proc.returncode == 2 and (tmp_path / "calls").read_text() == "x\n"


def test_preemptible_loop_does_not_retry_a_trainer_that_cannot_run(tmp_path):
    broken = tmp_path / "ssl-jax"  # a venv whose Python is gone: the shell exits 127
    broken.write_text("#!/nonexistent/venv/bin/python\n")
    broken.chmod(0o755)
    broken = str(broken)
    proc = _run("gpu_single_node.sh", "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG,
                env={"SSL_JAX": broken, "RESTART_DELAY": "0"}, check=False)
    assert proc.returncode == 127 and "activate the venv or set SSL_JAX" in proc.stderr
    assert "restart" not in proc.stderr, proc.stderr
    proc = _run("gpu_single_node.sh", "--workdir", str(tmp_path / "w"), CONFIG,
                env={"SSL_JAX": str(tmp_path / "no-ssl-jax")}, check=False)
    assert proc.returncode == 127 and "not found: activate the venv or set SSL_JAX" in proc.stderr


def _sigterm_once_started(tmp_path, env, script, *args, ctrl_c=False, delay=0.0):
    """Starts a launch script, sends it SIGTERM once its fake trainer touched tmp_path/started (and `delay`
    seconds more); returns (exit status, stderr). ctrl_c: SIGINT to the script's whole process group instead,
    as a terminal's Ctrl-C does."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env)
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, script), *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=ctrl_c)
    deadline = time.time() + 10
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_sigterm_to_the_loop_reaches_the_trainer_and_ends_the_loop(tmp_path):
    fake = _fake_ssl_jax(tmp_path, f"""
echo x >> {tmp_path}/calls
trap 'echo "stop requested (SIGTERM): saved" >&2; exit 0' TERM
touch {tmp_path}/started
for i in $(seq 100); do sleep 0.1; done
exit 1
""")
    returncode, err = _sigterm_once_started(tmp_path, {"SSL_JAX": fake, "RESTART_DELAY": "0"}, "gpu_single_node.sh",
                                            "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG)
    assert returncode == 0 and "not restarting" in err
    assert (tmp_path / "calls").read_text() == "x\n"


def test_sigterm_during_the_restart_delay_ends_the_loop(tmp_path):
    """A SIGTERM between two trainers (the restart delay) stops the loop at once: no new trainer is started
    that nobody would stop."""
    fake = _fake_ssl_jax(tmp_path, f"echo x >> {tmp_path}/calls; touch {tmp_path}/started; exit 1\n")
    t0 = time.time()
    returncode, err = _sigterm_once_started(tmp_path, {"SSL_JAX": fake, "RESTART_DELAY": "6"}, "gpu_single_node.sh",
                                            "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG, delay=1)
    assert returncode == 143 and "not restarting" in err, err
    assert (tmp_path / "calls").read_text() == "x\n" and time.time() - t0 < 5


# The trainer as the real one behaves on Ctrl-C: it saves, then writes "stop requested" to stderr. (A bash fake
# started in the background ignores SIGINT; the launch script's SIGTERM is what it sees.)
_SAVES_ON_SIGNAL = """
trap 'sleep 0.3; echo "stop requested (SIGTERM): saved step 3, exiting" >&2; touch {tmp}/saved; exit 0' TERM
touch {tmp}/started
for i in $(seq 100); do sleep 0.1; done
exit 1
"""


@pytest.mark.parametrize("script", ["gpu_single_node.sh", "method_table.sh"])
def test_ctrl_c_leaves_the_trainers_stderr_open_while_it_saves(tmp_path, script):
    """Ctrl-C signals the whole process group, the `tee` that copies the trainer's stderr to the log included:
    a tee killed by it broke the trainer's stderr, and the real trainer died there without saving."""
    body = _SAVES_ON_SIGNAL.format(tmp=tmp_path)
    if script == "gpu_single_node.sh":
        fake = _fake_ssl_jax(tmp_path, body)
        args, log = ["--preemptible", "--workdir", str(tmp_path / "w"), CONFIG], tmp_path / "w" / "launch_stderr.log"
    else:
        fake = _table_fake(tmp_path, f'if [[ "$1" == train ]]; then {body}\nfi')
        args = ["--methods", "simclr", "--root", str(tmp_path / "runs")]
        log = tmp_path / "runs" / "simclr_cifar10" / "method_table" / "train.log"
    returncode, err = _sigterm_once_started(tmp_path, {"SSL_JAX": fake, "RESTART_DELAY": "0"}, script, *args,
                                            ctrl_c=True)
    assert (tmp_path / "saved").exists(), err
    assert "stop requested" in err and "stop requested" in log.read_text()
    assert returncode == 130, err  # interrupted, not finished: a `&&` after the script does not run


@pytest.mark.parametrize("script", ["gpu_single_node.sh", "method_table.sh"])
def test_a_long_stderr_after_the_stop_line_still_means_stopped(tmp_path, script):
    """`grep -q` stops reading at the "stop requested" line; the tail feeding it then died of SIGPIPE, and
    pipefail turned that into "no such line": a stopped run was taken as finished (not restarted, marked done)."""
    once = f"""n=$(( $(cat {tmp_path}/count 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/count
if [[ $n == 1 ]]; then
  echo "stop requested (SIGTERM): saved step 5, exiting" >&2; head -c 1000000 /dev/zero | tr '\\0' x >&2
fi"""
    if script == "gpu_single_node.sh":
        proc = _run(script, "--preemptible", "--workdir", str(tmp_path / "w"), CONFIG,
                    env={"SSL_JAX": _fake_ssl_jax(tmp_path, once + "\nexit 0\n"), "RESTART_DELAY": "0"})
        assert (tmp_path / "count").read_text() == "2\n" and "restart 1/20" in proc.stderr
    else:
        root = tmp_path / "runs"
        fake = _table_fake(tmp_path, f'if [[ "$1" == train ]]; then {once}\nfi')
        proc = _run(script, "--methods", "simclr", "--protocols", "none", "--root", str(root), env={"SSL_JAX": fake},
                    check=False)
        assert proc.returncode == 1 and "was stopped before its end" in proc.stderr
        assert not (root / "simclr_cifar10" / "method_table" / "train.done").exists()


def test_sigterm_to_container_sh_reaches_docker(tmp_path):
    """container.sh execs `docker run`, so a SIGTERM sent to it reaches docker, which passes it to the trainer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!/usr/bin/env bash
exec > /dev/null 2>&1; echo $$ > {tmp_path}/docker.pid
trap 'touch {tmp_path}/got_term; exit 0' TERM
touch {tmp_path}/started
for i in $(seq 100); do sleep 0.1; done
""")
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    try:
        returncode, err = _sigterm_once_started(tmp_path, env, "container.sh", "train", CONFIG)
        assert returncode == 0 and (tmp_path / "got_term").exists(), (returncode, err)
    finally:
        try:
            os.kill(int((tmp_path / "docker.pid").read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------------------------
# method_table.sh: every method's preset trained, evaluated and reported; resumable under a time limit.
# ----------------------------------------------------------------------------------------------
def _table_fake(tmp_path, body=""):
    """A fake ssl-jax that logs its argv to tmp_path/argv, runs `body`, and fakes a run directory."""
    return _fake_ssl_jax(tmp_path, f"""
echo "$*" >> {tmp_path}/argv
if [[ "$1" == train ]]; then mkdir -p "$5"; echo '{{}}' > "$5/config.json"; fi  # as the real one, first
{body}
exit 0
""")


def _table_calls(tmp_path):
    calls = (tmp_path / "argv").read_text().splitlines() if (tmp_path / "argv").exists() else []
    (tmp_path / "argv").unlink(missing_ok=True)
    return [" ".join(c.split()[:3]) for c in calls]  # e.g. "train --config configs/simclr.py:smoke"


def test_method_table_dry_run_and_bad_arguments():
    proc = _run("method_table.sh", "--methods", "simclr,byol", "--protocols", "knn,linear", *OVERRIDES,
                env={"DRY_RUN": "1"})
    assert _commands(proc.stdout) == [
        ["ssl-jax", "train", "--config", "configs/simclr.py:cifar10", "--workdir", "runs/simclr_cifar10",
         "--no-progress", *OVERRIDES],
        ["ssl-jax", "eval", "--workdir", "runs/simclr_cifar10", "--protocol", "knn", "--no-progress"],
        ["ssl-jax", "eval", "--workdir", "runs/simclr_cifar10", "--protocol", "linear", "--no-progress"],
        ["ssl-jax", "train", "--config", "configs/byol.py:cifar10", "--workdir", "runs/byol_cifar10",
         "--no-progress", *OVERRIDES],
        ["ssl-jax", "eval", "--workdir", "runs/byol_cifar10", "--protocol", "knn", "--no-progress"],
        ["ssl-jax", "eval", "--workdir", "runs/byol_cifar10", "--protocol", "linear", "--no-progress"],
        ["ssl-jax", "report", "--workdir", "runs/simclr_cifar10", "runs/byol_cifar10", "--out", "runs/report_cifar10"]]
    default = _commands(_run("method_table.sh", env={"DRY_RUN": "1", "SSL_JAX": "python3 -m ssl_jax"}).stdout)
    assert [c[5] for c in default if c[3] == "train"] == [  # every method of the README's table, in order
        f"configs/{m}.py:cifar10"
        for m in ("simclr", "simclr_v2", "moco_v1", "moco_v2", "byol", "simsiam", "swav", "barlow_twins")]
    assert default[0][:3] == ["python3", "-m", "ssl_jax"]
    for args, message in ((["--methods", "simclr,nope"], "no config configs/nope.py"),
                          (["--protocols", "linear,knnn"], "unknown protocol 'knnn'"),
                          (["--time-limit", "10m"], "--time-limit must be a whole number of seconds"),
                          (["--preset"], "--preset needs a value"), (["simclr"], "unknown argument simclr")):
        proc = _run("method_table.sh", *args, env={"DRY_RUN": "1"}, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_method_table_skips_finished_steps_and_goes_on_after_a_failure(tmp_path):
    root = str(tmp_path / "runs")
    # byol's training fails once: simsiam still runs, and the report covers the runs that exist.
    fake = _table_fake(tmp_path, f"""
if [[ "$1 $3" == "train configs/byol.py:smoke" && ! -e {tmp_path}/failed_once ]]; then
  touch {tmp_path}/failed_once; exit 2
fi""")
    args = ["--preset", "smoke", "--methods", "simclr,byol,simsiam", "--protocols", "knn", "--root", root]
    proc = _run("method_table.sh", *args, env={"SSL_JAX": fake}, check=False)
    assert proc.returncode == 1 and "failed: byol (train)" in proc.stderr
    assert _table_calls(tmp_path) == [
        "train --config configs/simclr.py:smoke", f"eval --workdir {root}/simclr_smoke",
        "train --config configs/byol.py:smoke", "train --config configs/simsiam.py:smoke",
        f"eval --workdir {root}/simsiam_smoke", f"report --workdir {root}/simclr_smoke"]
    # Again: only byol's steps run; the others are marked done with the same commands.
    proc = _run("method_table.sh", *args, env={"SSL_JAX": fake})
    assert _table_calls(tmp_path) == ["train --config configs/byol.py:smoke", f"eval --workdir {root}/byol_smoke",
                                      f"report --workdir {root}/simclr_smoke"]
    assert proc.stderr.count("done before, skipped") == 4
    # The same commands through another executable: still done.
    _run("method_table.sh", *args, env={"SSL_JAX": f"bash {fake}"})
    assert _table_calls(tmp_path) == [f"report --workdir {root}/simclr_smoke"]
    # Another override retrains (resuming, in real life) and evaluates again, for every method.
    _run("method_table.sh", *args, "--config.num_epochs=4", env={"SSL_JAX": fake})
    assert len(_table_calls(tmp_path)) == 7


def test_method_table_time_limit_stops_the_trainer_and_the_next_call_continues(tmp_path):
    root = str(tmp_path / "runs")
    # The fake trainer runs until SIGTERM (saving, as the real one does) on its first call, finishes on the next.
    fake = _table_fake(tmp_path, f"""
if [[ "$1" == train && ! -e {tmp_path}/stopped_once ]]; then
  trap 'touch {tmp_path}/stopped_once; echo "stop requested (SIGTERM): saved" >&2; exit 0' TERM
  for i in $(seq 300); do sleep 0.1; done
  exit 1
fi""")
    args = ["--preset", "smoke", "--methods", "simclr,byol", "--protocols", "linear", "--root", root]
    t0 = time.time()
    proc = _run("method_table.sh", *args, "--time-limit", "2", env={"SSL_JAX": fake}, check=False)
    assert proc.returncode == 3 and "run the same command again to continue" in proc.stderr
    assert 2 <= time.time() - t0 < 20 and (tmp_path / "stopped_once").exists()
    assert _table_calls(tmp_path) == ["train --config configs/simclr.py:smoke", f"report --workdir {root}/simclr_smoke"]
    assert not os.path.exists(os.path.join(root, "simclr_smoke", "method_table", "train.done"))
    proc = _run("method_table.sh", *args, "--time-limit", "60", env={"SSL_JAX": fake})
    assert _table_calls(tmp_path) == ["train --config configs/simclr.py:smoke", f"eval --workdir {root}/simclr_smoke",
                                      "train --config configs/byol.py:smoke", f"eval --workdir {root}/byol_smoke",
                                      f"report --workdir {root}/simclr_smoke"]


def test_method_table_a_trainer_stopped_by_someone_else_is_not_done(tmp_path):
    root = str(tmp_path / "runs")
    fake = _table_fake(tmp_path, '[[ "$1" == train ]] && echo "stop requested (SIGTERM): saved step 7, exiting" >&2')
    proc = _run("method_table.sh", "--methods", "simclr", "--root", root, env={"SSL_JAX": fake}, check=False)
    assert proc.returncode == 1 and "was stopped before its end" in proc.stderr
    assert _table_calls(tmp_path) == ["train --config configs/simclr.py:cifar10",
                                      f"report --workdir {root}/simclr_cifar10"]
    assert os.listdir(os.path.join(root, "simclr_cifar10", "method_table")) == ["train.log"]
    assert "saved step 7" in open(os.path.join(root, "simclr_cifar10", "method_table", "train.log")).read()


def test_method_table_sigterm_reaches_the_trainer_and_marks_nothing_done(tmp_path):
    fake = _table_fake(tmp_path, f"""
trap 'echo "stop requested (SIGTERM): saved" >&2; touch {tmp_path}/saved; exit 0' TERM
touch {tmp_path}/started
for i in $(seq 100); do sleep 0.1; done
exit 1""")
    for limit in ([], ["--time-limit", "100"]):  # directly, and through `timeout`
        (tmp_path / "started").unlink(missing_ok=True)
        returncode, err = _sigterm_once_started(tmp_path, {"SSL_JAX": fake}, "method_table.sh", "--methods", "simclr",
                                                "--root", str(tmp_path / "runs"), *limit)
        assert returncode == 130 and "nothing marked done" in err and (tmp_path / "saved").exists(), err
        assert not os.path.exists(tmp_path / "runs" / "simclr_cifar10" / "method_table" / "train.done")
        (tmp_path / "saved").unlink()


def test_method_table_sigterm_between_two_steps_starts_no_other(tmp_path):
    """A SIGTERM that comes after a training finished (while the script looks at its log) stops the script
    before the evaluation: it used to start the next step and run it to its end."""
    fake = _table_fake(tmp_path, f'[[ "$1" == train ]] && touch {tmp_path}/started')
    returncode, err = _sigterm_once_started(tmp_path, {"SSL_JAX": fake}, "method_table.sh", "--methods", "simclr",
                                            "--protocols", "knn", "--root", str(tmp_path / "runs"), delay=0.5)
    assert returncode == 130 and "stopped by a signal before eval_knn" in err, err
    assert _table_calls(tmp_path) == ["train --config configs/simclr.py:cifar10"]


def test_method_table_real_smoke_run(tmp_path):
    """The real CLI under the script: train, kNN evaluation and a report whose commands table lists both."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", SSL_JAX=f"{sys.executable} -m ssl_jax")
    root = str(tmp_path / "runs")
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "method_table.sh"), "--preset", "smoke", "--methods",
                           "simsiam", "--protocols", "knn", "--root", root], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = open(os.path.join(root, "report_smoke", "report.md")).read()
    workdir = os.path.join(root, "simsiam_smoke")
    assert "| simsiam_smoke | simsiam | tiny | 2/2 | 64 |" in text
    assert (f"| simsiam_smoke | train | `ssl-jax train --config configs/simsiam.py:smoke --workdir {workdir} "
            "--no-progress` |") in text
    assert f"| simsiam_smoke | eval knn | `ssl-jax eval --workdir {workdir} --protocol knn --no-progress` |" in text


def test_device_session_runs_each_step_once_within_its_budget(tmp_path):
    """benchmarks/device_session.sh with a fake `ssl-jax`: steps run in order, a step that failed runs again
    next time and one that finished does not, a step whose minimum does not fit the budget is skipped, an
    unknown step is an error, and `collect` packs the logs."""
    script = os.path.join(ROOT, "benchmarks", "device_session.sh")
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-ssl-jax"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[[ "$*" != *swav* ]]\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "SSL_JAX": str(fake)}

    def session(*args):
        return subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)

    steps = ["bench_r18_byol", "bench_r18_swav", "simclr_e50_ours"]
    first = session("200", *steps)
    assert first.returncode == 0, first.stderr
    lines = calls.read_text().splitlines()
    assert [line.split()[2] for line in lines] == [
        "configs/byol.py:cifar10", "configs/swav.py:cifar10", "configs/simclr.py:cifar10"]
    assert lines[0].startswith("bench ") and "--steps 100" in lines[0]
    assert lines[2].startswith("train ") and "--config.num_epochs=50" in lines[2]
    assert "--workdir runs/simclr_e50_ours_cifar10" in lines[2]
    # the 50-epoch baseline is the preset's recipe before 2026-11-23, spelled out now that the preset changed
    assert {"--config.model.zero_init_residual=true", "--config.optim.warmup_epochs=10",
            "--config.optim.exclude_bias_and_norm=true", "--config.head.use_bn=true",
            "--config.simclr.bn_per_view=false"} <= set(lines[2].split())
    res = tmp_path / "runs" / "device_session"
    assert sorted(p.name for p in res.glob("*.done")) == ["bench_r18_byol.done", "simclr_e50_ours.done"]
    assert "bench_r18_swav exit 1" in first.stdout

    again = session("200", *steps)  # only the failed one runs again
    assert again.returncode == 0 and calls.read_text().splitlines()[3:] == [lines[1]]

    env["R50_BATCHES"] = "512 1024 2048"
    short = session("100", "bench_r50_simclr")  # needs 90 s: runs; a budget of 30 s does not
    del env["R50_BATCHES"]
    assert "bench_r50_simclr exit 0" in short.stdout
    r50 = calls.read_text().splitlines()[4:]
    assert len(r50) == 3 and [a.split("--config.batch_size=")[1].split()[0] for a in r50] == ["512", "1024", "2048"]
    assert all("--config.model.remat=true" in a for a in r50)
    noremat = session("100", "bench_r50_simclr_noremat")  # the default batches: 512 only
    assert "bench_r50_simclr_noremat exit 0" in noremat.stdout
    r50 = calls.read_text().splitlines()[7:]
    assert len(r50) == 1 and "--config.batch_size=512" in r50[0] and "--config.model.remat=false" in r50[0]
    assert "remat_policy" not in r50[0]
    assert "exit 0" in session("100", "bench_r50_simclr_remat_convs").stdout
    policy = calls.read_text().splitlines()[8].split()
    assert {"--config.model.remat=true", "--config.model.remat_policy=convs", "--config.batch_size=512"} <= set(policy)
    assert "exit 0" in session("150", "profile_r50_simclr").stdout
    profile = calls.read_text().splitlines()[9].split()
    assert profile[:3] == ["bench", "--config", "configs/simclr.py:imagenet"]
    assert {"--config.batch_size=512", "--config.model.remat=true", "--modes", "synthetic", "--profile",
            "runs/device_session/profile_r50_simclr", "--profile-steps", "3"} <= set(profile)
    skipped = session("30", "bench_r18_moco_v2")
    assert "bench_r18_moco_v2 skipped: 30s left, it needs 60s" in skipped.stdout
    assert len(calls.read_text().splitlines()) == 10

    variant = session("200", "simclr_e50_ours_lightly")  # lightly's recipe details on our trainer
    assert variant.returncode == 0, variant.stderr
    argv = calls.read_text().splitlines()[-1].split()
    assert "--workdir" in argv and argv[argv.index("--workdir") + 1] == "runs/simclr_e50_ours_lightly_cifar10"
    assert {"--config.model.zero_init_residual=false", "--config.optim.warmup_epochs=0",
            "--config.optim.exclude_bias_and_norm=false", "--config.num_epochs=50", "--config.head.use_bn=true",
            "--config.simclr.bn_per_view=false"} <= set(argv)

    unknown = session("100", "bench_r18_nothing_like_it", "no_such_step")
    assert unknown.returncode == 2 and "unknown step no_such_step" in unknown.stderr

    out = tmp_path / "out"
    out.mkdir()
    trace_dir = res / "profile_r50_simclr" / "synthetic"  # as the real bench writes it: trace and xplane
    trace_dir.mkdir(parents=True)
    (trace_dir / "h.trace.json.gz").write_bytes(b"")
    (trace_dir / "h.xplane.pb").write_bytes(b"")
    assert session("collect", str(out)).returncode == 0
    listing = subprocess.run(["tar", "tzf", str(out / "results.tgz")], capture_output=True, text=True, check=True)
    assert "runs/device_session/log" in listing.stdout.split()
    assert "runs/device_session/profile_r50_simclr/synthetic/h.trace.json.gz" in listing.stdout.split()
    assert not any(name.endswith(".xplane.pb") for name in listing.stdout.split())
