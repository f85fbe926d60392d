"""A run folder's life: one writer at a time, writes that are whole or absent and fail in one line, and the
checks every command makes on its output paths before it starts work."""
import errno
import fcntl
import io
import os
import tempfile
import weakref
from pathlib import Path

import torch

from .errors import CifarFastaiError

__all__ = ['RUN_FILES', 'RunFolder', 'RunFolderBusy', 'RunWriteError', 'atomic_write',
           'writable_folder', 'writable_file', 'torch_bytes']

RUN_FILES = ('config.json', 'history.csv', 'curves.png', 'checkpoint.pth', 'model.safetensors', 'model.json',
             'learner.pkl')
LOCK_FILE = '.lock'


class RunFolderBusy(CifarFastaiError):
    "Another process holds the run folder."


class RunWriteError(CifarFastaiError):
    "A file of a run could not be written (full disk, no permission): said in one line, what was there kept."


def atomic_write(path, data, after_failure=''):
    "Write `data` (bytes) to `path` whole or not at all: a temporary file, fsync, rename; removed if anything fails."
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one, never half of one
    except BaseException as e:  # a full disk, or Ctrl-C/SIGTERM mid-write: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunWriteError(f'cannot write {path} ({e.strerror or e}){after_failure}') from None
        raise


def torch_bytes(obj):
    "torch.save into memory: torch's zip writer reports a full disk as a RuntimeError, ours as an OSError."
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def writable_folder(path, create=True, parents=True):
    "A folder we can write in, checked (and made, if `create`) before any work; else one line."
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir(): raise CifarFastaiError(f'out: {path} is a file, not a folder')
    if not parents and not path.parent.is_dir(): raise CifarFastaiError(f'out: parent folder {path.parent} does not exist')
    if create:
        try: path.mkdir(parents=True, exist_ok=True)
        except OSError as e: raise CifarFastaiError(f'out: cannot create {path} ({e.strerror})') from None
    probe = path if path.is_dir() else path.parent
    if not probe.is_dir(): raise CifarFastaiError(f'out: parent folder {probe} does not exist')
    _probe_write(probe)
    return path


def writable_file(path):
    "A file path we can write, checked before any work: not a folder, in an existing folder we can write in."
    path = Path(path).expanduser()
    if path.is_dir(): raise CifarFastaiError(f'out: {path} is a folder; give a file name, e.g. {path / "bench.csv"}')
    if not path.parent.is_dir(): raise CifarFastaiError(f'out: folder {path.parent} does not exist')
    _probe_write(path.parent)
    return path


def _probe_write(folder):
    # os.access says yes to root even on read-only mounts; creating a file is the real test.
    try: tempfile.TemporaryFile(dir=folder).close()
    except OSError as e: raise CifarFastaiError(f'out: cannot write in {folder} ({e.strerror})') from None


# A forked child (a DataLoader worker) shares its parent's flocks: it would hold the folder for a few seconds after
# the parent is killed, and an immediate `fit --resume` would find it in use. Children let go of every held folder.
_HELD = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [folder.unlock() for folder in list(_HELD)])


class RunFolder:
    "A run folder, held by this process alone (an flock that dies with it) while it trains."

    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.checkpoint_epoch = None  # epochs in the last complete checkpoint; None before the first one
        self._lock_fd = None

    def __truediv__(self, name): return self.path / name

    def lock(self):
        "Take the folder for this process, or fail at once naming it: two writers would interleave their epochs."
        try: fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e: raise CifarFastaiError(f'out: cannot lock {self.path} ({e.strerror})') from None
        try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors='replace').strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. a filesystem without locks
                raise CifarFastaiError(f'out: cannot lock {self.path} ({e.strerror})') from None
            raise RunFolderBusy(f'out: {self.path} is in use by another process'
                                f'{f" (pid {holder})" if holder else ""}; wait for it or choose another folder')
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        _HELD.add(self)
        return self

    def unlock(self):
        if self._lock_fd is not None: os.close(self._lock_fd)  # closing the file releases its flock
        self._lock_fd = None
        _HELD.discard(self)

    def __enter__(self): return self
    def __exit__(self, *exc): self.unlock()

    def held_files(self): return [f for f in RUN_FILES if (self.path / f).exists()]

    def clear(self):
        for f in RUN_FILES: (self.path / f).unlink(missing_ok=True)

    def write(self, name, data):
        "Write one file of the run whole; a failure is one line that says what is still safe."
        atomic_write(self.path / name, data.encode() if isinstance(data, str) else data, self._safe_state())

    def save_checkpoint(self, state):
        self.write('checkpoint.pth', torch_bytes(state))
        self.checkpoint_epoch = state['epoch']

    def _safe_state(self):
        if self.checkpoint_epoch is None: return '; no epoch had finished yet'
        return (f'; the last complete checkpoint ({self.path / "checkpoint.pth"}, after epoch {self.checkpoint_epoch}) '
                f'is intact: make room and continue with cifar-fastai fit --resume {self.path}')
