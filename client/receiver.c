/* receiver.c - after "250 OK now reversing the connection" odmr-fetch is
 * the SMTP server and odmrd the client (RFC 2645 section 5).
 *
 * This is a small but complete ESMTP server: PIPELINING (replies are
 * buffered and leave before the next read that would wait - common/io),
 * SIZE, 8BITMIME, ENHANCEDSTATUSCODES, and DSN and SMTPUTF8 only when the
 * delivery target can honour them (target.h).  Every transaction is
 * relayed to the target as it arrives: a MAIL with the RCPTs and DATA
 * that came in the same read goes on as one group (target_group), so an
 * SMTP or LMTP site that pipelines costs one round trip for all of them,
 * with the replies in the order of the commands.  The message data is streamed
 * through in pieces of at most DATA_PIECE bytes, so memory never depends
 * on message size or line length.
 *
 * The data ends only at CRLF "." CRLF.  A bare CR or LF anywhere stops
 * the stream to the target at once (so a "<LF>.<CR><LF>" can never end a
 * message there either), the rest is read up to the real end, and the
 * message is refused with 554 5.5.2 and thrown away at the target. */
#include "fetch.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "../common/addr.h"
#include "target.h"

#define WHO "provider"
#define DATA_PIECE 8192
#define MAX_BAD_COMMANDS 20
/* Commands that move no mail (NOOP, VRFY, HELP, EHLO, HELO) allowed
 * between two transactions, as odmrd allows its own clients.  RSET is
 * not one here: odmrd sends it after each transaction the target took
 * no recipient of (a site that is down refuses every one). */
#define MAX_JUNK_COMMANDS 100
/* The message data must arrive at this rate once --timeout has passed,
 * as odmrd's own data_min_rate default: a provider trickling a message
 * must not hold the run, and its lock, for ever. */
#define DATA_MIN_RATE 500
/* RCPTs in one transaction before the session ends: odmrd sends every
 * recipient of a message (those beyond our TARGET_RCPT_MAX get 452 and
 * stay queued for the next run), and its max_recipients may be set up to
 * 1,000,000.  A lower cap would cut such an envelope every run, and its
 * mail would never move; only a provider looping RCPT goes past it. */
#define RCPT_SEEN_MAX 1000000

struct rx {
    const struct fetch_conf *c;
    struct io *io;
    struct target t;
    struct fetch_stats *st;
    bool greeted, esmtp, in_mail;
    bool done, quit, lost;        /* session over; by QUIT; connection gone */
    struct mail_args mail;
    size_t nrcpt;                 /* recipients the target accepted */
    size_t rcpts_seen;            /* RCPT commands in this transaction */
    unsigned bad_commands;
    unsigned junk_commands;       /* since the last MAIL */
    int64_t last_mail_ms;         /* io_clock_ms() of the last MAIL or end
                                     of data */
    bool linger_over;             /* we ended a lingering session */
    int status;                   /* exit status if the session ends now */
};

struct data_state {
    bool line_start;              /* the next byte begins a line */
    bool after_crlf;              /* ... and the previous line ended CRLF */
    bool prev_cr;                 /* the last byte seen was CR */
    bool bad_eol;                 /* bare CR or LF seen */
    bool target_ok;               /* the target still takes data */
    unsigned long long bytes;
};

static void vsay(struct rx *x, const char *fmt, va_list ap)
    PRINTF_LIKE(2, 0);

static void vsay(struct rx *x, const char *fmt, va_list ap)
{
    char line[SMTP_REPLY_LINE_MAX];

    vsnprintf(line, sizeof line - 2, fmt, ap);
    net_send(x->io, WHO, line, NULL);
}

static void say(struct rx *x, const char *fmt, ...) PRINTF_LIKE(2, 3);

static void say(struct rx *x, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsay(x, fmt, ap);
    va_end(ap);
}

