/* target_smtp.c - smtp:HOST:PORT, lmtp:HOST:PORT and lmtp:/socket.
 *
 * Each of odmrd's commands is relayed to the site's server and its reply
 * handed back, so RCPT replies are the local server's own and the 250
 * after the data is given only after the local server accepted the final
 * dot.  A MAIL that odmrd pipelined with its RCPTs and DATA goes on as one
 * group when the site offers PIPELINING (one round trip instead of one
 * per command), otherwise in lock step.  The data is streamed through (dot-stuffed
 * again on the way out); only the connection's buffers are held.
 *
 * LMTP answers the data once per recipient, odmrd can take only one
 * answer.  The combination (see docs/odmr-fetch.md):
 *   all 2xx                  -> 250
 *   none 2xx                 -> the first 4xx reply, else the first 5xx
 *   2xx and 4xx              -> 451: odmrd keeps the whole message; the
 *                               recipients that got it may get it twice
 *   2xx and 5xx (no 4xx)     -> the first 5xx, naming that recipient:
 *                               odmrd returns the message to its sender,
 *                               whose notice says the others did get it.
 *                               Answering 451 instead would repeat the
 *                               delivery to those on every run until the
 *                               queue lifetime ends.
 * Most per-recipient failures (unknown user, over quota) are reported by
 * LMTP servers at RCPT time, where they map one to one. */
#include "target.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/addr.h"

#define WHO "target"

struct smtp_target {
    struct io io;
    bool connected;
    bool in_tx;                   /* MAIL accepted, not ended */
    bool line_start;              /* dot-stuffing state of the data */
    bool failed;                  /* the data could not be written */
    bool pipelining;              /* the site offered it */
    struct target_caps have;      /* of the current connection */
    char **accepted;              /* LMTP: recipients accepted, in order */
    size_t naccepted;
};

static struct smtp_target *S(struct target *t)
{
    return t->impl;
}

static bool is_lmtp(const struct target *t)
{
    return t->spec->kind == TARGET_LMTP;
}

static void forget_accepted(struct smtp_target *s)
{
    for (size_t i = 0; i < s->naccepted; i++)
        free(s->accepted[i]);
    free(s->accepted);
    s->accepted = NULL;
    s->naccepted = 0;
}

/* The list of accepted recipients stays: LMTP replies may still be
 * being counted against it. */
static void disconnect(struct smtp_target *s)
{
    if (s->connected)
        io_close(&s->io);
    s->connected = s->in_tx = false;
}

/* Sends line (unless NULL) and reads the reply; false on I/O failure or
 * a malformed reply, after which the connection is closed. */
static bool talk(struct smtp_target *s, const char *line,
                 struct smtp_reply *r)
{
    bool malformed;

    if (line && (!net_send(&s->io, WHO, line, NULL) || !io_flush(&s->io))) {
        disconnect(s);
        return false;
    }
    if (net_reply(&s->io, WHO, r, &malformed) != IO_OK) {
        disconnect(s);
        return false;
    }
    return true;
}

/* ---- connecting ------------------------------------------------------ */

static void learn_caps(struct smtp_target *s, const struct smtp_reply *r)
{
    char size[32];
    unsigned long v;

    s->have.eightbit = smtp_ehlo_has(r, "8BITMIME", NULL, 0);
    s->have.smtputf8 = smtp_ehlo_has(r, "SMTPUTF8", NULL, 0);
    s->have.dsn = smtp_ehlo_has(r, "DSN", NULL, 0);
    s->pipelining = smtp_ehlo_has(r, "PIPELINING", NULL, 0);
    s->have.size = 0;
    if (smtp_ehlo_has(r, "SIZE", size, sizeof size) &&
        parse_ulong(size, ULONG_MAX, &v))
        s->have.size = v;
}

