/* delivery.h - the reversed session (RFC 2645 section 5): after "250 OK now
 * reversing the connection" odmrd is the SMTP client on the customer's
 * connection and delivers everything queued for the locked domains. */
#ifndef ODMR_DELIVERY_H
#define ODMR_DELIVERY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/io.h"
#include "conf.h"
#include "queue.h"

struct delivery_stats {
    unsigned long messages;      /* messages attempted */
    unsigned long sent, deferred, bounced;   /* recipients */
    uint64_t bytes;
};

struct delivery_ctx {
    const struct odmrd_conf *conf;
    struct queue *q;
    struct io *io;
    const char *account;         /* for the log */
    const char *peer;            /* customer's address, for the log */
    const char *qid;             /* message in hand, for the log, or NULL */
    /* The domains' delivery locks (.lock fds, in the order of the domains)
     * or NULL.  A session that lingers (XLINGER, linger.h) closes them
     * while it waits and takes them again to deliver; NULL: no linger. */
    int *locks;
    /* A lingering slot (linger_take_slot) the customer asked for before
     * ATRN, or -1; deliver_domains takes it over and frees it. */
    int linger_slot;
    struct delivery_stats stats;
};

/* Runs the whole reversed session: waits for the customer's 220, EHLO
 * (HELO on 5xx), delivers every message of the domains (which the caller
 * holds locked), including mail that arrives meanwhile, then QUIT.  A
 * customer that advertised XLINGER first gets new mail pushed for as long
 * as it and odmr_linger_max allow (linger.h).
 * Returns false when the connection failed (what was not acknowledged
 * stays queued). */
bool deliver_domains(struct delivery_ctx *d, char *const *domains, size_t n);

#endif
