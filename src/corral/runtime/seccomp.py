"""The seccomp filter of every sandbox: the OCI ``linux.seccomp`` object, built as data (tested as data).

Modelled on the usual container default (Docker's), written as an allowlist: anything not listed answers
``EPERM``. What is listed is what ordinary programs need (shells, coreutils, python, node, gcc, git, curl,
apt/dpkg, threads, event loops, sockets); what is left out is what reaches past the sandbox's own namespaces
(mounts, namespaces, modules, the clock, tracing other processes, keyrings, BPF, io_uring, NUMA policy).
``DENIED`` names the syscalls that must never be allowed, so tests can check it.

Choices that differ from, or go further than, Docker's default:

* ``ptrace``, ``process_vm_readv``/``process_vm_writev``, ``kcmp`` and ``pidfd_getfd`` are denied, on any
  kernel: a sandboxed process may not trace or drive another one through them (so ``strace`` and ``gdb``
  do not work). Reading ``/proc/<pid>/mem`` of a process of the same user inside the same sandbox is still
  possible (ordinary ptrace access rules; the host has no Yama): it never reaches past the sandbox.
* ``clone3`` answers ``ENOSYS`` (its flags live in memory, where seccomp cannot look): glibc then falls back
  to ``clone``, whose flags are checked — no namespace bits.
* ``clock_adjtime``, ``clock_settime`` and ``settimeofday`` are denied outright. The raw ``adjtimex`` syscall
  is allowed, as in Docker (without ``CAP_SYS_TIME``, never granted, it can only read the clock state), but
  glibc's ``adjtimex()``/``ntp_gettime()`` go through ``clock_adjtime``, so from C they answer ``EPERM``
  (measured, glibc 2.36): reading the NTP state is refused too.
* ``name_to_handle_at``, ``modify_ldt`` and the NUMA calls (``mbind``, ``get_mempolicy``...) are denied.
* ``personality`` is allowed only for the harmless personas (plain Linux, ``PER_LINUX32``,
  ``UNAME26``, and the query ``0xffffffff``), one rule per value since conditions in one rule are ANDed.

Some names (the ``*32``/``*64``/``*_time64`` calls, ``socketcall``, ``ipc``...) exist only for 32-bit x86
programs, which the filter also covers. Names newer than the runtime's libseccomp are skipped by the runtime
(with libseccomp 2.5.4: ``mseal`` and the ``*xattrat`` calls, logged only with ``--debug``); such a call then
answers ``EPERM`` under crun and ``ENOSYS`` under runc, which adds an ``ENOSYS`` stub for unknown numbers.
"""

from __future__ import annotations

from typing import Any

EPERM = 1
ENOSYS = 38

# 64-bit x86 only. The 32-bit (i386) and x32 system call ABIs are refused outright (the process is killed):
# they are rarely needed in sandboxes, are extra kernel attack surface, and each extra architecture made the
# runtime compile the filter again, adding ~40 ms to every sandbox boot (measured with crun 1.8.1: 76 ms vs
# 37 ms). Docker's default allows them; we do not.
ARCHITECTURES = ("SCMP_ARCH_X86_64",)

# clone(2) flags that make new namespaces: CLONE_NEWNS|CLONE_NEWCGROUP|CLONE_NEWUTS|CLONE_NEWIPC|
# CLONE_NEWUSER|CLONE_NEWPID|CLONE_NEWNET. (CLONE_NEWTIME is only reachable through clone3 and unshare.)
CLONE_NAMESPACE_FLAGS = 0x7E020000

# personality(2) values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# --- allowed, unconditionally -------------------------------------------------------------------------

# Opening, reading, writing and closing files and file descriptors.
FILE_IO = (
    "open",
    "openat",
    "openat2",
    "creat",
    "close",
    "close_range",
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "lseek",
    "_llseek",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "fcntl64",
    "ioctl",
    "flock",
    "fsync",
    "fdatasync",
    "sync",
    "syncfs",
    "sync_file_range",
    "fallocate",
    "fadvise64",
    "fadvise64_64",
    "readahead",
    "truncate",
    "truncate64",
    "ftruncate",
    "ftruncate64",
    "sendfile",
    "sendfile64",
    "splice",
    "tee",
    "vmsplice",
    "copy_file_range",
    "cachestat",
    "pipe",
    "pipe2",
    "memfd_create",
)