static bool hello(struct target *t, char *err, size_t n)
{
    struct smtp_target *s = S(t);
    struct smtp_reply r;
    char line[FETCH_HOST_MAX + 8];

    snprintf(line, sizeof line, "%s %s", is_lmtp(t) ? "LHLO" : "EHLO",
             t->conf->fqdn);
    if (!talk(s, line, &r)) {
        snprintf(err, n, "connection lost after %s", is_lmtp(t) ? "LHLO"
                                                                 : "EHLO");
        return false;
    }
    memset(&s->have, 0, sizeof s->have);
    s->pipelining = false;
    if (r.code == 250) {
        learn_caps(s, &r);
        return true;
    }
    snprintf(line, sizeof line, "HELO %s", t->conf->fqdn);
    if (!is_lmtp(t) && r.code >= 500 && talk(s, line, &r) && r.code == 250)
        return true;
    snprintf(err, n, "refused our greeting: %d %.200s", r.code, r.text);
    return false;
}

static bool connect_target(struct target *t, char *err, size_t n)
{
    struct smtp_target *s = S(t);
    const struct target_spec *sp = t->spec;
    struct smtp_reply r;

    int fd = net_connect(sp->path[0] ? sp->path : sp->host, sp->port,
                         t->conf->timeout, err, n);
    if (fd < 0)
        return false;
    io_init(&s->io, fd, (int)(t->conf->timeout * 1000));
    /* as on the provider's connection: a reply line trickled one octet
     * per timeout would hold the run, and the provider's session, for
     * ever */
    io_set_line_deadline(&s->io, (int)(t->conf->timeout * 1000));
    s->connected = true;
    if (!talk(s, NULL, &r)) {
        snprintf(err, n, "no greeting");
        return false;
    }
    if (r.code != 220) {
        snprintf(err, n, "greeting %d %.200s", r.code, r.text);
        disconnect(s);
        return false;
    }
    if (!hello(t, err, n)) {
        disconnect(s);
        return false;
    }
    return true;
}

static bool smtp_open(struct target *t, char *err, size_t n)
{
    struct smtp_target *s = calloc(1, sizeof *s);

    t->impl = s;
    if (!s) {
        snprintf(err, n, "out of memory");
        return false;
    }
    if (!connect_target(t, err, n))
        return false;
    t->caps = s->have;   /* what the receiver advertises from now on */
    return true;
}

/* ---- the envelope ---------------------------------------------------- */

static const char *body_name(enum smtp_body b)
{
    return b == BODY_8BITMIME ? "8BITMIME" : "7BIT";
}

/* MAIL FROM with the parameters this connection understands. */
static void mail_line(const struct smtp_target *s, const struct mail_args *m,
                      char *buf, size_t n)
{
    char from[ADDR_MAX + 1];
    size_t len;

    addr_format(&m->from, from, sizeof from);
    len = (size_t)snprintf(buf, n, "MAIL FROM:<%s>", from);
    if (s->have.size && m->size && len < n)
        len += (size_t)snprintf(buf + len, n - len, " SIZE=%llu",
                                (unsigned long long)m->size);
    if (s->have.eightbit && m->body != BODY_UNSPEC && len < n)
        len += (size_t)snprintf(buf + len, n - len, " BODY=%s",
                                body_name(m->body));
    if (s->have.smtputf8 && m->smtputf8 && len < n)
        len += (size_t)snprintf(buf + len, n - len, " SMTPUTF8");
    if (s->have.dsn && m->ret != RET_UNSPEC && len < n)
        len += (size_t)snprintf(buf + len, n - len, " RET=%s",
                                m->ret == RET_FULL ? "FULL" : "HDRS");
    if (s->have.dsn && m->envid[0] && len < n)
        snprintf(buf + len, n - len, " ENVID=%s", m->envid);
}

static void notify_list(unsigned bits, char *buf, size_t n)
{
    snprintf(buf, n, "%s%s%s%s",
             bits & DSN_NOTIFY_NEVER ? "NEVER," : "",
             bits & DSN_NOTIFY_SUCCESS ? "SUCCESS," : "",
             bits & DSN_NOTIFY_FAILURE ? "FAILURE," : "",
             bits & DSN_NOTIFY_DELAY ? "DELAY," : "");
    size_t len = strlen(buf);
    if (len)
        buf[len - 1] = '\0';   /* the last comma */
}

