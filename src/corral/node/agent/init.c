/*
 * corral-init: pid 1 of every Corral sandbox.
 *
 * 1. It is the init: it reaps every orphan, like catatonit -P.
 * 2. It starts commands for the host. The host passes it, as fd 3 (crun/runc --preserve-fds 1), a listening
 *    unix socket bound to a path in the sandbox's bundle directory: outside the sandbox's root, so nothing
 *    inside can connect to it. For each connection it receives one request and the command's stdout and
 *    stderr (SCM_RIGHTS), forks, and the child makes its own session, takes the uid/gid, changes directory and
 *    execs. Everything else is inherited from this process: namespaces, cgroup, seccomp filter,
 *    no_new_privs, capabilities (cleared by the kernel when the uid is not 0).
 *    It answers the child's pid (as seen inside), then, when the child exits, its wait status. If the host
 *    closes the connection first (timeout, client gone), the child's whole session is killed.
 *
 * Request (one message, at most 1 MiB): "corral-exec-1\0" uid "\0" gid "\0" cwd "\0" argc "\0" argv... envc "\0"
 * env... (decimal numbers as text, every field NUL-terminated), with two fds attached (stdout, stderr; stdin is
 * /dev/null) or three (stdin, stdout, stderr: interactive sessions). When stdin is a terminal (a pty the host
 * opened in the sandbox's own devpts), it becomes the command's controlling terminal.
 * Answers: "pid <n>\n" after the fork, then "exit <wait status>\n"; or "error <message>\n".
 *
 * 3. Before the sandbox is checkpointed (CRIU cannot dump a socket bound to a path outside the sandbox), the
 *    host sends "corral-detach-1\0" (no fds): the commands still attached to a host connection are ended, the
 *    listening socket is closed, and "ok\n" answered. After the dump or restore the host starts
 *    `init --serve` in the sandbox (through the runtime's exec, with a new listening socket as fd 3): the same
 *    command server, not pid 1, a subreaper too. A detach sent to it makes it exit once it has answered.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define LISTEN_FD 3
#define MAX_REQUEST (1 << 20)
#define MAX_ACTIVE 1024
#define MAX_FIELDS 65536

struct active {
    pid_t pid;  /* the command (leader of its own session); 0 = free slot */
    int conn;   /* the host's connection */
};

static struct active active[MAX_ACTIVE];
static int listening;  /* fd 3 is the host's listening socket */
static int serving;    /* `init --serve`: the command server of a checkpointed sandbox, not its pid 1 */

static void say(int conn, const char *fmt, long value) {
    char line[64];
    int n = snprintf(line, sizeof line, fmt, value);
    if (n > 0) (void)send(conn, line, (size_t)n, MSG_NOSIGNAL);
}

static void say_error(int conn, const char *message) {
    char line[256];
    int n = snprintf(line, sizeof line, "error %s\n", message);
    if (n > 0) (void)send(conn, line, (size_t)n, MSG_NOSIGNAL);
}

/* state and session of a process, from /proc/<pid>/stat; -1 if it is gone */
static int stat_of(long pid, char *state, long *sid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n <= 0) return -1;
    line[n] = '\0';
    char *close_paren = strrchr(line, ')');
    long ppid, pgrp;
    if (!close_paren || sscanf(close_paren + 2, "%c %ld %ld %ld", state, &ppid, &pgrp, sid) != 4) return -1;
    return 0;
}

/* Kill every live process of the session `sid` (the command's tree, and what it left running in the
 * background), until none is left: a group signal first (atomic with respect to fork), then a scan. */
static void kill_session(pid_t sid) {
    for (int round = 0; round < 500; round++) {
        (void)kill(-sid, SIGKILL);
        int found = 0;
        DIR *proc = opendir("/proc");
        if (!proc) return;
        struct dirent *entry;
        while ((entry = readdir(proc)) != NULL) {
            char *end;
            long pid = strtol(entry->d_name, &end, 10);
            char state;
            long session;
            if (*end || pid <= 1 || stat_of(pid, &state, &session) < 0) continue;
            if (session == sid && state != 'Z') {
                (void)kill((pid_t)pid, SIGKILL);
                found = 1;
            }
        }
        closedir(proc);
        if (!found) return;
        usleep(1000);
    }
}

