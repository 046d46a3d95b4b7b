"""Staged checkpoint folders: one a killed process left is removed by the next, one a live process holds is kept."""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from trainers.staging import CHECKPOINT, LOCK_FILE, staged_folder, staging_root, sweep_dead

# A process that stages a folder, writes into it, says where, and waits to be killed inside the block.
HOLDER = """
import time
from trainers.staging import staged_folder
with staged_folder() as folder:
    open(folder + "/weights", "w").write("x")
    print(folder, flush=True)
    time.sleep(600)
"""


def _holding(temp: Path, started: list) -> tuple[subprocess.Popen, Path]:
    """A HOLDER process with TMPDIR temp (added to started, for the caller to end), and its folder's holder."""
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True)
    started.append(process)
    folder = Path(process.stdout.readline().strip())
    assert (folder / "weights").is_file(), folder
    return process, folder.parent


def test_a_killed_holders_folder_is_removed_by_the_next_and_a_live_ones_is_kept(own_tempdir):
    started = []
    try:
        killed, killed_holder = _holding(own_tempdir, started)
        live, live_holder = _holding(own_tempdir, started)
        assert killed_holder.parent == live_holder.parent == staging_root()
        os.kill(killed.pid, signal.SIGKILL)  # no finally runs, as when Ray kills a trial inside its report
        killed.wait(timeout=30)
        assert (killed_holder / CHECKPOINT / "weights").is_file()  # what a TemporaryDirectory would leave for good
        # Old enough for the sweep (the default waits 10 minutes, which no test would).
        with staged_folder(min_age_s=0) as mine:
            assert not killed_holder.exists()
            assert (live_holder / CHECKPOINT / "weights").is_file()
            assert Path(mine).is_dir() and Path(mine).parent.parent == staging_root()
        assert not Path(mine).parent.exists()  # left normally, it is deleted at once
        assert sweep_dead(staging_root(), min_age_s=0) == []  # the live holder's is still held
        assert live_holder.exists()
    finally:
        for process in started:  # each by its own handle, whatever failed
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    assert sweep_dead(staging_root(), min_age_s=0) == [live_holder]  # killed too now
    assert list(staging_root().iterdir()) == []


def test_a_young_folder_is_not_swept_and_one_left_without_its_lock_is(own_tempdir):
    """Between a folder's creation and its lock a sweep must not take it for dead: it waits until the folder is
    min_age_s old. One whose process died in that gap has no lock file, and goes once it is old enough."""
    root = staging_root()
    root.mkdir()
    unlocked = Path(tempfile.mkdtemp(dir=root))
    assert not (unlocked / LOCK_FILE).exists()
    assert sweep_dead(root) == []  # younger than SWEEP_MIN_AGE_S
    assert unlocked.exists()
    assert sweep_dead(root, min_age_s=0) == [unlocked]
    assert not unlocked.exists()


def test_on_a_file_system_without_flock_checkpoints_still_stage_and_nothing_is_swept(own_tempdir, monkeypatch):
    """Some Lustre mounts answer flock with ENOSYS; a checkpoint must still be written there, and since no lock can
    be read, no folder may be taken for dead. No such file system runs here, so flock is made to refuse."""
    import errno
    import fcntl

    root = staging_root()
    root.mkdir()
    old = Path(tempfile.mkdtemp(dir=root))
    (old / LOCK_FILE).touch()

    def refuse(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with staged_folder(min_age_s=0) as folder:
        (Path(folder) / "weights").write_text("x")
        assert old.exists()  # its lock cannot be read: kept
    assert not Path(folder).parent.exists()
    assert sweep_dead(root, min_age_s=0) == [] and old.exists()
