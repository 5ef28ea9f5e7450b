"""Launchers: importing runs nothing; --dry-run prints exactly what a real run executes."""
import importlib.util
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("tpu_pod", "slurm_gpu", "local")


def _load(name: str):
    """A fresh import of launch/<name>.py (as ``python launch/<name>.py`` would see it)."""
    spec = importlib.util.spec_from_file_location(f"_launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def no_processes(monkeypatch):
    """Any attempt to start a process fails the test."""

    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a!r}")

    for fn in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, fn, refuse)
    monkeypatch.setattr(os, "system", refuse)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_import_runs_nothing(name, no_processes, capsys):
    mod = _load(name)
    assert callable(mod.main) and callable(mod.build_parser)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


@pytest.mark.parametrize("name", LAUNCHERS)
def test_help_documents_every_argument(name, no_processes, capsys):
    parser = _load(name).build_parser()
    for action in parser._actions:
        assert action.help, f"{name}: argument {action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        _load(name).main(["--help"])
    assert e.value.code == 0 and "--dry-run" in capsys.readouterr().out


TPU_ARGS = ["--name", "pod1", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--project", "proj",
            "--repo", "https://example.org/memjax.git", "--ref", "v0.1", "--config", "configs/mqar_tiny.py",
            "--workdir", "/mnt/shared/runs/a b", "--set", "train.steps=20", "model.pattern=A,F"]


