/* delivery.c - odmrd as SMTP client on the reversed ODMR connection.
 *
 * Per message: MAIL, RCPT for each recipient, DATA (pipelined when the
 * customer offers PIPELINING), the data streamed from the queue file with
 * dot-stuffing.  Per recipient: 2xx delivered, 4xx kept, 5xx returned to
 * the sender.  The outcome is made durable in this order: bounces first,
 * then the envelope rewritten (or removed when nobody is left), so a crash
 * at any point can at worst repeat a delivery, never lose one.
 *
 * Every wait for the customer names what it waited for when it fails, as
 * Postfix does: "timeout after RCPT TO to customer 192.0.2.1", "lost
 * connection after DATA with customer 192.0.2.1" (phase names below). */
#include "delivery.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../common/log.h"
#include "../common/smtp.h"
#include "../common/util.h"
#include "accounts.h"
#include "bounce.h"
#include "downgrade.h"
#include "linger.h"
#include "session.h"

#define REPLY_LINE_MAX 1024
#define MAX_PASSES 100            /* rescans for mail that arrived meanwhile */
#define DATA_READ 65536

struct caps {
    bool esmtp, pipelining, eightbit, smtputf8, dsn;
    uint64_t size;               /* 0 = no limit announced */
    unsigned long linger;        /* XLINGER seconds, 0 = not offered */
};

enum outcome { OUT_NONE = 0, OUT_SENT, OUT_DEFER, OUT_BOUNCE };

struct rcpt_state {
    enum outcome out;
    const char *status;          /* OUT_BOUNCE decided here, not by a reply */
    char reply[LAST_REPLY_MAX + 1];
};

/* Phases of the reversed session: what odmrd last said (the greeting is
 * awaited after our reply to ATRN). */
#define PH_GREETING "ATRN"
#define PH_MAIL "MAIL FROM"
#define PH_RCPT "RCPT TO"
#define PH_DATA "DATA"
#define PH_DOT "END-OF-MESSAGE"

/* ------------------------------------------------------------ failures */

static const char *qid_prefix(const struct delivery_ctx *d)
{
    return d->qid ? d->qid : "";
}

static const char *qid_sep(const struct delivery_ctx *d)
{
    return d->qid ? ": " : "";
}

/* The connection failed in phase: one line saying how (Postfix style). */
static void log_conn_failure(struct delivery_ctx *d, const char *phase)
{
    if (d->io->status == IO_TIMEOUT)
        log_info("%s%stimeout after %s to customer %s", qid_prefix(d),
                 qid_sep(d), phase, d->peer);
    else if (d->io->status == IO_DEADLINE)
        log_info("%s%scustomer %s too slow during %s (deadline exceeded)",
                 qid_prefix(d), qid_sep(d), d->peer, phase);
    else
        log_info("%s%slost connection after %s with customer %s",
                 qid_prefix(d), qid_sep(d), phase, d->peer);
}

/* ------------------------------------------------------------ replies */

/* Each line of a reply has its own deadline (command_deadline); once the
 * first is in, the rest must follow within the timeout, or a customer
 * could hold the domain's lock for hours with a long reply. */
static bool read_reply_lines(struct delivery_ctx *d, struct smtp_reply *r,
                             const char *phase)
{
    char line[REPLY_LINE_MAX];
    for (;;) {
        long n = io_getline(d->io, line, sizeof line, NULL);
        if (n == IO_TOOLONG) {
            /* RFC 5321 allows 512 octets; be liberal in what we accept:
             * the code at the start is what counts, and dropping the
             * session after the customer said 250 would deliver twice. */
            d->io->status = IO_OK;
            n = (long)strlen(line);
            log_info("%s%sover-long reply line from customer %s, cut to %ld "
                     "bytes", qid_prefix(d), qid_sep(d), d->peer, n);
        }
        if (n < 0) {
            log_conn_failure(d, phase);
            return false;
        }
        if (strlen(line) != (size_t)n) {
            log_info("%s%smalformed reply to %s from customer %s: NUL byte",
                     qid_prefix(d), qid_sep(d), phase, d->peer);
            return false;
        }
        int rc = smtp_reply_feed(r, line);
        if (rc < 0) {
            log_info("%s%smalformed reply to %s from customer %s: %.100s",
                     qid_prefix(d), qid_sep(d), phase, d->peer, line);
            return false;
        }
        if (rc == 1)
            return true;
        if (r->nlines == 1)
            io_deadline_within_timeout(d->io);
    }
}

/* Reads one complete reply to phase; false (logged) on I/O failure or a
 * malformed reply. */
static bool read_reply(struct delivery_ctx *d, struct smtp_reply *r,
                       const char *phase)
{
    smtp_reply_init(r);
    bool ok = read_reply_lines(d, r, phase);
    io_set_deadline(d->io, 0);
    return ok;
}

/* "550 5.1.1 text" on one line, for logs, envelopes and DSNs. */
static void reply_text(const struct smtp_reply *r, char *buf, size_t n)
{
    char first[LAST_REPLY_MAX + 1];
    str_copy(first, r->text, sizeof first);
    char *nl = strchr(first, '\n');
    if (nl)
        *nl = '\0';
    str_fmt(buf, n, "%d %s", r->code, first);   /* truncation is fine */
}

static enum outcome classify(int code)
{
    return code >= 200 && code < 300 ? OUT_SENT
           : code >= 500             ? OUT_BOUNCE
                                     : OUT_DEFER;
}

/* ------------------------------------------------------------ session */

/* Queues a command line (sent when the buffer fills or on flush). */
static bool send_line(struct delivery_ctx *d, const char *line,
                      const char *phase)
{
    log_debug("%s > %s", d->peer, line);
    if (io_puts(d->io, line) && io_puts(d->io, "\r\n"))
        return true;
    log_conn_failure(d, phase);
    return false;
}

static bool flush(struct delivery_ctx *d, const char *phase)
{
    if (io_flush(d->io))
        return true;
    log_conn_failure(d, phase);
    return false;
}

/* One command, one reply: the dialogue without pipelining. */
static bool ask(struct delivery_ctx *d, const char *line, const char *phase,
                struct smtp_reply *r)
{
    return send_line(d, line, phase) && flush(d, phase) &&
           read_reply(d, r, phase);
}

