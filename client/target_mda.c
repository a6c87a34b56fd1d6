/* target_mda.c - mda:COMMAND: one run of COMMAND per message.
 *
 * The command runs through /bin/sh -c with %f replaced by the sender and
 * %r by the recipients, each shell-quoted (so an address can never become
 * shell syntax), %% by %; any other % is left as it is (printf formats in
 * a command line keep working).  The message goes to its stdin as it
 * arrives, with LF line ends as Unix delivery programs (procmail,
 * maildrop, dovecot-lda) expect.  Its stdout goes to our stderr.
 *
 * Exit 0 -> 250; 75 (EX_TEMPFAIL), killed by a signal, no exit within
 * --timeout, or not reading its input for --timeout (it is killed, never
 * left to take a cut message as whole) -> 451 (odmrd keeps the mail);
 * anything else -> 554 (odmrd
 * returns it).  The shell reports a command killed by signal N as exit
 * status 128+N, so 129..192 count as killed too.  A message with a bare CR or LF is never handed over in
 * full: the command is killed before it sees the end of its input. */
#include "target.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "../common/addr.h"

/* The quoted recipient list. */
#define MDA_RCPTS_MAX (96 * 1024)
/* The whole command line is one argument of sh -c, and Linux takes at
 * most 128 KiB in one (MAX_ARG_STRLEN, the NUL included): past that,
 * exec fails every run and the message never moves.  Checked against
 * the expanded command, whatever number of %r it has. */
#define MDA_ARG_MAX (128 * 1024 - 1)
#define MDA_BUF 65536
#define MDA_EXEC_FAILED 75     /* our child could not exec: temporary */
#define WAIT_STEP_MS 10
#define SHELL_SIGNAL_MAX 64    /* signal numbers the shell's 128+N covers */

/* The running command, for target_mda_kill() in a signal handler. */
static volatile sig_atomic_t running_pid;

struct mda {
    char sender_q[4 * ADDR_MAX + 8];   /* quoted: ' becomes '\'' */
    char *rcpts_q;                     /* quoted, space separated */
    size_t rcpts_len;
    pid_t pid;
    int fd;                            /* the command's stdin */
    bool broken;                       /* it stopped reading */
    bool stalled;                      /* ... without exiting (timeout) */
    bool status_lost;                  /* waitpid failed: outcome unknown */
    char buf[MDA_BUF];
    size_t blen;
};

static struct mda *M(struct target *t)
{
    return t->impl;
}

static bool mda_open(struct target *t, char *err, size_t n)
{
    struct mda *m = calloc(1, sizeof *m);

    t->impl = m;
    if (m)
        m->rcpts_q = malloc(MDA_RCPTS_MAX);
    if (!m || !m->rcpts_q) {
        snprintf(err, n, "out of memory");
        return false;
    }
    m->pid = -1;
    m->fd = -1;
    t->caps = (struct target_caps){.eightbit = true, .smtputf8 = true};
    return true;
}

static void mda_mail(struct target *t, const struct mail_args *ma,
                     struct reply *r)
{
    struct mda *m = M(t);
    char from[ADDR_MAX + 1];
    size_t len = 0;

    addr_format(&ma->from, from, sizeof from);
    if (from[0] == '-') {
        reply_set(r, 553, "5.1.7 A sender starting with '-' is not handed to "
                          "a delivery command (it would read it as an "
                          "option)");
        return;
    }
    if (!shell_quote_append(m->sender_q, sizeof m->sender_q, &len, from)) {
        reply_set(r, 501, "5.1.7 Sender address too long");
        return;
    }
    m->rcpts_len = 0;
    m->rcpts_q[0] = '\0';
    reply_set(r, 250, "2.1.0 Ok");
}

/* The length of tmpl with %f, %r and %% replaced. */
static size_t expanded_len(const char *tmpl, size_t from_len, size_t rcpts_len)
{
    size_t len = 0;
    for (const char *p = tmpl; *p; p++) {
        bool sub = p[0] == '%' && (p[1] == 'f' || p[1] == 'r' || p[1] == '%');
        len += !sub ? 1 : p[1] == 'f' ? from_len : p[1] == 'r' ? rcpts_len : 1;
        p += sub;
    }
    return len;
}