static void rcpt_line(const struct smtp_target *s, const struct rcpt_args *a,
                      const char *addr, char *buf, size_t n)
{
    size_t len = (size_t)snprintf(buf, n, "RCPT TO:<%s>", addr);

    if (s->have.dsn && a->notify && len < n) {
        char list[64];
        notify_list(a->notify, list, sizeof list);
        len += (size_t)snprintf(buf + len, n - len, " NOTIFY=%s", list);
    }
    if (s->have.dsn && a->orcpt[0] && len < n)
        snprintf(buf + len, n - len, " ORCPT=%s", a->orcpt);
}

static void lost(struct reply *r, const char *when)
{
    reply_set(r, 451, "4.4.2 Lost the connection to the local mail system "
                      "%s", when);
}

/* Before a new MAIL: a clean, live connection that still offers what the
 * transaction needs; false with the reply for MAIL set. */
static bool ready_for_mail(struct target *t, const struct mail_args *m,
                           struct reply *r)
{
    struct smtp_target *s = S(t);
    char err[256];

    if (s->connected && s->in_tx)
        t->ops->reset(t);
    /* It may have gone away between transactions (restart, idle
     * timeout): one new connection is worth a try. */
    if (!s->connected && !connect_target(t, err, sizeof err)) {
        reply_set(r, 451, "4.4.1 Local mail system unavailable: %.300s", err);
        return false;
    }
    /* What odmr-fetch offered the provider came from the first
     * connection: one made since must still take what was accepted. */
    if (m->smtputf8 && !s->have.smtputf8) {
        reply_set(r, 451, "4.3.0 Local mail system no longer offers SMTPUTF8");
        return false;
    }
    if (m->body == BODY_8BITMIME && t->caps.eightbit && !s->have.eightbit) {
        reply_set(r, 451, "4.3.0 Local mail system no longer offers 8BITMIME");
        return false;
    }
    if ((m->ret != RET_UNSPEC || m->envid[0]) && t->caps.dsn && !s->have.dsn) {
        reply_set(r, 451, "4.3.0 Local mail system no longer offers DSN");
        return false;
    }
    return true;
}

static void smtp_mail(struct target *t, const struct mail_args *m,
                      struct reply *r)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;
    char line[SMTP_MAILRCPT_LINE_MAX];

    if (!ready_for_mail(t, m, r))
        return;
    mail_line(s, m, line, sizeof line);
    if (!talk(s, line, &sr)) {
        lost(r, "after MAIL");
        return;
    }
    reply_relay(r, &sr, false);
    s->in_tx = r->code / 100 == 2;
    forget_accepted(s);
}

/* LMTP answers the data once for each recipient accepted here. */
static void remember_accepted(struct smtp_target *s, const char *addr,
                              struct reply *r)
{
    if (r->code / 100 != 2)
        return;
    char **more = realloc(s->accepted, (s->naccepted + 1) * sizeof *more);
    char *copy = strdup(addr);
    if (!more || !copy) {
        free(copy);
        if (more)
            s->accepted = more;
        /* The site accepted a recipient we cannot count: its LMTP replies
         * to the data would no longer line up with the recipients.  Drop
         * the connection, so that nothing of this message is delivered
         * and every later reply is a 4xx. */
        disconnect(s);
        reply_set(r, 452, "4.3.0 Out of memory");
        return;
    }
    s->accepted = more;
    s->accepted[s->naccepted++] = copy;
}

/* A recipient with DSN parameters odmr-fetch accepted, for a site that
 * no longer offers DSN since a reconnection: they would be lost. */
static bool rcpt_dsn_lost(const struct target *t, const struct rcpt_args *a)
{
    const struct smtp_target *s = t->impl;
    return (a->notify || a->orcpt[0]) && t->caps.dsn && !s->have.dsn;
}

