"""Atomic file writes: a crash during a write leaves the previous file whole; JSON caches read back."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file through ``write(fileobj)`` into a temporary file, fsync it, rename it, and
    (POSIX) fsync the folder, so that the new file survives a power loss or a crash of the host.

    ``os.replace`` is atomic on POSIX and Windows, so readers see either the old or the new
    file, never a half-written one. The file gets the permissions a plain ``open`` would give
    it (0o666 less the umask), not the temporary file's 0o600. Where ``path`` is a symbolic
    link (``latest.pt -> runs/7/ckpt.pt``), its target is written, as by a plain ``open``, and
    the link stays; the temporary goes beside the target, on the target's file system.

    Raises:
        OSError: ELOOP for a loop of links, ENOENT for a link into a missing folder, EISDIR
            for a folder (:func:`_write_target`), PermissionError where the folder takes no
            new file; and whatever ``write`` raises (the previous file stays whole).
    """
    path = _write_target(Path(path))
    blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would say only "File exists"
        raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except PermissionError as exc:  # its message would name the temporary
        raise PermissionError(
            exc.errno,
            f"cannot create a temporary file in {path.parent} to replace {path.name} atomically",
            str(path),
        ) from exc
    try:
        if fcntl is not None:  # held until closed: the temporary is in use (_remove_stale_temporaries)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename is an entry of the folder: a crash may lose it until synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _write_target(path: Path) -> Path:
    """The file a write of ``path`` replaces: ``path``, or where symbolic links on the way lead
    (a rename onto a link would replace the link with a file).

    Raises:
        OSError: ELOOP, the links form a loop (as ``open`` raises).
        FileNotFoundError: a link leads into a folder that does not exist (``open`` would not
            create it either; a plain path's missing folders are created).
        IsADirectoryError: ``path`` is, or leads to, a folder.
    """
    target = Path(os.path.realpath(path))  # not strict: the file itself may not exist yet
    if any(os.path.islink(p) for p in (target, *target.parents)):  # realpath stops at a loop
        raise OSError(errno.ELOOP, "the symbolic links on this path form a loop", str(path))
    linked = any(os.path.islink(p) for p in (path, *path.parents))
    if linked and not target.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"a symbolic link on this path leads to {target}, whose folder does not exist",
            str(path),
        )
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    return target


#: bytes of the file's name its temporary keeps (a folder entry holds at most 255 bytes on
#: common file systems; the temporary adds ``.``, ``.``, 8 random characters and ``.tmp``)
_NAME_BYTES = 200
#: seconds an unlocked temporary must have gone unwritten before it counts as a killed
#: writer's: a writer locks its temporary just after creating it
STALE_SECONDS = 60.0