/* A command odmrd never sends when it keeps to the protocol (bad syntax,
 * parameters not offered, a nested MAIL): answered, and counted towards
 * MAX_BAD_COMMANDS.  "Need MAIL" is not one: it follows a MAIL the target
 * refused, once per message. */
static void say_error(struct rx *x, const char *fmt, ...) PRINTF_LIKE(2, 3);

static void say_error(struct rx *x, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsay(x, fmt, ap);
    va_end(ap);
    x->bad_commands++;
}

/* Counts what a final reply means for odmrd's copy of the message. */
static void count_reply(struct rx *x, int code)
{
    if (code / 100 == 4) {
        x->st->deferred++;
        x->status = EX_TEMPFAIL;   /* some mail stays at the provider */
    } else if (code / 100 == 5) {
        x->st->rejected++;
    }
}

static void send_reply(struct rx *x, const struct reply *r)
{
    say(x, "%s", r->line);
    count_reply(x, r->code);
}

static void end_transaction(struct rx *x)
{
    if (x->in_mail)
        x->t.ops->reset(&x->t);
    x->in_mail = false;
    x->nrcpt = 0;
    x->rcpts_seen = 0;
}

/* ---- HELO/EHLO ------------------------------------------------------- */

static void do_hello(struct rx *x, const char *arg, bool extended)
{
    const struct target_caps *k = &x->t.caps;
    const char *ext[8];
    char size[40], linger[40];
    size_t n = 0;

    if (!*arg) {
        say_error(x, "501 5.5.4 Syntax: %s hostname",
                  extended ? "EHLO" : "HELO");
        return;
    }
    end_transaction(x);
    x->greeted = true;
    x->esmtp = extended;
    if (!extended) {
        say(x, "250 %s", x->c->fqdn);
        return;
    }
    /* "SIZE" alone: no fixed limit (RFC 1870 4) */
    if (k->size)
        snprintf(size, sizeof size, "SIZE %llu", (unsigned long long)k->size);
    else
        str_copy(size, "SIZE", sizeof size);
    ext[n++] = "PIPELINING";
    ext[n++] = size;
    if (k->eightbit)
        ext[n++] = "8BITMIME";
    ext[n++] = "ENHANCEDSTATUSCODES";
    if (k->dsn)
        ext[n++] = "DSN";
    if (k->smtputf8)
        ext[n++] = "SMTPUTF8";
    if (x->c->linger) {   /* push delivery: a private extension of odmrd */
        snprintf(linger, sizeof linger, "XLINGER %ld", x->c->linger);
        ext[n++] = linger;
    }
    say(x, "250-%s", x->c->fqdn);
    for (size_t i = 0; i < n; i++)
        say(x, "250%c%s", i + 1 == n ? ' ' : '-', ext[i]);
}

/* ---- MAIL / RCPT ----------------------------------------------------- */

/* Parameters the session did not offer (RFC 5321 4.1.1.11 / RFC 1869). */
static bool mail_params_offered(struct rx *x, const struct mail_args *m)
{
    bool dsn_used = m->ret != RET_UNSPEC || m->envid[0];
    return (x->t.caps.dsn || !dsn_used) &&
           (x->esmtp || (!m->size && m->body == BODY_UNSPEC && !dsn_used));
}

static bool mail_group(struct rx *x);

static void do_mail(struct rx *x, const char *arg)
{
    struct smtp_err err;
    struct reply r;

    if (!x->greeted) {
        say_error(x, "503 5.5.1 Send HELO/EHLO first");
        return;
    }
    if (x->in_mail) {
        say_error(x, "503 5.5.1 Nested MAIL command");
        return;
    }
    if (!smtp_parse_mail(arg, &x->mail, x->esmtp && x->t.caps.smtputf8,
                         &err)) {
        say_error(x, "%s", err.reply);
        return;
    }
    if (!mail_params_offered(x, &x->mail)) {
        say_error(x, "555 5.5.4 Unsupported parameter");
        return;
    }
    if (x->t.caps.size && x->mail.size > x->t.caps.size) {
        say(x, "552 5.3.4 Message size exceeds fixed limit");
        count_reply(x, 552);
        return;
    }
    if (x->t.ops->group && mail_group(x))
        return;
    x->t.ops->mail(&x->t, &x->mail, &r);
    send_reply(x, &r);
    x->in_mail = r.code / 100 == 2;
    x->nrcpt = 0;
    x->rcpts_seen = 0;
}