# Looking at files and directories: stat in all its forms, access checks, links, directory listings.
FILE_INFO = (
    "stat",
    "lstat",
    "fstat",
    "newfstatat",
    "stat64",
    "lstat64",
    "fstat64",
    "fstatat64",
    "statx",
    "statfs",
    "fstatfs",
    "statfs64",
    "fstatfs64",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents",
    "getdents64",
    "getcwd",
    "chdir",
    "fchdir",
    "umask",
)

# Changing the tree and file metadata (mknod makes FIFOs and sockets; device nodes are refused without
# CAP_MKNOD in the user namespace). chroot needs CAP_SYS_CHROOT, which sandboxes have.
FILE_CHANGES = (
    "mkdir",
    "mkdirat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "unlink",
    "unlinkat",
    "mknod",
    "mknodat",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "chown32",
    "fchown32",
    "lchown32",
    "utime",
    "utimes",
    "utimensat",
    "utimensat_time64",
    "futimesat",
    "chroot",
)

# Extended attributes (file capabilities, ACLs, user.* attributes).
XATTRS = (
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "getxattrat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "setxattrat",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "listxattrat",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "removexattrat",
)

# File and readiness notification, event loops (epoll, poll, select, eventfd, inotify) and POSIX AIO
# (io_uring is not here: see DENIED).
EVENTS = (
    "select",
    "_newselect",
    "pselect6",
    "pselect6_time64",
    "poll",
    "ppoll",
    "ppoll_time64",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd",
    "eventfd2",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "io_setup",
    "io_destroy",
    "io_submit",
    "io_cancel",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
)

# Memory mappings and locks (mlock is bounded by RLIMIT_MEMLOCK, pkeys are V8's JIT protection).
MEMORY = (
    "brk",
    "mmap",
    "mmap2",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "mincore",
    "msync",
    "mlock",
    "mlock2",
    "munlock",
    "mlockall",
    "munlockall",
    "remap_file_pages",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "map_shadow_stack",
    "mseal",
)

# Making, running, waiting for and ending processes and threads (clone is conditional, clone3 is ENOSYS:
# see default_profile), and thread plumbing (TLS, robust futexes, rseq, membarrier).
PROCESSES = (
    "fork",
    "vfork",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "wait4",
    "waitid",
    "waitpid",
    "getpid",
    "getppid",
    "gettid",
    "getpgid",
    "setpgid",
    "getpgrp",
    "getsid",
    "setsid",
    "set_tid_address",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "membarrier",
    "arch_prctl",
    "set_thread_area",
    "get_thread_area",
    "prctl",
    "getcpu",
    "pidfd_open",
    "pidfd_send_signal",
    "process_mrelease",
    "restart_syscall",
)

# Futexes, the basis of every lock and condition variable.
FUTEXES = (
    "futex",
    "futex_time64",
    "futex_waitv",
    "futex_wait",
    "futex_wake",
    "futex_requeue",
)

# Signals, sent within the sandbox (its own pid namespace) or handled.
SIGNALS = (
    "kill",
    "tkill",
    "tgkill",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigpending",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "sigaltstack",
    "sigreturn",
    "sigprocmask",
    "signalfd",
    "signalfd4",
    "pause",
)

# Reading clocks, sleeping, interval timers and timer fds (adjtimex only reads without CAP_SYS_TIME).
TIME = (
    "time",
    "gettimeofday",
    "clock_gettime",
    "clock_gettime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "nanosleep",
    "adjtimex",
    "alarm",
    "getitimer",
    "setitimer",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
)