static void smtp_rcpt(struct target *t, const struct rcpt_args *a,
                      const char *addr, struct reply *r)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;
    char line[SMTP_MAILRCPT_LINE_MAX];

    if (!s->connected || !s->in_tx) {
        lost(r, "before RCPT");
        return;
    }
    if (rcpt_dsn_lost(t, a)) {
        reply_set(r, 451, "4.3.0 Local mail system no longer offers DSN");
        return;
    }
    rcpt_line(s, a, addr, line, sizeof line);
    if (!talk(s, line, &sr)) {
        lost(r, "after RCPT");
        return;
    }
    reply_relay(r, &sr, false);
    remember_accepted(s, addr, r);
}

/* ---- the data -------------------------------------------------------- */


static void smtp_data(struct target *t, struct reply *r)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;

    if (!s->connected || !s->in_tx) {
        lost(r, "before DATA");
        return;
    }
    if (!talk(s, "DATA", &sr)) {
        lost(r, "after DATA");
        return;
    }
    reply_relay(r, &sr, true);
    s->line_start = true;
    s->failed = false;
}

static bool smtp_write(struct target *t, const char *p, size_t len)
{
    struct smtp_target *s = S(t);

    while (len > 0 && !s->failed) {
        const char *nl = memchr(p, '\n', len);
        size_t chunk = nl ? (size_t)(nl - p) + 1 : len;
        if (s->line_start && p[0] == '.' && !io_write(&s->io, ".", 1))
            s->failed = true;
        else if (!io_write(&s->io, p, chunk))
            s->failed = true;
        s->line_start = nl != NULL;
        p += chunk;
        len -= chunk;
    }
    return !s->failed;
}

/* One LMTP reply (a lost connection counts as a temporary failure). */
static void lmtp_one(struct smtp_target *s, struct reply *one)
{
    struct smtp_reply sr;

    if (s->connected && talk(s, NULL, &sr))
        reply_relay(one, &sr, false);
    else
        reply_set(one, 451, "4.4.2 Lost the connection to the local mail "
                            "system after the data");
}

/* LMTP: one reply per accepted recipient, combined as described above. */
static void lmtp_replies(struct smtp_target *s, struct reply *r)
{
    struct reply first[6];          /* by class: [2], [4], [5] */
    size_t count[6] = {0}, n = s->naccepted;
    const char *who5 = "";

    for (size_t i = 0; i < n; i++) {
        struct reply one;
        lmtp_one(s, &one);
        int cls = one.code / 100;
        if (count[cls]++ == 0)
            first[cls] = one;
        if (cls == 5 && !who5[0])
            who5 = s->accepted[i];
    }
    if (count[4] == 0 && count[5] == 0)
        reply_set(r, 250, "2.0.0 Ok: delivered to %zu recipient(s) over "
                          "LMTP", n);
    else if (count[2] == 0)
        *r = count[4] ? first[4] : first[5];
    else if (count[4])
        reply_set(r, 451, "4.3.0 Delivered to %zu of %zu recipients only, "
                          "retrying all: %.300s", count[2], n, first[4].line);
    else
        reply_set(r, first[5].code, "%.300s (not delivered to <%.100s>; "
                  "%zu other recipient(s) did receive it)",
                  first[5].line + 4, who5, count[2]);
}

/* The site's answer to the final dot (sent already). */
static void end_replies(struct target *t, struct reply *r)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;

    if (is_lmtp(t))
        lmtp_replies(s, r);
    else if (s->connected && talk(s, NULL, &sr))
        reply_relay(r, &sr, false);
    else
        lost(r, "after the data");
    forget_accepted(s);
}

/* Whether the site sent anything since its 354: nothing is due from it
 * before the final dot, so that would be taken for the dot's reply - a
 * 250 the site never gave this message - and every later reply would be
 * one behind. */
static bool replied_out_of_turn(struct smtp_target *s)
{
    struct pollfd p = {s->io.fd, POLLIN, 0};
    return io_pending(&s->io) != 0 || (poll(&p, 1, 0) == 1 && p.revents);
}

