"""Files and folders holding personal data (CDRs, signaling, open calls, cursors, the
embedded database): private whatever the umask, and never a path another user could
have planted.

- `state.dir` is sipcdr's own folder. A missing one is made 0700 (missing folders above
  it 0711: others may pass through, as the embedded server's user must, but not list).
  An existing one is used only when it is a real folder (no symbolic link), belongs to
  the user sipcdr runs as and is open to no one else; otherwise the start is refused,
  naming the key and the path. sipcdr never changes the mode of a folder it may not
  have made (`/tmp`, `/`, an operator's shared folder). Below it everything must be
  that user's: a folder or file of another user (what a run as root leaves in a service
  user's state) is refused; folders and files others may read (left by older
  versions) are tightened to 0700/0600 at every start.
- Every folder above a private one must be changeable by root and that user only, or
  be sticky like `/tmp`: otherwise another user could swap a path between its check
  and its use.
- Files are opened with O_NOFOLLOW|O_CLOEXEC through a folder descriptor opened with
  O_NOFOLLOW and checked, and used only when they are regular, the user's and have a
  single name (a hard link could be anyone's file); modes are set with fchmod.
- The folder of the JSONL file may be the operator's: it must belong to the user and
  let no one else write to it; made 0700 when missing, otherwise never changed.
- The traverse grant: under root the embedded server's user must pass through the
  state folder. It gets a POSIX ACL entry `user:<that user>:--x`, written as the
  `system.posix_acl_access` attribute (no acl tools needed); on a filesystem without
  ACLs the folder's group gets traverse (0710) when that group has no other member,
  and the start is refused otherwise. Either way no one else can even pass through.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
import struct
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import BinaryIO, Final, Literal

STATE_KEY: Final = "state.dir"  # the configuration key refusals name by default
PRIVATE_DIR_MODE: Final = 0o700  # only sipcdr's user lists, enters and writes it
PRIVATE_FILE_MODE: Final = 0o600  # only sipcdr's user reads and writes it
# Folders sipcdr makes above a private one, as `mkdir -p` would: passable by others
# (the embedded server's user must reach its data), but no one else lists them.
PASSAGE_DIR_MODE: Final = 0o711
PRIVATE_UMASK: Final = 0o077  # files a library creates on its own are private too

_OPEN_BITS: Final = 0o077  # anything others than the owner may do
_WRITE_BITS: Final = 0o022  # others may add, remove or rename entries
_TRAVERSE_BIT: Final = 0o010  # the group may pass through, nothing more
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO would otherwise wait for a reader; cleared once the
# descriptor is known to be a regular file.
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_READ_LIMIT_BYTES: Final = 1024 * 1024  # the small bookkeeping files read_private reads
# The filesystem's own, root's, when the state folder is a disk of its own.
_FILESYSTEM_FOLDER: Final = "lost+found"

# The Linux POSIX ACL attribute: a version, then (tag, permissions, id) entries.
_ACL_ATTRIBUTE: Final = "system.posix_acl_access"
_ACL_VERSION: Final = 2
_ACL_HEAD: Final = struct.Struct("<I")
_ACL_ENTRY: Final = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
_ACL_NO_ID: Final = 0xFFFFFFFF
_ACL_EXECUTE: Final = 0o1
_NO_ACLS: Final = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})

_FLAGS: Final = {
    "ab": os.O_WRONLY | os.O_APPEND,
    "wb": os.O_WRONLY | os.O_TRUNC,
}


class PrivatePathError(OSError):
    """A path for personal data that sipcdr will not use: the message is one line
    naming the configuration key, the path and what to do."""


def refuse(key: str, path: Path | str, why: str) -> PrivatePathError:
    return PrivatePathError(f"{key}: {path} {why}")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"user id {uid}"


def not_owned(
    key: str, path: Path | str, owner: int, *, wanted: int | None = None
) -> PrivatePathError:
    """`path` belongs to `owner` rather than to `wanted` (by default the user sipcdr runs
    as): say whose it is and what to do."""
    me = os.geteuid()
    if wanted is not None and wanted != me:
        return refuse(key, path, f"belongs to {user_name(owner)}, not to {user_name(wanted)}")
    if me == 0:
        return refuse(
            key,
            path,
            f"belongs to {user_name(owner)}; as root sipcdr uses no other user's files: "
            f"run it as that user (sudo -u {user_name(owner)} sipcdr ...)",
        )
    name = user_name(me)
    return refuse(
        key,
        path,
        f"belongs to {user_name(owner)}, not to {name} that sipcdr runs as; "
        f"use a folder of {name}'s, or hand this over (chown -R {name} {path})",
    )


def restrict_umask() -> None:
    """Defence in depth for the commands that write personal data: whatever a library
    creates without an explicit mode is private as well."""
    os.umask(PRIVATE_UMASK)


# -- folders ------------------------------------------------------------------------------


def open_folder(path: Path | str, *, key: str = STATE_KEY, dir_fd: int | None = None) -> int:
    """A descriptor of the folder `path` itself, never of what a symbolic link there
    points to."""
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        shown = path if dir_fd is None else f"{path} (in its folder)"
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                link = stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                link = False
            if link:
                raise _symlink(key, shown) from None
            raise refuse(key, shown, "is not a folder") from None
        raise


def prepare_state_dir(path: Path, *, leave: Collection[str] = ()) -> Path:
    """Check (and make when missing) the state folder `path` as the module docstring
    says, and tighten what others may read below it; `leave` names entries right under
    it that belong to someone else by design (the embedded server's data directory),
    which are not looked into. Raises PrivatePathError."""
    path = _absolute(path)
    _refuse_found(path, STATE_KEY)
    _check_above(path, STATE_KEY)
    _make_missing(path, STATE_KEY)
    fd = open_folder(path)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise not_owned(STATE_KEY, path, info.st_uid)
        open_bits = info.st_mode & _OPEN_BITS
        if open_bits and not _traverse_only(fd, info):
            if open_bits != _TRAVERSE_BIT:
                raise refuse(
                    STATE_KEY,
                    path,
                    f"is open to other users (mode {_mode(info)}); sipcdr keeps personal "
                    "data there and changes no folder it may not have made: make it "
                    f"private (chmod 700 {path}) or name a new folder",
                )
            # Traverse for a group with other members (an older version's grant to the
            # embedded server's group): withdrawn; that server gets its own again.
            os.fchmod(fd, PRIVATE_DIR_MODE)
        _tighten_below(fd, path, leave)
    finally:
        os.close(fd)
    return path


def private_dir(path: Path, *, tighten: bool = True, key: str = STATE_KEY) -> Path:
    """A private folder: made 0700 when missing (missing folders above it 0711). An
    existing one must be a real folder of the user sipcdr runs as that no one else may
    write to. With `tighten` (a folder of sipcdr's own state) one others may list or
    enter is made 0700; without (a folder an operator may have chosen, for the JSONL
    file) it is left as it is. Raises PrivatePathError."""
    path = _absolute(path)
    _refuse_found(path, key)
    _check_above(path, key)
    _make_missing(path, key)
    fd = open_folder(path, key=key)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise not_owned(key, path, info.st_uid)
        if info.st_mode & _OPEN_BITS and not _traverse_only(fd, info):
            if tighten:
                os.fchmod(fd, PRIVATE_DIR_MODE)
            elif info.st_mode & _WRITE_BITS:
                raise _writable(key, path, info)
    finally:
        os.close(fd)
    return path


def grant_traverse(path: Path, uid: int, gid: int) -> Callable[[], None]:
    """Let the user `uid` (whose own group is `gid`) pass through the state folder
    `path`, and no one else (see the module docstring); returns what takes it back."""
    fd = open_folder(path)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise not_owned(STATE_KEY, path, info.st_uid)
        try:
            os.setxattr(fd, _ACL_ATTRIBUTE, _traverse_acl(info.st_mode, uid))
        except OSError as exc:
            if exc.errno not in _NO_ACLS:
                raise
        else:
            return lambda: _undo_acl(path, info.st_mode)
        others = _group_members(gid) - {user_name(uid), user_name(info.st_uid)}
        if others:
            raise refuse(
                STATE_KEY,
                path,
                f"cannot be opened to {user_name(uid)} alone: its filesystem has no ACLs "
                f"and that user's group {_group_name(gid)} has other members "
                f"({', '.join(sorted(others))}); give {user_name(uid)} a group of its own, "
                "or run sipcdr as a user of its own",
            )
        os.fchown(fd, -1, gid)
        os.fchmod(fd, (info.st_mode & 0o700) | _TRAVERSE_BIT)
        return lambda: _undo_group(path, info)
    finally:
        os.close(fd)


def _undo_acl(path: Path, mode: int) -> None:
    fd = open_folder(path)
    try:
        with contextlib.suppress(OSError):
            os.removexattr(fd, _ACL_ATTRIBUTE)
        os.fchmod(fd, stat.S_IMODE(mode))
    finally:
        os.close(fd)


def _undo_group(path: Path, before: os.stat_result) -> None:
    fd = open_folder(path)
    try:
        os.fchown(fd, -1, before.st_gid)
        os.fchmod(fd, stat.S_IMODE(before.st_mode))
    finally:
        os.close(fd)


def _absolute(path: Path) -> Path:
    """Absolute without resolving symbolic links: a link in the last place is refused,
    not followed."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _refuse_found(path: Path, key: str) -> None:
    """An existing link, or another user's folder, is refused before anything else is
    looked at: whose it is says best what to do."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _symlink(key, path)
    if info.st_uid != os.geteuid():
        raise not_owned(key, path, info.st_uid)


def _check_above(path: Path, key: str) -> None:
    """Every existing folder above `path`, on the way as written and as resolved, may be
    changed by root and the user sipcdr runs as only, or is sticky."""
    me = os.geteuid()
    existing = next((parent for parent in path.parents if os.path.lexists(parent)), None)
    if existing is None:
        return
    folders = dict.fromkeys([*path.parents, *Path(os.path.realpath(existing)).parents])
    folders[Path(os.path.realpath(existing))] = None
    for folder in folders:
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise refuse(key, path, f"cannot be reached: {folder}: {exc.strerror}") from None
        if info.st_uid not in (0, me):
            raise refuse(
                key,
                path,
                f"lies in {folder}, which belongs to {user_name(info.st_uid)}, who could "
                f"swap what is in it; use a path whose folders only root and "
                f"{user_name(me)} can change",
            )
        if info.st_mode & _WRITE_BITS and not info.st_mode & stat.S_ISVTX:
            raise refuse(
                key,
                path,
                f"lies in {folder}, which other users may write to (mode {_mode(info)}) "
                f"and so swap what is in it; use a path whose folders only root and "
                f"{user_name(me)} can change",
            )


def _make_missing(path: Path, key: str) -> None:
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        mode = PRIVATE_DIR_MODE if folder == path else PASSAGE_DIR_MODE
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: judged like any found folder
        except OSError as exc:
            raise refuse(key, folder, f"cannot be made: {exc.strerror}") from None
        fd = open_folder(folder, key=key)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise refuse(key, folder, "was replaced while it was made")
            # mkdir's mode is cut by the umask.
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _tighten_below(fd: int, path: Path, leave: Collection[str]) -> None:
    """Everything below the state folder is the user's; what others may read is made
    private. Symbolic links are never followed, nor changed."""
    me = os.geteuid()
    for folder, dirs, files, folder_fd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
        here = path / folder
        if folder == ".":
            skip = {*leave, _FILESYSTEM_FOLDER}
            dirs[:] = [name for name in dirs if name not in skip]
            files = [name for name in files if name not in skip]
        for name in (*dirs, *files):
            try:
                info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile (a spool segment delivered)
            if info.st_uid != me:
                raise not_owned(STATE_KEY, here / name, info.st_uid)
            if info.st_mode & _OPEN_BITS and not stat.S_ISLNK(info.st_mode):
                _tighten(folder_fd, name, info)


def tighten_files(folder: Path, names: Iterable[str], *, key: str = STATE_KEY) -> None:
    """Make `names` in `folder` 0600 where they are regular files of the user sipcdr runs
    as, with a single name; anything else there is left alone."""
    fd = open_folder(folder, key=key)
    try:
        for name in names:
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if info.st_uid == os.geteuid() and stat.S_ISREG(info.st_mode):
                _tighten(fd, name, info)
    finally:
        os.close(fd)


def _tighten(folder_fd: int, name: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        flags, mode = _DIR_FLAGS, PRIVATE_DIR_MODE
    elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        flags, mode = os.O_RDONLY | _FILE_FLAGS, PRIVATE_FILE_MODE
    else:
        return  # sockets, FIFOs, and files with other names (whose is the other one?)
    try:
        fd = os.open(name, flags, dir_fd=folder_fd)
    except FileNotFoundError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _traverse_only(fd: int, info: os.stat_result) -> bool:
    """Whether all that others may do is pass through, and only one of them may: the
    embedded server's user (see the module docstring)."""
    if info.st_mode & _OPEN_BITS != _TRAVERSE_BIT:
        return False
    try:
        acl = os.getxattr(fd, _ACL_ATTRIBUTE)
    except OSError:
        acl = b""
    if acl:
        entries = _parse_acl(acl)
        if entries is None:
            return False
        tags = [tag for tag, _perm, _id in entries]
        return (
            tags.count(_ACL_USER) <= 1
            and _ACL_GROUP not in tags
            and all(
                perm & ~_ACL_EXECUTE == 0
                for tag, perm, _id in entries
                if tag in (_ACL_USER, _ACL_MASK)
            )
            and all(perm == 0 for tag, perm, _id in entries if tag in (_ACL_GROUP_OBJ, _ACL_OTHER))
        )
    return len(_group_members(info.st_gid) - {user_name(info.st_uid)}) <= 1


def _traverse_acl(mode: int, uid: int) -> bytes:
    entries = [
        (_ACL_USER_OBJ, (mode >> 6) & 0o7, _ACL_NO_ID),
        (_ACL_USER, _ACL_EXECUTE, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_NO_ID),
        (_ACL_MASK, _ACL_EXECUTE, _ACL_NO_ID),
        (_ACL_OTHER, 0, _ACL_NO_ID),
    ]
    return _ACL_HEAD.pack(_ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)


def _parse_acl(data: bytes) -> list[tuple[int, int, int]] | None:
    body = data[_ACL_HEAD.size :]
    if len(data) < _ACL_HEAD.size or _ACL_HEAD.unpack_from(data)[0] != _ACL_VERSION:
        return None
    if len(body) % _ACL_ENTRY.size:
        return None
    return [entry for entry in _ACL_ENTRY.iter_unpack(body)]


def _group_members(gid: int) -> set[str]:
    """Everyone in the group: listed in it, or with it as their own group."""
    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        members = set()
    return members | {entry.pw_name for entry in pwd.getpwall() if entry.pw_gid == gid}


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"group id {gid}"


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"


def _symlink(key: str, path: Path | str) -> PrivatePathError:
    return refuse(
        key, path, "is a symbolic link; sipcdr follows none for personal data: name the real path"
    )


def _writable(key: str, path: Path | str, info: os.stat_result) -> PrivatePathError:
    return refuse(
        key,
        path,
        f"may be written to by other users (mode {_mode(info)}), who could swap what "
        f"sipcdr writes there; let only its owner write to it (chmod go-w {path})",
    )


# -- files --------------------------------------------------------------------------------


def open_private_fd(path: Path, flags: int, *, key: str = STATE_KEY) -> int:
    """`os.open(path, flags)`, creating the file 0600 whatever the umask. The file is
    opened through its folder (a real folder of the user sipcdr runs as, which no one
    else may write to) without following a symbolic link, and used only when it is a
    regular file of that user with a single name; one that others may read is
    tightened. O_TRUNC is applied once all that is checked."""
    path = Path(path)
    folder_fd = open_folder(path.parent, key=key)
    try:
        folder = os.fstat(folder_fd)
        if folder.st_uid != os.geteuid():
            raise not_owned(key, path.parent, folder.st_uid)
        if folder.st_mode & _WRITE_BITS:
            raise _writable(key, path.parent, folder)
        try:
            fd = os.open(
                path.name,
                (flags & ~os.O_TRUNC) | os.O_CREAT | _FILE_FLAGS,
                PRIVATE_FILE_MODE,
                dir_fd=folder_fd,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _symlink(key, path) from None
            raise
    finally:
        os.close(folder_fd)
    try:
        _check_file(fd, path, key)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(fd: int, path: Path, key: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise refuse(key, path, "is not a regular file")
    if info.st_uid != os.geteuid():
        raise not_owned(key, path, info.st_uid)
    if info.st_nlink != 1:
        raise refuse(
            key,
            path,
            f"has {info.st_nlink} names (hard links), so it may be another file as well; "
            "sipcdr writes personal data to files of a single name only",
        )
    if stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
        os.fchmod(fd, PRIVATE_FILE_MODE)


def check_file_location(path: Path, *, key: str) -> None:
    """What `open_private_fd` would refuse about `path` and its folder, said before
    anything is written (the folder is made when missing, the file is not)."""
    private_dir(path.parent, tighten=False, key=key)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _symlink(key, path)
    if not stat.S_ISREG(info.st_mode):
        raise refuse(key, path, "is not a regular file")
    if info.st_uid != os.geteuid():
        raise not_owned(key, path, info.st_uid)


def open_private(path: Path, mode: Literal["ab", "wb"], *, key: str = STATE_KEY) -> BinaryIO:
    """A binary file object on `path` (append or truncate), private as `open_private_fd`."""
    return os.fdopen(open_private_fd(path, _FLAGS[mode], key=key), mode)


def write_private(path: Path, data: bytes, *, key: str = STATE_KEY) -> None:
    """Replace the contents of `path` with `data`, the file private."""
    with open_private(path, "wb", key=key) as handle:
        handle.write(data)


def read_private(
    path: Path, *, key: str = STATE_KEY, limit: int = _READ_LIMIT_BYTES
) -> bytes | None:
    """The contents of `path`, a small file sipcdr wrote (at most `limit` bytes of it),
    or None when there is none; the same checks as `open_private_fd`, without creating
    it."""
    folder_fd = open_folder(path.parent, key=key)
    try:
        try:
            fd = os.open(path.name, os.O_RDONLY | _FILE_FLAGS, dir_fd=folder_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _symlink(key, path) from None
            raise
    finally:
        os.close(folder_fd)
    try:
        _check_file(fd, path, key)
        parts: list[bytes] = []
        left = limit
        while left > 0 and (part := os.read(fd, left)):
            parts.append(part)
            left -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)
