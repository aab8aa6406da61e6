"""Files in a directory that someone else may have written or can write (a colleague's study,
a shared scratch folder): reached without following links, read within bounds, written
atomically with the user's umask. rundir.py (the run directory) and everything else that
reads or writes a results directory go through here; README, "Results you did not write".

- Below a confined root (`confine`: the --out, the results directory of `normlab report`),
  no symbolic link is followed: every directory is opened one component at a time with
  O_NOFOLLOW, and every file is created, opened, locked, renamed and deleted relative to it.
  The root's own path may hold links: those are the user's. Below no confined root, only the
  file itself is not followed.
- Every read is bounded (LIMITS by file name, or the caller's limit) and takes regular files
  only: a FIFO, a device or a link is refused in one line (Unreadable), never waited on.
- Every write goes to a new temporary file (O_EXCL, O_NOFOLLOW, mode 0666 less the umask:
  0644 under 022), fsynced, then renamed over the target (a link there is replaced, never
  followed): after a crash at any moment each file is either complete or absent.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import stat
import time
from pathlib import Path

from .errors import NormlabError

_HOST = socket.gethostname().replace(".", "_") or "host"  # names this host's temporary files
MiB = 1 << 20
# The most normlab reads of each file; a larger one is refused before it is read. Sized far
# above what normlab writes: a study of MAX_RUNS runs, MAX_EPOCHS epochs (config.py).
LIMITS = {"config.json": 1 * MiB, "status.json": 1 * MiB, "metrics.csv": 16 * MiB, "checkpoint.sha256": 4096,
          "study.json": 64 * MiB, "jobs.json": 16 * MiB, "results.csv": 64 * MiB, "curves.csv": 256 * MiB}
DEFAULT_LIMIT = 16 * MiB
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_roots: set[str] = set()


class Unreadable(NormlabError):
    """A file that exists but cannot be used: a link, not a regular file, too large, damaged."""


# -- where links are not followed ----------------------------------------------------------
def confine(root: str | Path) -> Path:
    """Follow no symbolic link below `root` from now on, in this process (its own path is
    the user's: resolved as usual). Returns root as an absolute path."""
    path = os.path.abspath(root)
    _roots.add(path)
    return Path(path)


def _anchor(directory: str) -> tuple[str, list[str]]:
    """(the directory trusted as it is, the components below it that must not be links): the
    outermost confined root holding `directory`, or else `directory` itself (a file the user
    named, such as bench --json: only the file is not followed)."""
    roots = [r for r in _roots if directory == r or directory.startswith(r.rstrip("/") + "/")]
    anchor = min(roots, key=len) if roots else directory
    rest = os.path.relpath(directory, anchor)
    return anchor, [] if rest == "." else rest.split(os.sep)


def _link_error(path: str, err: OSError) -> NormlabError:
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        link = False
    if link:
        return NormlabError(f"{path} is a symbolic link; normlab neither reads nor writes through links "
                            f"inside a results directory (one could point anywhere): remove it, or "
                            f"use another --out")
    if err.errno == errno.ENOTDIR:
        return NormlabError(f"{path} is not a directory; move it away, or use another --out")
    return NormlabError(f"cannot open {path} ({err.strerror}); choose a readable and writable --out")


def _open_dir(path: str, create: bool = False) -> int:
    """A descriptor of directory `path`, reached without following links below its anchor;
    with `create`, missing directories are made (with the umask's mode)."""
    anchor, parts = _anchor(path)
    if create:
        os.makedirs(anchor, exist_ok=True)  # the anchor's own path is the user's
    fd = os.open(anchor, _DIR)
    here = anchor
    try:
        for part in parts:
            here = os.path.join(here, part)
            try:
                child = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _link_error(here, err) from None
        raise
    return fd


@contextlib.contextmanager
def _parent(path: str | Path, create: bool = False):
    """(descriptor of path's directory, path's name), the directory reached without links."""
    path = os.path.abspath(path)
    fd = _open_dir(os.path.dirname(path), create)
    try:
        yield fd, os.path.basename(path)
    finally:
        os.close(fd)


def make_dir(path: str | Path) -> Path:
    """Create directory `path` (and the missing ones above it) unless it exists; a link or a
    file in its place is refused in one line (NormlabError; other failures are OSError)."""
    os.close(_open_dir(os.path.abspath(path), create=True))
    return Path(path)


# -- bounded reads ---------------------------------------------------------------------------
def limit_for(path: str | Path) -> int:
    return LIMITS.get(Path(path).name, DEFAULT_LIMIT)


def size_text(n: int) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n:,} bytes"