/* The checks of RCPT's argument made here; false with the reply in why.
 * addr receives the address formatted for the target.  A UTF-8 address
 * only in a transaction whose MAIL said SMTPUTF8 (RFC 6531 3.4), which
 * needs the extension offered. */
static bool rcpt_acceptable(struct rx *x, const struct mail_args *m,
                            const char *arg, struct rcpt_args *a,
                            char addr[ADDR_MAX + 1], char *why, size_t n)
{
    struct smtp_err err;

    if (!smtp_parse_rcpt(arg, a, m->smtputf8, &err))
        str_copy(why, err.reply, n);
    else if (!x->t.caps.dsn && (a->notify || a->orcpt[0]))
        str_copy(why, "555 5.5.4 Unsupported parameter", n);
    else if (!addr_format(&a->to, addr, ADDR_MAX + 1))
        str_copy(why, "501 5.1.3 Address too long", n);
    else
        return true;
    return false;
}

/* Passes the target's reply to a RCPT on. */
static void rcpt_answered(struct rx *x, const char *addr, const struct reply *r)
{
    send_reply(x, r);
    if (r->code / 100 == 2)
        x->nrcpt++;
    else
        fprintf(stderr, "odmr-fetch: recipient <%s> %s: %s\n", addr,
                r->code / 100 == 4 ? "deferred" : "refused", r->line);
}

static void do_rcpt(struct rx *x, const char *arg)
{
    struct rcpt_args a;
    struct reply r;
    char addr[ADDR_MAX + 1], why[SMTP_REPLY_LINE_MAX];

    if (!x->in_mail) {
        say(x, "503 5.5.1 Need MAIL command");
        return;
    }
    if (++x->rcpts_seen > RCPT_SEEN_MAX) {
        say(x, "421 4.7.0 %s Too many recipients", x->c->fqdn);
        fprintf(stderr, "odmr-fetch: %s sent more than %d RCPT commands in "
                        "one transaction\n", x->c->server, RCPT_SEEN_MAX);
        if (x->status == 0)
            x->status = EX_PROTOCOL;
        x->done = true;
        return;
    }
    if (!rcpt_acceptable(x, &x->mail, arg, &a, addr, why, sizeof why)) {
        say_error(x, "%s", why);
        return;
    }
    if (x->nrcpt >= TARGET_RCPT_MAX) {
        reply_set(&r, 452, "4.5.3 Too many recipients");
        send_reply(x, &r);
        return;
    }
    x->t.ops->rcpt(&x->t, &a, addr, &r);
    rcpt_answered(x, addr, &r);
}

/* ---- DATA ------------------------------------------------------------ */

/* Flags CR and LF that are not part of a CRLF pair.  A CR at the very
 * end of a piece is judged by the first byte of the next one. */
static void check_line_ends(struct data_state *d, const char *p, size_t len)
{
    if (len && d->prev_cr && p[0] != '\n')
        d->bad_eol = true;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\n' && !(i ? p[i - 1] == '\r' : d->prev_cr))
            d->bad_eol = true;
        else if (p[i] == '\r' && i + 1 < len && p[i + 1] != '\n')
            d->bad_eol = true;
    }
    if (len)
        d->prev_cr = p[len - 1] == '\r';
}

/* One piece: a whole line (complete) or DATA_PIECE bytes of a longer
 * one.  Returns true at the end of the data. */
