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
from rfdit.checkpoint import Checkpointer, CheckpointError, _unreadable
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
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    return exit_info.value.code, "\n".join(errors) + "\n"


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


def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(tiny_digits_run, tmp_path, monkeypatch, capsys):
    diverge = ["--model.lr", "1e4", "--model.warmup_steps", "0"]
    code, err = cli(monkeypatch, capsys, SHORT + diverge + ["--max_steps", "40", "--save_interval", "5",
                                                            "--save_dir", str(tmp_path / "fresh")])
    assert code == 2 and err.count("\n") == 1 and "training diverged" in err and "at step 5" in err, err
    assert not (tmp_path / "fresh" / "export").exists()
    assert not any((tmp_path / "fresh" / "checkpoints").iterdir())
    copy = tmp_path / "run"  # good checkpoints, then a learning rate (1e6 warmed up over 200 steps) that blows up
    shutil.copytree(tiny_digits_run[0], copy)
    export = snapshot(copy / "export")
    with pytest.raises(ValueError, match="training diverged: .* at step 25.* last good checkpoint is step 20"):
        main(SHORT + ["--model.lr", "1e6", "--max_steps", "40", "--save_interval", "5", "--load_dir", str(copy),
                      "--allow_change", "model.lr"])
    with Checkpointer(copy / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.manager.all_steps() == [20]
        assert all(np.isfinite(x).all() for x in checkpointer.restore_named().values())
    assert snapshot(copy / "export") == export


def test_keep_checkpoints_must_keep_one():
    with pytest.raises(ValueError, match="--keep_checkpoints \\(=0\\) must be at least 1"):
        main(SHORT + ["--keep_checkpoints", "0", "--dry_run"])


def test_sigint_saves_and_raises_run_stopped_in_process(tmp_path):
    from rfdit.cli import RunStopped

    metrics = tmp_path / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(RunStopped) as stopped:
        main(SHORT + ["--max_steps", "100000", "--save_dir", str(tmp_path)])
    assert stopped.value.exit_code == 130 and stopped.value.signum == signal.SIGINT
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == stopped.value.step > 0


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tiny_digits_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_digits_run[0], copy)
    limit = max(f.stat().st_size for f in copy.glob("*.json*")) + 4096  # room for the logs, none for a checkpoint
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from rfdit.experiment import main; main()")
    child = subprocess.run([sys.executable, "-c", script, *SHORT, "--max_steps", "25", "--load_dir", str(copy)],
                           capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    lines = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert child.returncode == 2 and len(lines) == 1 and "Traceback" not in child.stderr, child.stderr
    assert "could not save checkpoint 25" in lines[0] and str(copy / "checkpoints") in lines[0]
    with Checkpointer(copy / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.manager.all_steps() == [20]
        checkpointer.restore_named()


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ('{"format": "rfdit-export"}',
                                           'has no "model"'), (None, "hidden_size = '32' \\(expected int\\)")])
def test_a_broken_export_config_is_one_clear_error(tiny_digits_run, tmp_path, text, message):
    from rfdit.checkpoint import load_export

    export = tmp_path / "export"
    shutil.copytree(tiny_digits_run[0] / "export", export)
    if text is None:
        config = json.loads((export / "config.json").read_text())
        config["model"]["hidden_size"] = "32"
        text = json.dumps(config)
    (export / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as error:
        load_export(export)
    assert str(export / "config.json") in str(error.value) and "\n" not in str(error.value)


def test_resume_refuses_changed_settings_unless_named(tiny_digits_run, tmp_path):
    run_dir, _ = tiny_digits_run
    changed = SHORT + ["--batch_size", "16", "--model.lr", "3e-4", "--seed", "1", "--max_steps", "25",
                       "--save_dir", str(tmp_path / "new"), "--load_dir", str(run_dir)]
    with pytest.raises(CheckpointError) as error:
        main(changed)
    message = str(error.value)
    for listed in ("batch_size: 32 -> 16", "seed: 0 -> 1", "model.lr: 0.001 -> 0.0003",
                   "--allow_change batch_size,seed,model.lr"):
        assert listed in message, message
    with pytest.raises(CheckpointError, match="other settings \\(seed: 0 -> 1\\)"):
        main(changed + ["--allow_change", "batch_size,model.lr"])
    with pytest.raises(ValueError, match="not settings a resumed run compares"):
        main(changed + ["--allow_change", "model.lrr"])
    assert not (tmp_path / "new").exists()
    # a longer run and the data elsewhere are the same run; named changes are accepted
    summary = main(changed + ["--allow_change", "batch_size,seed,model.lr", "--dataset_path", str(tmp_path)])
    assert summary["step"] == 25


def test_resume_compares_the_settings_of_old_checkpoints():
    from rfdit.run.config import changed_settings

    fixture = json.loads((ROOT / "tests" / "fixtures" / "run_v1" / "config.json").read_text())  # rfdit 0.1.0's
    now = {**fixture, "max_steps": 1000, "optim": {**fixture["optim"], "lr": 0.5}, "precision": "bf16"}
    assert changed_settings(fixture, now) == [("precision", "float32", "bf16"), ("model.lr", 0.001, 0.5)]


def flip_bytes(step_dir: pathlib.Path) -> None:
    """Flip bytes in the middle of the step's largest array file, keeping its length."""
    data = max((f for f in (step_dir / "arrays").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    data.write_bytes(bytes(raw))


def test_a_tensorstore_read_error_is_reported_on_one_line():
    # How TensorStore reports a damaged chunk: the reason, then its whole spec over many lines.
    raw = Exception(
        "Encountered error while reading array index: (slice(0, 32, 1),). See full TensorStore details: "
        "<bound method spec of TensorStore({\n  'base': {\n    'driver': 'zarr',\n  }\n})>"
    )
    message = str(_unreadable(25, pathlib.Path("run/checkpoints"), raw))
    assert "\n" not in message and "driver" not in message
    assert message.startswith("checkpoint 25 in run/checkpoints is unreadable (Exception: Encountered error while "
                              "reading array index: (slice(0, 32, 1),)); it may be corrupt")


def test_a_flipped_checkpoint_is_unreadable_and_fallback_finds_the_good_one(tiny_digits_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_digits_run[0], copy)
    main(SHORT + ["--max_steps", "25", "--load_dir", str(copy)])
    flip_bytes(copy / "checkpoints" / "25")
    with pytest.raises(CheckpointError, match="checkpoint 25 .* unreadable .*Delete it to fall back") as error:
        main(SHORT + ["--max_steps", "30", "--load_dir", str(copy)])
    assert "\n" not in str(error.value), "the reason is one line, not TensorStore's whole spec"
    summary = main(SHORT + ["--max_steps", "30", "--load_dir", str(copy), "--load_fallback", "1"])
    assert summary["step"] == 30 and (copy / "checkpoints" / "unreadable-25").is_dir()
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row][-2:] == [25, 30]  # from 20 again
    with Checkpointer(copy / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.manager.all_steps() == [20, 30]
