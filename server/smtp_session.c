/* smtp_session.c - inbound SMTP and LMTP for the hosted domains (SPEC 3.4).
 *
 * One session per process.  Recipients are grouped per domain as they are
 * accepted; at the end of DATA the message is committed once, with one
 * envelope per domain (queue.h), and only then acknowledged. */
#include "session.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/io.h"
#include "../common/log.h"
#include "../common/smtp.h"
#include "../common/util.h"
#include "accounts.h"
#include "data_stream.h"
#include "milter.h"
#include "queue.h"
#include "recipients.h"

#define MAX_RECEIVED 50          /* SPEC 3.4: more means a mail loop */

volatile sig_atomic_t session_stop_requested;
volatile sig_atomic_t session_idle;

struct accepted {                /* a recipient, in RCPT order (LMTP replies) */
    size_t env;
    char addr[ADDR_MAX + 1];
};

struct smtp {
    const struct odmrd_conf *conf;
    SSL_CTX *tls_ctx;
    const struct session_peer *peer;
    bool lmtp;
    struct queue q;
    char helo[HELO_MAX + 1];
    bool greeted, esmtp, tls_on;
    unsigned bad_commands;       /* and refusals: see reply */
    unsigned junk_commands;      /* since the last message (Postfix's rule) */
    /* transaction */
    bool have_mail;
    struct mail_args mail;
    struct envelope *envs;       /* one per recipient domain */
    bool *listed;                /* per envs[i]: its domain has a recipient list */
    size_t nenv;
    struct accepted *rcpts;
    size_t nrcpt;
    unsigned rcpt_overshoot;     /* RCPTs past max_recipients */
    /* mail filters (milter.h); NULL when none are configured */
    struct milter_chain *milter;
    char milter_refusal[MILTER_REPLY_MAX];   /* at connect or HELO, or "" */
    bool milter_discard;         /* a milter discarded the message early */
    bool milter_421;             /* a milter answered 421: end the session */
    char client_port[8], if_addr[64];
    struct io io;                /* last: its buffers need no clearing */
};

/* Every reply of this session goes to its connection, traced with its
 * peer; refusals count (guessing recipients, repeating a refused MAIL). */
#define reply(s, ...) \
    session_reply_counted(&(s)->io, (s)->peer->addr, &(s)->bad_commands, \
                          __VA_ARGS__)

static void reset_transaction(struct smtp *s)
{
    for (size_t i = 0; i < s->nenv; i++)
        envelope_free(&s->envs[i]);
    free(s->envs);
    free(s->listed);
    s->listed = NULL;
    free(s->rcpts);
    s->envs = NULL;
    s->rcpts = NULL;
    s->nenv = s->nrcpt = 0;
    s->rcpt_overshoot = 0;
    s->have_mail = false;
    memset(&s->mail, 0, sizeof s->mail);
    s->milter_discard = false;
    if (s->milter)
        milter_chain_abort(s->milter);
    session_idle = 1;
}

/* -------------------------------------------------------------- milters */

/* A reply of one or more lines joined by CRLF; suffix goes on the last. */
static void reply_lines(struct smtp *s, const char *text, const char *suffix)
{
    for (;;) {
        const char *eol = strstr(text, "\r\n");
        int len = eol ? (int)(eol - text) : (int)strlen(text);
        reply(s, "%.*s%s", len, text, eol ? "" : suffix);
        if (!eol)
            return;
        text = eol + 2;
    }
}

static void milter_macros_of(struct smtp *s, struct milter_macros *m,
                             const char *queue_id, const char *rcpt)
{
    static char sender[ADDR_MAX + 1];
    memset(m, 0, sizeof *m);
    m->hostname = s->conf->hostname;
    m->client_addr = s->peer->addr;
    m->client_port = s->client_port;
    m->if_addr = s->if_addr;
    m->daemon_name = "odmrd";
    m->helo = s->helo;
    if (s->tls_on && s->io.ssl) {
        m->tls_version = SSL_get_version(s->io.ssl);
        m->cipher = SSL_get_cipher_name(s->io.ssl);
    }
    m->queue_id = queue_id;
    sender[0] = '\0';
    if (s->have_mail || s->mail.from.local[0] || s->mail.from.domain[0])
        addr_format(&s->mail.from, sender, sizeof sender);
    m->mail_addr = sender;
    m->rcpt_addr = rcpt;
}

/* Logs a milter's refusal of a command and says it to the client. */
static void milter_refused(struct smtp *s, const char *what,
                           const struct milter_result *r)
{
    log_info("milter-reject: %s from %s: %.200s (milter %s)", what,
             s->peer->addr, r->reply, r->by);
    reply_lines(s, r->reply, "");
    /* 421 closes the transmission channel (RFC 5321 3.8), as Sendmail and
     * Postfix do when a milter chooses it */
    s->milter_421 |= !strncmp(r->reply, "421", 3);
}