static bool data_piece(struct rx *x, struct data_state *d, const char *p,
                       size_t len, bool complete)
{
    if (d->line_start && d->after_crlf && complete && len == 3 &&
        !memcmp(p, ".\r\n", 3))
        return true;
    if (d->line_start && p[0] == '.') {   /* RFC 5321 4.5.2 */
        p++;
        len--;
    }
    bool was_cr = d->prev_cr;
    check_line_ends(d, p, len);
    d->after_crlf = complete && ((len >= 2 && p[len - 2] == '\r') ||
                                 (len == 1 && was_cr));
    d->line_start = complete;
    d->bytes += len;
    if (!d->bad_eol && d->target_ok && len)
        d->target_ok = x->t.ops->write(&x->t, p, len);
    return false;
}

/* The data may take --timeout plus one second per DATA_MIN_RATE bytes
 * received so far. */
static void set_data_deadline(struct rx *x, int64_t start_ms,
                              unsigned long long start_in)
{
    unsigned long long got = x->io->bytes_in - start_in;
    io_set_deadline(x->io, start_ms + x->c->timeout * 1000 +
                               (int64_t)(got * 1000 / DATA_MIN_RATE));
}

/* Reads to the end of the data; IO_OK or the io_status that ended it. */
static int read_data(struct rx *x, struct data_state *d)
{
    static char piece[DATA_PIECE];
    size_t plen = 0;
    int64_t start_ms = io_clock_ms();
    unsigned long long start_in = x->io->bytes_in;

    for (;;) {
        bool complete = false;
        set_data_deadline(x, start_ms, start_in);
        long n = io_getseg(x->io, piece + plen, sizeof piece - plen,
                           &complete);
        if (n < 0)
            return (int)n;
        plen += (size_t)n;
        if (!complete && plen < sizeof piece)
            continue;
        if (data_piece(x, d, piece, plen, complete))
            return IO_OK;
        plen = 0;
    }
}

/* Without linger the summary line says it all; a session that stays for
 * hours says what it received as it goes. */
static void log_pushed(struct rx *x, unsigned long long bytes,
                       const struct reply *r)
{
    char from[ADDR_MAX + 1];
    addr_format(&x->mail.from, from, sizeof from);
    fprintf(stderr, "odmr-fetch: received message from <%s>, %llu bytes, "
                    "%zu recipient(s): %s\n", from, bytes, x->nrcpt, r->line);
}

struct pipelined;
static struct target_group *next_group(struct rx *x, struct pipelined *p);
static bool answer_group(struct rx *x, struct pipelined *p);

/* The end of the data; next: the group that follows it, or NULL. */
static void finish_data(struct rx *x, const struct data_state *d,
                        struct target_group *next)
{
    struct reply r;
    char shown[64];

    snprintf(shown, sizeof shown, "(message data, %llu bytes)", d->bytes);
    trace_line(WHO, false, shown);
    if (next) {
        x->t.ops->end_group(&x->t, &r, next);
    } else if (d->bad_eol) {
        x->t.ops->end(&x->t, true, &r);
        reply_set(&r, 554, "5.5.2 Bare CR or LF in message data (not "
                           "accepted)");
    } else {
        x->t.ops->end(&x->t, false, &r);
    }
    send_reply(x, &r);
    if (r.code / 100 == 2) {
        x->st->messages++;
        x->st->bytes += d->bytes;
        if (x->c->linger && x->c->verbose)   /* pushed: one line each */
            log_pushed(x, d->bytes, &r);
    } else {
        /* Quiet by default, but never about mail that did not arrive:
         * cron mails this line to the site's administrator. */
        char from[ADDR_MAX + 1];
        addr_format(&x->mail.from, from, sizeof from);
        fprintf(stderr, "odmr-fetch: message from <%s> %s: %s\n", from,
                r.code / 100 == 4 ? "deferred (stays queued at the provider)"
                                  : "refused (returned to the sender)",
                r.line);
    }
}

