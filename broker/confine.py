"""Whole-process confinement of what runs tenant code: executors and their compile helpers.

A root broker starts each executor as root; before the executor runs anything of a tenant's,
it (and the compile helper it forks first) goes through, in this order:

1. **A view of its own** (`View`): a private mount namespace whose root is a small tmpfs
   holding only what that process needs, bound in from the host, and a chroot into it. An
   executor sees its tenant's directory (`/tenants/<name>`, the tenant's own files) and
   `/modules` (the modules it loads); the compile helper sees the compiler and system
   headers read-only (`/usr`, the top-level library links), KubeCASH's header, its tenant's
   module cache (`/cache`), `/dev/null`, and no network (a new network namespace).
2. **An unprivileged uid** (`drop_to`): the tenant's `owner`, or one the broker allocates
   per tenant; no supplementary groups; not dumpable, so even processes of the same uid
   cannot ptrace it or read its memory.
3. **no_new_privs**, and for executors the whole-process seccomp filter
   (`sandbox.confine_process`), on every thread.

Nothing here is reversible in-process, and nothing a tenant's directory holds is followed:
the tenant's directory is opened with O_NOFOLLOW from its root-owned parent and bound by
descriptor. A broker that is not root cannot switch uids or make namespaces: its executors
then run as its own uid with the host's view (it logs that it does so).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import stat
import subprocess
import sys

__all__ = [
    "ConfineError", "TENANT_FS_SOURCE", "View", "can_confine", "check_mount_namespace", "drop_to",
    "is_tenant_fs", "mount_tenant_fs", "no_new_privs", "open_dir_nofollow", "probe",
    "resize_tenant_fs", "set_parent_death_signal", "tenant_fs_mounts", "tenant_fs_size",
    "unmount_tenant_fs", "unmount_tenant_fs_under"]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x08000000, 0x04000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC   # a directory, never via a symlink

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class ConfineError(OSError):
    """A confinement step failed; the process must not go on to run tenant code."""


def can_confine() -> bool:
    """Namespaces and uid changes need root (the broker's systemd unit runs it as root)."""
    return os.geteuid() == 0


def probe() -> str | None:
    """Why a root broker's executors could not be confined on this machine (None: they can).
    Namespaces can be refused to root too: a container without CAP_SYS_ADMIN, or systemd's
    RestrictNamespaces=. The broker checks once at start instead of failing every executor."""
    pid = os.fork()
    if pid == 0:                       # only async-signal-safe calls until _exit
        rc = _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET)
        os._exit(0 if rc == 0 else (ctypes.get_errno() or 1))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    return (f"executors cannot be confined: unshare of mount, IPC, UTS and network namespaces "
            f"failed ({os.strerror(code) if code > 0 else f'signal {-code}'}). A root broker needs "
            "CAP_SYS_ADMIN, and under systemd RestrictNamespaces= must allow 'mnt ipc net uts' "
            "(README, \"Sandbox\")")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise ConfineError(e, f"{what}: {os.strerror(e)}")


def open_dir_nofollow(parent_fd: int, name: str, *, create_mode: int | None = None) -> int:
    """A directory `name` inside `parent_fd`, never through a symlink: the entry itself must
    be a real directory (O_NOFOLLOW|O_DIRECTORY). With `create_mode`, a missing one is made;
    anything else in its place (a symlink, a file) is removed and a directory made instead."""
    if "/" in name or name in ("", ".", ".."):
        raise ConfineError(errno.EINVAL, f"not a plain directory name: {name!r}")
    try:
        return os.open(name, DIR_NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        if create_mode is None:
            raise
        if e.errno in (errno.ELOOP, errno.ENOTDIR):     # a symlink or a file: not ours to follow
            os.unlink(name, dir_fd=parent_fd)
        elif e.errno != errno.ENOENT:
            raise
    try:
        os.mkdir(name, create_mode, dir_fd=parent_fd)
    except FileExistsError:
        pass
    return os.open(name, DIR_NOFOLLOW, dir_fd=parent_fd)


class View:
    """A private mount namespace whose root will be a fresh tmpfs at `mountpoint`."""

    def __init__(self, mountpoint: str, *, size_bytes: int, network: bool = True):
        self.root = mountpoint
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if network else CLONE_NEWNET)
        _check(_libc.unshare(flags), "unshare (a private mount namespace)")
        # Nothing mounted here from now on is seen outside, nor the other way round.
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        _check(_libc.mount(b"kubecash-view", mountpoint.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                           f"size={size_bytes},mode=0755".encode()), f"mount tmpfs on {mountpoint}")

    def _inside(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def mkdir(self, path: str, mode: int = 0o755, owner: tuple[int, int] | None = None) -> str:
        inside = self._inside(path)
        os.makedirs(inside, mode=0o755, exist_ok=True)
        os.chmod(inside, mode)
        if owner is not None:
            os.chown(inside, *owner)
        return inside

    def bind(self, source: str | int, path: str, *, readonly: bool = True, exec_: bool = True,
             dev: bool = False) -> None:
        """Bind host `source` (a path, or a descriptor: bound as what it is open on, with no
        path lookup a tenant could redirect) at `path` inside."""
        src = f"/proc/self/fd/{source}" if isinstance(source, int) else source
        is_dir = stat.S_ISDIR(os.stat(src).st_mode)
        inside = self._inside(path)
        if is_dir:
            os.makedirs(inside, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            open(inside, "a").close()
        _check(_libc.mount(src.encode(), inside.encode(), None, MS_BIND | MS_REC, None), f"bind {src} at {path}")
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY if readonly else 0) \
            | (0 if exec_ else MS_NOEXEC) | (0 if dev else MS_NODEV)
        _check(_libc.mount(None, inside.encode(), None, flags, None), f"remount {path}")

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._inside(path))

    def host_tree(self, *tops: str) -> None:
        """Top-level entries of the host as they are: a symlink (merged /usr) as a symlink,
        a directory as a read-only bind."""
        for top in tops:
            if os.path.islink(top):
                self.symlink(os.readlink(top), top)
            elif os.path.isdir(top):
                self.bind(top, top)

    def enter(self) -> None:
        """chroot into the view. Until then the host's paths work; after, only the view's."""
        os.chroot(self.root)
        os.chdir("/")


