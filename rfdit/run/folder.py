"""The run folder: which one a run writes to, the lock that keeps it to one run at a time, and what a failed
start leaves behind (nothing).

    folder = choose_run_dir(save_dir, load_dir, overwrite=False)   # refuses to overwrite another run
    with RunFolder(folder) as run_dir:                              # locked; removed again if the start fails
        ...
        run_dir.started()                                           # from here on the folder is kept

In a multi-process run, process 0 chooses the folder and holds the lock; the others follow its choice
(`agree_on_run_dir`).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket

from ..checkpoint import CheckpointError

# what a run writes into its folder; a folder holding any of them holds a run
RUN_FILES = ("checkpoints", "export", "config.json", "metrics.jsonl", "samples.npz", "eval.json",
             "eval_references.json", "grids")
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder that this run may not write to: another run's, one in use, or not a folder."""


def holds_run(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def run_folder_of(load_dir: str | os.PathLike) -> pathlib.Path:
    """The run folder that `--load_dir` names: itself, or the parent of its checkpoints/ folder."""
    path = pathlib.Path(load_dir)
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        return path.parent
    return path


def choose_run_dir(save_dir: str | None, load_dir: str | None, *, overwrite: bool = False) -> pathlib.Path | None:
    """The folder the run writes to, or None for a new runs/<timestamp> (`new_run_dir` makes it).

    `--load_dir` alone continues the run in its own folder. A `--save_dir` that holds a run is refused unless it
    is the run being continued, or `overwrite` says to start over there.
    """
    if load_dir is not None and not pathlib.Path(load_dir).is_dir():
        raise CheckpointError(f"no checkpoint folder at {load_dir}; pass a run folder or its checkpoints/.")
    if save_dir is None:
        return None if load_dir is None else run_folder_of(load_dir)
    path = pathlib.Path(save_dir)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"--save_dir {save_dir}: {parent} is a file, not a folder; pass a folder's path.")
    if not holds_run(path) or overwrite:
        return path
    if load_dir is not None and _same(path, run_folder_of(load_dir)):
        return path
    if load_dir is not None:
        raise RunFolderError(
            f"--save_dir {save_dir} already holds another run; a run continued from {load_dir} would mix its files "
            f"with that one's. Leave out --save_dir to continue in {run_folder_of(load_dir)}, name an empty or new "
            "folder, or pass --overwrite 1 to delete the run in it first."
        )
    raise RunFolderError(
        f"--save_dir {save_dir} already holds a run. To continue it, run the same command with "
        f"--load_dir {save_dir} in place of --save_dir {save_dir} (and a larger --max_steps if it has finished); "
        f"to keep it and start a new one, pass another --save_dir or none (a new runs/<timestamp> folder); to "
        "delete it and start over, add --overwrite 1."
    )


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
    return a.resolve() == b.resolve()


def new_run_dir(root: str | os.PathLike = "runs", *, stamp: str | None = None) -> pathlib.Path:
    """A new, empty folder root/<timestamp>, with a suffix (-1, -2, ...) when that name is taken: made atomically,
    so runs started in the same second each get their own."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(10_000):
        path = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"could not make a new run folder under {root}: {stamp} to {stamp}-9999 are all taken.")


@dataclasses.dataclass
class RunFolder:
    """The run folder `path`, locked for this process inside the `with` block (when `lock`).

    The lock is an `fcntl.flock` on `path/.lock`, which holds the owner's pid and host: the OS releases it when
    the process dies, so a crashed run never blocks the next one. A folder this block created is removed again
    when the block fails before `started()`, and one emptied by `overwrite` loses the old run's files then.
    """

    path: pathlib.Path
    lock: bool = True
    overwrite: bool = False
    created: bool = False

    def __enter__(self) -> "RunFolder":
        path = self.path
        try:
            if not path.exists():
                path.mkdir(parents=True)
                self.created = True
        except (FileExistsError, NotADirectoryError) as error:
            raise RunFolderError(f"cannot make the run folder {path}: {error.strerror}: {error.filename}.") from None
        self._fd = None
        if self.lock:
            self._fd = _take_lock(path / LOCK_NAME)
        if self.overwrite:
            for name in RUN_FILES:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self._started = False
        return self

    def started(self) -> None:
        """The run has begun: keep its folder whatever happens next."""
        self._started = True

    def __exit__(self, kind, error, tb) -> None:
        if self._fd is not None:
            try:
                (self.path / LOCK_NAME).unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        if kind is not None and self.created and not self._started:
            shutil.rmtree(self.path, ignore_errors=True)


def _take_lock(lock_path: pathlib.Path) -> int:
    """An open descriptor of `lock_path` holding its exclusive flock, with this process's pid and host in it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = read_lock(lock_path)
            who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}" if owner else "another process"
            raise RunFolderError(
                f"the run folder {lock_path.parent} is in use by {who} (it holds {lock_path}). Wait for that run "
                "to end, or pass another --save_dir."
            ) from None
        # the holder before us may have removed the file between our open and our flock: lock the file that is there
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        return fd


def read_lock(lock_path: pathlib.Path) -> dict:
    try:
        return json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return {}


def agree_on_run_dir(choose) -> pathlib.Path:
    """`choose()` on process 0, its answer (a folder, or the error it raised) on every process.

    Single-process runs call `choose()` directly. The error reaches every process, so none waits for the others.
    """
    import jax

    if jax.process_count() == 1:
        return choose()
    import numpy as np
    from jax.experimental import multihost_utils

    message = b""
    if jax.process_index() == 0:
        try:
            message = b"ok:" + str(choose()).encode()
        except RunFolderError as error:
            message = b"error:" + str(error).encode()
    buffer = np.zeros(8192, np.uint8)
    buffer[:len(message)] = np.frombuffer(message[:8192], np.uint8)
    received = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).rstrip(b"\x00").decode()
    kind, _, text = received.partition(":")
    if kind == "error":
        raise RunFolderError(text)
    return pathlib.Path(text)
