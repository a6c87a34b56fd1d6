/* workers.c - the session process pool (see workers.h). */
#include "workers.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../common/log.h"
#include "../common/util.h"

struct worker {
    pid_t pid;
    int chan;                    /* master's end; -1 once retired */
    bool busy;
    bool retire;                 /* exit after the current session */
    struct worker_job job;
};

static struct worker *workers;
static size_t nworkers, max_workers;
static worker_session_fn run_session;
static worker_setup_fn setup_worker;

bool pool_init(size_t max, worker_session_fn session, worker_setup_fn setup)
{
    workers = calloc(max ? max : 1, sizeof *workers);
    max_workers = max;
    run_session = session;
    setup_worker = setup;
    return workers != NULL;
}

size_t pool_busy(void)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers; i++)
        n += workers[i].busy;
    return n;
}

size_t pool_size(void)
{
    return nworkers;
}

/* ------------------------------------------------------------- worker */

/* Receives one socket and its job; false on EOF (the master retired us). */
static bool receive_job(int chan, int *fd, struct worker_job *job)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {job, sizeof *job};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t got;
    do
        got = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got != (ssize_t)sizeof *job)
        return false;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        return false;
    memcpy(fd, CMSG_DATA(c), sizeof *fd);
    job->addr[sizeof job->addr - 1] = '\0';
    return true;
}

static void worker_main(int chan)
{
    setup_worker();
    for (unsigned used = 1;; used++) {
        int fd;
        struct worker_job job;
        if (!receive_job(chan, &fd, &job))
            break;
        run_session(fd, &job);
        /* After the last session say nothing: had we said "done", the
         * master could hand us a connection we would never serve.  Our
         * exit (EOF on the channel) tells it instead. */
        if (used >= WORKER_MAX_USE)
            break;
        char done = 'd';
        if (write(chan, &done, 1) != 1)
            break;
    }
    _exit(0);
}

/* ------------------------------------------------------------- master */

static struct worker *spawn(void)
{
    int sv[2];
    if (nworkers >= max_workers ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        return NULL;
    pid_t pid = fork();
    if (pid < 0) {
        log_err("fork: %s", strerror(errno));
        close(sv[0]);
        close(sv[1]);
        return NULL;
    }
    if (pid == 0) {
        close(sv[0]);
        for (size_t i = 0; i < nworkers; i++)   /* other workers' channels */
            if (workers[i].chan >= 0)
                close(workers[i].chan);
        worker_main(sv[1]);
    }
    close(sv[1]);
    struct worker *w = &workers[nworkers++];
    memset(w, 0, sizeof *w);
    w->pid = pid;
    w->chan = sv[0];
    return w;
}

static bool send_job(struct worker *w, int fd, const struct worker_job *job)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {(void *)job, sizeof *job};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    ssize_t sent;
    do
        sent = sendmsg(w->chan, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent == (ssize_t)sizeof *job;
}

static void retire(struct worker *w)
{
    if (w->chan >= 0)
        close(w->chan);   /* the worker reads EOF and exits */
    w->chan = -1;
    w->busy = false;
}

static struct worker *idle_worker(void)
{
    for (size_t i = 0; i < nworkers; i++)
        if (!workers[i].busy && workers[i].chan >= 0 && !workers[i].retire)
            return &workers[i];
    return NULL;
}

static size_t sessions_from(const char *addr)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers; i++)
        n += workers[i].busy && !strcmp(workers[i].job.addr, addr);
    return n;
}

enum pool_result pool_dispatch(int fd, const struct worker_job *job,
                               size_t per_ip_max)
{
    enum pool_result r = POOL_OK;
    if (per_ip_max && strcmp(job->addr, "unix") &&
        sessions_from(job->addr) >= per_ip_max)
        return POOL_PER_IP;
    if (pool_busy() >= max_workers)
        return POOL_FULL;
    /* Two tries: an idle worker may have died a moment ago. */
    for (int attempt = 0; attempt < 2; attempt++) {
        struct worker *w = idle_worker();
        if (!w)
            w = spawn();
        if (!w) {
            r = POOL_ERROR;
            break;
        }
        if (send_job(w, fd, job)) {
            w->busy = true;
            w->job = *job;
            close(fd);
            return POOL_OK;
        }
        retire(w);
        r = POOL_ERROR;
    }
    return r;
}

size_t pool_pollfds(struct pollfd *pfd, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers && n < max; i++)
        if (workers[i].chan >= 0)
            pfd[n++] = (struct pollfd){.fd = workers[i].chan, .events = POLLIN};
    return n;
}

static struct worker *by_chan(int chan)
{
    for (size_t i = 0; i < nworkers; i++)
        if (workers[i].chan == chan)
            return &workers[i];
    return NULL;
}

static size_t idle_count(void)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers; i++)
        n += !workers[i].busy && workers[i].chan >= 0;
    return n;
}

void pool_handle(const struct pollfd *pfd, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        struct worker *w = by_chan(pfd[i].fd);
        if (!w)
            continue;
        char buf[16];
        ssize_t got = read(w->chan, buf, sizeof buf);
        if (got <= 0) {
            if (got < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            retire(w);   /* exited or crashed: SIGCHLD removes it */
            continue;
        }
        w->busy = false;
        w->job.addr[0] = '\0';
        if (w->retire || idle_count() > WORKER_MAX_IDLE)
            retire(w);
    }
}

bool pool_reaped(pid_t pid, int status)
{
    for (size_t i = 0; i < nworkers; i++) {
        if (workers[i].pid != pid)
            continue;
        if (WIFSIGNALED(status) && WTERMSIG(status) != SIGTERM &&
            WTERMSIG(status) != SIGKILL)
            log_warn("session process %ld%s%s died of signal %d", (long)pid,
                     workers[i].busy ? " serving " : "",
                     workers[i].busy ? workers[i].job.addr : "", WTERMSIG(status));
        if (workers[i].chan >= 0)
            close(workers[i].chan);
        workers[i] = workers[--nworkers];
        return true;
    }
    return false;
}

void pool_retire_all(void)
{
    for (size_t i = 0; i < nworkers; i++) {
        if (workers[i].busy)
            workers[i].retire = true;
        else
            retire(&workers[i]);
    }
}

void pool_shutdown(int wait_s)
{
    for (size_t i = 0; i < nworkers; i++)
        kill(workers[i].pid, SIGTERM);
    int64_t deadline = now_ms() + (int64_t)wait_s * 1000;
    while (nworkers > 0 && now_ms() < deadline) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0)
            pool_reaped(pid, status);
        else
            usleep(20000);
    }
    for (size_t i = 0; i < nworkers; i++) {
        log_warn("session process %ld (%s) did not end in time, killed",
                 (long)workers[i].pid, workers[i].job.addr);
        kill(workers[i].pid, SIGKILL);
    }
    while (nworkers > 0) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0)
            break;
        pool_reaped(pid, status);
    }
}
