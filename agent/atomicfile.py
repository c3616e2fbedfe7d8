"""Replace a file so that every reader sees the old content or the new, never half of either; and the agent's own
state, written and read back only where no other account could have planted or changed anything.

Write a temporary file in the same folder (rename is atomic only within one file system), fsync it, rename it
over the target. ``durable=True`` also fsyncs the folder, for state that must survive a crash (wrap records,
calibration); files on /run (the GPU snapshot, metrics) are rewritten every second and need not.

Root never follows what another account planted (issue 17): the temporary file has an unguessable name and is
made with ``O_EXCL | O_NOFOLLOW`` relative to an open folder descriptor, and the rename happens through the same
descriptor, so neither a symlink nor a pre-created file at any name can redirect the write. State folders are
opened with :func:`open_dir`: every component from ``/`` with ``O_NOFOLLOW | O_DIRECTORY``, each owned by root (or
us) and writable by no one else (an intermediate sticky folder such as /tmp is passed when the next component is
ours), a symlink followed only where its folder is trusted and root owns it. A refusal is :class:`Refused` (an
OSError: the agent's loops already contain those), with a message that says which path and why.
"""

import errno
from . import fastos as os  # os without its import cost (fastos.py)
import stat

_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class Refused(OSError, ValueError):
    """A path root will not write or read through: a symlink, a file or folder another account could have
    planted or can change, a name that is not one path component."""

    def __init__(self, path, why):
        super().__init__(errno.EPERM, f"{path}: {why}; refusing to use it (it must be root's alone)")
        self.path = path
        self.why = why


def is_name(name, limit=255):
    """Whether ``name`` is one safe path component (the config's rule for names: letters, digits, '_', '.', '-',
    not starting with '.'), so joining it to a folder can never leave that folder."""
    return isinstance(name, str) and 0 < len(name) <= limit and name[0] != "." and set(name) <= _NAME_CHARS


def _temp_name(name):
    return f".{name[:100]}.{os.urandom(8).hex()}.tmp"


def _trusted(st, any_owner=False):
    return (any_owner or st.st_uid in (0, os.geteuid())) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _passable(st, any_owner=False):
    """A folder we may pass through (not stop in): trusted, or a sticky one (/tmp) where others cannot replace
    what we own (the next component must then be ours)."""
    return (any_owner or st.st_uid in (0, os.geteuid())) and (_trusted(st, any_owner) or st.st_mode & stat.S_ISVTX)