def set_parent_death_signal() -> None:
    """SIGKILL when the parent ends: nothing confined outlives what started it."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def drop_to(uid: int, gid: int) -> None:
    """Become uid:gid for good (real, effective, saved; no supplementary groups), not
    dumpable, and still ended when the parent ends (a uid change clears PDEATHSIG)."""
    parent = os.getppid()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise ConfineError(errno.EPERM, f"could not become uid {uid} gid {gid}")
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE, 0)")
    set_parent_death_signal()
    if os.getppid() != parent:     # it ended before PDEATHSIG was set again
        os._exit(1)


def no_new_privs() -> None:
    _check(_libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


# -- a file system per tenant directory ------------------------------------------------------
# A tenant's containers (and code in its executors) can write into its directory; on the
# shared runtime file system that would be everyone's space. So each tenant directory the
# broker makes is a tmpfs of its own, sized to the tenant's quota: filling it is that
# tenant's OUT_OF_MEMORY, nobody else's. It must be mounted where containers are made (the
# host's mount namespace; under systemd the broker has one of its own, a slave of it) and
# outlives the broker: containers keep the one they have bind-mounted across restarts.

TENANT_FS_SOURCE = "kubecash-tenant"    # the name our mounts carry in mountinfo
TENANT_FS_INODES = 16384                # files and directories per tenant
_TENANT_FS_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of this process's mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = (right.split() + ["", ""])[:2]
            out.append((_unescape(left.split()[4]), fstype, _unescape(source)))
    return out


def is_tenant_fs(path: str) -> bool:
    """Whether `path` is (topmost) one of our tenant file systems here."""
    path = os.path.realpath(path)
    top = None
    for point, fstype, source in _mounts():
        if point == path:
            top = (fstype, source)
    return top == ("tmpfs", TENANT_FS_SOURCE)


HELPER_TIMEOUT_S = 10.0                  # a mount helper that takes longer is given up on


def _open_path(path: str) -> int:
    """The directory at absolute `path`, opened one component at a time, never through a
    symlink (in whichever mount namespace this runs)."""
    if not os.path.isabs(path):
        raise ConfineError(errno.EINVAL, f"not an absolute path: {path}")
    fd = os.open("/", DIR_NOFOLLOW)
    for part in (p for p in path.split("/") if p):
        try:
            nfd = os.open(part, DIR_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            raise ConfineError(e.errno, f"{path}: component {part!r}: {os.strerror(e.errno)}") from None
        finally:
            os.close(fd)
        fd = nfd
    return fd


def _identity(path: str) -> tuple[int, int]:
    fd = _open_path(path)
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def _fs_op(op: str, path: str, options: str, expect: tuple[int, int]) -> tuple[int, int]:
    """mount / remount / umount the tenant file system at `path`, in this mount namespace,
    only if the directory found there is `expect` (device, inode: the one the broker sees,
    so another namespace's different tree is never acted on). Returns what is there after."""
    fd = _open_path(path)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(expect):
            raise ConfineError(errno.EXDEV, f"{path} is another directory here than the broker's")
        target = f"/proc/self/fd/{fd}".encode()
        if op == "mount":
            _check(_libc.mount(TENANT_FS_SOURCE.encode(), target, b"tmpfs", _TENANT_FS_FLAGS,
                               options.encode()), f"mount a tmpfs on {path}")
        elif op == "remount":
            _check(_libc.mount(None, target, None, MS_REMOUNT | _TENANT_FS_FLAGS, options.encode()),
                   f"remount {path} with {options}")
        elif op == "umount":
            _check(_libc.umount2(target, MNT_DETACH), f"unmount {path}")
        else:
            raise ValueError(op)
    finally:
        os.close(fd)
    return _identity(path)


def _same_namespace(namespace: str) -> bool | None:
    """Whether `namespace` (a /proc/<pid>/ns/mnt) is ours; None where it cannot be read."""
    try:
        a, b = os.stat(namespace), os.stat("/proc/self/ns/mnt")
    except OSError:
        return None
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _in_namespace(namespace: str, op: str, path: str, options: str,
                  expect: tuple[int, int]) -> tuple[int, int]:
    """_fs_op in mount namespace `namespace`. Another namespace is entered by a short-lived
    helper process: setns needs a single-threaded caller, and the broker is not one."""
    same = _same_namespace(namespace)
    if same is None:     # a mount where containers do not see it would hide every socket in it
        raise ConfineError(errno.ENOENT, f"cannot read mount namespace {namespace} ([broker] mount_namespace)")
    if same:
        return _fs_op(op, path, options, expect)
    try:
        r = subprocess.run([sys.executable, "-I", "-c", "import sys; from kubecash.broker.confine import "
                            "_namespace_main; _namespace_main(sys.argv[1:])", namespace, op, path, options,
                            f"{expect[0]}:{expect[1]}"],
                           capture_output=True, text=True, timeout=HELPER_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.SubprocessError as e:   # a timeout: the namespace file blocks (a FIFO, say)
        raise ConfineError(errno.ETIMEDOUT, f"in mount namespace {namespace}: {e}") from None
    if r.returncode != 0:
        raise ConfineError(errno.EPERM, f"in mount namespace {namespace}: "
                           f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f'exit {r.returncode}'}")
    dev, _, ino = r.stdout.strip().partition(":")
    return int(dev), int(ino)


def _namespace_main(argv: list[str]) -> None:
    namespace, op, path, options, expect = argv
    try:
        fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        _check(_libc.setns(fd, CLONE_NEWNS), f"setns({namespace})")
        dev, ino = _fs_op(op, path, options, tuple(int(x) for x in expect.split(":")))
    except OSError as e:
        print(e.strerror if isinstance(e, ConfineError) else e, file=sys.stderr)
        sys.exit(1)
    print(f"{dev}:{ino}")


def _options(size: int, owner: tuple[int, int] | None = None) -> str:
    size = max(size, 1 << 20)
    if owner is None:
        return f"size={size}"
    return f"size={size},nr_inodes={TENANT_FS_INODES},mode=0700,uid={owner[0]},gid={owner[1]}"


def mount_tenant_fs(path: str, *, size: int, owner: tuple[int, int], namespace: str) -> None:
    """Mount a tenant file system of `size` bytes on the (empty, new) directory `path`, in
    `namespace` (where containers are made). It must then be seen here too (mount
    propagation); if it is not, it is taken away again and this raises."""
    path = os.path.realpath(path)
    mounted = _in_namespace(namespace, "mount", path, _options(size, owner), _identity(path))
    if _identity(path) != mounted:
        try:
            _in_namespace(namespace, "umount", path, "", mounted)
        except ConfineError:
            pass
        raise ConfineError(errno.EXDEV, f"the tmpfs mounted on {path} in {namespace} does not show in "
                           "the broker's own mount namespace (no mount propagation from there)")


def resize_tenant_fs(path: str, *, size: int, namespace: str) -> None:
    path = os.path.realpath(path)
    _in_namespace(namespace, "remount", path, _options(size), _identity(path))


def unmount_tenant_fs(path: str, *, namespace: str) -> None:
    path = os.path.realpath(path)
    _in_namespace(namespace, "umount", path, "", _identity(path))


def tenant_fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def check_mount_namespace(path: str) -> None:
    """ValueError unless `path` can be a mount namespace: a /proc/<pid>/ns/mnt link. One
    that cannot be read here (another user's, or /proc/1 in some containers) passes: the
    broker checks again where it mounts, and mounts nothing if it cannot read it."""
    try:
        target = os.readlink(path)
    except PermissionError:
        return
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist (expected a mount namespace, /proc/<pid>/ns/mnt)") from None
    except OSError:
        raise ValueError(f"{path} is not a namespace link (expected /proc/<pid>/ns/mnt)") from None
    if not target.startswith("mnt:["):
        raise ValueError(f"{path} is {target}, not a mount namespace (expected /proc/<pid>/ns/mnt)")


def tenant_fs_mounts(under: str = "/") -> set[str]:
    """Where our tenant file systems are mounted, at or below `under`, in this namespace."""
    under = os.path.realpath(under).rstrip("/") + "/"
    return {p for p, fstype, source in _mounts()
            if source == TENANT_FS_SOURCE and fstype == "tmpfs" and (p + "/").startswith(under)}


def unmount_tenant_fs_under(root: str, *, namespace: str = "/proc/self/ns/mnt") -> int:
    """Unmount every tenant file system at or below `root` (a runtime directory being
    removed: tests, the demo); how many."""
    n = 0
    for p in sorted(tenant_fs_mounts(root), key=len, reverse=True):
        while is_tenant_fs(p):
            try:
                unmount_tenant_fs(p, namespace=namespace)
            except OSError:
                break
            n += 1
    return n