# Scheduling, priorities and resource limits (real-time classes still need CAP_SYS_NICE).
SCHEDULING = (
    "sched_yield",
    "sched_getaffinity",
    "sched_setaffinity",
    "sched_getattr",
    "sched_setattr",
    "sched_getparam",
    "sched_setparam",
    "sched_getscheduler",
    "sched_setscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "getpriority",
    "setpriority",
    "ioprio_get",
    "ioprio_set",
    "getrlimit",
    "setrlimit",
    "ugetrlimit",
    "prlimit64",
    "getrusage",
    "sysinfo",
    "uname",
)

# User and group ids and capabilities, within the sandbox's user namespace (su, sudo, apt's _apt user).
CREDENTIALS = (
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getuid32",
    "geteuid32",
    "getgid32",
    "getegid32",
    "getresuid",
    "getresgid",
    "getresuid32",
    "getresgid32",
    "getgroups",
    "getgroups32",
    "setuid",
    "setgid",
    "setuid32",
    "setgid32",
    "setreuid",
    "setregid",
    "setreuid32",
    "setregid32",
    "setresuid",
    "setresgid",
    "setresuid32",
    "setresgid32",
    "setgroups",
    "setgroups32",
    "setfsuid",
    "setfsgid",
    "setfsuid32",
    "setfsgid32",
    "capget",
    "capset",
)

# Sockets of every family (raw and packet sockets are refused by the missing CAP_NET_RAW), and socketcall,
# through which 32-bit programs reach them.
SOCKETS = (
    "socket",
    "socketpair",
    "socketcall",
    "bind",
    "connect",
    "listen",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "shutdown",
    "send",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "recv",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "recvmmsg_time64",
)

# System V IPC and POSIX message queues, private to the sandbox's IPC namespace and mqueue mount.
IPC = (
    "ipc",
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "semctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_notify",
    "mq_getsetattr",
)

# Randomness, and self-restriction (a process may always narrow itself further: seccomp, Landlock).
MISC = (
    "getrandom",
    "seccomp",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
)

ALLOWED = (
    FILE_IO
    + FILE_INFO
    + FILE_CHANGES
    + XATTRS
    + EVENTS
    + MEMORY
    + PROCESSES
    + FUTEXES
    + SIGNALS
    + TIME
    + SCHEDULING
    + CREDENTIALS
    + SOCKETS
    + IPC
    + MISC
)

# --- denied (left to the default action; clone3 has its own rule) -------------------------------------

# Mounting and the new mount API, and making or entering namespaces.
DENIED_MOUNTS_NAMESPACES = (
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
    "unshare",
    "setns",
    "clone3",
)

# The kernel itself: modules, kexec, reboot, swap, quotas, accounting, the kernel log, old sysctl and
# friends, host and domain names (the runtime sets the hostname).
DENIED_KERNEL = (
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "quotactl",
    "quotactl_fd",
    "acct",
    "syslog",
    "_sysctl",
    "sysfs",
    "ustat",
    "uselib",
    "nfsservctl",
    "lookup_dcookie",
    "vhangup",
    "sethostname",
    "setdomainname",
)

# Setting the clock, which is the host's.
DENIED_CLOCK = (
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
)

# Looking into or driving other processes.
DENIED_TRACING = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "perf_event_open",
    "bpf",
    "userfaultfd",
    "fanotify_init",
)

# Kernel attack surface with little use in a sandbox: keyrings, io_uring, file handles, NUMA policy,
# hardware I/O ports, and 16-bit / vm86 modes.
DENIED_SURFACE = (
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
    "set_mempolicy_home_node",
    "iopl",
    "ioperm",
    "modify_ldt",
    "vm86",
    "vm86old",
)

DENIED = DENIED_MOUNTS_NAMESPACES + DENIED_KERNEL + DENIED_CLOCK + DENIED_TRACING + DENIED_SURFACE


def default_profile() -> dict[str, Any]:
    """The ``linux.seccomp`` object of every sandbox: a plain dict, ready for ``json.dump``."""
    syscalls: list[dict[str, Any]] = [
        {"names": list(ALLOWED), "action": "SCMP_ACT_ALLOW"},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        *(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": persona, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            }
            for persona in PERSONALITIES
        ),
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES),
        "syscalls": syscalls,
    }
