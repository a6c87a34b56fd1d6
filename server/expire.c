/* expire.c - queue_lifetime: return what nobody collected (see expire.h). */
#include "expire.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../common/log.h"
#include "../common/util.h"
#include "bounce.h"

/* Hex digits of the arrival second at the start of a queue id. */
#define QID_TIME_DIGITS 8
/* "delivery time expired (message was queued for 12 minutes); last
 * attempt: " + the last reply. */
#define EXPIRE_DIAG_MAX (LAST_REPLY_MAX + 128)

struct expire_ctx {
    const struct odmrd_conf *conf;
    struct queue *q;
    const char *domain;
    time_t now, cutoff;      /* arrival before cutoff = expired */
};

/* Queue ids begin with the second the message started to arrive
 * (queue_new_id), and the envelope's arrival time is set at commit, later:
 * an id that is not older than the cutoff names a message that cannot have
 * expired, so its envelope need not be read.  This keeps a run over a big
 * queue down to directory listings. */
static bool id_too_young(const char *id, time_t cutoff)
{
    char hex[QID_TIME_DIGITS + 1], *end;
    if (strlen(id) < QID_TIME_DIGITS)
        return false;
    memcpy(hex, id, QID_TIME_DIGITS);
    hex[QID_TIME_DIGITS] = '\0';
    unsigned long long t = strtoull(hex, &end, 16);
    return *end == '\0' && (long long)t >= (long long)cutoff;
}

/* A message for several hosted domains is held once per domain, each copy
 * with its domain's recipients.  The copies expire together (same arrival),
 * and the sender sent one message, so one report covers them all. */
#define MAX_COPIES 16

struct copies {
    size_t n;                       /* [0] is the copy being expired */
    struct envelope *env[MAX_COPIES];
    struct envelope other[MAX_COPIES];
    int lock[MAX_COPIES];           /* -1 for [0]: its domain is locked */
    size_t nrcpt;
};

struct find_ctx {
    const struct expire_ctx *x;
    struct copies *k;
    const char *id;
};

/* queue_find callback: locks and loads the copy in domain, unless it is
 * the one at hand or being delivered (then it expires on its own later). */
static int add_copy(void *ctx, const char *domain)
{
    struct find_ctx *f = ctx;
    struct copies *k = f->k;
    char err[PATH_MAX + 128];
    if (!strcmp(domain, f->x->domain) || k->n == MAX_COPIES)
        return 0;
    int lock = queue_lock_domain(f->x->q, domain);
    if (lock < 0)
        return 0;
    struct envelope *e = &k->other[k->n];
    envelope_init(e);
    if (!queue_load(f->x->q, domain, f->id, e, err, sizeof err) ||
        e->arrival >= f->x->cutoff) {
        envelope_free(e);
        close(lock);
        return 0;
    }
    k->env[k->n] = e;
    k->lock[k->n] = lock;
    k->nrcpt += e->nrcpt;
    k->n++;
    return 0;
}

static void find_copies(const struct expire_ctx *x, struct envelope *e,
                        struct copies *k)
{
    memset(k, 0, sizeof *k);
    k->env[0] = e;
    k->lock[0] = -1;
    k->nrcpt = e->nrcpt;
    k->n = 1;
    struct find_ctx f = {x, k, e->id};
    queue_find(x->q, e->id, add_copy, &f);   /* no other copy on failure */
}

static void release_copies(struct copies *k)
{
    for (size_t i = 1; i < k->n; i++) {
        envelope_free(&k->other[i]);
        close(k->lock[i]);
    }
}

/* Bounces every recipient of every copy with 4.4.7. */
static enum bounce_result return_expired(const struct expire_ctx *x,
                                         const struct copies *k, int fd)
{
    char age[32];
    const struct envelope *e0 = k->env[0];
    bounce_format_age((long)(x->now - e0->arrival), age, sizeof age);
    size_t total = k->nrcpt ? k->nrcpt : 1, n = 0;
    struct bounce_rcpt *r = calloc(total, sizeof *r);
    char (*diag)[EXPIRE_DIAG_MAX] = calloc(total, sizeof *diag);
    if (!r || !diag) {
        free(r);
        free(diag);
        log_err("%s: out of memory while returning expired mail", e0->id);
        return BOUNCE_RETRY;
    }
    for (size_t c = 0; c < k->n; c++)
        for (size_t i = 0; i < k->env[c]->nrcpt; i++, n++) {
            const struct env_rcpt *er = &k->env[c]->rcpt[i];
            /* The last reply says why nobody took the message. */
            snprintf(diag[n], sizeof diag[n], "delivery time expired (message "
                     "was queued for %s)%s%s", age, er->last_reply[0] ?
                     "; last attempt: " : "", er->last_reply);
            r[n] = (struct bounce_rcpt){er->addr, er->orcpt, er->notify,
                                        BOUNCE_STATUS_EXPIRED, diag[n]};
        }
    enum bounce_result res = bounce_message(x->conf, x->q, e0, fd, r, n);
    free(r);
    free(diag);
    return res;
}