/* DATA's checks made here; false when answered already. */
static bool data_acceptable(struct rx *x)
{
    if (x->in_mail && x->nrcpt > 0)
        return true;
    say(x, x->in_mail ? "554 5.5.1 No valid recipients"
                      : "503 5.5.1 Need MAIL command");
    return false;
}

/* The target's answer to DATA: the data follows only after 354. */
static bool data_started(struct rx *x, const struct reply *r)
{
    if (r->code == 354)
        return true;
    send_reply(x, r);
    end_transaction(x);
    return false;
}

static void receive_data(struct rx *x);
static struct pipelined *group_buf(void);

static void do_data(struct rx *x, const char *arg)
{
    struct reply r;

    if (*arg) {
        say_error(x, "501 5.5.4 Syntax: DATA");
        return;
    }
    if (!data_acceptable(x))
        return;
    x->t.ops->data(&x->t, &r);
    if (data_started(x, &r))
        receive_data(x);
}

/* From our 354 to the reply to the final dot; true when the next
 * group came with it and was passed on (group_buf). */
static bool receive_one(struct rx *x)
{
    struct data_state d = {.line_start = true, .after_crlf = true,
                           .target_ok = true};
    struct reply r;

    say(x, "354 End data with <CR><LF>.<CR><LF>");
    int st = read_data(x, &d);
    io_set_deadline(x->io, 0);
    if (st != IO_OK) {
        x->t.ops->end(&x->t, true, &r);   /* nothing was acknowledged */
        x->in_mail = false;
        x->done = x->lost = true;
        if (st == IO_TIMEOUT)
            say(x, "421 4.4.2 %s Error: timeout exceeded", x->c->fqdn);
        else if (st == IO_DEADLINE)
            say(x, "421 4.4.2 %s Error: data rate too low", x->c->fqdn);
        if (st == IO_DEADLINE)
            fprintf(stderr, "odmr-fetch: %s sent message data slower than %d "
                            "bytes/s: session ended\n", x->c->server,
                    DATA_MIN_RATE);
        else
            fprintf(stderr, "odmr-fetch: connection to %s lost during "
                            "message data\n", x->c->server);
        return false;
    }
    struct target_group *next = d.bad_eol || !x->t.ops->end_group
                                    ? NULL : next_group(x, group_buf());
    finish_data(x, &d, next);
    x->in_mail = false;
    x->nrcpt = 0;
    x->rcpts_seen = 0;
    x->last_mail_ms = io_clock_ms();
    return next != NULL;
}

/* A loop, not recursion: a drain is one message after another. */
static void receive_data(struct rx *x)
{
    while (receive_one(x) && answer_group(x, group_buf()))
        ;
}

/* ---- pipelined envelopes --------------------------------------------- */

/* Recipients in one group; any further ones follow one by one. */
#define GROUP_RCPT_MAX 100

struct rcpt_slot {
    struct rcpt_args args;
    char addr[ADDR_MAX + 1];
    char refused[SMTP_REPLY_LINE_MAX];   /* our own reply; "" = sent on */
};

struct pipelined {
    struct mail_args mail;
    struct target_group g;
    struct rcpt_slot slot[GROUP_RCPT_MAX];
    struct group_rcpt sent[GROUP_RCPT_MAX];
    size_t nslot;
};

/* Copies the next command line out of what has already been read, if
 * all of it is there.  Only such lines may join a group, so a group never
 * waits for odmrd, and a line this declines is read as usual later. */
static bool peek_command(const struct io *io, char *buf, size_t n)
{
    const char *p = io->rbuf + io->rpos;
    const char *nl = memchr(p, '\n', io->rlen - io->rpos);
    if (!nl)
        return false;
    size_t len = (size_t)(nl - p);
    if (len && p[len - 1] == '\r')
        len--;
    if (len + 2 > n || memchr(p, '\0', len))
        return false;
    memcpy(buf, p, len);
    buf[len] = '\0';
    return true;
}