static void smtp_end(struct target *t, bool abort, struct reply *r)
{
    struct smtp_target *s = S(t);

    if (!abort && !s->failed && s->connected && replied_out_of_turn(s)) {
        disconnect(s);
        forget_accepted(s);
        reply_set(r, 451, "4.5.0 The local mail system replied out of turn "
                          "during the data; not delivered");
        return;
    }

    if (abort || s->failed || !s->connected) {
        /* No final dot: closing mid-data makes the server drop it. */
        disconnect(s);
        forget_accepted(s);
        lost(r, "during the data");
        return;
    }
    if (!s->line_start)     /* cannot happen: our data ends with CRLF */
        io_write(&s->io, "\r\n", 2);
    if (!net_send(&s->io, WHO, ".", NULL) || !io_flush(&s->io)) {
        disconnect(s);
        forget_accepted(s);
        lost(r, "at the end of the data");
        return;
    }
    s->in_tx = false;
    end_replies(t, r);
}

static void smtp_reset(struct target *t)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;

    if (s && s->connected && s->in_tx)
        (void)talk(s, "RSET", &sr);
    if (s) {
        s->in_tx = false;
        forget_accepted(s);
    }
}

/* ---- pipelined groups (RFC 2920) ------------------------------------ */

static void group_unanswered(struct target_group *g, size_t from,
                             const char *why)
{
    for (size_t i = from; i < g->nrcpt; i++)
        lost(&g->rcpt[i].reply, why);
    if (g->data)
        lost(&g->data_reply, why);
}

/* The site's next reply of the group; false once the connection is gone
 * (r then says so). */
static bool group_reply(struct smtp_target *s, struct reply *r,
                        bool want_354, const char *when)
{
    struct smtp_reply sr;

    if (s->connected && talk(s, NULL, &sr)) {
        reply_relay(r, &sr, want_354);
        return true;
    }
    lost(r, when);
    return false;
}

static bool group_send(struct smtp_target *s, const struct target_group *g)
{
    char line[SMTP_MAILRCPT_LINE_MAX];
    bool ok;

    mail_line(s, g->mail, line, sizeof line);
    ok = net_send(&s->io, WHO, line, NULL);
    for (size_t i = 0; ok && i < g->nrcpt; i++) {
        rcpt_line(s, g->rcpt[i].args, g->rcpt[i].addr, line, sizeof line);
        ok = net_send(&s->io, WHO, line, NULL);
    }
    if (ok && g->data)
        ok = net_send(&s->io, WHO, "DATA", NULL);
    ok = ok && io_flush(&s->io);
    if (!ok)
        disconnect(s);
    return ok;
}

/* DATA got 354 but there is nothing to send: an empty message ends the
 * data state, and the site's reply to it does not matter. */
static void group_no_data(struct smtp_target *s, struct target_group *g)
{
    struct smtp_reply sr;

    if (g->data_reply.code == 354 && !talk(s, ".", &sr))
        disconnect(s);
    s->in_tx = s->in_tx && s->connected && g->data_reply.code != 354;
    if (g->mail_reply.code / 100 != 2)
        reply_set(&g->data_reply, 503, "5.5.1 Need MAIL command");
    else
        reply_set(&g->data_reply, 554, "5.5.1 No valid recipients");
}

static void group_read(struct smtp_target *s, struct target_group *g);

static void group_pipelined(struct target *t, struct target_group *g)
{
    struct smtp_target *s = S(t);

    forget_accepted(s);
    if (!group_send(s, g)) {
        lost(&g->mail_reply, "after MAIL");
        group_unanswered(g, 0, "after MAIL");
        return;
    }
    group_read(s, g);
}

