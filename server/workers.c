/* workers.c - the session process pool (see workers.h). */
#include "workers.h"
#include "throttle.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
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
    int64_t idle_since;          /* now_ms() when it last became idle */
    struct worker_job job;
    char key[64];                /* throttle_addr_key of job.addr */
};

static struct worker *workers;
static size_t nworkers, max_workers;
static worker_session_fn run_session;
static worker_setup_fn setup_worker;
static worker_request_fn handle_request;
static size_t budgets[POOL_SERVICES], per_ip_limit;
static bool stressed[POOL_SERVICES];
static int own_chan = -1;        /* in a worker: its end of the channel */
static int watch_fd = -1;        /* in the master: its epoll set */
static const char *const service_names[POOL_SERVICES] = {"odmr", "smtp", "lmtp"};

bool pool_init(size_t max, worker_session_fn session, worker_setup_fn setup,
               worker_request_fn request)
{
    workers = calloc(max ? max : 1, sizeof *workers);
    max_workers = max;
    run_session = session;
    setup_worker = setup;
    handle_request = request;
    for (size_t i = 0; i < POOL_SERVICES; i++)
        budgets[i] = max;
    return workers != NULL;
}

void pool_set_limits(const size_t budget[POOL_SERVICES], size_t per_ip_max)
{
    for (size_t i = 0; i < POOL_SERVICES; i++)
        budgets[i] = budget[i] ? budget[i] : max_workers;
    per_ip_limit = per_ip_max;
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

/* Receives one socket and its job; false on EOF (the master retired us).
 * An answer that came after its question timed out (worker_ask) may be
 * waiting first: it is no job and is passed over, instead of ending the
 * worker and dropping the connection queued behind it. */
static bool receive_job(int chan, int *fd, struct worker_job *job)
{
    for (;;) {
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {job, sizeof *job};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        ssize_t got;
        do
            got = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
        while (got < 0 && errno == EINTR);
        if (got <= 0)
            return false;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        bool rights = c && c->cmsg_level == SOL_SOCKET &&
                      c->cmsg_type == SCM_RIGHTS;
        if (rights)
            memcpy(fd, CMSG_DATA(c), sizeof *fd);
        if (rights && got == (ssize_t)sizeof *job &&
            !(msg.msg_flags & MSG_TRUNC)) {
            job->addr[sizeof job->addr - 1] = '\0';
            return true;
        }
        if (rights)
            close(*fd);
    }
}

static void worker_main(int chan)
{
    own_chan = chan;
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
        struct worker_msg done = {.type = WMSG_DONE};
        if (send(chan, &done, sizeof done, MSG_NOSIGNAL) != (ssize_t)sizeof done)
            break;
    }
    _exit(0);
}

bool worker_ask(struct worker_msg *msg, int timeout_ms)
{
    static unsigned seq;
    if (own_chan < 0)
        return false;
    msg->type = WMSG_REQUEST;
    msg->seq = ++seq;
    if (send(own_chan, msg, sizeof *msg, MSG_NOSIGNAL) != (ssize_t)sizeof *msg)
        return false;
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - now_ms();
        struct pollfd p = {.fd = own_chan, .events = POLLIN};
        int rc = left > 0 ? poll(&p, 1, (int)left) : 0;
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            return false;
        struct worker_msg in;
        ssize_t got = recv(own_chan, &in, sizeof in, 0);
        if (got <= 0)
            return false;
        /* an answer that came too late for an earlier question is dropped */
        if (got == (ssize_t)sizeof in && in.type == WMSG_ANSWER && in.seq == msg->seq) {
            *msg = in;
            return true;
        }
    }
}

void worker_tell(const struct worker_msg *msg)
{
    struct worker_msg m = *msg;
    m.type = WMSG_NOTE;
    if (own_chan >= 0 && send(own_chan, &m, sizeof m, MSG_NOSIGNAL) < 0)
        log_debug("cannot report to the master: %s", strerror(errno));
}

/* ------------------------------------------------------------- master */

void pool_watch(int epoll_fd)
{
    watch_fd = epoll_fd;
}

/* Out of the epoll set first: a forked child may still hold a copy of
 * the channel, and epoll forgets a descriptor only when every copy of it
 * is closed; until then a closed number could report, then be reused. */
static void close_chan(struct worker *w)
{
    if (w->chan < 0)
        return;
    if (watch_fd >= 0)
        (void)epoll_ctl(watch_fd, EPOLL_CTL_DEL, w->chan, NULL);
    close(w->chan);
    w->chan = -1;
}

void pool_close_channels(void)
{
    for (size_t i = 0; i < nworkers; i++)
        if (workers[i].chan >= 0)
            close(workers[i].chan);   /* the child's copies only */
    if (watch_fd >= 0)
        close(watch_fd);
    watch_fd = -1;
}

/* A new worker.  client is the connection being dispatched: the child
 * must not keep its inherited copy, or that connection would stay open
 * after the session closes it (the worker lives on for more sessions). */
static struct worker *spawn(int client)
{
    int sv[2];
    if (nworkers >= max_workers ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
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
        close(client);
        pool_close_channels();   /* other workers' channels */
        worker_main(sv[1]);
    }
    close(sv[1]);
    struct worker *w = &workers[nworkers++];
    memset(w, 0, sizeof *w);
    w->pid = pid;
    w->chan = sv[0];
    w->idle_since = now_ms();
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = w->chan};
    if (watch_fd >= 0 && epoll_ctl(watch_fd, EPOLL_CTL_ADD, w->chan, &ev) != 0) {
        log_err("epoll: cannot watch a new session process: %s", strerror(errno));
        close_chan(w);   /* it reads EOF and exits; SIGCHLD removes it */
        return NULL;
    }
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
    close_chan(w);   /* the worker reads EOF and exits */
    w->busy = false;
}