/* Takes the line peek_command showed (it is all buffered: no wait). */
static void take_command(struct rx *x, char *buf, size_t n)
{
    if (io_getline(x->io, buf, n, NULL) >= 0)
        trace_line(WHO, false, buf);
}

static void add_rcpt(struct rx *x, struct pipelined *p, const char *arg)
{
    struct rcpt_slot *sl = &p->slot[p->nslot++];

    sl->refused[0] = '\0';
    if (rcpt_acceptable(x, &p->mail, arg, &sl->args, sl->addr, sl->refused,
                        sizeof sl->refused))
        p->sent[p->g.nrcpt++] = (struct group_rcpt){&sl->args, sl->addr,
                                                    {0, ""}};
}

/* The RCPTs and the DATA that follow MAIL in the buffer. */
static void collect_group(struct rx *x, struct pipelined *p)
{
    char line[SMTP_MAILRCPT_LINE_MAX];
    struct smtp_cmd cmd;

    while (p->nslot < GROUP_RCPT_MAX && peek_command(x->io, line, sizeof line)) {
        smtp_cmd_parse(line, &cmd);
        bool data = cmd.verb == SMTP_DATA && cmd.arg && !*cmd.arg;
        if (!data && (cmd.verb != SMTP_RCPT || !cmd.arg))
            return;
        take_command(x, line, sizeof line);
        if (data) {
            p->g.data = true;
            return;
        }
        smtp_cmd_parse(line, &cmd);
        add_rcpt(x, p, cmd.arg);
    }
}

static struct pipelined *group_buf(void)
{
    static struct pipelined p;   /* large; one group at a time */
    return &p;
}

/* The replies, in the order of the commands, as one by one.  True when
 * the data follows (354 given). */
static bool answer_group(struct rx *x, struct pipelined *p)
{
    size_t k = 0;

    x->mail = p->mail;
    send_reply(x, &p->g.mail_reply);
    x->in_mail = p->g.mail_reply.code / 100 == 2;
    x->nrcpt = 0;
    x->rcpts_seen = p->nslot;
    for (size_t i = 0; i < p->nslot; i++) {
        const struct rcpt_slot *sl = &p->slot[i];
        if (!x->in_mail)
            say(x, "503 5.5.1 Need MAIL command");
        else if (sl->refused[0])
            say_error(x, "%s", sl->refused);
        else
            rcpt_answered(x, sl->addr, &p->sent[k].reply);
        k += !sl->refused[0];
    }
    return p->g.data && data_acceptable(x) &&
           data_started(x, &p->g.data_reply);
}

/* MAIL (checked already) with whatever was pipelined behind it; false
 * when nothing was, and MAIL goes on alone. */
static bool mail_group(struct rx *x)
{
    struct pipelined *p = group_buf();

    p->mail = x->mail;
    p->nslot = 0;
    p->g = (struct target_group){.mail = &p->mail, .rcpt = p->sent};
    collect_group(x, p);
    if (p->nslot == 0 && !p->g.data)
        return false;
    x->t.ops->group(&x->t, &p->g);
    if (answer_group(x, p))
        receive_data(x);
    return true;
}

/* MAIL's checks made here, silently: a MAIL that fails them is read and
 * answered as usual instead of joining the end of the data. */
static bool mail_acceptable(struct rx *x, const char *arg, struct mail_args *m)
{
    struct smtp_err err;

    return smtp_parse_mail(arg, m, x->esmtp && x->t.caps.smtputf8, &err) &&
           mail_params_offered(x, m) &&
           !(x->t.caps.size && m->size > x->t.caps.size);
}

/* A MAIL group already read behind the final dot, to go with it. */
static struct target_group *next_group(struct rx *x, struct pipelined *p)
{
    char line[SMTP_MAILRCPT_LINE_MAX];
    struct smtp_cmd cmd;

