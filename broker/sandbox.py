"""The CPU backend's sandbox: tenant kernels run on native threads confined by seccomp.

A module is native code built from the tenant's source and loaded into its executor. The
worker threads that run its kernels are started here (plain pthreads, no Python in them)
and each installs, before it runs any tenant code, ``PR_SET_NO_NEW_PRIVS`` and a
seccomp-BPF filter (per thread: no TSYNC, so the executor's own threads keep opening
shared-memory files, loading modules and running the compiler). The filter allows what a
kernel legitimately needs and nothing else:

* memory: ``brk``, ``mmap`` (anonymous only, never ``PROT_EXEC``), ``mprotect`` (never
  ``PROT_EXEC``), ``munmap``, ``mremap``, ``madvise`` (advice below 100: no
  ``MADV_HWPOISON``/``MADV_SOFT_OFFLINE``);
* ``futex``, ``sched_yield``, ``nanosleep``, ``clock_nanosleep``, ``clock_gettime``,
  ``clock_getres``, ``gettimeofday`` (and ``time`` on x86-64), ``getcpu``, ``getrandom``;
* ``getpid``, ``gettid``, ``rt_sigprocmask``, ``rt_sigreturn``, ``restart_syscall``,
  ``tgkill`` of this process only (``abort()``), ``exit``, ``exit_group``;
* ``write``/``writev`` to fds 1 and 2 only (device ``printf``).

Anything else -- ``open``/``openat``/``openat2``/``creat``, ``socket``/``connect``/``bind``,
``execve``/``execveat``, ``fork``/``vfork``/``clone``/``clone3``, ``kill``, ``ptrace``,
``mount``, ``setuid``, ``read``, ``ioctl``... -- is refused with ``SECCOMP_RET_TRAP``: the
call does not happen, and the thread gets SIGSYS. Our SIGSYS handler records which call
it was, lets the executor tell the broker ("the sandbox refused system call openat"), and
the process ends by SIGSYS -- after at most 2 s even if nobody reports (a call made while
holding a libc lock, as fork does, gets the unnamed message). A system call made
under another ABI (i386 ``int 0x80`` on x86-64) kills the process at once.

Tenant code can also run at load and unload time: compile_module refuses modules whose
object has load-time initializers or unload-time finalizers of its own, and modules are
unloaded (dlclose, which runs destructors of function-local statics) on a confined thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

__all__ = ["SandboxError", "WorkerPool", "arch_supported", "seccomp_unavailable", "syscall_name",
           "set_violation_handler", "end_process_by_sigsys", "confined_dlclose", "policy", "array_type"]


class SandboxError(RuntimeError):
    """Kernels cannot be confined here (unsupported architecture, no seccomp...)."""


# ----------------------------------------------------------------------------------------
# Architectures and system call numbers
# ----------------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_RISCV64 = 0xC00000F3

# The allow-list, by name; numbers per architecture below (Linux UAPI: x86-64's own table;
# arm64's and riscv64's are asm-generic's; tests check all three against the kernel headers
# of each architecture's cross compiler).
_ALLOWED = ("brk munmap mremap futex sched_yield nanosleep clock_nanosleep clock_gettime "
            "clock_getres gettimeofday time getcpu getrandom getpid gettid rt_sigprocmask "
            "rt_sigreturn restart_syscall exit exit_group").split()
_CONDITIONAL = ("write", "writev", "mmap", "mprotect", "madvise", "tgkill")

_NAMES_X86_64 = (
    "read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction "
    "rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select "
    "sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep "
    "getitimer alarm setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg "
    "recvmsg shutdown bind listen getsockname getpeername socketpair setsockopt getsockopt "
    "clone fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget msgsnd "
    "msgrcv msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir "
    "fchdir rename mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown "
    "lchown umask gettimeofday getrlimit getrusage sysinfo times ptrace getuid syslog getgid "
    "setuid setgid geteuid getegid setpgid getppid getpgrp setsid setreuid setregid getgroups "
    "setgroups setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid "
    "capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack "
    "utime mknod uselib personality ustat statfs fstatfs sysfs getpriority setpriority "
    "sched_setparam sched_getparam sched_setscheduler sched_getscheduler "
    "sched_get_priority_max sched_get_priority_min sched_rr_get_interval mlock munlock "
    "mlockall munlockall vhangup modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex "
    "setrlimit chroot sync acct settimeofday mount umount2 swapon swapoff reboot sethostname "
    "setdomainname iopl ioperm create_module init_module delete_module get_kernel_syms "
    "query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid "
    "readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr "
    "flistxattr removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity "
    "sched_getaffinity set_thread_area io_setup io_destroy io_getevents io_submit io_cancel "
    "get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old "
    "remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64 "
    "timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime "
    "clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes "
    "vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive "
    "mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set "
    "ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat "
    "mknodat fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat "
    "fchmodat faccessat pselect6 ppoll unshare set_robust_list get_robust_list splice tee "
    "sync_file_range vmsplice move_pages utimensat epoll_pwait signalfd timerfd_create "
    "eventfd fallocate timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2 "
    "epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open "
    "recvmmsg fanotify_init fanotify_mark prlimit64 name_to_handle_at open_by_handle_at "
    "clock_adjtime syncfs sendmmsg setns getcpu process_vm_readv process_vm_writev kcmp "
    "finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create "
    "kexec_file_load bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2 "
    "pwritev2 pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq - - - - - - - - - - "
    "- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - "
    "- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - pidfd_send_signal "
    "io_uring_setup io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig "
    "fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2 "
    "process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset "
    "landlock_add_rule landlock_restrict_self memfd_secret process_mrelease futex_waitv "
    "set_mempolicy_home_node "
).split()

_NAMES_AARCH64 = (
    "io_setup io_destroy io_submit io_cancel io_getevents setxattr lsetxattr fsetxattr "
    "getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr removexattr lremovexattr "
    "fremovexattr getcwd lookup_dcookie eventfd2 epoll_create1 epoll_ctl epoll_pwait dup dup3 "
    "fcntl inotify_init1 inotify_add_watch inotify_rm_watch ioctl ioprio_set ioprio_get flock "
    "mknodat mkdirat unlinkat symlinkat linkat renameat umount2 mount pivot_root nfsservctl "
    "statfs fstatfs truncate ftruncate fallocate faccessat chdir fchdir chroot fchmod "
    "fchmodat fchownat fchown openat close vhangup pipe2 quotactl getdents64 lseek read write "
    "readv writev pread64 pwrite64 preadv pwritev sendfile pselect6 ppoll signalfd4 vmsplice "
    "splice tee readlinkat newfstatat fstat sync fsync fdatasync sync_file_range2 "
    "timerfd_create timerfd_settime timerfd_gettime utimensat acct capget capset personality "
    "exit exit_group waitid set_tid_address unshare futex set_robust_list get_robust_list "
    "nanosleep getitimer setitimer kexec_load init_module delete_module timer_create "
    "timer_gettime timer_getoverrun timer_settime timer_delete clock_settime clock_gettime "
    "clock_getres clock_nanosleep syslog ptrace sched_setparam sched_setscheduler "
    "sched_getscheduler sched_getparam sched_setaffinity sched_getaffinity sched_yield "
    "sched_get_priority_max sched_get_priority_min sched_rr_get_interval restart_syscall kill "
    "tkill tgkill sigaltstack rt_sigsuspend rt_sigaction rt_sigprocmask rt_sigpending "
    "rt_sigtimedwait rt_sigqueueinfo rt_sigreturn setpriority getpriority reboot setregid "
    "setgid setreuid setuid setresuid getresuid setresgid getresgid setfsuid setfsgid times "
    "setpgid getpgid getsid setsid getgroups setgroups uname sethostname setdomainname "
    "getrlimit setrlimit getrusage umask prctl getcpu gettimeofday settimeofday adjtimex "
    "getpid getppid getuid geteuid getgid getegid gettid sysinfo mq_open mq_unlink "
    "mq_timedsend mq_timedreceive mq_notify mq_getsetattr msgget msgctl msgrcv msgsnd semget "
    "semctl semtimedop semop shmget shmctl shmat shmdt socket socketpair bind listen accept "
    "connect getsockname getpeername sendto recvfrom setsockopt getsockopt shutdown sendmsg "
    "recvmsg readahead brk munmap mremap add_key request_key keyctl clone execve mmap "
    "fadvise64 swapon swapoff mprotect msync mlock munlock mlockall munlockall mincore "
    "madvise remap_file_pages mbind get_mempolicy set_mempolicy migrate_pages move_pages "
    "rt_tgsigqueueinfo perf_event_open accept4 recvmmsg arch_specific_syscall - - - - - - - - "
    "- - - - - - - wait4 prlimit64 fanotify_init fanotify_mark name_to_handle_at "
    "open_by_handle_at clock_adjtime syncfs setns sendmmsg process_vm_readv process_vm_writev "
    "kcmp finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create "
    "bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2 "
    "pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq kexec_file_load - - - - - - "
    "- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - "
    "- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - "
    "- - - - - - - - - - - - - - clock_gettime64 clock_settime64 clock_adjtime64 "
    "clock_getres_time64 clock_nanosleep_time64 timer_gettime64 timer_settime64 "
    "timerfd_gettime64 timerfd_settime64 utimensat_time64 pselect6_time64 ppoll_time64 - "
    "io_pgetevents_time64 recvmmsg_time64 mq_timedsend_time64 mq_timedreceive_time64 "
    "semtimedop_time64 rt_sigtimedwait_time64 futex_time64 sched_rr_get_interval_time64 "
    "pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount "
    "fsopen fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd "
    "faccessat2 process_madvise epoll_pwait2 mount_setattr quotactl_fd "
    "landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret "
    "process_mrelease futex_waitv set_mempolicy_home_node "
).split()


def _riscv64_names() -> list[str]:
    """riscv64's table: asm-generic's, as arm64 has it, less renameat (riscv64 has only
    renameat2) and with its own two in the architecture-specific range."""
    names = list(_NAMES_AARCH64)
    names[38] = "-"
    names[244:260] = ["-"] * 14 + ["riscv_hwprobe", "riscv_flush_icache"]
    return names


_NAMES_RISCV64 = _riscv64_names()

_ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, _NAMES_X86_64),
    "amd64": (AUDIT_ARCH_X86_64, _NAMES_X86_64),
    "aarch64": (AUDIT_ARCH_AARCH64, _NAMES_AARCH64),
    "arm64": (AUDIT_ARCH_AARCH64, _NAMES_AARCH64),
    "riscv64": (AUDIT_ARCH_RISCV64, _NAMES_RISCV64),
}
_AUDIT_NAMES = {AUDIT_ARCH_X86_64: _NAMES_X86_64, AUDIT_ARCH_AARCH64: _NAMES_AARCH64,
                AUDIT_ARCH_RISCV64: _NAMES_RISCV64}


def _arch() -> tuple[int, list[str]] | None:
    return _ARCHES.get(platform.machine().lower())


def arch_supported() -> bool:
    return _arch() is not None


SECCOMP_GET_ACTION_AVAIL = 2


@functools.lru_cache(maxsize=1)
def seccomp_unavailable() -> str | None:
    """Why seccomp filters cannot be installed here, or None when they can. Asks the kernel
    (SECCOMP_GET_ACTION_AVAIL: installs nothing) whether it can trap: qemu-user does not
    implement seccomp (a filter would see the emulator's own system calls), and a kernel
    may be built without it."""
    arch = _arch()
    if arch is None:
        return f"no system call table for {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    action = ctypes.c_uint32(SECCOMP_RET_TRAP)
    if libc.syscall(ctypes.c_long(arch[1].index("seccomp")), ctypes.c_long(SECCOMP_GET_ACTION_AVAIL),
                    ctypes.c_long(0), ctypes.byref(action)) != 0:
        e = ctypes.get_errno()
        return (f"seccomp filters cannot be installed here (seccomp: {os.strerror(e)}): qemu-user "
                "does not implement seccomp, and a kernel may be built without it")
    return None


def syscall_name(nr: int, audit_arch: int | None = None) -> str:
    names = _AUDIT_NAMES.get(audit_arch) if audit_arch is not None else (_arch() or (0, None))[1]
    if names and 0 <= nr < len(names) and names[nr] != "-":
        return names[nr]
    return f"#{nr}"


def policy(machine: str | None = None, *, allowed: Sequence[str] = _ALLOWED,
           conditional: Sequence[str] = _CONDITIONAL) -> dict[str, object]:
    """The kernel threads' allow-list (or the one given) as numbers, for this machine (or
    `machine`): documentation and tests."""
    arch = _ARCHES.get((machine or platform.machine()).lower())
    if arch is None:
        raise SandboxError(f"no system call table for {machine or platform.machine()}")
    audit, names = arch
    nr = {n: i for i, n in enumerate(names) if n != "-"}
    return {"audit_arch": audit,
            "allowed": {n: nr[n] for n in allowed if n in nr},
            "conditional": {n: nr[n] for n in conditional if n in nr}}


# ----------------------------------------------------------------------------------------
# The BPF program
# ----------------------------------------------------------------------------------------

_LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45   # BPF_JMP | BPF_{JEQ,JGE,JSET} | BPF_K
_RET = 0x06               # BPF_RET | BPF_K
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ALLOW = 0x7FFF0000
_PROT_EXEC, _MAP_ANONYMOUS = 0x4, 0x20
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:   # low 32 bits of args[i] (little-endian hosts only)
    return 16 + 8 * i


def build_filter(pid: int, machine: str | None = None) -> bytes:
    """struct sock_filter[] for this process (tgkill is allowed to `pid` only)."""
    p = policy(machine)
    audit, allowed, cond = p["audit_arch"], p["allowed"], p["conditional"]
    prog: list[tuple[int, object, object, int]] = []   # (code, jt, jf, k); labels resolved below
    labels: dict[str, int] = {}

    def emit(code, k=0, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    def label(name):
        labels[name] = len(prog)

    emit(_LD_W_ABS, _OFF_ARCH)
    emit(_JEQ, audit, 0, "kill")
    emit(_LD_W_ABS, _OFF_NR)
    for name, nr in cond.items():
        emit(_JEQ, nr, "c_" + ("write" if name == "writev" else name), 0)
    for nr in sorted(set(allowed.values())):
        emit(_JEQ, nr, "allow", 0)
    emit(_RET, SECCOMP_RET_TRAP)
    label("c_write")                      # write/writev(fd, ...): fds 1 and 2 only
    emit(_LD_W_ABS, _arg_lo(0))
    emit(_JEQ, 1, "allow", 0)
    emit(_JEQ, 2, "allow", "trap")
    label("c_mmap")                       # mmap(addr, len, prot, flags, fd, off)
    emit(_LD_W_ABS, _arg_lo(2))
    emit(_JSET, _PROT_EXEC, "trap", 0)
    emit(_LD_W_ABS, _arg_lo(3))
    emit(_JSET, _MAP_ANONYMOUS, "allow", "trap")
    label("c_mprotect")                   # mprotect(addr, len, prot)
    emit(_LD_W_ABS, _arg_lo(2))
    emit(_JSET, _PROT_EXEC, "trap", "allow")
    label("c_madvise")                    # madvise(addr, len, advice)
    emit(_LD_W_ABS, _arg_lo(2))
    emit(_JGE, 100, "trap", "allow")
    label("c_tgkill")                     # tgkill(tgid, tid, sig): this process only
    emit(_LD_W_ABS, _arg_lo(0))
    emit(_JEQ, pid & 0xFFFFFFFF, "allow", "trap")
    label("allow")
    emit(_RET, SECCOMP_RET_ALLOW)
    label("trap")
    emit(_RET, SECCOMP_RET_TRAP)
    label("kill")
    emit(_RET, SECCOMP_RET_KILL_PROCESS)

    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        def off(t, i=i):   # bound now: called only in this iteration
            if t == 0:
                return 0
            d = labels[t] - i - 1
            assert 0 <= d < 256, (t, d)
            return d
        out += struct.pack("<HBBI", code, off(jt), off(jf), k)
    return bytes(out)


# ----------------------------------------------------------------------------------------
# The native part: worker pool, SIGSYS handler, confined calls
# ----------------------------------------------------------------------------------------

_NATIVE_SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#ifndef SYS_SECCOMP
#define SYS_SECCOMP 1
#endif

extern "C" {

typedef int (*kc_run_fn)(int, void*, void*, void*);
typedef int (*kc_call_fn)(void*);

struct kc_pool;
struct kc_worker { kc_pool* pool; pthread_t th; int index; void* state; int rc; pthread_cond_t work; };
struct kc_pool {
    pthread_mutex_t mu; pthread_cond_t done;
    unsigned long gen; int active, pending, stop, started, setup_err;
    kc_run_fn run; int idx; void* argv; void* launch;
    int n, nice; struct sock_fprog prog; kc_worker* w;
};

/* The one filter confined calls use (set by the first sandboxed pool). */
static struct sock_fprog g_prog;
static pthread_mutex_t g_prog_mu = PTHREAD_MUTEX_INITIALIZER;

static int confine(const struct sock_fprog* prog) {
    if (!prog->len) return 0;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, prog) != 0) return errno;
    return 0;
}

static void* worker_main(void* arg) {
    kc_worker* w = (kc_worker*)arg;
    kc_pool* P = w->pool;
    int err = 0;
    if (P->nice) {   /* kernel threads yield to the executor's control plane */
        pid_t tid = (pid_t)syscall(SYS_gettid);
        errno = 0;
        int cur = getpriority(PRIO_PROCESS, tid);
        if (!(cur == -1 && errno)) setpriority(PRIO_PROCESS, tid, cur + P->nice > 19 ? 19 : cur + P->nice);
    }
    err = confine(&P->prog);
    pthread_mutex_lock(&P->mu);
    if (err && !P->setup_err) P->setup_err = err;
    P->started++;
    pthread_cond_broadcast(&P->done);
    unsigned long seen = P->gen;
    for (;;) {
        while (!P->stop && P->gen == seen) pthread_cond_wait(&w->work, &P->mu);
        if (P->stop) break;
        seen = P->gen;
        if (err || w->index >= P->active) continue;
        kc_run_fn run = P->run; int idx = P->idx; void* a = P->argv; void* l = P->launch;
        pthread_mutex_unlock(&P->mu);
        int rc = run(idx, a, l, w->state);
        pthread_mutex_lock(&P->mu);
        w->rc = rc;
        if (--P->pending == 0) pthread_cond_broadcast(&P->done);
    }
    pthread_mutex_unlock(&P->mu);
    return 0;
}

void kc_pool_close(kc_pool* P);

/* Returns the pool, or NULL with *err = errno of what failed (seccomp, pthread_create). */
kc_pool* kc_pool_create(int n, void** states, int nice, const void* filter, int filter_len,
                        int* err) {
    kc_pool* P = (kc_pool*)calloc(1, sizeof(kc_pool));
    if (!P) { *err = ENOMEM; return 0; }
    pthread_mutex_init(&P->mu, 0);
    pthread_cond_init(&P->done, 0);
    P->n = 0; P->nice = nice;
    P->w = (kc_worker*)calloc(n, sizeof(kc_worker));
    if (filter_len > 0) {
        int count = filter_len / (int)sizeof(struct sock_filter);
        struct sock_filter* f = (struct sock_filter*)malloc(filter_len);
        memcpy(f, filter, filter_len);
        P->prog.len = (unsigned short)count;
        P->prog.filter = f;
        pthread_mutex_lock(&g_prog_mu);
        if (!g_prog.len) {
            struct sock_filter* g = (struct sock_filter*)malloc(filter_len);
            memcpy(g, filter, filter_len);
            g_prog.filter = g;
            g_prog.len = (unsigned short)count;
        }
        pthread_mutex_unlock(&g_prog_mu);
    }
    for (int i = 0; i < n; i++) {
        kc_worker* w = &P->w[i];
        w->pool = P; w->index = i; w->state = states[i];
        pthread_cond_init(&w->work, 0);
        int e = pthread_create(&w->th, 0, worker_main, w);
        if (e) { *err = e; kc_pool_close(P); return 0; }
        P->n = i + 1;
    }
    pthread_mutex_lock(&P->mu);
    while (P->started < P->n) pthread_cond_wait(&P->done, &P->mu);
    int e = P->setup_err;
    pthread_mutex_unlock(&P->mu);
    if (e) { *err = e; kc_pool_close(P); return 0; }
    return P;
}

/* Runs run(idx, argv, launch, state_i) on workers [0, nw); rcs[i] gets each result. */
void kc_pool_run(kc_pool* P, kc_run_fn run, int idx, void* argv, void* launch, int nw, int* rcs) {
    pthread_mutex_lock(&P->mu);
    P->run = run; P->idx = idx; P->argv = argv; P->launch = launch;
    P->active = nw; P->pending = nw; P->gen++;
    /* Only the workers this launch uses wake (a one-block grid wakes one, not all): each
     * waits on its own condition. One left out sees the new gen when it next is woken. */
    for (int i = 0; i < nw; i++) pthread_cond_signal(&P->w[i].work);
    while (P->pending > 0) pthread_cond_wait(&P->done, &P->mu);
    for (int i = 0; i < nw; i++) rcs[i] = P->w[i].rc;
    pthread_mutex_unlock(&P->mu);
}

void kc_pool_close(kc_pool* P) {
    pthread_mutex_lock(&P->mu);
    P->stop = 1;
    for (int i = 0; i < P->n; i++) pthread_cond_signal(&P->w[i].work);
    pthread_mutex_unlock(&P->mu);
    for (int i = 0; i < P->n; i++) pthread_join(P->w[i].th, 0);
    free(P->w);
    free((void*)P->prog.filter);
    free(P);
}

/* fn(arg) on a fresh thread under the sandbox filter (unloading modules: dlclose runs
 * the destructors of a module's function-local statics, tenant code). */
struct kc_call { kc_call_fn fn; void* arg; int rc; int err; };
static void* call_main(void* p) {
    kc_call* c = (kc_call*)p;
    c->err = confine(&g_prog);
    if (!c->err) c->rc = c->fn(c->arg);
    return 0;
}
int kc_confined_call(kc_call_fn fn, void* arg, int* rc) {
    kc_call c = {fn, arg, 0, 0};
    pthread_t th;
    int e = pthread_create(&th, 0, call_main, &c);
    if (e) return e;
    pthread_join(th, 0);
    *rc = c.rc;
    return c.err;
}

/* ---- SIGSYS: a refused system call ------------------------------------------------- */
static volatile int g_nr = -1;
static volatile unsigned g_arch;
static volatile int g_watched;
static sem_t g_sem;

static void put(char* buf, int* n, const char* s) { while (*s && *n < 200) buf[(*n)++] = *s++; }

static void on_sigsys(int sig, siginfo_t* si, void* uc) {
    (void)sig; (void)uc;
    if (si->si_code == SYS_SECCOMP) {
        int nr = si->si_syscall;
        if (__sync_bool_compare_and_swap(&g_nr, -1, nr)) {
            g_arch = si->si_arch;
            char buf[224], num[16]; int n = 0, k = 0;
            unsigned v = (unsigned)nr;
            do { num[k++] = (char)('0' + v % 10); v /= 10; } while (v && k < 15);
            put(buf, &n, "kubecash: the sandbox refused system call ");
            while (k) buf[n++] = num[--k];
            put(buf, &n, " made by a kernel; the executor ends\n");
            (void)!write(2, buf, n);
            sem_post(&g_sem);
        }
        if (g_watched) {  /* the executor reports it and ends the process; else we do */
            struct timespec ts = {0, 10 * 1000 * 1000};
            for (int i = 0; i < 200; i++) nanosleep(&ts, 0);   /* 2 s */
        }
    }
    /* Default action: in a confined thread rt_sigaction is itself refused, and a SIGSYS
     * while SIGSYS is blocked (we are in its handler) kills the process at once. */
    signal(SIGSYS, SIG_DFL);
    raise(SIGSYS);
}

int kc_sandbox_init(void) {
    static int done;
    if (done) return 0;
    if (sem_init(&g_sem, 0, 0) != 0) return errno;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, 0) != 0) return errno;
    /* printf's first use allocates stdout's buffer after an fstat: do it now, unconfined. */
    static char outbuf[BUFSIZ];
    if (stdout->_IO_buf_base == 0) setvbuf(stdout, outbuf, isatty(1) ? _IOLBF : _IOFBF, sizeof outbuf);
    done = 1;
    return 0;
}

void kc_set_watched(int on) { g_watched = on; }

/* Blocks until a kernel made a refused system call; its number and audit arch. */
void kc_wait_violation(int* nr, unsigned* arch) {
    while (sem_wait(&g_sem) != 0) { }
    *nr = g_nr;
    *arch = g_arch;
}

}  /* extern "C" */
"""

