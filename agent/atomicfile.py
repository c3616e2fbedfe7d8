"""Replace a file so that every reader sees the old content or the new, never half of either.

Write a temporary file in the same folder (rename is atomic only within one file system), fsync it, rename it
over the target. ``durable=True`` also fsyncs the folder, for state that must survive a crash (wrap records,
calibration); files on /run (the GPU snapshot, metrics) are rewritten every second and need not.
"""

import os


def write(path, data, mode=0o644, durable=False, exclusive=False):
    """Atomically replace ``path`` with ``data`` (bytes or str), mode ``mode`` whatever the umask.

    ``exclusive``: create ``path`` only if it does not exist (FileExistsError otherwise), still never half-written:
    the finished temporary file is hard-linked into place, which fails rather than replaces.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    else:
        os.rename(tmp, path)
    if durable:
        fsync_dir(folder)


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


def read_trusted(path, limit=4096):
    """The text of a small state file only root (or this user) could have written, else None: not there, a
    symlink, not owned by root or us, or writable by group or others. Its readers act on it (the drain switch, the
    wrap map): a file another account could plant or edit must count as absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)