    if (!peek_command(x->io, line, sizeof line))
        return NULL;
    smtp_cmd_parse(line, &cmd);
    if (cmd.verb != SMTP_MAIL || !cmd.arg ||
        !mail_acceptable(x, cmd.arg, &p->mail))
        return NULL;
    take_command(x, line, sizeof line);
    p->nslot = 0;
    p->g = (struct target_group){.mail = &p->mail, .rcpt = p->sent};
    collect_group(x, p);
    return &p->g;
}

/* ---- the command loop ------------------------------------------------ */

static void dispatch(struct rx *x, const struct smtp_cmd *cmd)
{
    const char *arg = cmd->arg ? cmd->arg : "";

    switch (cmd->verb) {
    case SMTP_EHLO: do_hello(x, arg, true); break;
    case SMTP_HELO: do_hello(x, arg, false); break;
    case SMTP_MAIL:
        if (cmd->arg)
            do_mail(x, arg);
        else
            say_error(x, "501 5.5.4 Syntax: MAIL FROM:<address>");
        break;
    case SMTP_RCPT:
        if (cmd->arg)
            do_rcpt(x, arg);
        else
            say_error(x, "501 5.5.4 Syntax: RCPT TO:<address>");
        break;
    case SMTP_DATA: do_data(x, arg); break;
    case SMTP_RSET:
        end_transaction(x);
        say(x, "250 2.0.0 Ok");
        break;
    case SMTP_NOOP: say(x, "250 2.0.0 Ok"); break;
    case SMTP_VRFY:
        say(x, "252 2.5.0 Cannot VRFY user, but will accept message");
        break;
    case SMTP_HELP:
        say(x, "214 2.0.0 odmr-fetch: EHLO HELO MAIL RCPT DATA RSET NOOP "
               "QUIT");
        break;
    case SMTP_QUIT:
        say(x, "221 2.0.0 %s closing connection", x->c->fqdn);
        x->quit = x->done = true;
        break;
    default:
        say(x, "502 5.5.1 Command not implemented");
        x->bad_commands++;
        break;
    }
}

enum { LINE_END = -1, LINE_BAD = 0, LINE_OK = 1 };

static bool moves_no_mail(int verb)
{
    return verb == SMTP_NOOP || verb == SMTP_VRFY || verb == SMTP_HELP ||
           verb == SMTP_EHLO || verb == SMTP_HELO;
}

/* A provider that keeps the session up without sending mail: past
 * MAX_JUNK_COMMANDS such commands; lingering, once --linger and then
 * --timeout have passed since the last transaction (odmrd's NOOPs keep a
 * lingering session up, and it ends it within our XLINGER).  Ends the
 * session with 421 and returns true. */
static bool idle_too_long(struct rx *x, int verb)
{
    if (!moves_no_mail(verb))
        return false;
    if (x->c->linger) {
        int64_t idle_ms = io_clock_ms() - x->last_mail_ms;
        if (idle_ms <= (x->c->linger + x->c->timeout) * 1000)
            return false;
        say(x, "421 4.4.2 %s Linger time over, closing connection",
            x->c->fqdn);
        fprintf(stderr, "odmr-fetch: %s kept the session up past --linger "
                        "(%ld s) and --timeout: ended it\n", x->c->server,
                x->c->linger);
        x->linger_over = true;
    } else {
        if (++x->junk_commands <= MAX_JUNK_COMMANDS)
            return false;
        say(x, "421 4.7.0 %s Too many commands", x->c->fqdn);
        fprintf(stderr, "odmr-fetch: %s sent more than %d commands without "
                        "a message\n", x->c->server, MAX_JUNK_COMMANDS);
        if (x->status == 0)   /* mail deferred says more: try again */
            x->status = EX_PROTOCOL;
    }
    x->done = true;
    return true;
}