static void parse_caps(const struct smtp_reply *r, struct caps *c)
{
    char params[64];
    c->pipelining = smtp_ehlo_has(r, "PIPELINING", NULL, 0);
    c->eightbit = smtp_ehlo_has(r, "8BITMIME", NULL, 0);
    c->smtputf8 = smtp_ehlo_has(r, "SMTPUTF8", NULL, 0);
    c->dsn = smtp_ehlo_has(r, "DSN", NULL, 0);
    c->size = 0;
    if (smtp_ehlo_has(r, "SIZE", params, sizeof params)) {
        unsigned long v;
        if (parse_ulong(params, 0xFFFFFFFFUL, &v))
            c->size = v;
    }
    c->linger = 0;
    if (smtp_ehlo_has(r, "XLINGER", params, sizeof params)) {
        unsigned long v;
        if (parse_ulong(params, 366UL * 86400, &v))   /* a year is plenty */
            c->linger = v;
    }
}

/* Waits for the customer's greeting and says EHLO (HELO after a 5xx). */
static bool open_session(struct delivery_ctx *d, struct caps *c)
{
    struct smtp_reply r;
    char line[300];
    if (!flush(d, PH_GREETING) || !read_reply(d, &r, PH_GREETING))
        return false;
    if (r.code != 220) {
        reply_text(&r, line, sizeof line);
        log_info("%s: customer greeting was not 220: %s", d->peer, line);
        return false;
    }
    snprintf(line, sizeof line, "EHLO %s", d->conf->hostname);
    if (!ask(d, line, "EHLO", &r))
        return false;
    memset(c, 0, sizeof *c);
    if (r.code == 250) {
        c->esmtp = true;
        parse_caps(&r, c);
        return true;
    }
    const char *verb = "EHLO";
    if (r.code >= 500) {   /* an SMTP server without extensions */
        verb = "HELO";
        snprintf(line, sizeof line, "HELO %s", d->conf->hostname);
        if (!ask(d, line, verb, &r))
            return false;
        if (r.code == 250)
            return true;
    }
    reply_text(&r, line, sizeof line);
    log_info("%s: customer refused %s: %s", d->peer, verb, line);
    return false;
}

/* ------------------------------------------------------------ message */

/* size: of the data as it will be sent (after any 7-bit conversion). */
static void mail_command(const struct caps *c, const struct envelope *e,
                         uint64_t size, char *buf, size_t n)
{
    size_t len = (size_t)snprintf(buf, n, "MAIL FROM:<%s>", e->sender);
    if (c->size && len < n)
        len += (size_t)snprintf(buf + len, n - len, " SIZE=%llu",
                                (unsigned long long)size);
    if (c->eightbit && e->body != BODY_UNSPEC && len < n)
        len += (size_t)snprintf(buf + len, n - len, " BODY=%s",
                                e->body == BODY_8BITMIME ? "8BITMIME" : "7BIT");
    if (c->smtputf8 && e->smtputf8 && len < n)
        len += (size_t)snprintf(buf + len, n - len, " SMTPUTF8");
    if (c->dsn && e->ret != RET_UNSPEC && len < n)
        len += (size_t)snprintf(buf + len, n - len, " RET=%s",
                                e->ret == RET_FULL ? "FULL" : "HDRS");
    if (c->dsn && e->envid[0] && len < n)
        snprintf(buf + len, n - len, " ENVID=%s", e->envid);
}

static void notify_text(unsigned bits, char *buf, size_t n)
{
    buf[0] = '\0';
    if (bits & DSN_NOTIFY_NEVER) {
        str_copy(buf, "NEVER", n);
        return;
    }
    static const struct { unsigned bit; const char *name; } names[] = {
        {DSN_NOTIFY_SUCCESS, "SUCCESS"}, {DSN_NOTIFY_FAILURE, "FAILURE"},
        {DSN_NOTIFY_DELAY, "DELAY"}};
    for (size_t i = 0; i < 3; i++) {
        if (!(bits & names[i].bit))
            continue;
        if (buf[0])
            strncat(buf, ",", n - strlen(buf) - 1);
        strncat(buf, names[i].name, n - strlen(buf) - 1);
    }
}

static void rcpt_command(const struct caps *c, const struct env_rcpt *r,
                         char *buf, size_t n)
{
    size_t len = (size_t)snprintf(buf, n, "RCPT TO:<%s>", r->addr);
    if (c->dsn && r->notify && len < n) {
        char nt[64];
        notify_text(r->notify, nt, sizeof nt);
        len += (size_t)snprintf(buf + len, n - len, " NOTIFY=%s", nt);
    }
    if (c->dsn && r->orcpt[0] && len < n)
        snprintf(buf + len, n - len, " ORCPT=%s", r->orcpt);
}

/* Dot-stuffs (RFC 5321 4.5.2) whatever is written through it. */
struct stuffer {
    struct delivery_ctx *d;
    bool line_start, last_lf;
};

static bool stuff_write(void *ctx, const char *p, size_t len)
{
    struct stuffer *st = ctx;
    const char *end = p + len;
    while (p < end) {
        if (st->line_start && *p == '.' && !io_write(st->d->io, ".", 1))
            return false;
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl + 1 : end;
        if (!io_write(st->d->io, p, (size_t)(stop - p)))
            return false;
        st->line_start = nl != NULL;
        p = stop;
    }
    if (len)
        st->last_lf = end[-1] == '\n';
    st->d->stats.bytes += len;
    return true;
}

/* Streams the data file (converted to 7 bit when plan says so) and the
 * final "." into the output buffer (the caller flushes).  A failure ends
 * the session either way: the customer holds a partial message that only
 * closing the connection takes back. */
/* Sends the message: the first len octets of fd (a queue file holds its
 * envelope after them). */
