/* linger.c - the waiting half of push delivery (see linger.h): slots,
 * the .linger lock, and one wait for mail, the customer, a stop request
 * or a timer.  What is delivered, and when, is delivery.c's business. */
#define _GNU_SOURCE   /* ppoll, F_OFD_SETLK */
#include "linger.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "../common/log.h"
#include "../common/util.h"
#include "session.h"

volatile sig_atomic_t linger_stop_requested;

/* Domain keys never contain '/' and never start with '.' (idna.h); checked
 * again because these paths are built here, not by queue.c. */
static bool domain_path(char *buf, const struct queue *q, const char *domain,
                        const char *file)
{
    if (!domain[0] || domain[0] == '.' || strchr(domain, '/'))
        return false;
    return str_fmt(buf, PATH_MAX, "%s/q/%s%s%s", q->spool, domain,
                   file ? "/" : "", file ? file : "");
}

int linger_lock_domain(const struct queue *q, const char *domain)
{
    char path[PATH_MAX];
    if (!domain_path(path, q, domain, ".linger")) {
        errno = EINVAL;
        return -1;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return err == EWOULDBLOCK ? -2 : -1;
    }
    return fd;
}

/* ------------------------------------------------------------ slots */

static bool lock_byte(int fd, unsigned long i)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = (off_t)i, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

/* The inotify instance of the slot taken in this process.  Made with the
 * slot, because the kernel allows each user only
 * fs.inotify.max_user_instances of them (128 by default) and every
 * session runs as odmrd's user: a customer beyond that is told 451 at
 * XLINGER and polls, instead of being granted push that then cannot
 * start.  A slot granted and not used (no ATRN, or no XLINGER in the
 * customer's EHLO reply) gives it back at the end of the session
 * (linger_drop_reserve): workers serve many sessions, and each keeping
 * one would use up the user's instances with no session lingering. */
static int reserved_notify_fd = -1;

void linger_drop_reserve(void)
{
    if (reserved_notify_fd >= 0)
        close(reserved_notify_fd);
    reserved_notify_fd = -1;
}

static bool reserve_notify(void)
{
    if (reserved_notify_fd >= 0)
        return true;
    reserved_notify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (reserved_notify_fd >= 0)
        return true;
    if (errno == EMFILE)
        log_err("XLINGER refused: no inotify instance left for odmrd's "
                "user; raise the kernel's fs.inotify.max_user_instances "
                "above odmr_max_lingering (admin guide, Push delivery)");
    else
        log_err("XLINGER refused: inotify: %s", strerror(errno));
    return false;
}

/* The first free byte among the first odmr_max_lingering: a session
 * takes one once, so a linear search is cheap. */
