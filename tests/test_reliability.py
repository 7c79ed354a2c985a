"""What a run guarantees when things go wrong (docs/reliability.md): it never overwrites another run, never shares
its folder, stops on bad numbers, and resumes only the run it was."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import TINY_RUN as TINY
from rfdit.checkpoint import Checkpointer, CheckpointError
from rfdit.experiment import main
from rfdit.run.folder import RunFolder, RunFolderError, new_run_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHORT = TINY + ["--steps_per_call", "5", "--log_interval", "5", "--num_samples", "0"]


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def cli(monkeypatch, capsys, argv):
    """Run train_flow.py's entry point as the terminal does: the exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["train_flow.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_save_dir_holding_a_run_is_refused_with_what_to_type(tiny_digits_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = tiny_digits_run
    before = snapshot(run_dir)
    code, err = cli(monkeypatch, capsys, SHORT + ["--max_steps", "5", "--save_dir", str(run_dir)])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--load_dir {run_dir} in place of --save_dir {run_dir}" in err and "--overwrite 1" in err
    assert snapshot(run_dir) == before
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with pytest.raises(RunFolderError, match="already holds another run"):  # continuing one run into another's
        main(SHORT + ["--max_steps", "25", "--save_dir", str(run_dir), "--load_dir", str(other)])
    assert snapshot(run_dir) == before


def test_overwrite_starts_over(tiny_digits_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_digits_run[0], copy)
    main(SHORT + ["--max_steps", "5", "--save_dir", str(copy), "--overwrite", "1"])
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5] and not (copy / "samples.npz").exists()
    with Checkpointer(copy / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.manager.all_steps() == [5]


def test_load_dir_alone_continues_in_its_folder(tiny_digits_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_digits_run[0], copy)
    summary = main(SHORT + ["--max_steps", "25", "--load_dir", str(copy)])
    assert pathlib.Path(summary["run_dir"]) == copy and summary["step"] == 25
    with Checkpointer(copy / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 25
    assert not (copy / ".lock").exists()


def test_a_locked_run_folder_is_refused_until_its_holder_dies(tmp_path):
    with RunFolder(tmp_path):
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
            main(SHORT + ["--max_steps", "5", "--save_dir", str(tmp_path)])
    # a process that dies holding the lock leaves its lock file behind, but not the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rfdit.run.folder import RunFolder\n"
                               "with RunFolder(__import__('pathlib').Path(sys.argv[1])):\n"
                               "    print('locked', flush=True); time.sleep(600)", str(tmp_path / "crashed")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
        RunFolder(tmp_path / "crashed").__enter__()
    holder.kill()
    holder.wait()
    assert (tmp_path / "crashed" / ".lock").exists()
    with RunFolder(tmp_path / "crashed"):
        assert json.loads((tmp_path / "crashed" / ".lock").read_text())["pid"] == os.getpid()


def test_default_run_folders_are_unique(tmp_path):
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(new_run_dir(tmp_path, stamp="20260101-000000")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 8 and all(folder.is_dir() for folder in folders)
    assert sorted(f.name for f in folders)[:2] == ["20260101-000000", "20260101-000000-1"]


def test_a_failed_load_dir_leaves_no_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        main(SHORT + ["--max_steps", "5", "--save_dir", str(tmp_path / "new"), "--load_dir", str(tmp_path / "gone")])
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        main(SHORT + ["--max_steps", "5", "--load_dir", str(tmp_path / "gone")])
    assert list(tmp_path.iterdir()) == []


def test_save_dir_on_a_file_is_one_clear_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    for save_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        code, err = cli(monkeypatch, capsys, SHORT + ["--max_steps", "5", "--save_dir", str(save_dir)])
        assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'file'} is a file" in err, err