static bool send_data(struct delivery_ctx *d, int fd, uint64_t len,
                      const struct dg_plan *plan)
{
    static char buf[DATA_READ];
    struct stuffer st = {d, true, true};
    bool ok = true;
    if (plan->convert) {
        ok = downgrade_write(fd, plan, stuff_write, &st);
    } else {
        ssize_t got;
        while (ok && len > 0 &&
               (got = read(fd, buf, len < sizeof buf ? (size_t)len : sizeof buf)) != 0) {
            if (got < 0 && errno == EINTR)
                continue;
            ok = got > 0 && stuff_write(&st, buf, (size_t)got);
            if (ok)
                len -= (uint64_t)got;
        }
        if (ok && len > 0) {
            errno = EIO;    /* shrank since open_message: never a cut 250 */
            ok = false;
        }
    }
    if (ok && !st.last_lf)
        ok = io_write(d->io, "\r\n", 2);
    if (ok && io_puts(d->io, ".\r\n"))
        return true;
    if (d->io->status != IO_OK)
        log_conn_failure(d, PH_DATA);
    else
        log_err("%s: cannot read message data: %s; ending the session",
                qid_prefix(d), strerror(errno));
    return false;
}

/* Sets the outcome of every recipient currently in state only_if. */
static void set_all(struct rcpt_state *st, size_t n, enum outcome only_if,
                    enum outcome out, const char *reply)
{
    for (size_t i = 0; i < n; i++) {
        if (st[i].out != only_if)
            continue;
        st[i].out = out;
        str_copy(st[i].reply, reply, sizeof st[i].reply);
    }
}

/* Sends MAIL and the RCPTs, and, when pipelining, DATA too: RFC 2920
 * lets all of them go in one write. */
static bool send_envelope(struct delivery_ctx *d, const struct caps *c,
                          const struct envelope *e, uint64_t size)
{
    char cmd[SMTP_MAILRCPT_LINE_MAX];
    mail_command(c, e, size, cmd, sizeof cmd);
    if (!send_line(d, cmd, PH_MAIL))
        return false;
    for (size_t i = 0; i < e->nrcpt; i++) {
        rcpt_command(c, &e->rcpt[i], cmd, sizeof cmd);
        if (!send_line(d, cmd, PH_RCPT))
            return false;
    }
    /* the customer has not taken even the MAIL command when this fails */
    return send_line(d, "DATA", PH_DATA) && flush(d, PH_MAIL);
}

/* Reads one reply to phase; text receives it in one-line form. */
static bool next_reply(struct delivery_ctx *d, const char *phase, int *code,
                       char *text, size_t n)
{
    struct smtp_reply r;
    if (!read_reply(d, &r, phase))
        return false;
    *code = r.code;
    reply_text(&r, text, n);
    return true;
}

/* The reply to DATA.  After a 354 nothing can be due from the customer
 * until the final dot: more input then is a reply out of turn, which
 * would be taken for the dot's - and a message removed on a 250 that
 * was not for it. */
static bool read_data_reply(struct delivery_ctx *d, int *code, char *text,
                            size_t n)
{
    if (!next_reply(d, PH_DATA, code, text, n))
        return false;
    if (*code == 354 && io_pending(d->io) != 0) {
        log_info("%s%scustomer %s sent more after its 354 to DATA: protocol "
                 "error", qid_prefix(d), qid_sep(d), d->peer);
        return false;
    }
    return true;
}

/* Applies the reply to DATA (anything but 354 ends the transaction). */
static bool data_reply(struct rcpt_state *st, size_t n, int code,
                       const char *text)
{
    if (code == 354)
        return true;
    enum outcome out = classify(code);
    set_all(st, n, OUT_SENT, out == OUT_SENT ? OUT_DEFER : out, text);
    return false;
}

static size_t count_accepted(const struct rcpt_state *st, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += st[i].out == OUT_SENT;
    return k;
}

/* Pipelined transaction up to the data; sent: the commands went already,
 * behind the previous message.  *go: the data should follow. */
static bool envelope_pipelined(struct delivery_ctx *d, const struct caps *c,
                               const struct envelope *e, uint64_t size,
                               struct rcpt_state *st, bool sent, bool *go)
{
    char mail_text[LAST_REPLY_MAX + 1], text[LAST_REPLY_MAX + 1];
    int mail_code, code;
    if ((!sent && !send_envelope(d, c, e, size)) ||
        !next_reply(d, PH_MAIL, &mail_code, mail_text, sizeof mail_text))
        return false;
    for (size_t i = 0; i < e->nrcpt; i++) {
        if (!next_reply(d, PH_RCPT, &code, st[i].reply, sizeof st[i].reply))
            return false;
        st[i].out = classify(code);
    }
    if (mail_code / 100 != 2) {
        /* the RCPT replies only echo the failed MAIL */
        for (size_t i = 0; i < e->nrcpt; i++)
            st[i].out = OUT_NONE;
        set_all(st, e->nrcpt, OUT_NONE, classify(mail_code), mail_text);
    }
    if (!read_data_reply(d, &code, text, sizeof text))
        return false;
    if (count_accepted(st, e->nrcpt) == 0) {
        /* A server may still say 354 (RFC 2920 3.1): end the empty data. */
        return code != 354 || (send_line(d, ".", PH_DOT) && flush(d, PH_DOT) &&
                               next_reply(d, PH_DOT, &code, text, sizeof text));
    }
    *go = data_reply(st, e->nrcpt, code, text);
    return true;
}

/* The same, one command at a time. */
static bool envelope_stepwise(struct delivery_ctx *d, const struct caps *c,
                              const struct envelope *e, uint64_t size,
                              struct rcpt_state *st, bool *go)
{
    char cmd[SMTP_MAILRCPT_LINE_MAX], text[LAST_REPLY_MAX + 1];
    int code;
    mail_command(c, e, size, cmd, sizeof cmd);
    if (!send_line(d, cmd, PH_MAIL) || !flush(d, PH_MAIL) ||
        !next_reply(d, PH_MAIL, &code, text, sizeof text))
        return false;
    if (code / 100 != 2) {
        set_all(st, e->nrcpt, OUT_NONE, classify(code), text);
        return true;
    }
    for (size_t i = 0; i < e->nrcpt; i++) {
        rcpt_command(c, &e->rcpt[i], cmd, sizeof cmd);
        if (!send_line(d, cmd, PH_RCPT) || !flush(d, PH_RCPT) ||
            !next_reply(d, PH_RCPT, &code, st[i].reply, sizeof st[i].reply))
            return false;
        st[i].out = classify(code);
    }
    if (count_accepted(st, e->nrcpt) == 0)
        return true;
    if (!send_line(d, "DATA", PH_DATA) || !flush(d, PH_DATA) ||
        !read_data_reply(d, &code, text, sizeof text))
        return false;
    *go = data_reply(st, e->nrcpt, code, text);
    return true;
}