def _temporary_prefix(path: Path) -> str:
    """``.NAME.`` (the name cut to :data:`_NAME_BYTES` bytes): the temporary of ``path``."""
    return f".{path.name.encode()[:_NAME_BYTES].decode(errors='ignore')}."


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that killed writers left (SIGKILL, the OOM
    killer, a power loss): a checkpoint's is as large as the checkpoint, and hidden. A writer
    holds an exclusive ``flock`` on its temporary until it is renamed (:func:`atomic_write`),
    and the kernel drops it with the writer, whatever its process namespace (a PID test
    removed a live writer's temporary from another container sharing the host name); a
    temporary is removed only where no one holds it and it has not been written for
    :data:`STALE_SECONDS`. Nothing is removed where ``fcntl`` is missing (Windows)."""
    if fcntl is None:
        return
    prefix = _temporary_prefix(path)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}\.tmp")
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        if not pattern.fullmatch(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # gone, a link, unreadable
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < STALE_SECONDS:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError where a writer holds it
            candidate.unlink(missing_ok=True)
        except OSError:
            continue
        finally:
            os.close(fd)


def writable_folder(path: str | os.PathLike[str], what: str, option: str) -> bool:
    """Create the folder ``path`` (with its parents) where missing and check that a file can
    be written in it (a probe file, created and removed: permission bits say nothing of a
    read-only mount, ACLs or a root without ``CAP_DAC_OVERRIDE``). Returns whether it was
    created.

    Raises:
        ValueError: it cannot be created or written into; names ``what`` it is and the
            ``option`` to change.
    """
    path = Path(path)
    created = not path.exists()
    if path.exists() and not path.is_dir():  # "File exists" said it less plainly (helper-157)
        raise ValueError(f"the {what} {path} is a file, not a folder: choose a folder for {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        verb = "create" if created and not path.is_dir() else "write into"
        raise ValueError(
            f"cannot {verb} the {what} {path} ({exc.strerror or exc}): choose a writable {option}"
        ) from exc
    return created


def cache_folder(path: str | os.PathLike[str], option: str, log: Callable[[str], None]) -> None:
    """Check the profile folder ``path`` as :func:`writable_folder` does, except that an
    existing folder that takes no new file (a team's cache on a read-only mount) is used: its
    profiles are reused, and what is measured anew is said not to be saved, by ``log`` here
    and where it is measured. Before, ``pipeoptim partition`` and ``train`` refused such a
    folder even where it held every profile they needed (helper-115).

    Raises:
        ValueError: ``path`` cannot be created (a file in its place, a parent that takes no
            folder); names the ``option`` to change.
    """
    folder = Path(path)
    if _refuses_files(folder):
        log(
            f"the profile folder {folder} takes no new file: its profiles are reused, new ones are "
            f"measured for this run only (a writable {option} keeps them)"
        )
        return
    writable_folder(folder, "profile folder", option)


def _refuses_files(folder: Path) -> bool:
    """An existing folder in which no file can be created (a read-only mount, as root too)."""
    if not folder.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@contextlib.contextmanager
def held_folder(
    path: str | os.PathLike[str], what: str, option: str, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the folder ``path`` (existing) for this process while the block runs: an
    exclusive ``flock`` on the folder itself, which the system releases when the process ends,
    killed or not, so no stale lock is left. A second run into the same folder stops at once
    instead of interleaving its records with this one's (two ``pipeoptim train`` into one
    ``--out`` both wrote ``train.csv``, each step twice, and the last to finish won
    ``metrics.json`` and ``checkpoint.pt``). Where the platform has no ``flock`` (Windows) or the
    file system refuses it, ``log`` says the folder is not held and the block runs.

    Raises:
        ValueError: another process holds the folder; names ``what`` it is and the ``option``
            to change.
    """
    path = Path(path)
    if fcntl is None:
        log(f"the {what} {path} is not locked on this platform: a second run into it would not be refused")
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"the {what} {path} is in use by another run: choose another {option}, or wait until "
                "that run ends"
            ) from None
        except OSError as exc:  # a file system without locks (some network or FUSE mounts)
            reason = exc.strerror or exc
            log(f"cannot lock the {what} {path} ({reason}): a second run into it would not be refused")
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finite_json(data: Any) -> Any:
    """``data`` with every NaN and infinite float replaced by ``None`` (JSON has neither: a
    diverged run's ``"train_loss": NaN`` in ``metrics.json`` and ``--json`` was not JSON to any
    parser but Python's, helper-157)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json_table(path: Path, again: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The JSON object in ``path`` (a cache of measurements); ``{}`` where the file is absent,
    and also where it is unreadable, logged as ``"<again>: <path> is unreadable (<why>)"``."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log(f"{again}: {path} is unreadable ({exc})")
        return {}
    return table


def update_json_table(path: Path, key: str, value: Any) -> None:
    """Set ``key`` of the JSON object in ``path`` (a cache of measurements) to ``value``: read
    again and written while this process holds ``<path>.lock`` (``flock``, released when the
    process ends, killed or not), so that two processes measuring into one cache keep both
    entries (read before measuring and written after, one run's entry was lost in 1 of 3 tries
    of two ``partition`` runs started together, helper-115). Without locks (Windows, a file
    system that refuses them, a folder that takes no lock file) it is written unlocked.

    Raises:
        OSError: the file cannot be written.
    """
    with _locked(path.with_name(f"{path.name}.lock")):
        table = read_json_table(path, "", lambda _msg: None)
        table[key] = value
        write_json(path, table)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (made where missing); one another user made is opened to read only, as
    ``flock`` needs no more (opened to write, another user's 0644 lock file was refused and
    the table written unlocked, helper-117)."""
    try:
        fd = os.open(lock, os.O_RDONLY) if lock.exists() else os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:  # a read-only folder: the write says why
        yield
        return
    try:
        with contextlib.suppress(OSError, AttributeError):  # no flock here: unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wrong_fields(data: Mapping[str, Any], kinds: Mapping[str, type | tuple[type, ...]]) -> list[str]:
    """The names in ``kinds`` that ``data`` (a file's JSON or pickled object) lacks or holds
    as another type than ``kinds[name]``: the fields a loader names before it walks them."""
    return [name for name, kind in kinds.items() if name not in data or not isinstance(data[name], kind)]