/* Reads and checks one command line: LINE_OK, LINE_BAD (answered
 * already), or LINE_END when the connection is gone. */
static int next_command(struct rx *x, char *line, size_t size)
{
    long n = io_getline(x->io, line, size, NULL);

    if (n == IO_TOOLONG) {
        say(x, "500 5.5.6 Line too long");
        x->io->status = IO_OK;
        return LINE_BAD;
    }
    if (n < 0) {
        if (n == IO_TIMEOUT)
            say(x, "421 4.4.2 %s Error: timeout exceeded", x->c->fqdn);
        else if (n == IO_DEADLINE)
            say(x, "421 4.4.2 %s Error: command deadline exceeded",
                x->c->fqdn);
        fprintf(stderr, "odmr-fetch: %s %s before QUIT\n", x->c->server,
                n == IO_TIMEOUT    ? "went silent"
                : n == IO_DEADLINE ? "sent a command line too slowly"
                                   : "closed the connection");
        x->lost = true;
        return LINE_END;
    }
    trace_line(WHO, false, line);
    if (strlen(line) != (size_t)n) {
        say(x, "500 5.5.2 NUL character in command line");
        return LINE_BAD;
    }
    return LINE_OK;
}

static void serve(struct rx *x)
{
    /* MAIL and RCPT may be 2048 octets with CRLF, everything else 512. */
    static char line[SMTP_MAILRCPT_LINE_MAX];

    while (!x->done) {
        int k = next_command(x, line, sizeof line);
        if (k == LINE_END)
            return;
        if (k == LINE_OK) {
            struct smtp_cmd cmd;
            smtp_cmd_parse(line, &cmd);
            bool long_ok = cmd.verb == SMTP_MAIL || cmd.verb == SMTP_RCPT;
            size_t max = long_ok ? SMTP_MAILRCPT_LINE_MAX : SMTP_LINE_MAX;
            if (strlen(line) + 2 > max) {
                say(x, "500 5.5.6 Line too long");
                k = LINE_BAD;
            } else if (cmd.verb == SMTP_MAIL) {   /* a transaction begins */
                x->junk_commands = 0;
                x->last_mail_ms = io_clock_ms();
                dispatch(x, &cmd);
            } else if (idle_too_long(x, cmd.verb)) {
                return;
            } else {
                dispatch(x, &cmd);
            }
        }
        if (k == LINE_BAD)
            x->bad_commands++;
        if (x->bad_commands >= MAX_BAD_COMMANDS) {
            say(x, "421 4.7.0 %s Too many errors", x->c->fqdn);
            fprintf(stderr, "odmr-fetch: too many bad commands from %s\n",
                    x->c->server);
            if (x->status == 0)   /* mail deferred says more: try again */
                x->status = EX_PROTOCOL;
            return;
        }
    }
}

int receiver_run(const struct fetch_conf *c, struct io *io,
                 struct fetch_stats *st)
{
    static struct rx x;
    char err[512];

    memset(&x, 0, sizeof x);
    x.c = c;
    x.io = io;
    x.st = st;
    x.last_mail_ms = io_clock_ms();
    target_init(&x.t, c);
    if (!target_open(&x.t, err, sizeof err)) {
        fprintf(stderr, "odmr-fetch: delivery target %s: %s; the provider "
                        "keeps the mail\n", c->target.text, err);
        say(&x, "421 4.4.1 %s Local mail system unavailable, try again "
                "later", c->fqdn);
        io_flush(io);
        x.t.ops->close(&x.t);
        return EX_TEMPFAIL;
    }
    say(&x, "220 %s ESMTP odmr-fetch", c->fqdn);
    serve(&x);
    io_flush(io);
    end_transaction(&x);
    x.t.ops->close(&x.t);
    /* Without QUIT odmrd may not have settled everything it sent. */
    if (x.status == 0 && !x.quit && !x.linger_over)
        return EX_TEMPFAIL;
    return x.status;
}