/* ------------------------------------------------------------ outcome */

static void log_outcome(struct delivery_ctx *d, const struct envelope *e,
                        const struct rcpt_state *st)
{
    static const char *names[] = {"deferred", "sent", "deferred", "bounced"};
    for (size_t i = 0; i < e->nrcpt; i++) {
        log_info("%s: to=<%s>, domain=%s, account=%s, relay=%s, status=%s (%s)",
                 e->id, e->rcpt[i].addr, e->domain, d->account, d->peer,
                 names[st[i].out], st[i].reply[0] ? st[i].reply : "no reply");
        d->stats.sent += st[i].out == OUT_SENT;
        d->stats.bounced += st[i].out == OUT_BOUNCE;
        d->stats.deferred += st[i].out == OUT_DEFER || st[i].out == OUT_NONE;
    }
}

/* The enhanced status code (RFC 3463: 5.d{1,3}.d{1,3}) that starts the
 * text after a reply's code, into out; false when there is none.  A
 * reply such as "550 5.7.1: blocked" still gives 5.7.1, but nothing that
 * is not a code reaches the report's Status field. */
static bool reply_status(const char *reply, char *out, size_t n)
{
    const char *p = strchr(reply, ' ');
    if (!p || p[1] != '5' || p[2] != '.')
        return false;
    const char *q = p + 3;
    for (int part = 0; part < 2; part++) {
        size_t digits = strspn(q, "0123456789");
        if (digits < 1 || digits > 3)
            return false;
        q += digits;
        if (part == 0 && *q++ != '.')
            return false;
    }
    if (isalnum((unsigned char)*q))
        return false;   /* "5.1.10x": not a code */
    size_t len = (size_t)(q - (p + 1));
    if (len >= n)
        return false;
    memcpy(out, p + 1, len);
    out[len] = '\0';
    return true;
}

/* Returns the bounced recipients to the sender.  When even that cannot be
 * done now (BOUNCE_RETRY: the report could not be stored anywhere), those
 * recipients stay queued instead, so the notice is tried again later. */
static void return_bounced(struct delivery_ctx *d, const struct envelope *e,
                           int fd, struct rcpt_state *st)
{
    struct bounce_rcpt *br = calloc(e->nrcpt, sizeof *br);
    char (*status)[16] = calloc(e->nrcpt, sizeof *status);
    size_t n = 0;
    for (size_t i = 0; br && status && i < e->nrcpt; i++) {
        if (st[i].out != OUT_BOUNCE)
            continue;
        /* "550 5.1.1 ..." -> "5.1.1"; a reply without one gets 5.0.0 */
        if (st[i].status)
            str_copy(status[n], st[i].status, sizeof status[n]);
        else if (!reply_status(st[i].reply, status[n], sizeof status[n]))
            str_copy(status[n], "5.0.0", sizeof status[n]);
        br[n] = (struct bounce_rcpt){e->rcpt[i].addr, e->rcpt[i].orcpt,
                                     e->rcpt[i].notify, status[n], st[i].reply};
        n++;
    }
    bool kept = !br || !status;
    if (kept)
        log_err("%s: out of memory while returning mail; keeping the "
                "recipients queued", e->id);
    else if (n && bounce_message(d->conf, d->q, e, fd, br, n) == BOUNCE_RETRY) {
        log_warn("%s: bounce could not be sent or stored; keeping the "
                 "recipients queued", e->id);
        kept = true;
    }
    for (size_t i = 0; kept && i < e->nrcpt; i++)
        if (st[i].out == OUT_BOUNCE)
            st[i].out = OUT_DEFER;
    free(br);
    free(status);
}

/* Makes the outcome durable: bounces, then the envelope. */
static void settle(struct delivery_ctx *d, struct envelope *e, int fd,
                   struct rcpt_state *st)
{
    return_bounced(d, e, fd, st);
    log_outcome(d, e, st);
    size_t keep = 0;
    for (size_t i = 0; i < e->nrcpt; i++) {
        if (st[i].out == OUT_SENT || st[i].out == OUT_BOUNCE)
            continue;
        e->rcpt[keep] = e->rcpt[i];
        str_copy(e->rcpt[keep].last_reply, st[i].reply, sizeof e->rcpt[0].last_reply);
        keep++;
    }
    e->nrcpt = keep;
    if (keep == 0) {
        if (!queue_remove(d->q, e->domain, e->id))
            log_err("%s: cannot remove from queue: %s", e->id, strerror(errno));
        else
            log_info("%s: removed", e->id);
        return;
    }
    e->attempts++;
    e->last_attempt = time(NULL);
    if (!queue_update(d->q, e))
        log_err("%s: cannot update envelope: %s", e->id, strerror(errno));
}

/* RFC 6152 section 3: 8-bit data that no MIME rule turns into 7 bits
 * must not reach a customer without 8BITMIME.  The message is returned
 * (5.6.3, "conversion required but not supported"; RFC 3463) like one the
 * customer refused.  Raw UTF-8 header text is fine when both sides use
 * SMTPUTF8 (RFC 6531). */
static bool refuse_unconvertible(struct delivery_ctx *d, const struct caps *c,
                                 const struct envelope *e,
                                 const struct dg_plan *plan,
                                 struct rcpt_state *st)
{
    if (c->eightbit || e->body != BODY_8BITMIME)
        return false;
    enum dg_problem p = e->smtputf8 && c->smtputf8 ? plan->body_problem
                                                   : plan->problem;
    if (p == DG_NONE)
        return false;
    char why[LAST_REPLY_MAX + 1];
    /* For the sender's report: the customer's address is not theirs. */
    snprintf(why, sizeof why, "the receiving site does not support "
             "8BITMIME and the message cannot be converted to 7 bit: %s",
             downgrade_problem_text(p));
    log_warn("%s: cannot be sent to customer %s, which does not offer "
             "8BITMIME: %s; %s (5.6.3)", e->id, d->peer,
             downgrade_problem_text(p), e->sender[0] ? "returning it to the "
             "sender" : "null sender, dropped without a report");
    set_all(st, e->nrcpt, OUT_NONE, OUT_BOUNCE, why);
    for (size_t i = 0; i < e->nrcpt; i++)
        st[i].status = BOUNCE_STATUS_NO_CONVERSION;
    return true;
}

