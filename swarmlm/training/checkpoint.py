"""Atomic checkpoints: a reader (or a crash) sees the old checkpoint or the new one, never a mix.

The new checkpoint is written into a temporary directory next to the target (same filesystem), every
file and directory is fsync'ed, and only then is it moved into place:
  * target missing  -> rename(temp, target)
  * target present  -> renameat2(RENAME_EXCHANGE) swaps the two directories in one step (Linux); where
    that is unavailable, rename(target, .old) + rename(temp, target), and the next save (or
    `recover_checkpoint`) puts .old back if a crash fell between the two renames.
A process killed while writing leaves only its temporary directory `.NAME.tmp-PID-*`, which the next
save removes once that process is gone. The layout is transformers' `save_pretrained` (safetensors)
plus the tokenizer, so `swarmlm peer --model DIR` serves it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from swarmlm.errors import CheckpointError

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.json"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def save_checkpoint(directory: str | os.PathLike, model, tokenizer, training_state: Optional[dict] = None, *,
                    overwrite: bool = False) -> Path:
    """Writes model weights (safetensors), config, tokenizer and `training_state` to `directory` atomically.

    The new checkpoint is written beside `directory`, then swapped in; the previous one stays whole until the
    new one is. A save replaces only what a save writes: if `directory` holds anything the new checkpoint does
    not (a user's files, other weights shards), it raises CheckpointError and changes nothing, unless
    `overwrite` (then those are deleted with the previous checkpoint)."""
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(directory)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if training_state is not None:
            (temporary / TRAINING_STATE_FILE).write_text(json.dumps(training_state, indent=2, sort_keys=True))
        os.chmod(temporary, 0o755)
        foreign = _foreign_entries(directory, temporary)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise CheckpointError(f"{directory} holds files a checkpoint save did not write ({shown}); nothing was "
                                  f"changed: save to another directory, or overwrite it (--overwrite)")
        _fsync_tree(temporary)
        _move_into_place(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # after an exchange it holds the previous checkpoint
    return directory


def check_replaceable(directory: str | os.PathLike, overwrite: bool = False,
                      remedy: str = "save to another directory, or overwrite it (--overwrite)") -> None:
    """CheckpointError now (before long work) if a save to `directory` would surely refuse: it is a non-empty
    directory that holds no checkpoint a save wrote (no training_state.json), or not a directory at all."""
    directory = Path(directory)
    if overwrite or not directory.exists():
        return
    if not directory.is_dir() or (any(directory.iterdir()) and not (directory / TRAINING_STATE_FILE).is_file()):
        raise CheckpointError(f"{directory} is not empty and holds no swarmlm checkpoint: {remedy}")


def _foreign_entries(directory: Path, new: Path) -> list[str]:
    """What `directory` holds that the new checkpoint in `new` does not, and that no save writes (a training state,
    weights shards of another sharding): it would be lost in the swap."""
    if not directory.is_dir():
        return [directory.name] if directory.exists() else []
    written = {path.relative_to(new) for path in new.rglob("*")}
    return sorted(str(rel) for path in directory.rglob("*") if (rel := path.relative_to(directory)) not in written
                  and not (path.is_dir() and any(path.iterdir())) and not _saved_by_a_save(rel))


def _saved_by_a_save(relative: Path) -> bool:
    name = relative.name
    return len(relative.parts) == 1 and (name == TRAINING_STATE_FILE or name.endswith(".safetensors")
                                         or name.endswith(".safetensors.index.json"))


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Removes leftovers of interrupted saves of `directory`; restores it from `.old` if a save died mid-swap."""
    directory = Path(directory).absolute()
    if not directory.parent.is_dir():
        return
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not directory.exists():
        logger.warning(f"Restoring {directory} from {olds[-1]} (a save was interrupted between two renames)")
        os.rename(olds.pop(), directory)
    for leftover in olds:
        shutil.rmtree(leftover, ignore_errors=True)
    for temporary in directory.parent.glob(f".{directory.name}.tmp-*"):
        if not _writer_alive(temporary.name):
            shutil.rmtree(temporary, ignore_errors=True)


def _writer_alive(temporary_name: str) -> bool:
    try:
        pid = int(temporary_name.split(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # our own earlier attempt that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    """fsyncs every file, then every directory (deepest first), so the data is on disk before the rename."""
    directories = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            directories.append(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync_directory(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(temporary: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(temporary, directory)
    elif not _exchange(temporary, directory):
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(temporary, directory)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(directory.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False where the OS cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(error)}")