static void remove_expired(const struct expire_ctx *x, const struct envelope *e,
                           const char *age)
{
    log_info("%s: expired after %s in the queue of %s (from=<%s>, nrcpt=%zu)",
             e->id, age, e->domain, e->sender, e->nrcpt);
    if (queue_remove(x->q, e->domain, e->id))
        log_info("%s: removed", e->id);
    else if (errno != ENOENT)
        log_err("%s: cannot remove from the queue of %s: %s", e->id,
                e->domain, strerror(errno));
}

static void expire_message(const struct expire_ctx *x, struct envelope *e)
{
    char age[32];
    struct copies k;
    find_copies(x, e, &k);
    int fd = queue_open_data(x->q, x->domain, e->id);
    if (fd < 0)
        log_warn("%s: data file of the expired message is missing (%s); "
                 "returning the report without it", e->id, strerror(errno));
    enum bounce_result res = return_expired(x, &k, fd);
    if (fd >= 0)
        close(fd);
    bounce_format_age((long)(x->now - e->arrival), age, sizeof age);
    if (res == BOUNCE_RETRY)
        log_warn("%s: expired after %s in the queue of %s; kept until its "
                 "bounce can be queued", e->id, age, x->domain);
    else
        for (size_t i = 0; i < k.n; i++)
            remove_expired(x, k.env[i], age);
    release_copies(&k);
}

static int expire_id(void *ctx, const char *id)
{
    const struct expire_ctx *x = ctx;
    char err[PATH_MAX + 128];
    struct envelope e;
    if (id_too_young(id, x->cutoff))
        return 0;
    envelope_init(&e);
    errno = 0;
    if (!queue_load(x->q, x->domain, id, &e, err, sizeof err)) {
        /* ENOENT: removed since the listing.  EINVAL: damaged (a parse
         * error, or it names another message): it would never be
         * delivered nor expire, so it goes where an administrator can
         * look at it, as Postfix's "corrupt" queue does. */
        char where[PATH_MAX];
        if (errno == EINVAL && queue_quarantine(x->q, x->domain, id, where,
                                                sizeof where))
            log_warn("%s: damaged envelope in the queue of %s (%s); message "
                     "moved to %s", id, x->domain, err, where);
        else if (errno != ENOENT)
            log_warn("%s: cannot read the envelope in the queue of %s: %s",
                     id, x->domain, err);
    } else if (e.arrival < x->cutoff) {
        expire_message(x, &e);
    }
    envelope_free(&e);
    return 0;
}

static int expire_domain(void *ctx, const char *domain)
{
    struct expire_ctx *x = ctx;
    int lock = queue_lock_domain(x->q, domain);
    if (lock == -2) {
        log_debug("expiry: %s is being delivered, skipped this time", domain);
        return 0;
    }
    if (lock < 0) {
        log_warn("expiry: cannot lock the queue of %s: %s", domain,
                 strerror(errno));
        return 0;
    }
    x->domain = domain;
    if (queue_ids(x->q, domain, expire_id, x) < 0)
        log_warn("expiry: cannot list the queue of %s: %s", domain,
                 strerror(errno));
    close(lock);
    return 0;
}

void queue_expire(const struct odmrd_conf *conf, struct queue *q)
{
    struct expire_ctx x = {conf, q, NULL, time(NULL), 0};
    x.cutoff = x.now - conf->queue_lifetime;
    if (queue_domains(q, expire_domain, &x) < 0 && errno != ENOENT)
        log_warn("expiry: cannot list the queue in %s: %s", q->spool,
                 strerror(errno));
}