/* Recipients that cannot be offered to this customer at all. */
static bool precheck(struct delivery_ctx *d, const struct caps *c,
                     const struct envelope *e, const struct dg_plan *plan,
                     uint64_t size, struct rcpt_state *st)
{
    const char *why = NULL;
    if (c->size && size > c->size)
        why = "552 5.3.4 Message too big for the receiving site";
    else if (e->smtputf8 && !c->smtputf8)
        why = "553 5.6.7 The receiving site does not support SMTPUTF8";
    if (why) {
        set_all(st, e->nrcpt, OUT_NONE, OUT_BOUNCE, why);
        return false;
    }
    if (refuse_unconvertible(d, c, e, plan, st))
        return false;
    if (plan->convert)
        log_info("%s: 8-bit MIME parts converted to quoted-printable for %s "
                 "(no 8BITMIME)", e->id, d->peer);
    return true;
}

/* RFC 6152 section 3: for a customer without 8BITMIME, finds the 8-bit
 * MIME parts to re-encode, and what cannot be.  Messages not declared
 * 8BITMIME go as they are, as they came.  False when the data could not
 * be read. */
static bool plan_downgrade(const struct caps *c, const struct envelope *e,
                           int fd, struct dg_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    if (c->eightbit || e->body != BODY_8BITMIME)
        return true;
    if (!downgrade_plan(fd, e->size, plan)) {
        log_err("%s: cannot read message data: %s", e->id, strerror(errno));
        return false;
    }
    return true;
}

/* One message of a pass, from its files to its outcome.  With a customer
 * that pipelines, the next message's MAIL, RCPTs and DATA follow this
 * one's final dot in the same write (RFC 2920 3.1 lets message content
 * begin a group), so the customer works on the next envelope while odmrd
 * settles this one: one round trip per message instead of two. */
struct outgoing {
    const char *id;
    bool loaded;                 /* envelope, data and plan are here */
    bool sendable;               /* precheck passed: it is offered */
    bool offered;                /* its envelope went behind the last dot */
    struct envelope e;
    int fd;
    struct dg_plan plan;
    struct rcpt_state *st;
    uint64_t size;               /* of the data as sent */
};

static void close_message(struct outgoing *m)
{
    if (m->fd >= 0)
        close(m->fd);
    downgrade_free(&m->plan);
    free(m->st);
    envelope_free(&m->e);   /* zeroed when it was not loaded */
    memset(m, 0, sizeof *m);
    m->fd = -1;
}

/* Loads id and decides whether it can be offered to this customer at all
 * (precheck's refusals are settled like the customer's). */
static void open_message(struct delivery_ctx *d, const struct caps *c,
                         const char *domain, const char *id, struct outgoing *m)
{
    char err[256];
    memset(m, 0, sizeof *m);
    m->id = id;
    m->fd = -1;
    if (!queue_load(d->q, domain, id, &m->e, err, sizeof err)) {
        if (errno != ENOENT)
            log_err("%s: unreadable envelope, left alone: %s", id, err);
        memset(&m->e, 0, sizeof m->e);
        return;
    }
    m->fd = queue_open_data(d->q, domain, id);
    m->st = calloc(m->e.nrcpt ? m->e.nrcpt : 1, sizeof *m->st);
    if (m->fd < 0 || !m->st) {
        log_err("%s: cannot open message data: %s", id, strerror(errno));
        return;
    }
    if (!plan_downgrade(c, &m->e, m->fd, &m->plan))
        return;
    m->loaded = true;
    m->size = m->plan.convert ? m->plan.size : m->e.size;
    m->sendable = m->e.nrcpt > 0 &&
                  precheck(d, c, &m->e, &m->plan, m->size, m->st);
}

/* The customer must take the message at data_min_rate once timeout has
 * passed, as inbound clients must send it.  The per-write timeout alone
 * is not enough: a customer that frees a third of the send buffer within
 * each timeout would hold the domain's lock (and a slot) for hours. */
static void set_write_deadline(struct delivery_ctx *d, uint64_t size)
{
    unsigned long rate = d->conf->data_min_rate;
    if (!rate)
        return;
    if (size > (uint64_t)1 << 40)
        size = (uint64_t)1 << 40;   /* keeps the sum below in range */
    io_set_deadline(d->io, io_clock_ms() + d->io->timeout_ms +
                               (int64_t)(size * 1000 / rate));
}

static bool send_data_and_next_within(struct delivery_ctx *d,
                                      const struct caps *c,
                                      struct outgoing *m,
                                      struct outgoing *next)
{
    if (!send_data(d, m->fd, m->e.size, &m->plan))
        return false;
    if (next && next->sendable && c->pipelining && !session_stop_requested) {
        d->qid = next->id;
        bool ok = send_envelope(d, c, &next->e, next->size);
        d->qid = m->id;
        next->offered = ok;
        return ok;
    }
    return flush(d, PH_DATA);
}

/* After this message's data: the next one's envelope, when the customer
 * pipelines and the session goes on; then everything leaves at once.  The
 * write deadline ends with the flush: the reply to the dot has its own. */
static bool send_data_and_next(struct delivery_ctx *d, const struct caps *c,
                               struct outgoing *m, struct outgoing *next)
{
    set_write_deadline(d, m->size);
    bool ok = send_data_and_next_within(d, c, m, next);
    io_set_deadline(d->io, 0);
    return ok;
}

/* Offers the message and sends its data, the next envelope behind the
 * dot.  *sent: the final dot is on its way and its reply is still to be
 * read (await_dot).  False when the connection failed. */
