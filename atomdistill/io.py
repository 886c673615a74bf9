"""Files: atomic writes (a result on disk is either the old one or the new one, never half of
each), checks that an output location is writable before the work that fills it, content
checksums, and an exclusive lock on a folder that one process writes."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import AtomDistillError

try:   # POSIX; elsewhere folders are not locked (see FolderLock)
    import fcntl
except ImportError:   # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".atomdistill.lock"
TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A write that fails for want of space or permission (or because part of the path is a file)
    raises an AtomDistillError naming the path; the previous file, if any, is left untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; a result is an ordinary file
        os.replace(tmp, path)
    except Exception as e:
        if _is_write_failure(e):
            raise AtomDistillError(f"cannot write {path}: {_write_failure_reason(e, path)}") from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _is_write_failure(e: Exception) -> bool:
    # safetensors reports a failed write as SafetensorError ("No space left on device ...").
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def _write_failure_reason(e: Exception, path: Path) -> str:
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "No space left" in text:
        return "the disk is full; free some space and run the command again (earlier files are intact)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the location is not writable (permission denied or read-only); choose another output path"
    if code in (errno.ENOTDIR, errno.EEXIST) or isinstance(e, (NotADirectoryError, FileExistsError)):
        blocker = _file_in_the_way(path)
        return (f"{blocker} is a file, not a folder" if blocker else "part of the path is a file") + \
            "; choose another output path"
    return f"{e.strerror if getattr(e, 'strerror', None) else text}; check the output path"


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of `path` (or path's parent itself) that exists and is not a folder."""
    parent = Path(path).parent.absolute()
    for folder in [*reversed(parent.parents), parent]:
        if folder.exists() and not folder.is_dir():
            return folder
    return None


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Raise an AtomDistillError now if `path` (a file, or a folder if `folder`) could not be
    written later: part of it is a file, it is of the wrong kind, or its nearest existing folder
    is not writable. Creates nothing (a probe file is made and removed)."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise AtomDistillError(f"{path} is a file, not a folder; choose another output folder")
        if not folder and path.is_dir():
            raise AtomDistillError(f"{path} is a folder, not a file; choose another output file name")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AtomDistillError(f"cannot write {path}: {existing} is a file, not a folder; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".atomdistill-probe.", suffix=TMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AtomDistillError(f"cannot write {path}: {_write_failure_reason(e, path)}") from None


def check_new_file(path: str | os.PathLike, *, overwrite: bool | None, inputs=(), remade=()) -> None:
    """Refuse now, before the work, to write the file `path` over something it would destroy: one
    of the command's `inputs` (always), or any existing file unless `overwrite` or its suffix is
    in `remade` (outputs such as a grid picture that the command makes again). `overwrite` None:
    the command has no --overwrite. Then check_writable."""
    path = Path(path)
    if path.is_file():
        if any(Path(i).is_file() and os.path.samefile(path, i) for i in inputs):
            raise AtomDistillError(f"{path} is what this command reads; writing it would destroy it: choose another "
                                   "output path")
        if not overwrite and path.suffix.lower() not in remade:
            raise AtomDistillError(f"{path} already exists; choose another output path"
                                   + (", or pass --overwrite to replace it" if overwrite is not None else ""))
    check_writable(path)


EXPORT_SUFFIXES = (".png", ".pt")   # what exports write: the only files a replaced folder may hold


def check_new_folder(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse now a folder output that exists and is not empty (files an earlier export left there
    would be read back as part of this one), unless `overwrite` and it holds nothing but an earlier
    export's files, which atomic_folder then replaces whole. Then check_writable."""
    path = Path(path)
    here, where = Path.cwd(), path.resolve()
    if where == here or where in here.parents:   # renamed aside, it would take the shell's folder
        raise AtomDistillError(f"{path} is the current folder or holds it, which an export cannot replace; "
                               "name a new folder inside it, e.g. ./exported")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise AtomDistillError(f"{path} is not empty; choose a new or empty folder, or pass --overwrite "
                                   "(overwrite=True) to replace an earlier export there")
        foreign = _foreign_file(path)
        if foreign is not None:
            raise AtomDistillError(f"{path} holds {foreign}, which no export writes; --overwrite replaces only "
                                   "a folder of earlier export files (.png, .pt): choose another folder")
    check_writable(path, folder=True)


def _foreign_file(folder: Path) -> Path | None:
    """The first entry under `folder` that an export would not have written, if any: a file of
    another kind, or anything deeper than DIR/<class>/<file>."""
    for entry in sorted(folder.rglob("*")):
        depth = len(entry.relative_to(folder).parts)
        if entry.is_dir() and not entry.is_symlink():
            if depth > 1:
                return entry
        elif entry.is_symlink() or depth > 2 or entry.suffix.lower() not in EXPORT_SUFFIXES:
            return entry
    return None


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a new empty folder beside `path`; on success it takes `path`'s place whole.

    So a killed export leaves no half-written folder for another tool to read, and a replaced one
    is either the old export or the new. `path` must be new or empty, or, with `overwrite`, hold
    only an earlier export's files (check_new_folder). Failed writes raise an AtomDistillError."""
    path = Path(path)
    sweep_killed_exports(path.parent)
    check_new_folder(path, overwrite=overwrite)
    tmp = old = None
    lock = old_lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
        lock = _lock_folder(tmp)   # marks it live for sweep_killed_exports
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it private; an export is an ordinary folder
        yield tmp
        if path.exists():   # rename cannot replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=TMP_SUFFIX, dir=path.parent))
            old_lock = _lock_folder(old)
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        if old is not None and not path.exists() and (old / path.name).exists():
            os.replace(old / path.name, path)   # put the earlier export back
        if _is_write_failure(e):
            raise AtomDistillError(f"cannot write {path}: {_write_failure_reason(e, path)}") from None
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        for fd in (lock, old_lock):
            if fd is not None:
                os.close(fd)


_EXPORT_TMP = re.compile(r"\..+\.(old\.)?[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
STALE_AFTER_S = 60   # a temporary folder younger than this may be a starting export's, not yet locked


def _lock_folder(folder: Path) -> int | None:
    """An flock on the folder itself, held until the returned descriptor is closed (the kernel
    drops it when the process dies, kill -9 included). None where there is no flock."""
    if fcntl is None:   # pragma: no cover - Windows
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:   # a file system without locks (ENOLCK): the sweep cannot lock it either, so skips it
        os.close(fd)
        return None
    return fd


def sweep_killed_exports(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary folders that killed exports left in `folder`; the ones removed.

    A live export holds an flock on its temporary folder; one that is unlocked and over a minute
    old was left by an export that died. If the kill came between moving an earlier export aside
    and renaming the new one in, the earlier export is put back in its place first: nothing is
    lost. Where there is no flock (Windows) nothing is removed."""
    folder = Path(folder)
    removed = []
    if fcntl is None or not folder.is_dir():
        return removed
    for tmp in sorted(folder.glob(f".*{TMP_SUFFIX}")):
        # Only mkdtemp's names for atomic_folder (.NAME.XXXXXXXX.tmp, .NAME.old.XXXXXXXX.tmp);
        # atomic_path's temporaries are files, swept under their run folder's lock.
        if not _EXPORT_TMP.fullmatch(tmp.name) or not tmp.is_dir() or tmp.is_symlink():
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue   # a live export
            if time.time() - os.fstat(fd).st_mtime < STALE_AFTER_S:
                continue
            entries = list(tmp.iterdir())
            if ".old." in tmp.name:   # holds the earlier export, moved aside
                if len(entries) != 1 or not entries[0].is_dir() or _foreign_file(entries[0]) is not None:
                    continue
                if not (folder / entries[0].name).exists():
                    os.replace(entries[0], folder / entries[0].name)
            elif _foreign_file(tmp) is not None:
                continue   # never delete what an export does not write
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def remove_stale_temporaries(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files that killed atomic writes of `names` left in `folder`.

    Only call it while holding the folder's lock: a live writer's temporary looks the same."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*{TMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def is_leftover(path: Path) -> bool:
    """A lock file or an interrupted atomic write: not a result, and harmless to ignore."""
    return path.name.endswith(LOCK_NAME) or (path.name.startswith(".") and path.name.endswith(TMP_SUFFIX))


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def hash_json(obj) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=6).hexdigest()


def hash_tensors(*tensors) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def content_checksum(tensors: dict, meta: dict) -> str:
    """A checksum of a file's content: every tensor (name, dtype, shape, bytes) and the metadata
    in canonical JSON (without its own 'checksum' entry). Stored in the metadata on save and
    compared on load, so a flipped byte or an edited value is found instead of used."""
    import torch
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())   # as bytes: any dtype, NaN included
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


# ---- locking ----------------------------------------------------------------------------------
class FolderLock:
    """An exclusive lock on a folder, held by one process from acquire() until release() or its end.

    It is an flock on `folder/.atomdistill.lock`: the kernel drops it when the process ends in
    any way (kill -9 included), so a stale lock never blocks anyone. The file names the holder
    (pid and host) for the message a second writer gets. On systems without flock (Windows)
    nothing is locked. Two FolderLocks of one folder exclude each other even in one process.
    `of_file` locks one file of a folder instead (its lock file is `.NAME.atomdistill.lock`)."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", *, lock_name: str = LOCK_NAME,
                 subject: str | os.PathLike | None = None, instead: str = "choose another folder"):
        self.folder, self.what, self.instead = Path(folder), what, instead
        self.path = self.folder / lock_name
        self.subject = Path(subject) if subject is not None else self.folder   # what the message names
        self._fd: int | None = None
        self._created: list[Path] = []   # folders acquire() made, deepest first

    @classmethod
    def of_file(cls, path: str | os.PathLike, what: str = "file", instead: str = "choose another name") -> "FolderLock":
        path = Path(path)
        return cls(path.parent, what, lock_name=f".{path.name}{LOCK_NAME}", subject=path, instead=instead)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None or fcntl is None:
            return self
        check_writable(self.folder, folder=True)
        self._created = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AtomDistillError(f"cannot write {self.folder}: {_write_failure_reason(e, self.folder)}") from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise AtomDistillError(
                    f"{self.what} {self.subject} is in use by another atomdistill process ({self._holder()}); "
                    f"wait for it to finish, stop it, or {self.instead}") from None
            # The holder removes the file when it releases: if that happened between our open
            # and flock, we hold a lock on a removed file; take the new one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "pid unknown"
        except OSError:
            return "pid unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)   # still ours: unlink before unlocking, so no one locks a removed file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in self._created:   # folders made only to hold the lock go again if nothing was written in them
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