/* The replies to a group sent. */
static void group_read(struct smtp_target *s, struct target_group *g)
{
    bool ok = group_reply(s, &g->mail_reply, false, "after MAIL");
    s->in_tx = ok && g->mail_reply.code / 100 == 2;
    size_t i = 0;
    for (; ok && i < g->nrcpt; i++) {
        struct group_rcpt *gr = &g->rcpt[i];
        ok = group_reply(s, &gr->reply, false, "after RCPT");
        if (ok && s->in_tx)
            remember_accepted(s, gr->addr, &gr->reply);
    }
    if (!ok) {   /* i: the first recipient without an answer */
        group_unanswered(g, i, "after RCPT");
        return;
    }
    if (!g->data || !group_reply(s, &g->data_reply, true, "after DATA"))
        return;
    if (g->data_reply.code == 354 && s->in_tx && s->naccepted) {
        s->line_start = true;
        s->failed = false;
    } else if (g->data_reply.code == 354 || !s->in_tx || !s->naccepted) {
        group_no_data(s, g);
    }
}

/* Without PIPELINING at the site: the same, one command at a time. */
static void group_stepwise(struct target *t, struct target_group *g)
{
    size_t accepted = 0;

    smtp_mail(t, g->mail, &g->mail_reply);
    bool in_tx = g->mail_reply.code / 100 == 2;
    for (size_t i = 0; i < g->nrcpt; i++) {
        struct group_rcpt *gr = &g->rcpt[i];
        if (!in_tx) {
            reply_set(&gr->reply, 503, "5.5.1 Need MAIL command");
            continue;
        }
        smtp_rcpt(t, gr->args, gr->addr, &gr->reply);
        accepted += gr->reply.code / 100 == 2;
    }
    if (!g->data)
        return;
    if (in_tx && accepted)
        smtp_data(t, &g->data_reply);
    else if (in_tx)
        reply_set(&g->data_reply, 554, "5.5.1 No valid recipients");
    else
        reply_set(&g->data_reply, 503, "5.5.1 Need MAIL command");
}

static void smtp_group(struct target *t, struct target_group *g)
{
    if (!ready_for_mail(t, g->mail, &g->mail_reply)) {
        for (size_t i = 0; i < g->nrcpt; i++)
            reply_set(&g->rcpt[i].reply, 503, "5.5.1 Need MAIL command");
        if (g->data)
            reply_set(&g->data_reply, 503, "5.5.1 Need MAIL command");
        return;
    }
    for (size_t i = 0; i < g->nrcpt; i++)
        if (rcpt_dsn_lost(t, g->rcpt[i].args)) {
            group_stepwise(t, g);   /* each such recipient gets its 451 */
            return;
        }
    if (S(t)->pipelining)
        group_pipelined(t, g);
    else
        group_stepwise(t, g);
}

/* The final dot and the next group in one write, then the replies in
 * order: one round trip to the site per message. */
static void smtp_end_group(struct target *t, struct reply *r,
                           struct target_group *g)
{
    struct smtp_target *s = S(t);

    /* smtp_end also answers a site that replied out of turn */
    if (!s->pipelining || s->failed || !s->connected ||
        (g->mail->smtputf8 && !s->have.smtputf8) || replied_out_of_turn(s)) {
        smtp_end(t, false, r);
        smtp_group(t, g);
        return;
    }
    if (!s->line_start)     /* cannot happen: our data ends with CRLF */
        io_write(&s->io, "\r\n", 2);
    s->in_tx = false;
    if (!net_send(&s->io, WHO, ".", NULL) || !group_send(s, g)) {
        disconnect(s);
        forget_accepted(s);
        lost(r, "at the end of the data");
        lost(&g->mail_reply, "after MAIL");
        group_unanswered(g, 0, "after MAIL");
        return;
    }
    end_replies(t, r);
    group_read(s, g);
}

static void smtp_close(struct target *t)
{
    struct smtp_target *s = S(t);
    struct smtp_reply sr;

    if (!s)
        return;
    if (s->connected)
        (void)talk(s, "QUIT", &sr);
    disconnect(s);
    forget_accepted(s);
    free(s);
    t->impl = NULL;
}

const struct target_ops target_smtp_ops = {
    .open = smtp_open,
    .mail = smtp_mail,
    .rcpt = smtp_rcpt,
    .data = smtp_data,
    .write = smtp_write,
    .end = smtp_end,
    .reset = smtp_reset,
    .close = smtp_close,
    .group = smtp_group,
    .end_group = smtp_end_group,
};