static void mda_rcpt(struct target *t, const struct rcpt_args *a,
                     const char *addr, struct reply *r)
{
    struct mda *m = M(t);
    size_t len = m->rcpts_len;
    bool ok = len + 2 <= MDA_RCPTS_MAX;

    (void)a;
    if (addr[0] == '-') {
        /* quoting stops the shell, not the command's option parser:
         * RCPT TO:<-X/path@domain> would be sendmail's -X (Postfix
         * refuses such addresses by default, allow_min_user) */
        reply_set(r, 553, "5.1.3 A recipient starting with '-' is not "
                          "handed to a delivery command (it would read it "
                          "as an option)");
        return;
    }
    if (ok && len)
        m->rcpts_q[len++] = ' ';
    if (!ok || !shell_quote_append(m->rcpts_q, MDA_RCPTS_MAX, &len, addr) ||
        expanded_len(t->spec->arg, strlen(m->sender_q), len) > MDA_ARG_MAX) {
        m->rcpts_q[m->rcpts_len] = '\0';
        reply_set(r, 452, "4.5.3 Too many recipients for one delivery "
                          "command");
        return;
    }
    m->rcpts_len = len;
    reply_set(r, 250, "2.1.5 Ok");
}

/* The command line with %f, %r and %% replaced; malloc'ed or NULL. */
static char *expand(const char *tmpl, const char *from, const char *rcpts)
{
    size_t need = expanded_len(tmpl, strlen(from), strlen(rcpts)) + 1;
    char *out = malloc(need), *o = out;
    if (!out)
        return NULL;
    for (const char *p = tmpl; *p; p++) {
        const char *sub = NULL;
        if (p[0] == '%' && (p[1] == 'f' || p[1] == 'r' || p[1] == '%'))
            sub = p[1] == 'f' ? from : p[1] == 'r' ? rcpts : "%";
        if (!sub) {
            *o++ = *p;
            continue;
        }
        size_t len = strlen(sub);
        memcpy(o, sub, len);
        o += len;
        p++;
    }
    *o = '\0';
    return out;
}

/* The command runs in a process group of its own, so that a pipeline or
 * a program started by the shell dies with the shell. */
static void kill_command(pid_t pid)
{
    if (pid > 0) {
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);   /* in case setpgid() lost a race */
    }
}

void target_mda_kill(void)
{
    kill_command((pid_t)running_pid);
}

static void child(int in, const char *cmd, pid_t parent)
{
#ifdef __linux__
    /* If we are killed mid-message, the command must not take the end of
     * its input for the end of the message and deliver half of it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(MDA_EXEC_FAILED);
#else
    (void)parent;
#endif
    setpgid(0, 0);
    /* We ignore SIGPIPE; a delivery program should see the default. */
    signal(SIGPIPE, SIG_DFL);
    if (in == 0)   /* dup2 would keep close-on-exec set */
        fcntl(0, F_SETFD, 0);
    if ((in != 0 && dup2(in, 0) < 0) || dup2(2, 1) < 0)
        _exit(MDA_EXEC_FAILED);
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(MDA_EXEC_FAILED);
}

static void mda_data(struct target *t, struct reply *r)
{
    struct mda *m = M(t);
    int p[2];
    char *cmd = expand(t->spec->arg, m->sender_q, m->rcpts_q);

    if (!cmd || pipe(p) != 0) {
        free(cmd);
        reply_set(r, 451, "4.3.0 Cannot run the delivery command: %s",
                  strerror(errno));
        return;
    }
    /* Close-on-exec: other delivery commands must not hold this pipe
     * open (the command would never see the end of its input). */
    fcntl(p[0], F_SETFD, FD_CLOEXEC);
    fcntl(p[1], F_SETFD, FD_CLOEXEC);
    fflush(NULL);
    pid_t parent = getpid();
    m->pid = fork();
    if (m->pid == 0)
        child(p[0], cmd, parent);
    if (m->pid > 0)
        setpgid(m->pid, m->pid);
    running_pid = m->pid > 0 ? m->pid : 0;
    free(cmd);
    close(p[0]);
    if (m->pid < 0) {
        close(p[1]);
        reply_set(r, 451, "4.3.0 Cannot run the delivery command: %s",
                  strerror(errno));
        return;
    }
    m->fd = p[1];
    /* Non-blocking, so that a command that stops reading cannot hold us
     * past the timeout. */
    fcntl(m->fd, F_SETFL, fcntl(m->fd, F_GETFL) | O_NONBLOCK);
    m->broken = false;
    m->stalled = false;
    m->status_lost = false;
    m->blen = 0;
    reply_set(r, 354, "Go ahead");
}

/* Writes the buffer to the command; false once it stopped reading. */
static bool flush_buf(struct target *t)
{
    struct mda *m = M(t);
    size_t off = 0;

    while (off < m->blen && !m->broken) {
        ssize_t w = write(m->fd, m->buf + off, m->blen - off);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        struct pollfd pf = {.fd = m->fd, .events = POLLOUT, .revents = 0};
        if (w < 0 && errno == EAGAIN &&
            poll(&pf, 1, (int)(t->conf->timeout * 1000)) > 0)
            continue;
        /* EPIPE: it closed its input and chose its exit status on what
         * it read (as Postfix's pipe(8) takes it); anything else - the
         * timeout above - and it would see a cut message as complete. */
        m->broken = true;
        m->stalled = !(w < 0 && errno == EPIPE);
    }
    m->blen = 0;
    return !m->broken;
}