static int parse_number(const char *text, long max, long *out) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || end == text || value < 0 || value > max) return -1;
    *out = value;
    return 0;
}

/* In the child: become the command. Never returns. */
static void run_command(int in_fd, int out_fd, int err_fd, long uid, long gid, const char *cwd, char **argv, char **envp) {
    if (setsid() < 0) _exit(126);
    if (in_fd < 0) in_fd = open("/dev/null", O_RDONLY);
    if (in_fd < 0 || dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) _exit(126);
    if (isatty(0) && ioctl(0, TIOCSCTTY, 0) < 0) _exit(126);
    (void)syscall(SYS_close_range, 3, ~0U, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    /* the directory first, as root (like the runtimes do): a user may run in a directory it cannot open */
    if (chdir(cwd) < 0) {
        dprintf(2, "corral: cannot change directory to %s: %s\n", cwd, strerror(errno));
        _exit(126);
    }
    if (setgroups(0, NULL) < 0 || setgid((gid_t)gid) < 0 || setuid((uid_t)uid) < 0) {
        dprintf(2, "corral: cannot run as %ld:%ld: %s\n", uid, gid, strerror(errno));
        _exit(126);
    }
    environ = envp;
    execvpe(argv[0], argv, envp);
    int err = errno;
    dprintf(2, "corral: cannot run %s: %s\n", argv[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

static const char DETACH[] = "corral-detach-1";

/* Let go of every host connection before a checkpoint: attached commands are ended (their connections are
 * the host's), the listening socket closed. */
static void detach(int conn) {
    for (int i = 0; i < MAX_ACTIVE; i++)
        if (active[i].pid && active[i].conn >= 0) {
            close(active[i].conn);
            active[i].conn = -1;
            kill_session(active[i].pid);
        }
    if (listening) {
        close(LISTEN_FD);
        listening = 0;
    }
    (void)send(conn, "ok\n", 3, MSG_NOSIGNAL);
    close(conn);
    if (serving) _exit(0);
}

static void handle(int conn) {
    static char buf[MAX_REQUEST + 1];
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {buf, MAX_REQUEST};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    /* fds[0] stdin (-1: /dev/null), fds[1] stdout, fds[2] stderr */
    int fds[3] = {-1, -1, -1};
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        if (c->cmsg_len == CMSG_LEN(2 * sizeof(int)))
            memcpy(fds + 1, CMSG_DATA(c), 2 * sizeof(int));
        else if (c->cmsg_len == CMSG_LEN(3 * sizeof(int)))
            memcpy(fds, CMSG_DATA(c), 3 * sizeof(int));
        else  /* not ours to keep */
            for (size_t k = 0; k < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) close(((int *)CMSG_DATA(c))[k]);
    }
    if (n == (ssize_t)sizeof DETACH && memcmp(buf, DETACH, sizeof DETACH) == 0 && fds[1] < 0) {
        detach(conn);
        return;
    }
    if (n <= 0 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || fds[1] < 0 || fds[2] < 0) {
        say_error(conn, "bad request");
        goto fail;
    }
    buf[n] = '\0';
    /* split into NUL-terminated fields */
    static char *fields[MAX_FIELDS];
    int count = 0;
    for (char *p = buf; p < buf + n && count < MAX_FIELDS; p += strlen(p) + 1) fields[count++] = p;
    if (buf[n - 1] != '\0' || count < 6 || strcmp(fields[0], "corral-exec-1") != 0) {
        say_error(conn, "bad request");
        goto fail;
    }
    long uid, gid, argc, envc;
    if (parse_number(fields[1], 65535, &uid) || parse_number(fields[2], 65535, &gid) ||
        parse_number(fields[4], MAX_FIELDS, &argc) || argc < 1 || 5 + argc >= count ||
        parse_number(fields[5 + argc], MAX_FIELDS, &envc) || 6 + argc + envc != count) {
        say_error(conn, "bad request");
        goto fail;
    }
    static char *argv[MAX_FIELDS + 1];
    static char *envp[MAX_FIELDS + 1];
    for (long i = 0; i < argc; i++) argv[i] = fields[5 + i];
    argv[argc] = NULL;
    for (long i = 0; i < envc; i++) envp[i] = fields[6 + argc + i];
    envp[envc] = NULL;
    int slot = -1;
    for (int i = 0; i < MAX_ACTIVE; i++)
        if (!active[i].pid) {
            slot = i;
            break;
        }
    if (slot < 0) {
        say_error(conn, "too many commands at once");
        goto fail;
    }
    pid_t pid = fork();
    if (pid < 0) {
        say_error(conn, "fork failed");
        goto fail;
    }
    if (pid == 0) run_command(fds[0], fds[1], fds[2], uid, gid, fields[3], argv, envp);
    for (int k = 0; k < 3; k++)
        if (fds[k] >= 0) close(fds[k]);
    active[slot].pid = pid;
    active[slot].conn = conn;
    say(conn, "pid %ld\n", (long)pid);
    return;
fail:
    for (int k = 0; k < 3; k++)
        if (fds[k] >= 0) close(fds[k]);
    close(conn);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_ACTIVE; i++)
            if (active[i].pid == pid) {
                if (active[i].conn >= 0) {
                    say(active[i].conn, "exit %ld\n", (long)status);
                    close(active[i].conn);
                }
                active[i].pid = 0;
            }
    }
}

int main(int argc, char **argv) {
    serving = argc > 1 && strcmp(argv[1], "--serve") == 0;
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) return 1;
    listening = fcntl(LISTEN_FD, F_GETFD) >= 0;
    if (serving && !listening) return 1;
    if (listening) (void)fcntl(LISTEN_FD, F_SETFD, FD_CLOEXEC);
    for (;;) {
        struct pollfd polls[2 + MAX_ACTIVE];
        int nfds = 0;
        /* where the command connections start (a detach may close the listener during this round) */
        const int base = listening ? 2 : 1;
        polls[nfds++] = (struct pollfd){sfd, POLLIN, 0};
        if (base == 2) polls[nfds++] = (struct pollfd){LISTEN_FD, POLLIN, 0};
        int slots[MAX_ACTIVE];
        for (int i = 0; i < MAX_ACTIVE; i++)
            if (active[i].pid && active[i].conn >= 0) {
                slots[nfds - base] = i;
                polls[nfds++] = (struct pollfd){active[i].conn, POLLIN | POLLRDHUP, 0};
            }
        if (poll(polls, (nfds_t)nfds, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (polls[0].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) == sizeof info) {
            }
            reap();
        }
        if (base == 2 && polls[1].revents & POLLIN) {
            int conn = accept4(LISTEN_FD, NULL, NULL, SOCK_CLOEXEC);
            if (conn >= 0) handle(conn);
        }
        for (int k = base; k < nfds; k++) {
            if (!(polls[k].revents & (POLLIN | POLLRDHUP | POLLHUP | POLLERR))) continue;
            int i = slots[k - base];
            if (!active[i].pid || active[i].conn != polls[k].fd) continue;
            char byte;
            ssize_t got = recv(active[i].conn, &byte, 1, MSG_DONTWAIT);
            if (got > 0 || (got < 0 && errno == EAGAIN)) continue; /* nothing is sent after the request */
            /* the host went away or timed out: end the command's whole session; the exit is then reaped
             * with no one to tell */
            close(active[i].conn);
            active[i].conn = -1;
            kill_session(active[i].pid);
        }
    }
}
