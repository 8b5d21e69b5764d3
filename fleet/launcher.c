/* Fleet's launcher, compiled: the same program as fleet/launcher.py (read its docstring), in C, so that
 * starting an agent costs a fork and two execs instead of a Python interpreter (~1 ms, not ~15-60 ms).
 *
 *   launcher parent=PID lc=VALUE tether=FD|- ttl=SECONDS grace=SECONDS creds=U:G:GS|- cwd=DIR|- run=ID:FENCE|-
 *            -- PROGRAM ARGS...
 *
 * It forks the agent (PR_SET_PDEATHSIG, so it cannot outlive the launcher; with creds=- it keeps no
 * ambient or inheritable capability, nor, unless root, any at all: confine_self), becomes a child subreaper,
 * and waits for the agent's exit, the tether's end-of-file (the executor died), its deadline (the
 * executor could not prove it still owns the run) or SIGUSR1 (the executor's kill: no more grace); then
 * it stops the whole group and every descendant that left it: SIGTERM, the grace, SIGKILL until none is
 * left. It exits with the agent's code (128+N for a death by signal N).
 * fleet/process.py builds it on first use with the system's C compiler and falls back to the Python
 * launcher where there is none; tests/test_process.py runs every launcher test against both.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <grp.h>
#include <linux/capability.h>

#define EXIT_USAGE 2
#define EXIT_CANNOT_EXECUTE 126
#define EXIT_NOT_FOUND 127
#define EXIT_CONFIG 78
#define POLL_MS 20

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void say(const char *text) {
    ssize_t ignored = write(2, text, strlen(text));
    (void)ignored;
}

static const char *option(char **argv, int cut, const char *key) {
    size_t len = strlen(key);
    for (int i = 1; i < cut; i++)
        if (strncmp(argv[i], key, len) == 0 && argv[i][len] == '=') return argv[i] + len + 1;
    return NULL;
}

static int statuses_agent = -1, agent_status = 0, agent_reaped = 0;

static void reap_all(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        if (pid == statuses_agent) { agent_status = status; agent_reaped = 1; }
}

/* SIGUSR1 from the executor (fleet/process.py's kill, the orphan sweep): no more grace, kill everything
 * now. The handler only notes it; the self-pipe wakes a poll that is under way. */
static volatile sig_atomic_t kill_requested = 0;
static int wake_pipe[2] = {-1, -1};

static void on_kill_request(int sig) {
    (void)sig;
    int saved = errno;
    kill_requested = 1;
    ssize_t ignored = write(wake_pipe[1], "k", 1);
    (void)ignored;
    errno = saved;
}

struct proc_entry { long pid, ppid, pgrp; };

/* Every live process of this host (this pid namespace) with its parent and group; *count of them. */
static struct proc_entry *live_processes(size_t *count) {
    size_t used = 0, room = 256;
    struct proc_entry *all = malloc(room * sizeof *all);
    DIR *proc = all ? opendir("/proc") : NULL;
    *count = 0;
    if (proc == NULL) { free(all); return NULL; }
    struct dirent *entry;
    char path[64], stat[1024];
    while ((entry = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || pid <= 0) continue;
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (f == NULL) continue;
        size_t n = fread(stat, 1, sizeof stat - 1, f);
        fclose(f);
        stat[n] = '\0';
        char *close = strrchr(stat, ')');
        char state;
        long ppid, pgrp;
        if (close == NULL || sscanf(close + 2, "%c %ld %ld", &state, &ppid, &pgrp) != 3) continue;
        if (state == 'Z' || state == 'X') continue;
        if (used == room) {
            struct proc_entry *more = realloc(all, 2 * room * sizeof *all);
            if (more == NULL) break;
            all = more;
            room *= 2;
        }
        all[used++] = (struct proc_entry){pid, ppid, pgrp};
    }
    closedir(proc);
    *count = used;
    return all;
}

/* Every other live member of our group and every descendant of ours, by the parent chains down from us:
 * how many, signalled. A descendant that left the group (its own setsid) is still one, and while we live
 * it cannot leave our tree: an orphan comes back to us, the subreaper. */
static int signal_members(int sig) {
    pid_t me = getpid(), group = getpgid(0);
    size_t count;
    struct proc_entry *all = live_processes(&count);
    if (all == NULL) return 0;
    char *ours = calloc(count ? count : 1, 1);
    int found = 0;
    for (int grew = 1; grew && ours != NULL;) { /* mark children of marked (or of us) until nothing new */
        grew = 0;
        for (size_t i = 0; i < count; i++) {
            if (ours[i] || all[i].pid == me) continue;
            int mine = all[i].pgrp == group || all[i].ppid == me;
            for (size_t j = 0; !mine && j < count; j++) mine = ours[j] && all[j].pid == all[i].ppid;
            if (mine) { ours[i] = 1; grew = 1; found++; if (sig) kill((pid_t)all[i].pid, sig); }
        }
    }
    free(ours);
    free(all);
    return found;
}