/* The client's port and the address it reached, for the macros. */
static void socket_names(struct smtp *s)
{
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    char host[NI_MAXHOST];
    if (getpeername(s->peer->fd, (struct sockaddr *)&a, &len) != 0 ||
        getnameinfo((struct sockaddr *)&a, len, host, sizeof host,
                    s->client_port, sizeof s->client_port,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
        s->client_port[0] = '\0';
    len = sizeof a;
    if (getsockname(s->peer->fd, (struct sockaddr *)&a, &len) != 0 ||
        getnameinfo((struct sockaddr *)&a, len, s->if_addr, sizeof s->if_addr,
                    NULL, 0, NI_NUMERICHOST) != 0)
        s->if_addr[0] = '\0';
}

/* Opens the milters and tells them about the connection; a refusal is
 * remembered and given to every MAIL (Postfix does the same). */
static void milter_session_start(struct smtp *s)
{
    static struct milter_chain chain;
    struct milter_macros m;
    struct milter_result r;
    if (!s->conf->n_milters)
        return;
    s->milter = &chain;
    socket_names(s);
    milter_chain_open(&chain, s->conf, s->peer->fd);
    milter_macros_of(s, &m, NULL, NULL);
    char name[80];
    snprintf(name, sizeof name, "[%s]", s->peer->addr);  /* no reverse DNS */
    milter_chain_connect(&chain, &m, name, &r);
    if (r.verdict == MILTER_REJECT || r.verdict == MILTER_TEMPFAIL) {
        str_copy(s->milter_refusal, r.reply, sizeof s->milter_refusal);
        log_info("milter-reject: CONNECT from %s: %.200s (milter %s)",
                 s->peer->addr, r.reply, r.by);
    }
}

static bool milter_helo_ok(struct smtp *s)
{
    struct milter_macros m;
    struct milter_result r;
    if (!s->milter || s->milter_refusal[0])
        return true;
    milter_macros_of(s, &m, NULL, NULL);
    milter_chain_helo(s->milter, &m, &r);
    if (r.verdict == MILTER_CONTINUE)
        return true;
    milter_refused(s, "HELO", &r);
    return false;
}

static bool milter_mail_ok(struct smtp *s)
{
    struct milter_macros m;
    struct milter_result r;
    char from[ADDR_MAX + 3], size[32] = "";
    if (!s->milter)
        return true;
    if (s->milter_refusal[0]) {
        reply_lines(s, s->milter_refusal, "");
        s->milter_421 |= !strncmp(s->milter_refusal, "421", 3);
        return false;
    }
    milter_macros_of(s, &m, NULL, NULL);
    snprintf(from, sizeof from, "<%s>", m.mail_addr);
    if (s->mail.size)
        snprintf(size, sizeof size, "SIZE=%llu", (unsigned long long)s->mail.size);
    /* the client's ESMTP args odmrd keeps, as Postfix passes them on */
    const char *args[5];
    size_t na = 0;
    args[na++] = from;
    if (size[0])
        args[na++] = size;
    if (s->mail.body == BODY_8BITMIME)
        args[na++] = "BODY=8BITMIME";
    if (s->mail.smtputf8)
        args[na++] = "SMTPUTF8";
    args[na] = NULL;
    milter_chain_mail(s->milter, &m, args, &r);
    if (r.verdict == MILTER_DISCARD)
        s->milter_discard = true;
    else if (r.verdict != MILTER_CONTINUE) {
        milter_refused(s, "MAIL", &r);
        milter_chain_abort(s->milter);
        return false;
    }
    return true;
}

/* RCPT: a refused recipient is not added; its domain's envelope goes
 * when it was created for it. */
static bool milter_rcpt_ok(struct smtp *s, struct envelope *e, const char *addr)
{
    struct milter_macros m;
    struct milter_result r;
    char to[ADDR_MAX + 3];
    if (!s->milter)
        return true;
    milter_macros_of(s, &m, NULL, addr);
    snprintf(to, sizeof to, "<%s>", addr);
    const char *args[] = {to, NULL};
    milter_chain_rcpt(s->milter, &m, args, &r);
    if (r.verdict == MILTER_DISCARD)
        s->milter_discard = true;
    if (r.verdict == MILTER_CONTINUE || r.verdict == MILTER_DISCARD)
        return true;
    milter_refused(s, "RCPT", &r);
    if (e->nrcpt == 0 && e == &s->envs[s->nenv - 1])
        envelope_free(&s->envs[--s->nenv]);
    return false;
}

/* ------------------------------------------------------------ greeting */

static void do_helo(struct smtp *s, const char *arg, bool extended)
{
    if (!*arg) {
        reply(s, "501 5.5.4 Syntax: %s hostname",
              s->lmtp ? "LHLO" : extended ? "EHLO" : "HELO");
        return;
    }
    reset_transaction(s);
    str_copy(s->helo, arg, sizeof s->helo);
    /* The name ends up in Received: headers and logs: keep it printable. */
    for (char *p = s->helo; *p; p++)
        if ((unsigned char)*p < 33 || (unsigned char)*p > 126 || *p == '(' ||
            *p == ')')
            *p = '?';
    if (!milter_helo_ok(s))
        return;
    s->greeted = true;
    s->esmtp = extended;
    if (!extended) {
        reply(s, "250 %s", s->conf->hostname);
        return;
    }
    reply(s, "250-%s", s->conf->hostname);
    reply(s, "250-PIPELINING");
    reply(s, "250-SIZE %llu", (unsigned long long)s->conf->max_message_size);
    reply(s, "250-8BITMIME");
    if (s->tls_ctx && !s->tls_on)
        reply(s, "250-STARTTLS");
    reply(s, "250-DSN");
    reply(s, "250-SMTPUTF8");
    reply(s, "250 ENHANCEDSTATUSCODES");
}

static void do_starttls(struct smtp *s, const char *arg)
{
    if (session_starttls(&s->io, s->tls_ctx, s->tls_on, arg, s->peer->addr,
                         &s->bad_commands) != STARTTLS_ON)
        return;
    s->tls_on = true;
    /* RFC 3207: forget everything learnt before the handshake. */
    reset_transaction(s);
    s->greeted = false;
    s->helo[0] = '\0';
}

/* ---------------------------------------------------------------- MAIL */

static void do_mail(struct smtp *s, const char *arg)
{
    struct smtp_err err;
    if (!s->greeted) {
        reply(s, "503 5.5.1 Send %s first", s->lmtp ? "LHLO" : "EHLO/HELO");
        return;
    }
    if (s->have_mail) {
        reply(s, "503 5.5.1 Nested MAIL command");
        return;
    }
    if (!arg) {
        reply(s, "501 5.5.4 Syntax: MAIL FROM:<address>");
        return;
    }
    if (!smtp_parse_mail(arg, &s->mail, s->esmtp, &err)) {
        reply(s, "%s", err.reply);
        return;
    }
    if (!s->esmtp && (s->mail.size || s->mail.body || s->mail.ret ||
                      s->mail.envid[0] || s->mail.smtputf8)) {
        reply(s, "555 5.5.4 Parameters need EHLO");
        return;
    }
    if (s->mail.size > s->conf->max_message_size) {
        reply(s, "552 5.3.4 Message size exceeds fixed limit");
        return;
    }
    if (!milter_mail_ok(s))
        return;
    s->have_mail = true;
    session_idle = 0;
    reply(s, "250 2.1.0 Ok");
}

/* ---------------------------------------------------------------- RCPT */

static struct envelope *find_env(struct smtp *s, const char *domain)
{
    for (size_t i = 0; i < s->nenv; i++)
        if (!strcmp(s->envs[i].domain, domain))
            return &s->envs[i];
    return NULL;
}

/* Would queuing `extra` more bytes for domain exceed domain_quota? */
static bool over_quota(struct smtp *s, const char *domain, uint64_t extra)
{
    uint64_t bytes;
    unsigned long count;
    if (!s->conf->domain_quota)
        return false;
    if (!queue_usage(&s->q, domain, &bytes, &count))
        return false;
    return bytes + extra > s->conf->domain_quota || bytes >= s->conf->domain_quota;
}

/* Asks the account database about the recipient (sender routing is
 * refused without asking); false after replying when it is refused. */
static enum rcpt_result recipient_status(struct smtp *s, const struct mailbox *to,
                                         const char *key, bool *has_list)
{
    char owner[ACCOUNT_NAME_MAX + 1];
    return to->literal || recipients_routed(to->local) ? RCPT_NO_DOMAIN
           : recipients_check(s->conf->accounts_db, key, to->local, owner,
                              sizeof owner, has_list);
}

static bool recipient_ok(struct smtp *s, const struct mailbox *to,
                         const char *key, bool *has_list)
{
    enum rcpt_result r = recipient_status(s, to, key, has_list);
    if (r == RCPT_NO_DOMAIN) {
        log_info("reject: RCPT from %s: 550 5.7.1 <%s@%s>: Relay access denied",
                 s->peer->addr, to->local, to->domain);
        reply(s, "550 5.7.1 <%s@%s>: Relay access denied", to->local, to->domain);
    } else if (r == RCPT_UNKNOWN_USER) {
        log_info("reject: RCPT from %s: 550 5.1.1 <%s@%s>: Recipient address "
                 "rejected: User unknown", s->peer->addr, to->local, to->domain);
        reply(s, "550 5.1.1 <%s@%s>: Recipient address rejected: User unknown",
              to->local, to->domain);
    } else if (r != RCPT_VALID) {
        log_err("accounts database %s: temporary failure", s->conf->accounts_db);
        reply(s, "451 4.3.0 Temporary lookup failure");
    }
    return r == RCPT_VALID;
}

/* A new envelope for the domain key; NULL after replying. */
static struct envelope *new_envelope(struct smtp *s, const char *key,
                                     bool has_list)
{
    if (over_quota(s, key, s->mail.size)) {
        log_info("reject: RCPT from %s: 452 4.2.2 quota exceeded for %s",
                 s->peer->addr, key);
        reply(s, "452 4.2.2 Mailbox full: quota exceeded for %s", key);
        return NULL;
    }
    struct envelope *grown = realloc(s->envs, (s->nenv + 1) * sizeof *grown);
    if (grown)
        s->envs = grown;
    bool *flags = grown ? realloc(s->listed, (s->nenv + 1) * sizeof *flags) : NULL;
    if (!flags) {
        reply(s, "452 4.3.1 Insufficient system resources");
        return NULL;
    }
    s->listed = flags;
    s->listed[s->nenv] = has_list;
    struct envelope *e = &s->envs[s->nenv++];
    envelope_init(e);
    str_copy(e->domain, key, sizeof e->domain);
    return e;
}

/* Checks the recipient (its domain, its list, routing tricks) and returns
 * its domain's envelope, creating it on first use; NULL after replying
 * when the recipient cannot be accepted. */
static struct envelope *domain_envelope(struct smtp *s, const struct mailbox *to)
{
    char key[IDNA_KEY_MAX + 1] = "";
    const char *why = NULL;
    if (!to->literal && idna_domain_key(to->domain, key, sizeof key, &why) != IDNA_OK) {
        log_info("reject: RCPT from %s: 501 5.1.3 <%s@%s>: invalid domain (%s)",
                 s->peer->addr, to->local, to->domain, why);
        reply(s, "501 5.1.3 <%s@%s>: Invalid domain name (IDNA: %s)", to->local,
              to->domain, why);
        return NULL;
    }
    struct envelope *e = find_env(s, key);
    if (e && !s->listed[e - s->envs] && !recipients_routed(to->local))
        return e;   /* looked up in this transaction: no list, nothing to ask */
    bool has_list = false;
    if (!recipient_ok(s, to, key, &has_list))
        return NULL;
    return e ? e : new_envelope(s, key, has_list);
}

static bool already_listed(const struct envelope *e, const char *addr)
{
    for (size_t i = 0; i < e->nrcpt; i++)
        if (!strcmp(e->rcpt[i].addr, addr))
            return true;
    return false;
}

static void do_rcpt(struct smtp *s, const char *arg)
{
    struct rcpt_args ra;
    struct smtp_err err;
    char addr[ADDR_MAX + 1];
    if (!s->have_mail) {
        reply(s, "503 5.5.1 Need MAIL command");
        return;
    }
    if (!arg) {
        reply(s, "501 5.5.4 Syntax: RCPT TO:<address>");
        return;
    }
    if (!smtp_parse_rcpt(arg, &ra, s->mail.smtputf8, &err)) {
        reply(s, "%s", err.reply);
        return;
    }
    if (s->nrcpt >= s->conf->max_recipients) {
        /* The client is to send the rest in another transaction (RFC 5321
         * 4.5.3.1.10): a pipelined batch past the limit is no error, up
         * to as many again (Postfix's smtpd_recipient_overshoot_limit). */
        session_reply(&s->io, s->peer->addr, "452 4.5.3 Too many recipients");
        if (++s->rcpt_overshoot > s->conf->max_recipients)
            s->bad_commands++;
        return;
    }
    struct envelope *e = domain_envelope(s, &ra.to);
    if (!e)
        return;
    addr_format(&ra.to, addr, sizeof addr);
    if (!milter_rcpt_ok(s, e, addr))
        return;
    /* Room in the list first: a recipient in the envelope is one the
     * client was told 250 for. */
    struct accepted *grown = realloc(s->rcpts, (s->nrcpt + 1) * sizeof *grown);
    if (grown)
        s->rcpts = grown;
    if (!grown || (!already_listed(e, addr) &&
                   !envelope_add_rcpt(e, addr, ra.notify, ra.orcpt, SIZE_MAX))) {
        reply(s, "452 4.3.1 Insufficient system resources");
        return;
    }
    s->rcpts[s->nrcpt].env = (size_t)(e - s->envs);
    str_copy(s->rcpts[s->nrcpt].addr, addr, sizeof s->rcpts[0].addr);
    s->nrcpt++;
    reply(s, "250 2.1.5 Ok");
}

/* ---------------------------------------------------------------- DATA */

struct data_state {
    struct data_stream st;        /* the data's lines and their faults */
    int64_t start_ms;             /* io_clock_ms() when DATA began */
    int64_t milter_ms;            /* spent waiting for milters since */
    unsigned long long start_in;  /* io bytes_in then */
    /* for milters: where the headers and the body are in the queue file */
    uint64_t prefix;              /* odmrd's Received: */
    struct milter_span *hdrs;
    size_t nhdrs, hdrs_cap;
    bool hdrs_over;               /* more than MILTER_HEADERS_MAX */
    uint64_t body_off;            /* the empty line, or 0: not seen */
};

/* Notes where a header (or a piece of it) lies in the queue file. */
static void record_span(struct data_state *d, uint64_t off, size_t len,
                        bool new_header)
{
    if (d->hdrs_over)
        return;
    if (!new_header && d->nhdrs) {
        d->hdrs[d->nhdrs - 1].len += len;
        return;
    }
    if (d->nhdrs == d->hdrs_cap) {
        size_t cap = d->hdrs_cap ? d->hdrs_cap * 2 : 32;
        if (cap > MILTER_HEADERS_MAX)
            cap = MILTER_HEADERS_MAX;
        struct milter_span *grown = cap > d->hdrs_cap
                                        ? realloc(d->hdrs, cap * sizeof *grown)
                                        : NULL;
        if (!grown) {
            d->hdrs_over = true;
            return;
        }
        d->hdrs = grown;
        d->hdrs_cap = cap;
    }
    d->hdrs[d->nhdrs++] = (struct milter_span){off, len};
}

/* Passes one piece of message text (at offset off of the queue file) on
 * to the milters: header, the end of the headers or body. */
static void milter_feed(struct smtp *s, struct data_state *d,
                        const struct queue_in *in, const struct data_text *t)
{
    uint64_t off = in->size;
    if (t->part == DATA_HEADER) {
        bool folded = t->len && (t->p[0] == ' ' || t->p[0] == '\t');
        record_span(d, off, t->len, t->line_start && !folded);
        milter_chain_header_piece(s->milter, t->p, t->len, t->line_start);
    } else if (t->part == DATA_HEADERS_END) {
        struct milter_macros m;
        d->body_off = off;
        milter_macros_of(s, &m, in->id, NULL);
        milter_chain_end_of_headers(s->milter, &m);
    } else {
        milter_chain_body(s->milter, t->p, t->len);
    }
}

/* Handles one piece of a line: the whole line (ends in LF) or, for very
 * long lines, DATA_STREAM_PIECE_MAX bytes of it. Returns true at end of
 * data. */
static bool data_piece(struct smtp *s, struct queue_in *in, struct data_state *d,
                       const char *p, size_t len, bool complete)
{
    struct data_text t;
    if (data_stream_piece(&d->st, p, len, complete, &t))
        return true;
    if (!data_stream_refused(&d->st)) {
        if (s->milter) {
            /* the milters' time is not the client's (set_data_deadline) */
            int64_t t0 = io_clock_ms();
            milter_feed(s, d, in, &t);
            d->milter_ms += io_clock_ms() - t0;
        }
        queue_in_write(in, t.p, t.len);
    }
    return false;
}

/* Postfix's smtpd_min_data_rate: the whole DATA phase may last `timeout`
 * plus one second per data_min_rate bytes received, plus the time odmrd
 * spent waiting for its milters (a slow milter is not a slow client).  The per-read timeout
 * alone would let a client sending a byte every few seconds hold the
 * session forever; a client that really sends data keeps moving its
 * deadline forward. */
static void set_data_deadline(struct smtp *s, const struct data_state *d)
{
    unsigned long rate = s->conf->data_min_rate;
    if (!rate)
        return;
    /* Only what an accepted message may hold earns time.  A refused one
     * (a bare LF, too big) is still read to its end, so that the client
     * hears the refusal as the reply to its final dot - but a client
     * streaming on after a bare LF must not keep its slot for ever. */
    unsigned long long got = s->io.bytes_in - d->start_in;
    if (got > s->conf->max_message_size)
        got = s->conf->max_message_size;
    io_set_deadline(&s->io, d->start_ms + d->milter_ms + s->io.timeout_ms +
                                (int64_t)(got * 1000 / rate));
}

/* Reads message data to the terminating CRLF.CRLF. Returns false when the
 * connection failed or was too slow (nothing may be acknowledged then). */
static bool read_data(struct smtp *s, struct queue_in *in, struct data_state *d)
{
    char piece[DATA_STREAM_PIECE_MAX];
    size_t plen = 0;
    d->start_ms = io_clock_ms();
    d->milter_ms = 0;
    d->start_in = s->io.bytes_in;
    for (;;) {
        bool complete = false;
        set_data_deadline(s, d);
        long n = io_getseg(&s->io, piece + plen, sizeof piece - plen, &complete);
        if (n < 0)
            return false;
        plen += (size_t)n;
        if (!complete && plen < sizeof piece)
            continue;
        if (data_piece(s, in, d, piece, plen, complete))
            return true;
        plen = 0;
    }
}

static void add_received(struct smtp *s, struct queue_in *in)
{
    char hdr[2048], date[64], tls[256] = "", forpart[ADDR_MAX + 16] = "";
    rfc5322_date(time(NULL), date, sizeof date);
    if (s->tls_on) {
        char info[200];
        io_tls_info(&s->io, info, sizeof info);
        snprintf(tls, sizeof tls, "\r\n\t(using %s)", info);
    }
    if (s->nrcpt == 1)
        snprintf(forpart, sizeof forpart, "\r\n\tfor <%s>", s->rcpts[0].addr);
    const char *proto = s->lmtp ? "LMTP" : s->mail.smtputf8 ? "UTF8SMTP"
                                       : s->esmtp ? "ESMTP" : "SMTP";
    snprintf(hdr, sizeof hdr,
             "Received: from %s ([%s])%s\r\n\tby %s (odmrd) with %s%s id %s%s;"
             " %s\r\n",
             s->helo, s->peer->addr, tls, s->conf->hostname, proto,
             s->tls_on ? "S" : "", in->id, forpart, date);
    queue_in_write(in, hdr, strlen(hdr));
}

/* 452 4.3.1 means the disk is full: the client should try again later.
 * Anything else (permissions, a link in the spool, I/O errors) is a local
 * error that the administrator must look at (the log names the path). */
static const char *storage_reply(int err)
{
    if (err == ENOSPC || err == EDQUOT || err == ENOMEM)
        return "452 4.3.1 Insufficient system storage";
    return "451 4.3.0 Local error in processing";
}

/* Replies once for SMTP, once per recipient for LMTP (RFC 2033 4.2). */
static void reply_all(struct smtp *s, const char *text)
{
    if (!s->lmtp) {
        reply(s, "%s", text);
        return;
    }
    for (size_t i = 0; i < s->nrcpt; i++)
        reply(s, "%s <%s>", text, s->rcpts[i].addr);
}

static void fill_envelopes(struct smtp *s)
{
    char sender[ADDR_MAX + 1];
    addr_format(&s->mail.from, sender, sizeof sender);
    for (size_t i = 0; i < s->nenv; i++) {
        struct envelope *e = &s->envs[i];
        str_copy(e->sender, sender, sizeof e->sender);
        str_copy(e->envid, s->mail.envid, sizeof e->envid);
        e->ret = s->mail.ret;
        e->body = s->mail.body;
        e->smtputf8 = s->mail.smtputf8;
        str_copy(e->client, s->peer->addr, sizeof e->client);
        str_copy(e->helo, s->helo, sizeof e->helo);
    }
}

/* ------------------------------------------------- milters, end of data */

static void copy_write(void *ctx, const void *data, size_t len)
{
    queue_in_write(ctx, data, len);
}

/* The message as the milters changed it, in *copy under the same id; the
 * original is discarded.  false after replying when that failed. */
static bool milter_apply(struct smtp *s, struct queue_in *in,
                         struct data_state *d, const struct milter_edits *e,
                         struct queue_in *copy)
{
    char err[256];
    /* Past MILTER_HEADERS_MAX the headers are not recorded, so neither
     * new headers nor a new body (written after the recorded ones) can
     * be applied without losing some of them. */
    if (d->hdrs_over && (e->nheaders || e->body_fd >= 0)) {
        log_err("%s: milters changed a message with more than %d "
                "headers: not accepted", in->id, MILTER_HEADERS_MAX);
        queue_in_abort(in);
        reply_all(s, "451 4.3.0 Local error in processing");
        return false;
    }
    int fd = queue_in_reread(in);
    if (fd < 0 || !queue_in_begin_copy(&s->q, copy, in)) {
        int errnum = errno;
        log_err("%s: cannot apply milter changes: %s", in->id, strerror(errnum));
        if (fd >= 0)
            close(fd);
        queue_in_abort(in);
        reply_all(s, storage_reply(errnum));
        return false;
    }
    struct milter_original o = {fd, d->prefix, d->hdrs, d->nhdrs,
                                d->body_off ? d->body_off : in->size, in->size};
    bool ok = milter_rewrite(&o, e, copy_write, copy, err, sizeof err);
    close(fd);
    queue_in_abort(in);
    if (!ok) {
        log_err("%s: cannot apply milter changes: %s", in->id, err);
        queue_in_abort(copy);
        reply_all(s, "451 4.3.0 Local error in processing");
    }
    return ok;
}

/* A recipient a milter adds: only one the account database accepts, as
 * at RCPT time (a milter is never a way to relay); false when refused. */
static bool milter_add_rcpt(struct smtp *s, const char *id,
                            const struct milter_rcpt_edit *r)
{
    /* SMFIR_ADDRCPT_PAR's text carries NOTIFY= and ORCPT= after the
     * address: room for a whole RCPT argument, or the ORCPT is cut */
    char arg[SMTP_MAILRCPT_LINE_MAX + 3], key[IDNA_KEY_MAX + 1], addr[ADDR_MAX + 1];
    struct rcpt_args ra;
    struct smtp_err err;
    bool has_list = false;
    int len = snprintf(arg, sizeof arg, r->addr[0] == '<' ? "%s" : "<%s>",
                       r->addr);
    if (len < 0 || (size_t)len >= sizeof arg) {
        log_warn("%s: milter %s: recipient %.300s not added: too long", id,
                 r->by, r->addr);
        return false;
    }
    if (!smtp_parse_rcpt(arg, &ra, s->mail.smtputf8, &err) || ra.to.literal ||
        idna_domain_key(ra.to.domain, key, sizeof key, NULL) != IDNA_OK ||
        recipient_status(s, &ra.to, key, &has_list) != RCPT_VALID) {
        log_warn("%s: milter %s: recipient %.300s not added: not a hosted "
                 "recipient", id, r->by, r->addr);
        return false;
    }
    addr_format(&ra.to, addr, sizeof addr);
    size_t total = 0;
    for (size_t i = 0; i < s->nenv; i++)
        total += s->envs[i].nrcpt;
    if (total >= s->conf->max_recipients) {
        log_warn("%s: milter %s: recipient <%s> not added: max_recipients (%lu) "
                 "reached", id, r->by, addr, s->conf->max_recipients);
        return false;
    }
    struct envelope *e = find_env(s, key);
    if (!e) {
        struct envelope *grown = realloc(s->envs, (s->nenv + 1) * sizeof *grown);
        if (!grown)
            return false;
        s->envs = grown;
        e = &s->envs[s->nenv++];
        envelope_init(e);
        str_copy(e->domain, key, sizeof e->domain);
    }
    if (!already_listed(e, addr) &&
        !envelope_add_rcpt(e, addr, ra.notify, ra.orcpt, SIZE_MAX))
        return false;
    log_info("%s: milter %s: added recipient <%s>", id, r->by, addr);
    return true;
}

static void milter_del_rcpt(struct smtp *s, const char *id,
                            const struct milter_rcpt_edit *r)
{
    char want[ADDR_MAX + 1];
    str_copy(want, r->addr + (r->addr[0] == '<'), sizeof want);
    size_t len = strlen(want);
    if (len && want[len - 1] == '>' && r->addr[0] == '<')
        want[len - 1] = '\0';
    for (size_t i = 0; i < s->nenv; i++)
        for (size_t j = 0; j < s->envs[i].nrcpt; j++)
            if (!strcasecmp(s->envs[i].rcpt[j].addr, want)) {
                envelope_del_rcpt(&s->envs[i], j);
                log_info("%s: milter %s: removed recipient <%s>", id, r->by, want);
                return;
            }
    log_info("%s: milter %s: recipient %.300s to remove is not one", id, r->by,
             r->addr);
}

/* Applies the recipient changes; envelopes left without recipients go.
 * Returns the number of envelopes left. */
static size_t milter_recipients(struct smtp *s, const char *id,
                                const struct milter_edits *e)
{
    for (size_t i = 0; i < e->nrcpts; i++) {
        if (e->rcpts[i].add)
            milter_add_rcpt(s, id, &e->rcpts[i]);
        else
            milter_del_rcpt(s, id, &e->rcpts[i]);
    }
    size_t kept = 0;
    for (size_t i = 0; i < s->nenv; i++) {
        if (s->envs[i].nrcpt)
            s->envs[kept++] = s->envs[i];
        else
            envelope_free(&s->envs[i]);
    }
    s->nenv = kept;
    return kept;
}

/* Says the milter's refusal once (SMTP) or per recipient (LMTP). */
static void reply_all_lines(struct smtp *s, const char *text)
{
    char suffix[ADDR_MAX + 4];
    if (!s->lmtp) {
        reply_lines(s, text, "");
        return;
    }
    for (size_t i = 0; i < s->nrcpt; i++) {
        snprintf(suffix, sizeof suffix, " <%s>", s->rcpts[i].addr);
        reply_lines(s, text, suffix);
    }
}

/* A discarded message is acknowledged like a queued one and dropped. */
static void milter_discarded(struct smtp *s, struct queue_in *in,
                             const char *by)
{
    char text[SMTP_REPLY_LINE_MAX];
    log_info("%s: discarded by milter %s: client=%s, helo=%s, nrcpt=%zu",
             in->id, by, s->peer->addr, s->helo, s->nrcpt);
    queue_in_abort(in);
    snprintf(text, sizeof text, "250 2.0.0 Ok: queued as %s", in->id);
    reply_all(s, text);
}

/* The end of the message for the milters.  Returns the message to commit
 * (in, or its changed copy) or NULL after replying; held receives the
 * quarantine reason when a milter held it ("" otherwise). */
static struct queue_in *milter_end(struct smtp *s, struct queue_in *in,
                                   struct data_state *d, char *held, size_t hn)
{
    static struct queue_in copy;
    struct milter_macros m;
    struct milter_result r;
    struct milter_edits e;
    char tmp_dir[PATH_MAX];
    if (!s->milter)
        return in;
    if (s->milter_discard) {
        milter_chain_abort(s->milter);
        milter_discarded(s, in, "(at MAIL, RCPT or DATA)");
        return NULL;
    }
    if (!str_fmt(tmp_dir, sizeof tmp_dir, "%s/tmp", s->q.spool))
        tmp_dir[0] = '\0';   /* cannot happen: queue_open made it */
    milter_macros_of(s, &m, in->id, NULL);
    milter_chain_end_of_message(s->milter, &m, tmp_dir, &e, &r);
    struct queue_in *result = in;
    if (r.verdict == MILTER_DISCARD) {
        milter_discarded(s, in, r.by);
        result = NULL;
    } else if (r.verdict != MILTER_CONTINUE) {
        log_info("%s: milter-reject: END-OF-MESSAGE from %s: %.200s (milter %s)",
                 in->id, s->peer->addr, r.reply, r.by);
        queue_in_abort(in);
        reply_all_lines(s, r.reply);
        s->milter_421 |= !strncmp(r.reply, "421", 3);
        result = NULL;
    } else if (e.nrcpts && milter_recipients(s, in->id, &e) == 0) {
        milter_discarded(s, in, "(no recipient left)");
        result = NULL;
    } else if (e.nheaders || e.body_fd >= 0) {
        result = milter_apply(s, in, d, &e, &copy) ? &copy : NULL;
    }
    if (result && e.quarantine[0]) {
        snprintf(held, hn, "%s (milter %s)", e.quarantine, e.quarantined_by);
        log_info("%s: quarantined by milter %s: %s", in->id, e.quarantined_by,
                 e.quarantine);
    }
    if (result)
        milter_edits_apply_sender(&e, in->id, &s->mail);
    milter_edits_free(&e);
    return result;
}

/* The message's own faults (line ends, NUL, size, a loop): true after
 * refusing it. */
static bool data_refused(struct smtp *s, struct queue_in *in,
                         const struct data_state *d)
{
    if (d->st.bad_eol) {
        queue_in_abort(in);
        reply_all(s, "554 5.5.2 Bare CR or LF in message data (not accepted)");
        log_info("%s: rejected: bare CR or LF in data from %s", in->id, s->peer->addr);
        return true;
    }
    if (d->st.nul) {
        queue_in_abort(in);
        reply_all(s, "554 5.6.0 NUL character in message data (not accepted)");
        log_info("%s: rejected: NUL in data from %s", in->id, s->peer->addr);
        return true;
    }
    if (d->st.too_big) {
        queue_in_abort(in);
        reply_all(s, "552 5.3.4 Message size exceeds fixed limit");
        return true;
    }
    if (d->st.received > MAX_RECEIVED) {
        queue_in_abort(in);
        reply_all(s, "554 5.4.6 Too many Received: headers - mail loop?");
        log_info("%s: rejected: %u Received: headers (loop) from %s", in->id,
                 d->st.received, s->peer->addr);
        return true;
    }
    return false;
}

/* Decides what to say about a fully received message and commits it. */
static void finish_data(struct smtp *s, struct queue_in *in, struct data_state *d)
{
    char text[SMTP_REPLY_LINE_MAX];
    if (data_refused(s, in, d))
        return;
    char held[1024] = "";
    in = milter_end(s, in, d, held, sizeof held);
    if (!in)
        return;
    for (size_t i = 0; i < s->nenv; i++) {
        if (over_quota(s, s->envs[i].domain, in->size)) {
            queue_in_abort(in);
            snprintf(text, sizeof text, "452 4.2.2 Quota exceeded for %s",
                     s->envs[i].domain);
            reply_all(s, text);
            return;
        }
    }
    fill_envelopes(s);
    struct envelope **list = malloc(s->nenv * sizeof *list);
    int err = list ? 0 : ENOMEM;
    for (size_t i = 0; list && i < s->nenv; i++)
        list[i] = &s->envs[i];
    if (!err)
        err = held[0] ? queue_in_commit_held(&s->q, in, list, s->nenv, held)
                      : queue_in_commit(&s->q, in, list, s->nenv);
    free(list);
    if (err) {
        queue_in_abort(in);
        log_err("%s: cannot queue message in %s: %s", in->id, s->q.spool,
                strerror(err));
        reply_all(s, storage_reply(err));
        return;
    }
    log_info("%s: client=%s, helo=%s, from=<%s>, size=%llu, nrcpt=%zu, "
             "domains=%zu", in->id, s->peer->addr, s->helo, s->envs[0].sender,
             (unsigned long long)in->size, s->nrcpt, s->nenv);
    snprintf(text, sizeof text, "250 2.0.0 Ok: queued as %s", in->id);
    reply_all(s, text);
}

/* The connection failed or was too slow during DATA: nothing is queued; a
 * client that is still there hears why. */
static void data_lost(struct smtp *s, struct queue_in *in,
                      const struct data_state *d)
{
    enum io_status st = s->io.status;
    bool refused_late = st == IO_DEADLINE && data_stream_refused(&d->st);
    if (refused_late) {
        log_info("%s: refused message from %s still coming at its deadline "
                 "after %llu bytes: session ended", in->id, s->peer->addr,
                 s->io.bytes_in - d->start_in);
    } else if (st == IO_DEADLINE) {
        log_info("%s: lost connection with %s during DATA (data rate below "
                 "data_min_rate: %llu bytes in %lld s)", in->id, s->peer->addr,
                 s->io.bytes_in - d->start_in,
                 (long long)((io_clock_ms() - d->start_ms) / 1000));
    } else {
        log_info("%s: lost connection with %s during DATA (%s)", in->id,
                 s->peer->addr, st == IO_TIMEOUT ? "timeout" : "closed");
    }
    queue_in_abort(in);
    if (refused_late)
        reply(s, "421 4.7.0 %s Error: refused message not ended in time",
              s->conf->hostname);
    else if (st == IO_DEADLINE)
        reply(s, "421 4.4.2 %s Error: data rate too low", s->conf->hostname);
    else if (st == IO_TIMEOUT)
        reply(s, "421 4.4.2 %s Error: timeout exceeded", s->conf->hostname);
    io_flush(&s->io);
    s->io.status = st;   /* for the disconnect line */
}

/* DATA for the milters, once the queue id is known; false after
 * replying (and discarding the new queue file) when they refuse. */
static bool milter_data_ok(struct smtp *s, struct queue_in *in)
{
    struct milter_macros m;
    struct milter_result r;
    if (!s->milter)
        return true;
    milter_macros_of(s, &m, in->id, NULL);
    milter_chain_data(s->milter, &m, &r);
    if (r.verdict == MILTER_DISCARD)
        s->milter_discard = true;
    if (r.verdict == MILTER_CONTINUE || r.verdict == MILTER_DISCARD)
        return true;
    queue_in_abort(in);
    milter_refused(s, "DATA", &r);
    /* The milters have forgotten the transaction: so does the session,
     * or another DATA would reach them without MAIL and RCPT. */
    reset_transaction(s);
    return false;
}

static void do_data(struct smtp *s, const char *arg)
{
    struct queue_in in;
    struct data_state d = {0};
    if (!s->have_mail || s->nrcpt == 0) {
        reply(s, "503 5.5.1 %s", s->have_mail ? "No valid recipients"
                                              : "Need MAIL command");
        return;
    }
    if (*arg) {
        reply(s, "501 5.5.4 Syntax: DATA");
        return;
    }
    if (!queue_in_begin_at(&s->q, &in, s->envs[0].domain)) {
        int err = errno;
        log_err("cannot create queue file %s: %s", in.tmp_path, strerror(err));
        reply(s, "%s", storage_reply(err));
        return;
    }
    if (!milter_data_ok(s, &in))
        return;
    data_stream_init(&d.st, s->conf->max_message_size);
    reply(s, "354 End data with <CR><LF>.<CR><LF>");
    add_received(s, &in);
    d.prefix = in.size;
    bool complete = read_data(s, &in, &d);
    io_set_deadline(&s->io, 0);   /* DATA is over, and a 421 must go out */
    unsigned refused_before = s->bad_commands;
    if (complete)
        finish_data(s, &in, &d);
    else
        data_lost(s, &in, &d);
    /* The end of data is one command, however many LMTP replies it has;
     * and a message taken forgives the errors before it, as Postfix
     * does (a relay reusing its connection sends many messages). */
    s->bad_commands = s->bad_commands > refused_before ? refused_before + 1
                      : complete                       ? 0
                                                       : s->bad_commands;
    free(d.hdrs);
    if (!complete)
        return;
    reset_transaction(s);
    /* A client that sends whole messages is not idling. */
    s->junk_commands = 0;
}

/* ------------------------------------------------------------ dispatch */

static bool dispatch(struct smtp *s, const struct smtp_cmd *cmd)
{
    const char *arg = cmd->arg ? cmd->arg : "";
    switch (cmd->verb) {
    case SMTP_HELO:
    case SMTP_EHLO:
        if (s->lmtp) {
            reply(s, "500 5.5.1 This is LMTP: use LHLO");
            break;
        }
        do_helo(s, arg, cmd->verb == SMTP_EHLO);
        break;
    case SMTP_LHLO:
        if (!s->lmtp) {
            reply(s, "500 5.5.2 Command unrecognized");
            break;
        }
        do_helo(s, arg, true);
        break;
    case SMTP_MAIL: do_mail(s, cmd->arg); break;
    case SMTP_RCPT: do_rcpt(s, cmd->arg); break;
    case SMTP_DATA: do_data(s, arg); break;
    case SMTP_RSET:
        reset_transaction(s);
        reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_NOOP: reply(s, "250 2.0.0 Ok"); break;
    case SMTP_HELP:
        reply(s, "214 2.0.0 See RFC 5321; this server accepts mail for its "
                 "hosted domains only");
        break;
    case SMTP_VRFY:
        reply(s, "252 2.0.0 Cannot VRFY user, but will accept message");
        break;
    case SMTP_STARTTLS: do_starttls(s, arg); break;
    case SMTP_QUIT:
        reply(s, "221 2.0.0 Bye");
        return false;
    case SMTP_UNKNOWN:
        reply(s, "500 5.5.2 Command unrecognized");
        break;
    default:
        reply(s, "502 5.5.1 Command not implemented");
        break;
    }
    return true;
}

static void log_end(struct smtp *s)
{
    const char *why = s->io.status == IO_TIMEOUT ? "timeout"
                      : s->io.status == IO_DEADLINE ? "deadline exceeded"
                      : s->io.status == IO_EOF  ? "lost connection"
                      : s->io.status == IO_ERROR ? "I/O error" : "quit";
    log_info("disconnect from %s (%s)", s->peer->addr, why);
}

/* MAIL and RCPT may carry long parameters (RFC 5321 4.5.3.1.4 plus DSN). */
static size_t command_limit(int verb)
{
    return verb == SMTP_MAIL || verb == SMTP_RCPT ? SMTP_MAILRCPT_LINE_MAX
                                                  : SMTP_LINE_MAX;
}

static void session_loop(struct smtp *s)
{
    char line[SMTP_MAILRCPT_LINE_MAX + 1];
    for (;;) {
        if (session_stop_requested && !s->have_mail) {
            reply(s, "421 4.3.2 %s Service shutting down", s->conf->hostname);
            io_flush(&s->io);
            return;
        }
        struct smtp_cmd cmd;
        enum command_read r = session_read_command(
            &s->io, s->peer->addr, s->conf->hostname, line, sizeof line,
            command_limit, &s->bad_commands, &cmd);
        if (r == COMMAND_END)
            return;
        if (r == COMMAND_BAD)
            continue;
        if (session_too_much_junk(&s->io, s->peer->addr, s->conf->hostname,
                                  cmd.verb, &s->junk_commands))
            return;
        if (!dispatch(s, &cmd) || s->io.status != IO_OK || s->milter_421) {
            io_flush(&s->io);
            return;
        }
    }
}

void smtp_session_run(const struct odmrd_conf *conf, SSL_CTX *tls,
                      const struct session_peer *peer, bool lmtp)
{
    static struct smtp s;   /* large buffers: keep them off the stack */
    char err[PATH_MAX + 64];
    memset(&s, 0, offsetof(struct smtp, io));
    s.conf = conf;
    s.tls_ctx = tls;
    s.peer = peer;
    s.lmtp = lmtp;
    log_info("connect from %s (%s)", peer->addr, lmtp ? "LMTP" : "SMTP");
    session_start_io(&s.io, conf, peer);
    if (!queue_open(&s.q, conf->spool_dir, err, sizeof err)) {
        log_err("queue: %s", err);
        reply(&s, "421 4.3.0 %s Service temporarily unavailable", conf->hostname);
        io_flush(&s.io);
        io_close(&s.io);
        return;
    }
    milter_session_start(&s);
    reply(&s, "220 %s %s odmrd", conf->hostname, lmtp ? "LMTP" : "ESMTP");
    session_loop(&s);
    log_end(&s);
    reset_transaction(&s);
    if (s.milter)
        milter_chain_close(s.milter);
    io_close(&s.io);
}