@functools.lru_cache(maxsize=128)
def array_type(ctype, n: int):
    """`ctype * n`, kept. Python 3.11 caches array types only while an instance lives; a new
    one per launch costs tens of microseconds and leaves a reference cycle for the GC."""
    return ctype * n


_native_lock = threading.Lock()
_native: ctypes.CDLL | None = None
_libc_dlclose = ctypes.CDLL(None).dlclose   # once: a CDLL per call would be GC-only garbage


def _compiler() -> str:
    cxx = os.environ.get("KUBECASH_CXX") or shutil.which("g++")
    if not cxx:
        raise SandboxError("no host C++ compiler (g++) found to build the sandbox runtime")
    return cxx


_BUILD_PREFIX = "kubecash-sandbox-"


def _sweep_build_dirs() -> None:
    """Remove build directories left by processes that are gone (an executor killed while it
    built the runtime): each is named after its builder's pid. Only this uid's can go
    (/tmp is sticky); one whose pid lives (or is reused) is left."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        pid = name[len(_BUILD_PREFIX):].partition("-")[0]
        if not name.startswith(_BUILD_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        path = os.path.join(tmp, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _load_native(cache_dir: str | os.PathLike | None) -> ctypes.CDLL:
    """Build (once, cached by source and compiler) and load the native runtime."""
    global _native
    with _native_lock:
        if _native is not None:
            return _native
        cxx = _compiler()
        real = os.path.realpath(cxx)
        st = os.stat(real)
        key = hashlib.sha256(f"{_NATIVE_SOURCE}\0{real}:{st.st_size}:{st.st_mtime_ns}:"
                             f"{platform.machine()}".encode()).hexdigest()[:32]
        _sweep_build_dirs()
        work = tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{os.getpid()}-")
        try:
            cached = os.path.join(str(cache_dir), f"sandbox-{key}.so") if cache_dir else None
            path = os.path.join(work, "sandbox.so")
            if cached and os.path.exists(cached):
                shutil.copyfile(cached, path)
            else:
                src = os.path.join(work, "sandbox.cc")
                with open(src, "w") as f:
                    f.write(_NATIVE_SOURCE)
                try:
                    p = subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-pthread",
                                        "-fno-exceptions", "-o", path, src],
                                       capture_output=True, text=True, timeout=120,
                                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                            "LC_ALL": "C"})
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise SandboxError(f"cannot build the sandbox runtime: {e}") from None
                if p.returncode != 0:
                    raise SandboxError("cannot build the sandbox runtime: " + p.stderr[-2000:])
                if cached:              # keeping it is an optimisation: a full disk is no error
                    tmp = cached + f".{os.getpid()}.tmp"
                    try:
                        os.makedirs(str(cache_dir), exist_ok=True)
                        shutil.copyfile(path, tmp)
                        os.replace(tmp, cached)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
            lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        lib.kc_pool_create.restype = ctypes.c_void_p
        lib.kc_pool_create.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.kc_pool_run.restype = None
        lib.kc_pool_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.kc_pool_close.restype = None
        lib.kc_pool_close.argtypes = [ctypes.c_void_p]
        lib.kc_confined_call.restype = ctypes.c_int
        lib.kc_confined_call.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.kc_sandbox_init.restype = ctypes.c_int
        lib.kc_set_watched.argtypes = [ctypes.c_int]
        lib.kc_wait_violation.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint)]
        _native = lib
        return lib


class WorkerPool:
    """N native worker threads; with `sandbox`, each confined before it runs anything."""

    def __init__(self, states: Sequence[int], *, nice: int = 0, sandbox: bool = True,
                 cache_dir: str | os.PathLike | None = None):
        if sandbox and not arch_supported():
            raise SandboxError(
                f"the kernel sandbox has no system call table for {platform.machine()}: "
                "kernels are not run unconfined (set sandbox = false in [broker] to allow it)")
        self._lib = _load_native(cache_dir)
        self.sandboxed = sandbox
        prog = b""
        if sandbox:
            err = self._lib.kc_sandbox_init()
            if err:
                raise SandboxError(f"cannot install the SIGSYS handler: {os.strerror(err)}")
            prog = build_filter(os.getpid())
        arr = (ctypes.c_void_p * len(states))(*states)
        err = ctypes.c_int(0)
        self._p = self._lib.kc_pool_create(len(states), arr, int(nice), prog, len(prog),
                                           ctypes.byref(err))
        if not self._p:
            why = seccomp_unavailable() if sandbox else None
            raise SandboxError(f"cannot start confined kernel threads: {os.strerror(err.value)}"
                               + (f" ({why or 'seccomp unavailable?'}; set sandbox = false in [broker] "
                                  "to run kernels unconfined)" if sandbox else ""))
        self.n = len(states)

    def run(self, fn_addr: int, idx: int, argv: int, launch: int, nw: int) -> list[int]:
        rcs = array_type(ctypes.c_int, max(1, nw))()
        self._lib.kc_pool_run(self._p, fn_addr, idx, argv, launch, nw, rcs)
        return list(rcs[:nw])

    def close(self) -> None:
        if self._p:
            p, self._p = self._p, None
            self._lib.kc_pool_close(p)


def confined_dlclose(handle: int) -> bool:
    """dlclose(handle) on a thread under the sandbox filter (if one was set up: with only
    unsandboxed pools it runs unconfined, as their kernels do). False when the sandbox
    runtime was never loaded (no kernel ran: a plain dlclose is safe)."""
    lib = _native
    if lib is None:
        return False
    fn = ctypes.cast(_libc_dlclose, ctypes.c_void_p).value
    rc = ctypes.c_int(0)
    err = lib.kc_confined_call(fn, ctypes.c_void_p(handle), ctypes.byref(rc))
    if err:   # no confined thread: leave the module loaded rather than unload it unconfined
        print(f"kubecash: module not unloaded (no confined thread: {os.strerror(err)})",
              file=sys.stderr)
    return True


# ----------------------------------------------------------------------------------------
# Telling someone: the watcher
# ----------------------------------------------------------------------------------------

_watch_lock = threading.Lock()
_watcher: threading.Thread | None = None
_on_violation: Callable[[str, int, str], None] | None = None


def violation_message(name: str, nr: int) -> str:
    return (f"the sandbox refused system call {name} ({nr}) made by a kernel: kernels on the "
            "CPU backend may not open files, create sockets, start programs or make other "
            "host system calls")


def set_violation_handler(fn: Callable[[str, int, str], None] | None) -> None:
    """fn(message, nr, name) runs on a watcher thread when a kernel makes a refused call;
    it should report and then end the process (end_process_by_sigsys). Without one, the
    process ends by SIGSYS right away."""
    global _watcher, _on_violation
    lib = _native
    if lib is None:
        raise SandboxError("the sandbox runtime is not loaded (start a sandboxed WorkerPool first)")
    with _watch_lock:
        _on_violation = fn
        lib.kc_set_watched(1 if fn is not None else 0)
        if fn is not None and _watcher is None:
            _watcher = threading.Thread(target=_watch, args=(lib,), name="sandbox-watch", daemon=True)
            _watcher.start()


def _watch(lib: ctypes.CDLL) -> None:
    nr, arch = ctypes.c_int(0), ctypes.c_uint(0)
    lib.kc_wait_violation(ctypes.byref(nr), ctypes.byref(arch))
    name = syscall_name(nr.value, arch.value)
    msg = violation_message(name, nr.value)
    fn = _on_violation
    try:
        if fn is not None:
            fn(msg, nr.value, name)
    finally:
        end_process_by_sigsys()


def end_process_by_sigsys() -> None:
    """End this process the way the kernel would (the broker reads the signal)."""
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(int(signal.SIGSYS), None)      # SIG_DFL, from any thread
    os.kill(os.getpid(), signal.SIGSYS)


# ----------------------------------------------------------------------------------------
# The executor's whole-process filter
# ----------------------------------------------------------------------------------------
# Kernels can call any function of their executor (Py_AddPendingCall, say), so whatever the
# executor's own threads may do, a kernel may make them do. Once an executor has started
# (its socket bound, its compile helper forked, its view reduced to its jail, its uid
# dropped), every thread of it is put under this filter (TSYNC); kernel threads add the
# stricter one above on top. What stays is what the Python main loop, libzmq and dlopen
# need inside the jail: file calls there (the jail holds only the tenant's own directory
# and modules), I/O on descriptors it holds, accepting on its bound socket, threads, memory.
# (sched_setscheduler: libzmq's threads set their own policy as they start, which may be just
# after the filter goes on; raising one's priority needs a capability this uid does not have.)
# mmap of shared anonymous memory (outside the RLIMIT_DATA bound), fcntl beyond descriptor
# flags and locks, and setpriority of a whole uid's processes answer EPERM.
# Refused outright: exec, fork (clone without CLONE_THREAD), socket/connect/bind, ptrace,
# other processes' memory or signals, mount/chroot/namespaces, io_uring (it would bypass
# the filter), bpf, perf, keys, handles, module loading.

_PROCESS_ALLOWED = (
    "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 close close_range "
    "fstat stat lstat newfstatat statx lseek open openat access faccessat faccessat2 readlink "
    "readlinkat getdents64 getcwd unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir "
    "ftruncate fallocate fsync fdatasync flock dup dup2 dup3 pipe pipe2 eventfd2 poll ppoll "
    "select pselect6 epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 munmap "
    "mremap mprotect madvise msync mincore brk fchmod fchown umask futex futex_waitv "
    "set_robust_list get_robust_list rseq set_tid_address sched_yield sched_getaffinity "
    "sched_setaffinity sched_getparam sched_getscheduler sched_setparam sched_setscheduler "
    "getpriority nanosleep "
    "clock_nanosleep clock_gettime clock_getres gettimeofday time getcpu getrandom getpid gettid "
    "getppid getuid geteuid getgid getegid getgroups getresuid getresgid uname sysinfo getrusage "
    "getrlimit times rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigsuspend "
    "rt_sigtimedwait sigaltstack restart_syscall exit exit_group wait4 waitid membarrier "
    "recvfrom recvmsg recvmmsg sendto sendmsg sendmmsg accept accept4 getsockopt setsockopt "
    "getsockname getpeername shutdown seccomp arch_prctl timerfd_create timerfd_settime "
    "timerfd_gettime").split()
_PROCESS_CONDITIONAL = ("clone", "clone3", "prctl", "ioctl", "kill", "tgkill", "prlimit64", "mmap",
                        "fcntl", "setpriority")
_FCNTL_ALLOWED = (0, 1, 2, 3, 4, 5, 6, 7, 36, 37, 38, 1030)  # dup, fd and status flags, locks
_ALU_AND = 0x54           # BPF_ALU | BPF_AND | BPF_K
_PR_ALLOWED = (3, 15, 16, 21, 22, 23, 38, 39, 0x53564D41)  # get dumpable, names, seccomp, no_new_privs, vma names
_IOCTL_ALLOWED = (0x5401, 0x5421, 0x541B, 0x5450, 0x5451)  # TCGETS FIONBIO FIONREAD FIONCLEX FIOCLEX
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_FILTER_FLAG_TSYNC = 1


def process_policy(machine: str | None = None) -> dict[str, object]:
    """The executor's whole-process allow-list, as numbers (documentation and tests)."""
    return policy(machine, allowed=_PROCESS_ALLOWED, conditional=_PROCESS_CONDITIONAL)