/* Every member of our group is a descendant of ours, and as a subreaper every orphaned descendant
 * becomes our child: with no child left there is nothing to stop (and no /proc scan to pay for). */
static int no_children(void) {
    reap_all(); /* reaps (and records) every exited child; then -1/ECHILD means none is left */
    siginfo_t info;
    return waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD;
}

/* SIGTERM the group, the grace (cut short by a kill request), then SIGKILL every member and descendant
 * until none is left: we are never in the way of that SIGKILL, so nothing is left unwatched. */
static void stop_group(double grace_s) {
    if (no_children() || signal_members(0) == 0) return;
    if (!kill_requested) kill(0, SIGTERM); /* the group; we ignore it ourselves */
    double deadline = now_s() + grace_s;
    while (!kill_requested && now_s() < deadline) {
        usleep(POLL_MS * 1000);
        reap_all();
        if (signal_members(0) == 0) return;
    }
    while (signal_members(SIGKILL) > 0) {
        usleep(POLL_MS * 1000);
        reap_all();
    }
}

/* Become uid:gid:groups for good, holding no capability (ambient first: a non-root worker may carry
 * CAP_SETUID and friends as ambient ones, and they would otherwise survive the switch and the exec). */
static int switch_user(const char *creds) {
    unsigned uid, gid;
    char groups_text[4096];
    gid_t groups[256];
    int count = 0;
    groups_text[0] = '\0';
    if (sscanf(creds, "%u:%u:%4095s", &uid, &gid, groups_text) < 2) return -1;
    for (char *g = strtok(groups_text, ","); g != NULL && count < 256; g = strtok(NULL, ","))
        groups[count++] = (gid_t)strtoul(g, NULL, 10);
    if (setgroups((size_t)count, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) return -1;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return -1;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &header, data);
}

/* Stay this user, but pass on nothing that could make the agent someone else: a non-root worker may
 * hold CAP_SETUID and friends as ambient capabilities (to switch users for run_as agents), and an agent
 * of its own user would inherit them through the exec and setuid(0). Ambient and inheritable go always;
 * a non-root one also drops permitted and effective, and takes no_new_privs (no setuid binary or file
 * capability gives any back). Root stays root: an agent without run_as under a root worker is root. */
