/* target.h - delivery targets behind the reversed SMTP session.
 *
 * The receiver (receiver.c) turns odmrd's transaction into calls here and
 * answers odmrd with the replies these calls produce, so that every
 * acknowledgement odmrd gets reflects what the site's mail system said:
 *
 *   target_open      once after the reversal, before our 220: connects
 *                    (smtp/lmtp) and learns what we may advertise
 *   target_mail      MAIL FROM            -> reply for MAIL
 *   target_rcpt      RCPT TO (accepted)   -> reply for RCPT
 *   target_data      DATA                 -> 354, or a failure reply
 *   target_write     message bytes, dot-stuffing undone, CRLF lines
 *   target_end       end of data          -> the reply to the final dot,
 *                    2xx only once the message is safe at the target;
 *                    abort = true throws the message away (bare CR/LF)
 *   target_reset     RSET / transaction abandoned
 *   target_close     QUIT towards the target, free everything
 *   target_group     optional: MAIL, RCPTs and DATA that odmrd pipelined,
 *                    passed on as one group where the target takes
 *                    pipelining (RFC 2920), with the replies the separate
 *                    calls would have given; saves the round trips to the
 *                    site's server that would otherwise follow each other
 *   target_end_group optional: the end of one message and the next group
 *                    together (RFC 2920 3.1: message content may begin a
 *                    group)
 *
 * Replies are complete SMTP reply lines with an enhanced status code.  A
 * target never answers 421 (that code would mean *we* close odmrd's
 * connection): trouble at the target is 451/452, so odmrd keeps the
 * mail, or 5xx when the site's mail system refused it for good. */
#ifndef ODMR_TARGET_H
#define ODMR_TARGET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/smtp.h"
#include "fetch.h"

/* Recipients in one transaction (SPEC 3.1's max_recipients default). */
#define TARGET_RCPT_MAX 1000

struct reply {
    int code;
    char line[SMTP_REPLY_LINE_MAX - 2];  /* "250 2.0.0 Ok"; CRLF makes 512 */
};

void reply_set(struct reply *r, int code, const char *fmt, ...)
    PRINTF_LIKE(3, 4);
/* Takes a reply of the site's mail system over for odmrd: first line
 * only, cleaned, an enhanced code added when it has none, 421 turned into
 * 451, and anything outside 2xx/4xx/5xx (or 354 when want_354) into 451. */
void reply_relay(struct reply *r, const struct smtp_reply *from,
                 bool want_354);

/* What the receiver may advertise in its EHLO reply. */
struct target_caps {
    bool eightbit, smtputf8, dsn;
    uint64_t size;                    /* 0 = no limit announced */
};

struct target;

/* One recipient of a group: reply receives the target's answer. */
struct group_rcpt {
    const struct rcpt_args *args;
    const char *addr;                 /* formatted, as for target_rcpt */
    struct reply reply;
};

/* MAIL, the recipients and, when data is true, DATA.  After it, unless
 * the MAIL and at least one RCPT were accepted and DATA got 354, the
 * target is not in the data: it answered anything but 354 or took an
 * empty message back (a server may say 354 with no recipient, RFC 2920
 * 3.1), and data_reply says which. */
struct target_group {
    const struct mail_args *mail;
    struct group_rcpt *rcpt;
    size_t nrcpt;
    bool data;
    struct reply mail_reply, data_reply;
};

struct target_ops {
    bool (*open)(struct target *t, char *err, size_t n);
    void (*mail)(struct target *t, const struct mail_args *m, struct reply *r);
    void (*rcpt)(struct target *t, const struct rcpt_args *a,
                 const char *addr, struct reply *r);
    void (*data)(struct target *t, struct reply *r);
    bool (*write)(struct target *t, const char *p, size_t len);
    void (*end)(struct target *t, bool abort, struct reply *r);
    void (*reset)(struct target *t);
    void (*close)(struct target *t);
    void (*group)(struct target *t, struct target_group *g);   /* or NULL */
    /* Or NULL: end (without abort) and then group, both in one write when
     * the target pipelines; r receives the reply to the data. */
    void (*end_group)(struct target *t, struct reply *r, struct target_group *g);
};

struct target {
    const struct target_ops *ops;
    const struct target_spec *spec;
    const struct fetch_conf *conf;
    struct target_caps caps;
    void *impl;                       /* the kind's own state */
};

extern const struct target_ops target_smtp_ops;
extern const struct target_ops target_mda_ops;
extern const struct target_ops target_maildir_ops;

/* Sets t up for c->target (no I/O yet). */
void target_init(struct target *t, const struct fetch_conf *c);

static inline bool target_open(struct target *t, char *err, size_t n)
{
    return t->ops->open(t, err, n);
}

/* Kills a running mda: command (async-signal-safe: for the handler of
 * SIGTERM and friends, so that no command sees a cut message end). */
void target_mda_kill(void);

/* ---- helpers shared by the kinds (deliver.c) ---- */

/* Appends s shell-quoted ('...' with ' as '\'') to buf of size n at *len;
 * false when it does not fit. */
bool shell_quote_append(char *buf, size_t n, size_t *len, const char *s);

#endif