static bool is_idle(const struct worker *w)
{
    return !w->busy && w->chan >= 0 && !w->retire;
}

/* The worker idle for the shortest time: reusing the same few keeps
 * their memory warm and lets the rest reach WORKER_IDLE_EXPIRE_S. */
static struct worker *idle_worker(void)
{
    struct worker *best = NULL;
    for (size_t i = 0; i < nworkers; i++)
        if (is_idle(&workers[i]) &&
            (!best || workers[i].idle_since > best->idle_since))
            best = &workers[i];
    return best;
}

/* Sessions from key's client: an IPv6 /64 counts as one client, as it
 * does for the failure table, since one host there has a whole /64 and
 * could otherwise take a service's budget with one address per session. */
static size_t sessions_from(const char *key, int service)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers; i++)
        n += workers[i].busy && workers[i].job.service == service &&
             !strcmp(workers[i].key, key);
    return n;
}

size_t pool_service_busy(int service)
{
    size_t n = 0;
    for (size_t i = 0; i < nworkers; i++)
        n += workers[i].busy && workers[i].job.service == service;
    return n;
}

/* Above 80% of its budget a service is under stress; each change is one
 * log line. */
static bool update_stress(int service, size_t busy)
{
    bool now = busy * 10 > budgets[service] * 8;
    if (now != stressed[service]) {
        stressed[service] = now;
        if (now)
            log_warn("stress: %s sessions %zu of %zu (over 80%% of %s_max_connections):"
                     " idle timeouts shortened", service_names[service], busy,
                     budgets[service], service_names[service]);
        else
            log_info("stress: %s sessions %zu of %zu: back to normal timeouts",
                     service_names[service], busy, budgets[service]);
    }
    return now;
}

enum pool_result pool_dispatch(int fd, struct worker_job *job)
{
    enum pool_result r = POOL_OK;
    int svc = job->service >= 0 && job->service < POOL_SERVICES ? job->service : 0;
    char key[sizeof workers[0].key];
    throttle_addr_key(job->addr, key, sizeof key);
    if (per_ip_limit && strcmp(job->addr, "unix") &&
        sessions_from(key, svc) >= per_ip_limit)
        return POOL_PER_IP;
    size_t busy = pool_service_busy(svc);
    if (busy >= budgets[svc])
        return POOL_SERVICE_FULL;
    if (pool_busy() >= max_workers)
        return POOL_FULL;
    job->stress = update_stress(svc, busy + 1);
    /* Two tries: an idle worker may have died a moment ago. */
    for (int attempt = 0; attempt < 2; attempt++) {
        struct worker *w = idle_worker();
        if (!w)
            w = spawn(fd);
        if (!w) {
            r = POOL_ERROR;
            break;
        }
        if (send_job(w, fd, job)) {
            w->busy = true;
            w->job = *job;
            str_copy(w->key, key, sizeof w->key);
            close(fd);
            return POOL_OK;
        }
        retire(w);
        r = POOL_ERROR;
    }
    return r;
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
        n += is_idle(&workers[i]);
    return n;
}

void pool_expire_idle(void)
{
    size_t idle = idle_count();
    if (idle <= WORKER_MAX_IDLE)
        return;
    int64_t cutoff = now_ms() - (int64_t)WORKER_IDLE_EXPIRE_S * 1000;
    for (size_t i = 0; i < nworkers && idle > WORKER_MAX_IDLE; i++)
        if (is_idle(&workers[i]) && workers[i].idle_since <= cutoff) {
            retire(&workers[i]);
            idle--;
        }
}

/* A request or note from a busy worker, about the session it serves. */
static void answer(struct worker *w, struct worker_msg *msg, size_t len)
{
    if (len != sizeof *msg || !w->busy || !handle_request ||
        (msg->type != WMSG_REQUEST && msg->type != WMSG_NOTE))
        return;   /* nothing a well-behaved worker sends: ignored */
    msg->account[sizeof msg->account - 1] = '\0';
    bool wants_answer = msg->type == WMSG_REQUEST;
    handle_request(&w->job, msg);
    if (!wants_answer)
        return;
    msg->type = WMSG_ANSWER;
    /* Never block the master: a worker that does not read its answers
     * only loses them (it then proceeds without, see worker_ask). */
    if (send(w->chan, msg, sizeof *msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        log_debug("answer to session process %ld lost: %s", (long)w->pid,
                  strerror(errno));
}

void pool_handle(int fd)
{
    struct worker *w = by_chan(fd);
    if (!w)
        return;
    struct worker_msg msg;
    ssize_t got = recv(w->chan, &msg, sizeof msg, MSG_DONTWAIT);
    if (got <= 0) {
        if (got == 0 || (errno != EINTR && errno != EAGAIN))
            retire(w);   /* exited or crashed: SIGCHLD removes it */
        return;
    }
    if (got != (ssize_t)sizeof msg || msg.type != WMSG_DONE) {
        answer(w, &msg, (size_t)got);
        return;
    }
    w->busy = false;
    w->idle_since = now_ms();
    update_stress(w->job.service, pool_service_busy(w->job.service));
    w->job.addr[0] = '\0';
    if (w->retire)
        retire(w);
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
        close_chan(&workers[i]);
        workers[i] = workers[--nworkers];
        return true;
    }
    return false;
}

void pool_retire_all(void)
{
    for (size_t i = 0; i < nworkers; i++) {
        if (workers[i].busy) {
            workers[i].retire = true;
            /* a lingering session ends, so its customer reconnects to a
             * process with the new configuration (linger.h) */
            kill(workers[i].pid, SIGUSR1);
        } else
            retire(&workers[i]);
    }
}

void pool_renew(void)
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