static int confine_self(void) {
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return -1;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    int root = geteuid() == 0;
    for (int i = 0; i < 2; i++) {
        data[i].inheritable = 0;
        if (!root) data[i].permitted = data[i].effective = 0;
    }
    if (syscall(SYS_capset, &header, data) != 0) return -1;
    return root ? 0 : prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

static void become_agent(char **argv, const char *creds, const char *cwd, int tether) {
    pid_t launcher = getppid();
    signal(SIGPIPE, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGQUIT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    close(wake_pipe[0]);
    close(wake_pipe[1]);
    if (tether >= 0) close(tether);
    char line[512];
    /* Until the exec, a failure is the configuration's (a user or a folder this agent cannot have): 78. */
    int switching = creds != NULL && strcmp(creds, "-") != 0;
    if (switching && switch_user(creds) != 0) {
        snprintf(line, sizeof line, "fleet launcher: cannot switch to uid:gid:groups %s: %s\n", creds, strerror(errno));
        say(line);
        _exit(EXIT_CONFIG);
    }
    if (!switching && confine_self() != 0) {
        snprintf(line, sizeof line, "fleet launcher: cannot drop the worker's capabilities: %s\n", strerror(errno));
        say(line);
        _exit(EXIT_CONFIG);
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* after the switch, which would clear it */
    if (getppid() != launcher) _exit(EXIT_CANNOT_EXECUTE); /* died before the signal was armed */
    if (cwd != NULL && strcmp(cwd, "-") != 0 && chdir(cwd) != 0) {
        snprintf(line, sizeof line, "fleet launcher: cannot enter its working directory %s: %s\n", cwd, strerror(errno));
        say(line);
        _exit(EXIT_CONFIG);
    }
    execv(argv[0], argv);
    int err = errno;
    snprintf(line, sizeof line, "fleet launcher: cannot run %s: %s\n", argv[0], strerror(err));
    say(line);
    _exit(err == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXECUTE);
}

/* The newest validity in the pipe, in seconds; -1 at end-of-file. */
static double read_tether(int tether) {
    char buf[4096];
    ssize_t n = read(tether, buf, sizeof buf - 1);
    if (n <= 0) return n == 0 ? -1.0 : 0.0;
    buf[n] = '\0';
    while (n > 0 && buf[n - 1] == '\n') buf[--n] = '\0';
    char *last = strrchr(buf, '\n');
    return strtod(last ? last + 1 : buf, NULL) / 1000.0;
}

int main(int argc, char **argv) {
    int cut = -1;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--") == 0) { cut = i; break; }
    const char *parent = cut > 0 ? option(argv, cut, "parent") : NULL;
    if (cut < 0 || cut + 1 >= argc || parent == NULL) {
        say("usage: launcher parent=PID [key=value ...] -- PROGRAM [ARGS...]\n");
        return EXIT_USAGE;
    }
    if (getppid() != (pid_t)strtol(parent, NULL, 10)) return EXIT_CANNOT_EXECUTE;
    /* The group we stop must be the attempt's own: lead one, whoever started us and however. */
    if (getpgid(0) != getpid() && setpgid(0, 0) != 0) return EXIT_CANNOT_EXECUTE;
    const char *tether_text = option(argv, cut, "tether");
    int tether = (tether_text == NULL || strcmp(tether_text, "-") == 0) ? -1 : atoi(tether_text);
    const char *ttl_text = option(argv, cut, "ttl");
    const char *grace_text = option(argv, cut, "grace");
    double grace_s = grace_text ? strtod(grace_text, NULL) : 5.0;
    /* lc= is for the Python launcher, whose start-up changes LC_CTYPE; this one leaves the environment alone. */
    signal(SIGHUP, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGPIPE, SIG_IGN); /* our notes go to the executor's pipe, whose reader may be dead */
    if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return EXIT_CANNOT_EXECUTE;
    struct sigaction request = {0};
    request.sa_handler = on_kill_request;
    sigaction(SIGUSR1, &request, NULL);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t agent = fork();
    if (agent < 0) return EXIT_CANNOT_EXECUTE;
    if (agent == 0) become_agent(argv + cut + 1, option(argv, cut, "creds"), option(argv, cut, "cwd"), tether);
    statuses_agent = agent;
    int pidfd = (int)syscall(SYS_pidfd_open, agent, 0);
    double deadline = (tether >= 0 && ttl_text) ? now_s() + strtod(ttl_text, NULL) : -1.0;
    const char *reason = NULL;
    while (!agent_reaped) {
        struct pollfd fds[3] = {{pidfd, POLLIN, 0}, {wake_pipe[0], POLLIN, 0}, {tether, POLLIN, 0}};
        int timeout = -1;
        if (deadline >= 0) {
            double left = (deadline - now_s()) * 1000;
            timeout = left > 0 ? (int)left + 1 : 0;
        }
        if (pidfd < 0 && (timeout < 0 || timeout > POLL_MS)) timeout = POLL_MS; /* no pidfd: poll for the exit */
        int ready = kill_requested ? 0 : poll(fds, tether >= 0 ? 3 : 2, timeout);
        if (ready < 0 && errno != EINTR) break;
        reap_all();
        if (agent_reaped) break;
        if (kill_requested) {
            reason = NULL; /* the executor's kill: it says why; no line of ours in the agent's output */
        } else if (tether >= 0 && (fds[2].revents & (POLLIN | POLLHUP))) {
            double valid = read_tether(tether);
            if (valid < 0) { reason = "its executor is gone"; }
            else { deadline = now_s() + valid; continue; }
        } else if (deadline >= 0 && now_s() >= deadline) {
            reason = "its executor could not prove it still owns the run";
        } else {
            continue;
        }
        if (reason != NULL) {
            char line[160];
            snprintf(line, sizeof line, "\nfleet launcher: stopping the agent: %s\n", reason);
            say(line);
        }
        stop_group(grace_s);
        while (!agent_reaped) {
            int status;
            if (waitpid(agent, &status, 0) == agent) { agent_status = status; agent_reaped = 1; }
            else if (errno != EINTR) break;
        }
    }
    stop_group(grace_s);
    reap_all();
    if (WIFEXITED(agent_status)) return WEXITSTATUS(agent_status);
    if (WIFSIGNALED(agent_status)) return 128 + WTERMSIG(agent_status);
    return EXIT_CANNOT_EXECUTE;
}
