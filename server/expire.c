/* expire.c - queue_lifetime: return what nobody collected (see expire.h). */
#include "expire.h"

#include <errno.h>
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

/* Bounces every recipient of e with 4.4.7.  Returns the bounce result. */
static enum bounce_result return_expired(const struct expire_ctx *x,
                                         const struct envelope *e, int fd)
{
    char age[32];
    bounce_format_age((long)(x->now - e->arrival), age, sizeof age);
    struct bounce_rcpt *r = calloc(e->nrcpt ? e->nrcpt : 1, sizeof *r);
    char (*diag)[EXPIRE_DIAG_MAX] = calloc(e->nrcpt ? e->nrcpt : 1,
                                           sizeof *diag);
    if (!r || !diag) {
        free(r);
        free(diag);
        log_err("%s: out of memory while returning expired mail", e->id);
        return BOUNCE_RETRY;
    }
    for (size_t i = 0; i < e->nrcpt; i++) {
        const struct env_rcpt *er = &e->rcpt[i];
        /* The last reply says why nobody took the message; worth telling. */
        snprintf(diag[i], sizeof diag[i], "delivery time expired (message was "
                 "queued for %s)%s%s", age, er->last_reply[0] ?
                 "; last attempt: " : "", er->last_reply);
        r[i] = (struct bounce_rcpt){er->addr, er->orcpt, er->notify,
                                    BOUNCE_STATUS_EXPIRED, diag[i]};
    }
    enum bounce_result res = bounce_message(x->conf, x->q, e, fd, r, e->nrcpt);
    free(r);
    free(diag);
    return res;
}

static void expire_message(const struct expire_ctx *x, struct envelope *e)
{
    char age[32];
    int fd = queue_open_data(x->q, x->domain, e->id);
    if (fd < 0)
        log_warn("%s: data file of the expired message is missing (%s); "
                 "returning the report without it", e->id, strerror(errno));
    enum bounce_result res = return_expired(x, e, fd);
    if (fd >= 0)
        close(fd);
    bounce_format_age((long)(x->now - e->arrival), age, sizeof age);
    if (res == BOUNCE_RETRY) {
        log_warn("%s: expired after %s in the queue of %s; kept until its "
                 "bounce can be queued", e->id, age, x->domain);
        return;
    }
    log_info("%s: expired after %s in the queue of %s (from=<%s>, nrcpt=%zu)",
             e->id, age, x->domain, e->sender, e->nrcpt);
    if (queue_remove(x->q, x->domain, e->id))
        log_info("%s: removed", e->id);
    else if (errno != ENOENT)
        log_err("%s: cannot remove from the queue of %s: %s", e->id,
                x->domain, strerror(errno));
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
        if (errno != ENOENT)   /* ENOENT: removed since the listing */
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