def read_bytes(path: str | Path, limit: int | None = None, follow: bool = False) -> bytes:
    """The bytes of regular file `path`, at most `limit` (LIMITS by name): FileNotFoundError
    when absent, Unreadable when it is a link (unless `follow`: a file the user named), a
    FIFO, a device or larger than the limit. A FIFO is never waited on."""
    limit = limit_for(path) if limit is None else limit
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        if follow:
            fd = os.open(path, flags)
        else:
            with _parent(path) as (dir_fd, name):
                fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except NormlabError as err:
        raise Unreadable(str(err)) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Unreadable(str(_link_error(str(path), err))) from None
        raise Unreadable(f"{path} cannot be read ({err.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode)
                    else "a device or socket")
            raise Unreadable(f"{path} is {kind}, not a regular file; normlab reads regular files only")
        if info.st_size > limit:
            raise Unreadable(f"{path} is {size_text(info.st_size)}, more than the {size_text(limit)} "
                             f"normlab reads of it: it was not written by normlab")
        chunks, total = [], 0
        while chunk := os.read(fd, min(MiB, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise Unreadable(f"{path} grew beyond the {size_text(limit)} normlab reads of it")
        return b"".join(chunks)
    except OSError as err:
        raise Unreadable(f"{path} cannot be read ({err.strerror})") from None
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int | None = None, follow: bool = False) -> str:
    try:
        return read_bytes(path, limit, follow).decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable(f"{path} is not UTF-8 text") from None


def parse_json(text: str, where) -> object:
    """JSON text, refusing what Python's parser would crash on (deep nesting, huge numbers)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:120]
        raise Unreadable(f"{where} is not valid JSON ({reason})") from None


def load_json(path: str | Path, limit: int | None = None) -> dict:
    """The JSON object in path: FileNotFoundError when absent, Unreadable (one line, naming
    the file) when it is anything but a JSON object within the limit."""
    value = parse_json(read_text(path, limit), path)
    if not isinstance(value, dict):
        raise Unreadable(f"{path} holds a JSON {type(value).__name__}, not an object: it was not "
                         f"written by normlab")
    return value


def read_json(path: str | Path, limit: int | None = None) -> dict | None:
    """The JSON object in path, or None when it is absent, unreadable or not an object."""
    try:
        return load_json(path, limit)
    except (FileNotFoundError, Unreadable):
        return None


# -- writes: atomic, never through a link, with the user's umask ----------------------------
def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the new one, never a mix."""
    commit(stage(path, data), path)


def stage(path: Path, data: bytes) -> Path:
    """Write data, fsynced, to a new temporary file beside path (named after this host and
    process, so that remove_stale_temps knows whose it is); commit() puts it in place. The file
    is created (O_EXCL, O_NOFOLLOW) with mode 0666 less the umask, as open() would."""
    path = Path(path)
    try:
        with _parent(path) as (dir_fd, name):
            while True:
                tmp = f".{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o666, dir_fd=dir_fd)
                    break
                except FileExistsError:
                    continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
        return path.with_name(tmp)
    except OSError as err:
        raise _write_error(path, err) from None


def commit(tmp: Path, path: Path) -> None:
    """Rename a staged file over path (a link there is replaced, never followed) and make the
    rename durable (fsync of the directory)."""
    path = Path(path)
    try:
        with _parent(path) as (dir_fd, name):
            try:
                _fault_point(path)
                os.rename(Path(tmp).name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(Path(tmp).name, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
    except OSError as err:
        raise _write_error(path, err) from None


def _write_error(path: Path, err: OSError) -> NormlabError:
    if err.errno == errno.ENOSPC:
        return NormlabError(f"no space left to write {path}; free disk space or choose another "
                            f"--out, then run the same command again to resume")
    return NormlabError(f"cannot write {path} ({err.strerror}); choose a writable --out")


def _fault_point(path: Path) -> None:
    """For the soak test (scripts/soak.py) only: NORMLAB_FAULT_WRITE_DELAY=S holds every write
    S seconds between its temporary file and the rename, so that random kills land there."""
    delay = os.environ.get("NORMLAB_FAULT_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))


def append_line(path: Path, line: str) -> None:
    """Append one line (appends of a short line are atomic: several processes can share the
    file); the file is created with the umask's mode, never opened through a link."""
    try:
        with _parent(path) as (dir_fd, name):
            fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o666, dir_fd=dir_fd)  # a FIFO: refused, not waited on
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NormlabError(f"{path} is not a regular file; move it away, or use another --out")
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _link_error(str(path), err) from None
        raise _write_error(path, err) from None


def open_lock_file(path: Path) -> int:
    """A descriptor of lock file `path` for flock, created if absent (never through a link:
    a link there is refused, so that its target is never created or changed)."""
    try:
        with _parent(path) as (dir_fd, name):
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         0o666, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _link_error(str(path), err) from None
        raise _write_error(Path(path), err) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NormlabError(f"{path} is not a regular file; move it away, or use another --out")
    return fd


def rename_aside(path: Path, new_name: str) -> Path:
    """Rename directory or file `path` to `new_name` beside it (a link is renamed, never
    followed)."""
    try:
        with _parent(path) as (dir_fd, name):
            os.rename(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
    except OSError as err:
        raise _write_error(Path(path), err) from None
    return Path(path).with_name(new_name)


def hard_link(path: Path, copy: Path) -> None:
    """Make `copy` (beside path) another name of the file `path` (a link at path is linked
    itself, never followed), replacing any `copy`."""
    try:
        with _parent(path) as (dir_fd, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(Path(copy).name, dir_fd=dir_fd)
            os.link(name, Path(copy).name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        raise _write_error(Path(copy), err) from None


def remove(path: Path) -> None:
    """Delete the file `path` if it is there (a link is removed itself, never its target)."""
    try:
        with _parent(path) as (dir_fd, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _write_error(Path(path), err) from None


def remove_stale_temps(directory: Path) -> int:
    """Delete temporary files that a killed process of this host left in directory (a live
    process's, or another host's, are kept). Returns how many were removed."""
    removed = 0
    try:
        fd = _open_dir(os.path.abspath(directory))
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise _write_error(Path(directory), err) from None
    try:
        for name in os.listdir(fd):
            if not (name.startswith(".") and name.endswith(".tmp") and f".{_HOST}." in name):
                continue
            pid = name[:-len(".tmp")].split(f".{_HOST}.", 1)[1].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)  # unlink removes a link itself, never its target
                    removed += 1
    finally:
        os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