static bool offer(struct delivery_ctx *d, const struct caps *c,
                  struct outgoing *m, struct outgoing *next, bool *sent)
{
    struct envelope *e = &m->e;
    bool go = false;
    *sent = false;
    if (!m->sendable)
        return true;
    bool ok = c->pipelining
                  ? envelope_pipelined(d, c, e, m->size, m->st, m->offered, &go)
                  : envelope_stepwise(d, c, e, m->size, m->st, &go);
    if (ok && go) {
        ok = send_data_and_next(d, c, m, next);
        *sent = ok;
    } else if (ok) {
        /* nothing was accepted: leave the customer in a clean state */
        struct smtp_reply r;
        ok = ask(d, "RSET", "RSET", &r);
    }
    return ok;
}

/* The customer's reply to the final dot decides every recipient it had
 * accepted.  False when the connection failed. */
static bool await_dot(struct delivery_ctx *d, struct outgoing *m)
{
    struct smtp_reply r;
    char text[LAST_REPLY_MAX + 1];
    if (!read_reply(d, &r, PH_DOT))
        return false;
    reply_text(&r, text, sizeof text);
    set_all(m->st, m->e.nrcpt, OUT_SENT, classify(r.code), text);
    return true;
}

/* ------------------------------------------------------------ domains */

struct id_list {
    char **ids;
    size_t n, cap;
};

static int collect_id(void *ctx, const char *id)
{
    struct id_list *l = ctx;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        char **more = realloc(l->ids, cap * sizeof *more);
        if (!more)
            return -1;
        l->ids = more;
        l->cap = cap;
    }
    l->ids[l->n] = strdup(id);
    if (!l->ids[l->n])
        return -1;
    l->n++;
    return 0;
}

static void free_ids(struct id_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->ids[i]);
    free(l->ids);
    memset(l, 0, sizeof *l);
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Was id attempted in an earlier pass?  Only the first `sorted` entries
 * are sorted; the ones added in this pass cannot repeat within it. */
static bool seen(const struct id_list *done, size_t sorted, const char *id)
{
    const char *key = id;
    return sorted && bsearch(&key, done->ids, sorted, sizeof *done->ids, cmp_id);
}

/* The index of the first message at or after i not attempted in an
 * earlier pass. */
static size_t next_unseen(const struct id_list *now, const struct id_list *done,
                          size_t sorted, size_t i)
{
    while (i < now->n && seen(done, sorted, now->ids[i]))
        i++;
    return i;
}

/* One pass over a domain: every message not attempted yet in this
 * session, three at a time.  `cur` is the message whose data is being
 * sent; `next` is loaded, and with a pipelining customer its envelope
 * follows cur's dot; `settling` is the message before cur, whose outcome
 * is known but made durable (settle) only once cur's data has gone out.
 * So removing the previous message and loading the next one happen while
 * the customer and its site work on cur, not between the reply that lets
 * cur's data go and the data.  A message offered behind a dot is always
 * finished, even when a stop comes meanwhile. */
struct pass {
    struct delivery_ctx *d;
    const struct caps *c;
    const char *domain;
    struct id_list now;
    struct id_list *done;
    size_t sorted;             /* done's entries from earlier passes */
    size_t ahead;              /* the first index of now not loaded yet */
    struct outgoing slot[3];
    struct outgoing *settling, *cur, *next;
};

/* Loads the next message not attempted in an earlier pass into the empty
 * slot m; m stays empty (id NULL) when none is left. */
static void load_ahead(struct pass *p, struct outgoing *m)
{
    size_t i = next_unseen(&p->now, p->done, p->sorted, p->ahead);
    p->ahead = i < p->now.n ? i + 1 : i;
    if (i < p->now.n)
        open_message(p->d, p->c, p->domain, p->now.ids[i], m);
}

/* Makes the settling message's outcome durable and empties its slot. */
static void settle_pending(struct pass *p)
{
    struct outgoing *s = p->settling;
    if (s->loaded)
        settle(p->d, &s->e, s->fd, s->st);
    close_message(s);
}

/* Delivers p->cur and moves every slot on by one.  False when the
 * connection failed (cur then stays queued as it was). */
static bool deliver_cur(struct pass *p)
{
    struct delivery_ctx *d = p->d;
    struct outgoing *m = p->cur, *t;
    bool ok = true, sent = false;
    if (m->loaded) {
        d->stats.messages++;
        d->qid = m->id;
        ok = offer(d, p->c, m, p->next->id ? p->next : NULL, &sent);
    }
    settle_pending(p);
    if (ok && !session_stop_requested) {
        load_ahead(p, p->settling);
        if (!p->next->id) {
            t = p->next;
            p->next = p->settling;
            p->settling = t;
        }
    }
    if (ok && sent)
        ok = await_dot(d, m);
    d->qid = NULL;
    if (!ok) {
        close_message(m);
        /* What load_ahead put there was never offered: nothing of it is
         * to be settled (settle_pending emptied the slot before). */
        close_message(p->settling);
        return false;
    }
    t = p->settling;
    p->settling = m;
    p->cur = p->next;
    p->next = t;
    return true;
}

/* *found counts the messages of the pass.  Returns false on connection
 * failure. */
static bool deliver_pass(struct delivery_ctx *d, const struct caps *c,
                         const char *domain, struct id_list *done, size_t *found)
{
    struct pass p = {.d = d, .c = c, .domain = domain, .done = done,
                     .sorted = done->n};
    for (size_t k = 0; k < 3; k++)
        p.slot[k].fd = -1;
    p.settling = &p.slot[0];
    p.cur = &p.slot[1];
    p.next = &p.slot[2];
    if (queue_ids(d->q, domain, collect_id, &p.now) < 0) {
        log_err("queue %s: %s", domain, strerror(errno));
        free_ids(&p.now);
        return true;
    }
    load_ahead(&p, p.cur);
    if (p.cur->id && c->pipelining)
        load_ahead(&p, p.next);
    bool ok = true;
    while (ok && p.cur->id && (!session_stop_requested || p.cur->offered)) {
        (*found)++;
        bool recorded = collect_id(done, p.cur->id) == 0;
        ok = deliver_cur(&p) && recorded;   /* out of memory: stop, not loop */
    }
    settle_pending(&p);
    close_message(p.cur);
    close_message(p.next);
    if (done->n > 1)   /* qsort wants a valid pointer even for nothing */
        qsort(done->ids, done->n, sizeof *done->ids, cmp_id);
    free_ids(&p.now);
    return ok;
}