static bool mda_write(struct target *t, const char *p, size_t len)
{
    struct mda *m = M(t);

    /* CRLF -> LF: the receiver has refused any CR that is not followed
     * by LF, so dropping every CR is exact. */
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\r')
            continue;
        if (m->blen == sizeof m->buf && !flush_buf(t))
            return false;
        m->buf[m->blen++] = p[i];
    }
    return !m->broken;
}

/* Waits for the command; false when it had to be killed, or when its
 * status cannot be had (status_lost: a delivery whose outcome is unknown
 * is not a delivery). */
static bool wait_child(struct target *t, int *status)
{
    struct mda *m = M(t);
    int64_t deadline = now_ms() + t->conf->timeout * 1000;
    struct timespec step = {0, WAIT_STEP_MS * 1000000L};

    for (;;) {
        pid_t w = waitpid(m->pid, status, WNOHANG);
        if (w == m->pid)
            break;
        if (w < 0 && errno != EINTR) {
            int e = errno;
            fprintf(stderr, "odmr-fetch: cannot learn how the delivery "
                            "command ended: %s\n", strerror(e));
            /* ECHILD: reaped already, its pid may be another process's */
            if (e != ECHILD)
                kill_command(m->pid);
            m->pid = -1;
            running_pid = 0;
            m->status_lost = true;
            return false;
        }
        if (now_ms() > deadline) {
            kill_command(m->pid);
            while (waitpid(m->pid, status, 0) < 0 && errno == EINTR)
                ;
            m->pid = -1;
            running_pid = 0;
            return false;
        }
        nanosleep(&step, NULL);
    }
    m->pid = -1;
    running_pid = 0;
    return true;
}

/* The signal that ended the command: directly, or as the shell reports
 * a killed command, exit status 128 + N. */
static int killed_by(int status)
{
    if (WIFSIGNALED(status))
        return WTERMSIG(status);
    if (WIFEXITED(status) && WEXITSTATUS(status) > 128 &&
        WEXITSTATUS(status) <= 128 + SHELL_SIGNAL_MAX)
        return WEXITSTATUS(status) - 128;
    return 0;
}

static void verdict(int status, struct reply *r)
{
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        reply_set(r, 250, "2.0.0 Ok: delivered by command");
    else if (WIFEXITED(status) && WEXITSTATUS(status) == EX_TEMPFAIL)
        reply_set(r, 451, "4.3.0 Delivery command failed temporarily (exit "
                          "status 75)");
    else if (killed_by(status))
        reply_set(r, 451, "4.3.0 Delivery command killed by signal %d",
                  killed_by(status));
    else
        reply_set(r, 554, "5.3.0 Delivery command failed (exit status %d)",
                  WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

static void mda_end(struct target *t, bool abort, struct reply *r)
{
    struct mda *m = M(t);
    int status = 0;

    if (m->pid < 0) {
        reply_set(r, 451, "4.3.0 Delivery command not running");
        return;
    }
    if (!abort)
        flush_buf(t);
    /* Killed before it can see an end of input that is not the end of
     * the message. */
    if (abort || m->stalled)
        kill_command(m->pid);
    close(m->fd);
    m->fd = -1;
    bool exited = wait_child(t, &status);
    if (!abort && m->stalled)
        reply_set(r, 451, "4.4.7 Delivery command stopped reading its "
                          "input for %ld s", t->conf->timeout);
    else if (!exited && m->status_lost)
        reply_set(r, 451, "4.3.0 Delivery command's exit status is unknown");
    else if (!exited)
        reply_set(r, 451, "4.4.7 Delivery command timed out");
    else
        verdict(status, r);
    if (trace_on())
        fprintf(stderr, "odmr-fetch: delivery command: %s\n", r->line);
}

static void mda_reset(struct target *t)
{
    struct mda *m = M(t);
    struct reply r;

    if (m && m->pid > 0)
        mda_end(t, true, &r);
}

static void mda_close(struct target *t)
{
    struct mda *m = M(t);

    if (!m)
        return;
    mda_reset(t);
    free(m->rcpts_q);
    free(m);
    t->impl = NULL;
}

const struct target_ops target_mda_ops = {
    .open = mda_open,
    .mail = mda_mail,
    .rcpt = mda_rcpt,
    .data = mda_data,
    .write = mda_write,
    .end = mda_end,
    .reset = mda_reset,
    .close = mda_close,
};
