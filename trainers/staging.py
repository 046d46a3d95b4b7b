"""Checkpoint folders staged in the node's temp folder, and those that killed processes left there removed.

A checkpoint is written to a local folder and handed to Ray, which copies it into the trial's storage. The folder
must outlive the report, and a report waits for the driver, so a trial killed there (Ctrl-C, a crashed driver, a
lost node) never deletes it: with tempfile.TemporaryDirectory each such kill left a model, its EMA and its
optimizer state in /tmp. Neither Ray nor tempfile offers a folder that a dead process's successor removes; this
is written by hand, on the standard library's flock. Each folder holds a lock file that its process keeps locked
while the folder is in use; the kernel drops the lock when the process dies, however it dies, so a lock that can
be taken marks a folder nobody uses.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = "lock"
CHECKPOINT = "checkpoint"
# A folder is created, then locked, a few microseconds apart; one younger than this is never taken for a dead one,
# so a sweep cannot catch a live folder in that gap.
SWEEP_MIN_AGE_S = 600.0


def staging_root() -> Path:
    """This user's staging folder on this node (per user: another user's sweep could neither read nor delete it)."""
    return Path(tempfile.gettempdir()) / f"effsearch-staging-{os.getuid()}"


@contextlib.contextmanager
def staged_folder(*, min_age_s: float = SWEEP_MIN_AGE_S) -> Iterator[str]:
    """An empty folder for one checkpoint, deleted on leaving; first removes the folders dead processes left."""
    root = staging_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep_dead(root, min_age_s=min_age_s)
    holder = Path(tempfile.mkdtemp(dir=root))
    lock = os.open(holder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        # A file system without flock (a Lustre mount without the option) refuses it: the folder then goes unlocked,
        # and no sweep on that file system can take it for dead either.
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        folder = holder / CHECKPOINT
        folder.mkdir()
        yield str(folder)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        os.close(lock)  # after the folder is gone: while it exists, it is locked


def sweep_dead(root: Path, *, min_age_s: float = SWEEP_MIN_AGE_S) -> list[Path]:
    """Delete the folders under root that no live process holds (older than min_age_s); returns them."""
    removed = []
    now = time.time()
    for holder in list(root.iterdir()) if root.is_dir() else []:
        try:
            old = holder.is_dir() and now - holder.stat().st_mtime >= min_age_s
        except FileNotFoundError:  # another sweep removed it meanwhile
            continue
        if not old:
            continue
        try:
            lock = os.open(holder / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:  # its process died before making its lock file, or another sweep is removing it
            shutil.rmtree(holder, ignore_errors=True)
            removed.append(holder)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live process holds it, another sweep is removing it, or flock cannot tell here
            continue
        else:
            shutil.rmtree(holder, ignore_errors=True)
            removed.append(holder)
        finally:
            os.close(lock)
    return removed