/* Every message of one domain, passes repeated while mail keeps arriving.
 * `done` keeps what was attempted. False on connection failure. */
static bool drain_domain(struct delivery_ctx *d, const struct caps *c,
                         const char *domain, struct id_list *done)
{
    bool ok = true;
    size_t found = 1;
    for (int pass = 0; ok && found && pass < MAX_PASSES &&
                       !session_stop_requested; pass++) {
        found = 0;
        ok = deliver_pass(d, c, domain, done, &found);
    }
    return ok;
}

/* ------------------------------------------------------------ linger */

/* A 4xx from the customer while lingering: the domain's remaining mail is
 * tried again after 1 minute, doubling to at most 15 minutes. */
#define RETRY_FIRST_MS 60000
#define RETRY_MAX_MS 900000
/* The maintenance pass or odmrctl holds a domain's .lock for a moment. */
#define LOCK_RETRY_MS 200

struct pushed {                  /* one domain of a lingering session */
    struct id_list *done;        /* attempted: what of it is still queued
                                    was deferred */
    int64_t retry_at, backoff;   /* retry_at 0: nothing deferred */
    bool due;                    /* a pass is wanted */
};

struct lingering {
    struct linger_watch lg;
    struct pushed dom[LINGER_DOMAINS_MAX];
    bool mail[LINGER_DOMAINS_MAX];
    int64_t end, quiet_since, lock_retry_at;
    const char *why_end;         /* for the log */
    bool closed;                 /* the customer closed: no QUIT */
    bool lost;                   /* the connection failed */
};

/* Forgets what was attempted and is gone (delivered, expired, deleted),
 * so a long linger does not grow with every message it pushed. */
static void keep_queued(struct delivery_ctx *d, const char *domain,
                        struct id_list *done)
{
    struct id_list now = {0};
    if (queue_ids(d->q, domain, collect_id, &now) < 0) {
        free_ids(&now);
        return;
    }
    size_t keep = 0;
    if (now.n > 1)
        qsort(now.ids, now.n, sizeof *now.ids, cmp_id);
    for (size_t i = 0; i < done->n; i++) {
        if (seen(&now, now.n, done->ids[i]))
            done->ids[keep++] = done->ids[i];
        else
            free(done->ids[i]);
    }
    done->n = keep;
    free_ids(&now);
}

/* Between passes a lingering session holds no delivery lock (linger.h). */
static void drop_locks(struct delivery_ctx *d, size_t n)
{
    queue_sync_removals();
    for (size_t i = 0; i < n; i++) {
        if (d->locks[i] >= 0)
            close(d->locks[i]);
        d->locks[i] = -1;
    }
}

/* A binding can change while a session lingers (odmrctl domain del, the
 * domain moved to another account, user del): each pass asks again, as
 * ATRN did, so new mail never goes to the account that had the domain.
 * Database trouble leaves ATRN's answer standing. */
static bool still_owned(const struct delivery_ctx *d, const char *domain)
{
    char owner[ACCOUNT_NAME_MAX + 1];
    enum acct_result r = accounts_domain_owner(d->conf->accounts_db, domain,
                                               owner, sizeof owner);
    if (r == ACCT_OK)
        return !strcmp(owner, d->account);
    return r != ACCT_NOTFOUND;
}

/* One pass over domain i, under its delivery lock.  False on connection
 * failure, or when the domain is no longer the account's; a busy lock
 * leaves the pass due and sets a short retry. */
static bool push_domain(struct delivery_ctx *d, const struct caps *c,
                        struct lingering *L, char *const *domains, size_t i)
{
    struct pushed *p = &L->dom[i];
    if (!still_owned(d, domains[i])) {
        log_info("%s: account=%s: %s is no longer a domain of the account",
                 d->peer, d->account, domains[i]);
        L->why_end = "a domain is no longer the account's";
        return false;
    }
    int fd = queue_lock_domain(d->q, domains[i]);
    if (fd == -2) {
        L->lock_retry_at = io_clock_ms() + LOCK_RETRY_MS;
        return true;
    }
    if (fd < 0) {
        log_err("%s: XLINGER: cannot lock the queue of %s: %s", d->peer,
                domains[i], strerror(errno));
        L->why_end = "queue error";
        return false;
    }
    d->locks[i] = fd;
    p->due = false;
    unsigned long before = d->stats.messages;
    bool ok = drain_domain(d, c, domains[i], p->done);
    keep_queued(d, domains[i], p->done);
    queue_sync_removals();
    close(fd);
    d->locks[i] = -1;
    if (d->stats.messages != before)
        L->quiet_since = io_clock_ms();
    if (!p->done->n) {
        p->retry_at = 0;
        p->backoff = RETRY_FIRST_MS;
    } else if (!p->retry_at) {
        p->retry_at = io_clock_ms() + p->backoff;
    }
    return ok;
}

/* The next moment the session must act without being woken. */
static int64_t next_timer(const struct lingering *L, const struct odmrd_conf *conf)
{
    int64_t t = L->end;
    int64_t noop = L->quiet_since + (int64_t)conf->odmr_linger_noop * 1000;
    if (noop < t)
        t = noop;
    if (L->lock_retry_at && L->lock_retry_at < t)
        t = L->lock_retry_at;
    for (size_t i = 0; i < L->lg.n; i++)
        if (L->dom[i].retry_at && L->dom[i].retry_at < t)
            t = L->dom[i].retry_at;
    return t;
}

/* Timers that came: retries become due passes; silence gets a NOOP.
 * False when the session ends. */