def build_process_filter(pid: int, machine: str | None = None) -> bytes:
    """struct sock_filter[] for the executor process: each system call is one block, a
    compare and its own returns, so no jump is longer than a block (BPF jumps are 8-bit)."""
    p = process_policy(machine)
    audit, allowed, cond = p["audit_arch"], p["allowed"], p["conditional"]
    ret = {"allow": (_RET, 0, 0, SECCOMP_RET_ALLOW), "trap": (_RET, 0, 0, SECCOMP_RET_TRAP),
           "eperm": (_RET, 0, 0, SECCOMP_RET_ERRNO | _EPERM),
           "enosys": (_RET, 0, 0, SECCOMP_RET_ERRNO | _ENOSYS)}

    def one_of(arg: int, values, yes: str, no: str) -> list[tuple[int, int, int, int]]:
        block = [(_LD_W_ABS, 0, 0, _arg_lo(arg))]
        for i, v in enumerate(values):   # a match jumps over the rest of the compares to `yes`
            block.append((_JEQ, len(values) - i, 0, v & 0xFFFFFFFF))
        return block + [ret[no], ret[yes]]

    blocks: dict[str, list[tuple[int, int, int, int]]] = {
        # threads only: a fork could exec, or run outside the filter's view of the process
        "clone": [(_LD_W_ABS, 0, 0, _arg_lo(0)), (_JSET, 1, 0, _CLONE_THREAD), ret["trap"], ret["allow"]],
        "clone3": [ret["enosys"]],        # its flags are behind a pointer: glibc falls back to clone
        "prctl": one_of(0, _PR_ALLOWED, "allow", "eperm"),    # never PR_SET_DUMPABLE
        "ioctl": one_of(1, _IOCTL_ALLOWED, "allow", "eperm"),  # never TIOCSTI and the like
        "kill": one_of(0, (pid,), "allow", "trap"),           # this process only
        "tgkill": one_of(0, (pid,), "allow", "trap"),
        "prlimit64": one_of(0, (0, pid), "allow", "trap"),
        # Shared anonymous memory is outside RLIMIT_DATA, the executor's memory bound.
        "mmap": [(_LD_W_ABS, 0, 0, _arg_lo(3)), (_ALU_AND, 0, 0, _MAP_ANONYMOUS | 1),
                 (_JEQ, 0, 1, _MAP_ANONYMOUS | 1), ret["eperm"], ret["allow"]],
        "fcntl": one_of(1, _FCNTL_ALLOWED, "allow", "eperm"),  # no F_SETOWN/F_SETSIG/F_SETLEASE
        "setpriority": one_of(0, (0,), "allow", "eperm"),     # PRIO_PROCESS: not a whole uid
    }
    prog = [(_LD_W_ABS, 0, 0, _OFF_ARCH), (_JEQ, 1, 0, audit), (_RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
            (_LD_W_ABS, 0, 0, _OFF_NR)]
    for name, nr in cond.items():
        block = blocks[name]
        prog.append((_JEQ, 0, len(block), nr))
        prog += block
    for nr in sorted(set(allowed.values())):
        prog += [(_JEQ, 0, 1, nr), ret["allow"]]
    prog.append(ret["trap"])
    for code, jt, jf, _k in prog:
        assert jt < 256 and jf < 256, (code, jt, jf)
    return b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def confine_process(pid: int | None = None) -> None:
    """no_new_privs and the whole-process filter, on every thread at once (TSYNC)."""
    if not arch_supported():
        raise SandboxError(
            f"the sandbox has no system call table for {platform.machine()}: tenant code is not "
            "run unconfined (set sandbox = false in [broker] to allow it)")
    prog = build_process_filter(os.getpid() if pid is None else pid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:   # PR_SET_NO_NEW_PRIVS
        raise SandboxError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    fp = _Fprog(len(prog) // 8, prog)
    nr = _arch()[1].index("seccomp")
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(1), ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
                      ctypes.byref(fp))
    if rc != 0:
        why = os.strerror(ctypes.get_errno()) if rc < 0 else f"thread {rc} could not take the filter"
        hint = seccomp_unavailable() if rc < 0 else None
        raise SandboxError(f"cannot confine the executor process (seccomp TSYNC): {why}"
                           + (f" ({hint}; set sandbox = false in [broker] to run tenant code "
                              "unconfined)" if hint else ""))