def test_tpu_pod_dry_run(no_processes, capsys):
    mod = _load("tpu_pod")
    assert mod.main(TPU_ARGS + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    # first the plan: the step compiled for the slice on this machine, before any VM exists
    assert shlex.split(lines[0]) == ["memjax-compile", "--config", "configs/mqar_tiny.py", "--topology", "v4-32",
                                     "--set", "train.steps=20", "model.pattern=A,F"]
    assert mod.main(TPU_ARGS + ["--dry-run", "--skip-plan"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines[1:]
    lines = lines[1:]
    describe, create = lines[0].split(" || ")
    assert shlex.split(describe)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod1"]
    create = shlex.split(create)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1"]
    assert {"--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base"} <= set(create)
    for line in lines[1:]:
        words = shlex.split(line)
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in words
    install = shlex.split(lines[1])[-1]
    assert "git clone -q --depth 1 --branch v0.1 https://example.org/memjax.git memjax" in install
    assert 'uv pip install' in install and '-e "./memjax[tpu]"' in install
    remote = shlex.split(lines[2])[-1]
    assert remote.startswith("--command=")
    train = shlex.split(remote.split("&&")[-1])
    assert train == ["memjax-train", "--config", "configs/mqar_tiny.py", "--workdir", "/mnt/shared/runs/a b",
                     "--set", "train.steps=20", "model.pattern=A,F", "--distributed"]


def test_tpu_pod_runs_what_dry_run_prints(monkeypatch, capsys):
    mod = _load("tpu_pod")
    args = TPU_ARGS + ["--source", "copy", "--spot", "--delete-after"]
    assert mod.main(args + ["--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    ran = []
    monkeypatch.setattr(mod.subprocess, "run",
                        lambda argv, **k: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
    assert mod.main(args) == 0
    assert ran == [["bash", "-c", line] for line in printed]
    assert printed[0].startswith("memjax-compile ")
    assert printed[2].startswith("tar czf") and " scp " in printed[3] and printed[-1].endswith("--quiet")
    assert "--spot" in printed[1]
    # A failing step stops the sequence and its exit code is returned.
    ran.clear()
    monkeypatch.setattr(mod.subprocess, "run",
                        lambda argv, **k: ran.append(argv) or subprocess.CompletedProcess(argv, 7))
    assert mod.main(args) == 7 and len(ran) == 1


def test_tpu_pod_rejects_bad_arguments(no_processes, capsys):
    mod = _load("tpu_pod")
    with pytest.raises(SystemExit):
        mod.main(["--name", "x", "--zone", "z", "--config", "c", "--workdir", "w", "--dry-run"])  # no --repo
    assert "--repo is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(TPU_ARGS + ["--accelerator-type", "v9-8", "--dry-run"])
    assert "unknown generation" in capsys.readouterr().err


SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "02:00:00",
              "--setup", "source .venv/bin/activate", "--config", "configs/mqar_tiny.py",
              "--set", "train.steps=20"]


def _script_from_dry_run(out: str):
    lines = out.rstrip("\n").split("\n")
    assert lines[0].startswith("# ") and lines[1] == "#!/bin/bash"
    return lines[0][2:], "\n".join(lines[1:-1]).strip() + "\n", lines[-1]


@pytest.mark.parametrize("procs", ["per-node", "per-gpu"])
def test_slurm_dry_run(procs, tmp_path, no_processes, capsys):
    mod = _load("slurm_gpu")
    workdir = str(tmp_path / "run")
    assert mod.main(SLURM_ARGS + ["--workdir", workdir, "--procs", procs, "--dry-run"]) == 0
    path, script, sbatch = _script_from_dry_run(capsys.readouterr().out)
    assert not os.path.exists(workdir)  # dry run writes nothing
    assert path == os.path.join(workdir, "memjax-memjax.sbatch") and sbatch == f"sbatch {path}"
    per_node = 1 if procs == "per-node" else 4
    for line in ("#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={per_node}", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00", "#SBATCH --signal=TERM@120",
                 "source .venv/bin/activate", f"export JAX_NUM_PROCESSES={2 * per_node}",
                 'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"'):
        assert line in script.splitlines(), line
    assert ("export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script) == (procs == "per-node")
    srun = [ln for ln in script.splitlines() if ln.startswith("srun")]
    assert len(srun) == 1 and shlex.split(srun[0]) == [
        "srun", "--kill-on-bad-exit=1", "memjax-train", "--config", "configs/mqar_tiny.py", "--workdir", workdir,
        "--set", "train.steps=20", "--distributed"]


def _fake_bin(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_writes_submits_and_the_script_runs(tmp_path, monkeypatch, capsys):
    mod = _load("slurm_gpu")
    workdir = str(tmp_path / "run")
    args = SLURM_ARGS[:8] + ["--config", "configs/mqar_tiny.py", "--workdir", workdir]  # no --setup
    assert mod.main(args + ["--dry-run"]) == 0
    path, script, sbatch = _script_from_dry_run(capsys.readouterr().out)
    ran = []
    monkeypatch.setattr(mod.subprocess, "run",
                        lambda argv, **k: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
    assert mod.main(args) == 0
    assert ran == [shlex.split(sbatch)]
    with open(path) as f:
        assert f.read() == script
    # Run the script as SLURM would, with fake scontrol / srun: the coordinator is the
    # first node, and srun gets the training command.
    _fake_bin(tmp_path, "scontrol", 'echo gpu007\nfor i in $(seq 8 5000); do echo gpu$i; done\n')
    _fake_bin(tmp_path, "srun", 'echo "COORD=$JAX_COORDINATOR_ADDRESS N=$JAX_NUM_PROCESSES"\necho "ARGS=$*"\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    monkeypatch.undo()
    out = subprocess.run(["bash", path], env=env, capture_output=True, text=True, check=True).stdout
    assert "COORD=gpu007:24242 N=2" in out
    assert f"ARGS=--kill-on-bad-exit=1 memjax-train --config configs/mqar_tiny.py --workdir {workdir}" in out


def test_slurm_rejects_bad_arguments(no_processes, capsys):
    with pytest.raises(SystemExit):
        _load("slurm_gpu").main(["--nodes", "0", "--config", "c", "--workdir", "w", "--dry-run"])
    assert "--nodes must be >= 1" in capsys.readouterr().err


def test_local_dry_run(no_processes, capsys):
    mod = _load("local")
    assert mod.main(["--config", "configs/mqar_tiny.py", "--workdir", "runs/mp", "--num-processes", "3",
                     "--local-device-count", "2", "--port", "23456", "--set", "train.steps=5",
                     "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
        assert words[2] == sys.executable and words[3:5] == ["-m", "memjax.train.cli"]
        assert words[5:] == ["--config", "configs/mqar_tiny.py", "--workdir", "runs/mp", "--set", "train.steps=5",
                             "--coordinator", "127.0.0.1:23456", "--num-processes", "3", "--process-id", str(i),
                             "--local-device-count", "2"]


def test_local_picks_a_free_port_and_validates(no_processes):
    mod = _load("local")
    args = mod.build_parser().parse_args(["--config", "c.py", "--workdir", "w"])
    cmds = mod.build_commands(args)
    assert len(cmds) == 2 and cmds[0][1][-7] == cmds[1][1][-7]  # one coordinator for all
    port = int(cmds[0][1][-7].rsplit(":", 1)[1])
    assert 0 < port < 65536
    args.num_processes = 0
    with pytest.raises(ValueError, match="--num-processes"):
        mod.build_commands(args)


def test_cli_accepts_the_distributed_flags():
    from memjax.train.cli import _parser

    a = _parser("memjax-train").parse_args(["--config", "c", "--workdir", "w", "--coordinator", "h:1",
                                            "--num-processes", "2", "--process-id", "1",
                                            "--local-device-count", "4"])
    assert (a.coordinator, a.num_processes, a.process_id, a.local_device_count, a.distributed) == \
        ("h:1", 2, 1, 4, False)
    b = _parser("memjax-train").parse_args(["--config", "c", "--workdir", "w", "--distributed"])
    assert b.distributed and b.coordinator is None



@pytest.mark.parametrize("name", ["local", "slurm_gpu", "tpu_pod"])
def test_repeated_set_flags_add_up(name):
    """``--set a=1 --set b=2`` keeps both overrides (argparse's default would keep the last)."""
    from memjax.train.cli import _parser

    a = _parser("memjax-train").parse_args(["--config", "c", "--workdir", "w", "--set", "train.steps=5",
                                            "--set", "train.progress=False"])
    assert a.set == ["train.steps=5", "train.progress=False"]
    argv = ["--config", "c.py", "--workdir", "w"] + (["--name", "n", "--zone", "z"] if name == "tpu_pod" else [])
    b = _load(name).build_parser().parse_args(argv + ["--set", "x=1", "--set", "y=2"])
    assert b.set == ["x=1", "y=2"]