static bool on_timer(struct delivery_ctx *d, struct lingering *L)
{
    int64_t now = io_clock_ms();
    if (now >= L->end) {
        L->why_end = "linger time is up";
        return false;
    }
    if (L->lock_retry_at && now >= L->lock_retry_at)
        L->lock_retry_at = 0;   /* the due passes are tried again */
    for (size_t i = 0; i < L->lg.n; i++) {
        struct pushed *p = &L->dom[i];
        if (p->retry_at && now >= p->retry_at) {
            free_ids(p->done);   /* everything still queued is retried */
            p->retry_at = 0;
            p->backoff = p->backoff * 2 > RETRY_MAX_MS ? RETRY_MAX_MS
                                                       : p->backoff * 2;
            p->due = true;
        }
    }
    if (now < L->quiet_since + (int64_t)d->conf->odmr_linger_noop * 1000)
        return true;
    /* Keeps NAT mappings open and finds a dead customer. */
    struct smtp_reply r;
    L->quiet_since = now;
    if (!ask(d, "NOOP", "NOOP", &r)) {
        L->why_end = "connection lost";
        L->lost = true;
        return false;
    }
    if (r.code == 421) {
        L->why_end = "customer said 421";
        return false;
    }
    return true;
}

/* The customer is the SMTP server here: it speaks only when asked, so
 * anything it sends unasked ends the linger. */
static void on_peer(struct delivery_ctx *d, struct lingering *L)
{
    char line[REPLY_LINE_MAX];
    long n = io_getline(d->io, line, sizeof line, NULL);
    if (n == IO_EOF) {
        L->why_end = "customer closed the connection";
        L->closed = true;
        return;
    }
    if (n < 0) {
        L->why_end = "connection lost";
        L->closed = L->lost = true;
        return;
    }
    log_warn("%s: customer sent \"%.80s\" unasked while lingering", d->peer,
             line);
    L->why_end = "customer spoke unasked";
}

static bool run_due(struct delivery_ctx *d, const struct caps *c,
                    struct lingering *L, char *const *domains)
{
    for (size_t i = 0; i < L->lg.n && !session_stop_requested; i++)
        if (L->dom[i].due && !L->lock_retry_at &&
            !push_domain(d, c, L, domains, i))
            return false;
    return true;
}

/* One wake-up of the linger loop; false when the linger ends. */
static bool linger_step(struct delivery_ctx *d, const struct caps *c,
                        struct lingering *L, char *const *domains)
{
    switch (linger_wait(&L->lg, d->io, next_timer(L, d->conf), L->mail)) {
    case LINGER_MAIL:
        for (size_t i = 0; i < L->lg.n; i++) {
            L->dom[i].due |= L->mail[i];
            L->mail[i] = false;
        }
        break;
    case LINGER_TIMER:
        if (!on_timer(d, L))
            return false;
        break;
    case LINGER_PEER:
        on_peer(d, L);
        return false;
    case LINGER_STOP:
        L->why_end = "odmrd is stopping or reloading";
        return false;
    case LINGER_GONE:
        L->why_end = "a domain's queue directory was removed";
        return false;
    case LINGER_FAIL:
        L->why_end = "wait failed";
        return false;
    }
    if (run_due(d, c, L, domains))
        return true;
    if (!L->why_end) {
        L->why_end = "connection lost";
        L->lost = true;
    }
    return false;
}

static bool may_linger(const struct delivery_ctx *d, const struct caps *c)
{
    return c->linger && d->locks && d->linger_slot >= 0 &&
           d->conf->odmr_linger_max > 0 &&
           !session_stop_requested && !linger_stop_requested;
}

/* Stays on the connection and pushes new mail (linger.h).  *closed: the
 * customer closed it (no QUIT then).  False on connection failure. */
static bool linger_session(struct delivery_ctx *d, const struct caps *c,
                           char *const *domains, size_t n,
                           struct id_list *done, bool *closed)
{
    struct lingering *L = calloc(1, sizeof *L);
    int slot = d->linger_slot;
    d->linger_slot = -1;
    if (!L || !linger_begin(&L->lg, slot, d->q, domains, n)) {
        if (!L)
            close(slot);
        free(L);
        return true;   /* QUIT, as for a customer without XLINGER */
    }
    long secs = (long)c->linger < d->conf->odmr_linger_max
                    ? (long)c->linger : d->conf->odmr_linger_max;
    int64_t now = io_clock_ms();
    L->end = now + (int64_t)secs * 1000;
    L->quiet_since = now;
    for (size_t i = 0; i < n; i++) {
        keep_queued(d, domains[i], &done[i]);
        L->dom[i] = (struct pushed){.done = &done[i], .backoff = RETRY_FIRST_MS,
                                    .retry_at = done[i].n ? now + RETRY_FIRST_MS : 0};
    }
    drop_locks(d, n);
    log_info("%s: account=%s lingering for up to %lds (XLINGER %lu)", d->peer,
             d->account, secs, c->linger);
    while (linger_step(d, c, L, domains))
        ;
    bool ok = !L->lost;
    log_info("%s: account=%s linger ended: %s", d->peer, d->account, L->why_end);
    *closed = L->closed;
    linger_end(&L->lg);
    free(L);
    return ok;
}

/* ------------------------------------------------------------ session */

bool deliver_domains(struct delivery_ctx *d, char *const *domains, size_t n)
{
    struct caps c;
    bool closed = false;
    memset(&d->stats, 0, sizeof d->stats);
    struct id_list *done = calloc(n ? n : 1, sizeof *done);
    /* a session that fails at the greeting gets its summary line too */
    bool ok = done && open_session(d, &c);
    for (size_t i = 0; ok && i < n && !session_stop_requested; i++)
        ok = drain_domain(d, &c, domains[i], &done[i]);
    if (ok && may_linger(d, &c))
        ok = linger_session(d, &c, domains, n, done, &closed);
    if (ok && !closed) {
        struct smtp_reply r;
        /* The customer's 221: nothing depends on it, but a customer that
         * stops answering here is logged like one that stops earlier. */
        ask(d, "QUIT", "QUIT", &r);
    }
    for (size_t i = 0; done && i < n; i++)
        free_ids(&done[i]);
    free(done);
    if (d->linger_slot >= 0)   /* asked for, not used */
        close(d->linger_slot);
    d->linger_slot = -1;
    log_info("%s: account=%s, messages=%lu, sent=%lu, deferred=%lu, "
             "bounced=%lu, bytes=%llu%s", d->peer, d->account, d->stats.messages,
             d->stats.sent, d->stats.deferred, d->stats.bounced,
             (unsigned long long)d->stats.bytes, ok ? "" : " (connection lost)");
    return ok;
}