int linger_take_slot(const struct odmrd_conf *conf)
{
    char path[PATH_MAX];
    if (!str_fmt(path, sizeof path, "%s/linger.slots", conf->spool_dir))
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        log_err("XLINGER: cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    for (unsigned long i = 0; i < conf->odmr_max_lingering; i++) {
        if (lock_byte(fd, i)) {
            if (reserve_notify())
                return fd;
            close(fd);
            return -1;
        }
        if (errno != EAGAIN && errno != EACCES) {
            log_err("XLINGER: cannot lock %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
    }
    close(fd);
    return -2;
}

/* ------------------------------------------------------------ watches */

static bool watch_domains(struct linger_watch *lg, const struct queue *q,
                          char *const *domains, size_t n)
{
    lg->notify_fd = reserved_notify_fd >= 0
                        ? reserved_notify_fd
                        : inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    reserved_notify_fd = -1;
    if (lg->notify_fd < 0) {
        log_err("XLINGER: inotify: %s", strerror(errno));
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char dir[PATH_MAX];
        /* IN_MOVED_TO: an envelope or queue file renamed into place (a
         * commit, a release from the quarantine); IN_CREATE: a queue file
         * linked into place (written unnamed, server/queue.c); the rest:
         * the directory is gone */
        uint32_t mask = IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF |
                        IN_ONLYDIR | IN_DONT_FOLLOW;
        lg->wd[i] = domain_path(dir, q, domains[i], NULL)
                        ? inotify_add_watch(lg->notify_fd, dir, mask) : -1;
        if (lg->wd[i] < 0) {
            log_err("XLINGER: cannot watch %s: %s", dir, strerror(errno));
            return false;
        }
        lg->n = i + 1;
    }
    return true;
}

bool linger_begin(struct linger_watch *lg, int slot_fd, const struct queue *q,
                  char *const *domains, size_t n)
{
    memset(lg, 0, sizeof *lg);
    lg->slots_fd = slot_fd;
    lg->notify_fd = -1;
    if (n > LINGER_DOMAINS_MAX) {
        log_info("XLINGER ignored: more than %d domains", LINGER_DOMAINS_MAX);
        linger_end(lg);
        return false;
    }
    if (watch_domains(lg, q, domains, n))
        return true;
    linger_end(lg);
    return false;
}

void linger_end(struct linger_watch *lg)
{
    if (lg->notify_fd >= 0)
        close(lg->notify_fd);   /* drops the watches */
    if (lg->slots_fd >= 0)
        close(lg->slots_fd);    /* the last close frees the OFD lock */
    lg->notify_fd = lg->slots_fd = -1;
    lg->n = 0;
}

/* ------------------------------------------------------------ waiting */

static size_t domain_of(const struct linger_watch *lg, int wd)
{
    for (size_t i = 0; i < lg->n; i++)
        if (lg->wd[i] == wd)
            return i;
    return lg->n;
}

static bool is_envelope(const struct inotify_event *ev)
{
    return ev->len && queue_name_commits(ev->name);
}

/* Reads every pending event.  The queue is re-read anyway, so an overflow
 * only means "look at every domain". */
static enum linger_wake read_events(struct linger_watch *lg, bool *mail)
{
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool any = false;
    for (;;) {
        ssize_t got = read(lg->notify_fd, buf, sizeof buf);
        if (got <= 0)
            return got < 0 && errno != EAGAIN && errno != EINTR ? LINGER_FAIL
                   : any ? LINGER_MAIL : LINGER_TIMER;
        for (char *p = buf; p < buf + got;) {
            const struct inotify_event *ev = (const void *)p;
            p += sizeof *ev + ev->len;
            if (ev->mask & IN_Q_OVERFLOW) {
                for (size_t i = 0; i < lg->n; i++)
                    mail[i] = true;
                any = true;
                continue;
            }
            size_t i = domain_of(lg, ev->wd);
            if (i == lg->n)
                continue;
            if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED))
                return LINGER_GONE;
            if (is_envelope(ev))
                mail[i] = any = true;
        }
    }
}

static bool stop_wanted(void)
{
    return session_stop_requested || linger_stop_requested;
}

enum linger_wake linger_wait(struct linger_watch *lg, const struct io *io,
                             int64_t until_ms, bool *mail)
{
    /* Data the customer sent is already buffered: nothing to wait for. */
    if (io_pending(io))
        return LINGER_PEER;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGUSR1);
    /* The stop flags are tested with the signals blocked and ppoll
     * unblocks them atomically: a signal can never slip in between. */
    sigprocmask(SIG_BLOCK, &block, &old);
    enum linger_wake w = LINGER_TIMER;
    for (;;) {
        if (stop_wanted()) {
            w = LINGER_STOP;
            break;
        }
        int64_t left = until_ms - io_clock_ms();
        if (left <= 0)
            break;
        struct pollfd p[2] = {{.fd = io->fd, .events = POLLIN},
                              {.fd = lg->notify_fd, .events = POLLIN}};
        struct timespec ts = {left / 1000, (long)(left % 1000) * 1000000};
        int rc = ppoll(p, 2, &ts, &old);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0) {
            log_err("XLINGER: wait: %s", strerror(errno));
            w = LINGER_FAIL;
            break;
        }
        if (rc > 0 && p[0].revents) {
            w = LINGER_PEER;
            break;
        }
        if (rc > 0 && p[1].revents &&
            (w = read_events(lg, mail)) != LINGER_TIMER)
            break;
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    return w;
}