def open_dir(path, create=False, mode=0o755, any_owner=False):
    """A descriptor of folder ``path`` (absolute) that only root (or we) could have made or can change, reached
    without following anything another account planted. ``create``: make missing components with ``mode``.
    ``any_owner``: the folders may belong to another system account (node_exporter's textfile folder under
    /var/lib/prometheus), still writable by their owner alone. Raises :class:`Refused`, FileNotFoundError (``create``
    False), or another OSError."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise Refused(str(path), "not an absolute path")
    fd = os.open("/", _DIR)
    try:
        st = os.fstat(fd)
        parts = [p for p in path.split("/") if p and p != "."]
        links = 0
        done = "/"
        while parts:
            part = parts.pop(0)
            if part == "..":
                raise Refused(path, "'..' in the path")
            if not _passable(st, any_owner):
                raise Refused(done, "a folder others can write to")
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIR, dir_fd=fd)
                os.fchmod(nfd, mode)  # whatever the umask
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                lst = os.stat(part, dir_fd=fd, follow_symlinks=False)
                here = os.path.join(done, part)
                if not stat.S_ISLNK(lst.st_mode):
                    raise Refused(here, "not a folder") from None
                if not _trusted(st, any_owner) or (lst.st_uid not in (0, os.geteuid()) and lst.st_uid != st.st_uid):
                    raise Refused(here, "a symlink another account could have made") from None
                links += 1
                if links > 40:
                    raise Refused(path, "too many symlinks") from None
                # what we passed has no symlink left in it: '..' in the target is plain text here
                target = os.path.normpath(os.path.join(done, os.readlink(part, dir_fd=fd)))
                parts = [p for p in target.split("/") if p and p != "."] + parts
                os.close(fd)
                fd = -1
                fd = os.open("/", _DIR)
                st = os.fstat(fd)
                done = "/"
                continue
            os.close(fd)
            fd = nfd
            done = os.path.join(done, part)
            st = os.fstat(fd)
            if st.st_uid not in (0, os.geteuid()) and not any_owner:
                raise Refused(done, f"owned by uid {st.st_uid}")
        if not _trusted(st, any_owner):
            raise Refused(done, "a folder others can write to")
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def write_at(dir_fd, name, data, mode=0o644, durable=False, exclusive=False):
    """Atomically replace ``name`` in the open folder ``dir_fd`` with ``data``; see :func:`write`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not name or "/" in name or name in (".", ".."):
        raise Refused(str(name), "not one path component")
    while True:
        tmp = _temp_name(name)
        try:
            fd = os.open(tmp, _WRITE, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:  # a collision of 64 random bits: only a planted name; draw again
            continue
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_at(dir_fd, tmp)
        raise
    os.close(fd)
    try:
        if exclusive:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp = None
    finally:
        if tmp is not None:
            _unlink_at(dir_fd, tmp)
    if durable:
        try:
            os.fsync(dir_fd)
        except OSError:
            pass


def write(path, data, mode=0o644, durable=False, exclusive=False):
    """Atomically replace ``path`` with ``data`` (bytes or str), mode ``mode`` whatever the umask.

    ``exclusive``: create ``path`` only if it does not exist (FileExistsError otherwise), still never half-written:
    the finished temporary file is hard-linked into place, which fails rather than replaces.
    The folder is the caller's (followed as named); inside it nothing is followed. The agent's own state goes
    through :func:`write_state` instead, which also vouches for the folder.
    """
    folder = os.path.dirname(path) or "."
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_at(dfd, os.path.basename(path), data, mode, durable, exclusive)
    finally:
        os.close(dfd)


def write_state(directory, name, data, mode=0o644, durable=False, dir_mode=0o755, create=True, any_owner=False):
    """Atomically write ``directory/name``, a file of the agent's own state, in a folder only root can change
    (:func:`open_dir`, made with ``dir_mode`` where missing). Raises :class:`Refused` rather than follow."""
    dfd = open_dir(directory, create=create, mode=dir_mode, any_owner=any_owner)
    try:
        write_at(dfd, name, data, mode, durable)
    finally:
        os.close(dfd)


def append_at(dir_fd, name, data, mode=0o644):
    """Append ``data`` to ``name`` in the open folder ``dir_fd`` (created with ``mode`` if missing); the file's new
    size. Only to a regular file of one link that root (or we) own and no one else may write: never through a
    symlink, into a FIFO or device, or into a hard link of someone else's file."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not name or "/" in name or name in (".", ".."):
        raise Refused(str(name), "not one path component")
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    created = True
    try:
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            created = False
            fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(name, "a symlink") from None
        raise
    try:
        if created:
            os.fchmod(fd, mode)  # ours, new: its mode whatever the umask
        _check_file(os.fstat(fd), name)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _check_file(st, name):
    if not stat.S_ISREG(st.st_mode):
        raise Refused(name, "not a regular file")
    if st.st_nlink != 1:
        raise Refused(name, f"a file with {st.st_nlink} links")
    if not _trusted(st):
        raise Refused(name, "a file another account owns or can write")


def _unlink_at(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def remove_state(directory, name):
    """Remove ``directory/name`` from a trusted state folder; True when it was there. Refused as open_dir is."""
    try:
        dfd = open_dir(directory)
    except FileNotFoundError:
        return False
    try:
        os.unlink(name, dir_fd=dfd)
        try:
            os.fsync(dfd)
        except OSError:
            pass
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def fsync_dir(path):
    """Make a rename or unlink in ``path`` durable; best effort (some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_fd(fd, limit):
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(limit - size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_trusted_at(dir_fd, name, limit=4096, raw=False):
    """:func:`read_trusted` relative to an open folder; bytes with ``raw``."""
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError:
        return None
    return _read_checked(fd, name, limit, raw)


def _read_checked(fd, name, limit, raw):
    try:
        try:
            _check_file(os.fstat(fd), name)
        except Refused:
            return None
        data = _read_fd(fd, limit)
        return data if raw else data.decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def read_trusted(path, limit=4096):
    """The text of a small state file only root (or this user) could have written, else None: not there, a
    symlink, not a regular file, a hard link, not owned by root or us, or writable by group or others. Its readers
    act on it (the drain switch, the wrap map): a file another account could plant or edit must count as absent."""
    try:
        fd = os.open(path, _READ)  # the hot path's drain check: one failed open when there is none
    except OSError:
        return None
    return _read_checked(fd, path, limit, False)


def read_state(directory, name, limit=1 << 20, raw=False):
    """The content of ``directory/name`` of the agent's own state (text, bytes with ``raw``), None when the folder
    or the file is not there. Raises :class:`Refused` when the folder or the file is not root's alone (the caller
    says so once, and treats it as absent)."""
    try:
        dfd = open_dir(directory)
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(name, _READ, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(os.path.join(directory, name), "a symlink") from None
            raise
        try:
            try:
                _check_file(os.fstat(fd), name)
            except Refused as exc:
                raise Refused(os.path.join(directory, name), exc.why) from None
            data = _read_fd(fd, limit)
        finally:
            os.close(fd)
        return data if raw else data.decode("utf-8", "replace")
    finally:
        os.close(dfd)
