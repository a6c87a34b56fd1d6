/* milter_chain.c - the conversation with each configured milter (milter.h).
 *
 * Every exchange has a deadline (milter_connect_timeout for connecting and
 * OPTNEG, milter_command_timeout for the SMTP stages,
 * milter_content_timeout for headers, body and end of message, and
 * EOM_TIMEOUTS_MAX of them for a message's headers and body together, and
 * as many for the whole chain's end of message, never over EOM_CHAIN_MAX_S)
 * and every wait is bounded by it; nothing a milter sends is used before
 * milter_parse_reply has checked it. */
#include "milter.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../common/connect.h"
#include "../common/io.h"
#include "../common/log.h"
#include "../common/util.h"

#define ERR_MAX 256
/* SMFIR_PROGRESS restarts the content timeout, but the end of a message
 * never takes more than this many content timeouts. */
#define EOM_TIMEOUTS_MAX 4
/* The whole chain's end of message ends by then however many milters
 * there are: a client waits 10 minutes for the reply to its final dot
 * (RFC 5321 4.5.3.2.6), and mail accepted after it has gone comes again
 * when it retries - a duplicate.  Past it, the milter still answering
 * counts as failed and the ones after it are not asked
 * (milter_default_action for the message either way). */
#define EOM_CHAIN_MAX_S 540

static int64_t earlier(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

enum stage_kind { STAGE_SESSION, STAGE_MESSAGE };

/* ------------------------------------------------------------- sockets */

/* Waits for ev on fd until deadline; false + reason when it passes. */
static bool wait_for(int fd, short ev, int64_t deadline, char *err, size_t n)
{
    for (;;) {
        int64_t left = deadline - io_clock_ms();
        if (left <= 0) {
            snprintf(err, n, "timed out");
            return false;
        }
        struct pollfd p = {.fd = fd, .events = ev};
        int r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0)
            return true;
        if (r < 0 && errno != EINTR) {
            snprintf(err, n, "poll: %s", strerror(errno));
            return false;
        }
    }
}

/* Skips done bytes of the iovecs *v[0..*cnt) (and empty ones). */
static void iov_advance(struct iovec **v, int *cnt, size_t done)
{
    while (*cnt && done >= (*v)->iov_len) {
        done -= (*v)->iov_len;
        (*v)++;
        (*cnt)--;
    }
    if (*cnt) {
        (*v)->iov_base = (char *)(*v)->iov_base + done;
        (*v)->iov_len -= done;
    }
}

/* Writes the iovecs v[0..cnt) entirely, in as few system calls as the
 * socket allows. */
static bool send_iov(int fd, struct iovec *v, int cnt, int64_t deadline,
                     char *err, size_t n)
{
    iov_advance(&v, &cnt, 0);
    while (cnt) {
        struct msghdr msg = {.msg_iov = v, .msg_iovlen = (size_t)cnt};
        ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (w >= 0) {
            iov_advance(&v, &cnt, (size_t)w);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!wait_for(fd, POLLOUT, deadline, err, n))
                return false;
        } else if (errno != EINTR) {
            snprintf(err, n, "write: %s", strerror(errno));
            return false;
        }
    }
    return true;
}

/* Writes what is gathered for m. */
static bool flush_out(struct milter_conn *m, int64_t deadline, char *err,
                      size_t n)
{
    struct iovec v = {m->out, m->olen};
    m->olen = 0;
    return send_iov(m->fd, &v, 1, deadline, err, n);
}

/* Gathers one packet for m; one that does not fit goes out at once,
 * together with what was gathered before it (order kept). */
static bool put_packet(struct milter_conn *m, char cmd, const void *data,
                       size_t len, int64_t deadline, char *err, size_t n)
{
    /* olen may be within 5 of the end: the unsigned sum must stay on the
     * left, where it cannot wrap */
    if (5 + len <= sizeof m->out - m->olen) {
        milter_packet_head(m->out + m->olen, cmd, len);
        if (len)
            memcpy(m->out + m->olen + 5, data, len);
        m->olen += 5 + len;
        return true;
    }
    uint8_t head[5];
    milter_packet_head(head, cmd, len);
    struct iovec v[3] = {{m->out, m->olen}, {head, sizeof head},
                         {(void *)data, len}};
    m->olen = 0;
    return send_iov(m->fd, v, 3, deadline, err, n);
}

/* Reads exactly len bytes for m: first what its input buffer holds, then
 * from the socket (small reads through the buffer, so that one recv
 * usually brings several reply packets). */
static bool recv_bytes(struct milter_conn *m, uint8_t *out, size_t len,
                       int64_t deadline, char *err, size_t n)
{
    while (len) {
        if (m->ioff < m->ilen) {
            size_t take = m->ilen - m->ioff < len ? m->ilen - m->ioff : len;
            memcpy(out, m->in + m->ioff, take);
            m->ioff += take;
            out += take;
            len -= take;
            continue;
        }
        bool direct = len >= sizeof m->in;
        ssize_t r = recv(m->fd, direct ? out : m->in,
                         direct ? len : sizeof m->in, 0);
        if (r > 0 && direct) {
            out += r;
            len -= (size_t)r;
        } else if (r > 0) {
            m->ioff = 0;
            m->ilen = (size_t)r;
        } else if (r == 0) {
            snprintf(err, n, "connection closed by the milter");
            return false;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!wait_for(m->fd, POLLIN, deadline, err, n))
                return false;
        } else if (errno != EINTR) {
            snprintf(err, n, "read: %s", strerror(errno));
            return false;
        }
    }
    return true;
}

/* Reads one packet into c->pkt; *total: its length (command byte
 * included), checked by milter_frame before anything else is read. */
static bool recv_packet(struct milter_chain *c, struct milter_conn *m,
                        int64_t deadline, size_t *total, char *err, size_t n)
{
    uint8_t head[4];
    if (!recv_bytes(m, head, sizeof head, deadline, err, n))
        return false;
    if (milter_frame(head, sizeof head, total, err, n) < 0)
        return false;
    /* the head alone: milter_frame said "need more" and checked the length */
    *total = (size_t)head[0] << 24 | (size_t)head[1] << 16 |
             (size_t)head[2] << 8 | head[3];
    return recv_bytes(m, c->pkt, *total, deadline, err, n);
}

static bool recv_reply(struct milter_chain *c, struct milter_conn *m,
                       int64_t deadline, struct milter_reply *r, char *err,
                       size_t n)
{
    size_t total;
    return flush_out(m, deadline, err, n) &&
           recv_packet(c, m, deadline, &total, err, n) &&
           milter_parse_reply(c->pkt, total, r, err, n);
}

/* Closes m's socket; what was gathered or read for it goes too. */
static void conn_close(struct milter_conn *m)
{
    if (m->fd >= 0)
        close(m->fd);
    m->fd = -1;
    m->olen = m->ioff = m->ilen = 0;
}

/* ------------------------------------------------------------ failures */

static const char *default_name(enum milter_failure f)
{
    return f == MILTER_FAIL_ACCEPT ? "accept"
           : f == MILTER_FAIL_REJECT ? "reject" : "tempfail";
}

static void set_result(struct milter_result *r, enum milter_verdict v,
                       const char *reply, const char *by)
{
    r->verdict = v;
    str_copy(r->reply, reply, sizeof r->reply);
    str_copy(r->by, by, sizeof r->by);
}

/* A broken milter's share of a stage: milter_default_action. */
static void apply_default(struct milter_chain *c, struct milter_conn *m,
                          struct milter_result *r)
{
    enum milter_failure f = c->conf->milter_default_action;
    if (f == MILTER_FAIL_TEMPFAIL)
        set_result(r, MILTER_TEMPFAIL, "451 4.7.1 Service unavailable - try "
                   "again later", m->addr->name);
    else if (f == MILTER_FAIL_REJECT)
        set_result(r, MILTER_REJECT, "550 5.7.1 Command rejected",
                   m->addr->name);
}

/* Gives up on a milter for the rest of the session. */
static void conn_failed(struct milter_chain *c, struct milter_conn *m,
                        const char *stage, const char *why,
                        struct milter_result *r)
{
    log_warn("milter %s: %s: %s (milter_default_action = %s)", m->addr->name,
             stage, why, default_name(c->conf->milter_default_action));
    conn_close(m);
    m->broken = c->conf->milter_default_action != MILTER_FAIL_ACCEPT;
    if (r)
        apply_default(c, m, r);
}

/* ---------------------------------------------------------------- open */

static bool negotiate(struct milter_chain *c, struct milter_conn *m,
                      char *err, size_t n)
{
    uint8_t req[12];
    bool masked = false;
    int64_t deadline = io_clock_ms() + c->conf->milter_connect_timeout * 1000;
    milter_optneg_request(req, (uint32_t)c->conf->milter_protocol,
                          MILTER_ACTIONS_OFFERED, MILTER_STEPS_OFFERED);
    size_t total;
    if (!put_packet(m, SMFIC_OPTNEG, req, sizeof req, deadline, err, n) ||
        !flush_out(m, deadline, err, n) ||
        !recv_packet(c, m, deadline, &total, err, n))
        return false;
    if (c->pkt[0] != SMFIC_OPTNEG) {
        snprintf(err, n, "answered OPTNEG with '%c'", c->pkt[0]);
        return false;
    }
    if (!milter_parse_optneg(c->pkt + 1, total - 1,
                             (uint32_t)c->conf->milter_protocol, &m->neg,
                             &masked, err, n))
        return false;
    if (masked)
        log_warn("milter %s: asked for actions or steps odmrd does not offer; "
                 "ignored", m->addr->name);
    return true;
}

void milter_chain_open(struct milter_chain *c, const struct odmrd_conf *conf,
                       int client_fd)
{
    char err[ERR_MAX];
    (void)client_fd;
    memset(c, 0, sizeof *c);
    c->conf = conf;
    c->n = conf->n_milters;
    if (!c->n)
        return;
    c->pkt = malloc(MILTER_PACKET_MAX);
    for (size_t i = 0; i < c->n; i++) {
        struct milter_conn *m = &c->conn[i];
        m->addr = &conf->milters[i];
        m->fd = -1;
        if (!c->pkt) {
            conn_failed(c, m, "connect", "out of memory", NULL);
            continue;
        }
        unsigned long port = 0;
        if (!m->addr->is_unix)
            parse_ulong(m->addr->port, 65535, &port);
        m->fd = net_connect(m->addr->host, (unsigned)port,
                            conf->milter_connect_timeout, err, sizeof err);
        if (m->fd < 0 || !negotiate(c, m, err, sizeof err))
            conn_failed(c, m, "connect", err, NULL);
    }
}

bool milter_chain_active(const struct milter_chain *c)
{
    return c->n > 0;
}

/* -------------------------------------------------------------- stages */

struct stage {
    const char *name;          /* for the log */
    char cmd;                  /* SMFIC_* */
    uint32_t skip_flag;        /* SMFIP_NO*: the milter does not want it */
    uint32_t noreply_flag;     /* SMFIP_NR_*: it sends no answer */
    enum stage_kind kind;
    bool batch;                /* unanswered packets wait for the next
                                  write (headers until the end of headers,
                                  a small body until the end of message) */
};

static const struct stage ST_CONNECT = {"connect", SMFIC_CONNECT, SMFIP_NOCONNECT,
                                        SMFIP_NR_CONN, STAGE_SESSION, false};
static const struct stage ST_HELO = {"HELO", SMFIC_HELO, SMFIP_NOHELO,
                                     SMFIP_NR_HELO, STAGE_SESSION, false};
static const struct stage ST_MAIL = {"MAIL", SMFIC_MAIL, SMFIP_NOMAIL,
                                     SMFIP_NR_MAIL, STAGE_MESSAGE, false};
static const struct stage ST_RCPT = {"RCPT", SMFIC_RCPT, SMFIP_NORCPT,
                                     SMFIP_NR_RCPT, STAGE_MESSAGE, false};
static const struct stage ST_DATA = {"DATA", SMFIC_DATA, SMFIP_NODATA,
                                     SMFIP_NR_DATA, STAGE_MESSAGE, false};
static const struct stage ST_HEADER = {"header", SMFIC_HEADER, SMFIP_NOHDRS,
                                       SMFIP_NR_HDR, STAGE_MESSAGE, true};
static const struct stage ST_EOH = {"end of headers", SMFIC_EOH, SMFIP_NOEOH,
                                    SMFIP_NR_EOH, STAGE_MESSAGE, false};
static const struct stage ST_BODY = {"body", SMFIC_BODY, SMFIP_NOBODY,
                                     SMFIP_NR_BODY, STAGE_MESSAGE, true};

static bool is_content(const struct stage *st)
{
    return st->cmd == SMFIC_HEADER || st->cmd == SMFIC_EOH ||
           st->cmd == SMFIC_BODY;
}

/* ms for one exchange: the stage's timeout, and for the headers and body
 * no more than what is left of the message's content budget. */
static int64_t stage_timeout_ms(const struct milter_chain *c,
                                const struct stage *st)
{
    if (!is_content(st))
        return c->conf->milter_command_timeout * 1000;
    int64_t t = c->conf->milter_content_timeout * 1000;
    return c->content_left_ms < t ? c->content_left_ms : t;
}

/* The verdict a final reply gives; false for one that is not allowed at
 * this stage (a protocol error). */
static bool take_final(struct milter_conn *m, const struct stage *st,
                       const struct milter_reply *rep, struct milter_result *r)
{
    const char *by = m->addr->name;
    switch (rep->cmd) {
    case SMFIR_CONTINUE:
        return true;
    case SMFIR_ACCEPT:
        if (st->kind == STAGE_SESSION)     /* done with the whole session */
            conn_close(m);
        m->done_with_message = true;
        return true;
    case SMFIR_REJECT:
        set_result(r, MILTER_REJECT, "550 5.7.1 Command rejected", by);
        return true;
    case SMFIR_TEMPFAIL:
        set_result(r, MILTER_TEMPFAIL, "451 4.7.1 Service unavailable - try "
                   "again later", by);
        return true;
    case SMFIR_REPLYCODE:
        set_result(r, rep->text[0] == '4' ? MILTER_TEMPFAIL : MILTER_REJECT,
                   rep->text, by);
        return true;
    case SMFIR_DISCARD:
        if (st->kind != STAGE_MESSAGE)
            return false;
        set_result(r, MILTER_DISCARD, "", by);
        return true;
    case SMFIR_SKIP:
        if (st->cmd != SMFIC_BODY)
            return false;
        m->skip_body = true;
        return true;
    }
    return false;
}

/* Sends the stage's macros and command to m and takes its answer. */
static void exchange_once(struct milter_chain *c, struct milter_conn *m,
                     const struct stage *st, const uint8_t *macros,
                     size_t mlen, const void *data, size_t len,
                     struct milter_result *r)
{
    char err[ERR_MAX];
    struct milter_reply rep;
    int64_t deadline = io_clock_ms() + stage_timeout_ms(c, st);
    if ((mlen && !put_packet(m, SMFIC_MACRO, macros, mlen, deadline, err,
                             sizeof err)) ||
        !put_packet(m, st->cmd, data, len, deadline, err, sizeof err)) {
        conn_failed(c, m, st->name, err, r);
        return;
    }
    /* By the flags alone, as libmilter decides: a milter of any version
     * that took a no-reply flag odmrd offered stays silent there. */
    if (m->neg.steps & st->noreply_flag) {
        if (!st->batch && !flush_out(m, deadline, err, sizeof err))
            conn_failed(c, m, st->name, err, r);
        return;
    }
    do {
        if (!recv_reply(c, m, deadline, &rep, err, sizeof err)) {
            conn_failed(c, m, st->name, err, r);
            return;
        }
    } while (rep.cmd == SMFIR_PROGRESS);
    if (!take_final(m, st, &rep, r)) {
        snprintf(err, sizeof err, "reply '%c' not allowed here", rep.cmd);
        conn_failed(c, m, st->name, err, r);
    }
}

/* exchange_once, the time it took charged to the message's content
 * budget when it was for the headers or the body. */
static void exchange(struct milter_chain *c, struct milter_conn *m,
                     const struct stage *st, const uint8_t *macros,
                     size_t mlen, const void *data, size_t len,
                     struct milter_result *r)
{
    int64_t t0 = io_clock_ms();
    exchange_once(c, m, st, macros, mlen, data, len, r);
    if (is_content(st))
        c->content_left_ms -= io_clock_ms() - t0;
}

static void clear_result(struct milter_result *r)
{
    r->verdict = MILTER_CONTINUE;
    r->reply[0] = r->by[0] = '\0';
}

/* A milter discarded the message: the ones after it never saw this
 * stage, so none of them may see the rest of the message either (libmilter
 * would take RCPT without MAIL for a protocol error).  Each is told the
 * message is over, as Sendmail does. */
/* SMFIC_ABORT to every milter not told yet (once per message). */
static void abort_each(struct milter_chain *c)
{
    char err[ERR_MAX];
    int64_t deadline = io_clock_ms() + c->conf->milter_command_timeout * 1000;
    for (size_t i = 0; i < c->n; i++) {
        struct milter_conn *m = &c->conn[i];
        if (m->fd >= 0 && !m->aborted &&
            (!put_packet(m, SMFIC_ABORT, "", 0, deadline, err, sizeof err) ||
             !flush_out(m, deadline, err, sizeof err)))
            conn_failed(c, m, "abort", err, NULL);
        m->aborted = true;
    }
}

static void discard_for_all(struct milter_chain *c)
{
    abort_each(c);
    for (size_t i = 0; i < c->n; i++)
        c->conn[i].done_with_message = true;
}

/* One stage, milter after milter, until one refuses. */
static void run_stage(struct milter_chain *c, const struct stage *st,
                      const uint8_t *macros, size_t mlen, const void *data,
                      size_t len, struct milter_result *r)
{
    clear_result(r);
    for (size_t i = 0; i < c->n && r->verdict == MILTER_CONTINUE; i++) {
        struct milter_conn *m = &c->conn[i];
        if (m->broken)
            apply_default(c, m, r);
        else if (m->fd >= 0 && !(m->neg.steps & st->skip_flag) &&
                 !(st->kind == STAGE_MESSAGE && m->done_with_message) &&
                 !(st->cmd == SMFIC_BODY && m->skip_body) &&
                 !(st->cmd == SMFIC_DATA && m->neg.version < 4))
            exchange(c, m, st, macros, mlen, data, len, r);
    }
    if (r->verdict == MILTER_DISCARD)
        discard_for_all(c);
}

/* ------------------------------------------------------------- macros */

#define MACROS_MAX 8192

struct macro_buf {
    uint8_t data[MACROS_MAX];
    size_t len;
};

static void macro_begin(struct macro_buf *b, char stage)
{
    b->data[0] = (uint8_t)stage;
    b->len = 1;
}

/* Adds one macro; an empty or missing value is not sent, and macros that
 * do not fit are dropped (the values are bounded by the session, so that
 * would be a bug, not an attack). */
static void macro_add(struct macro_buf *b, const char *name, const char *value)
{
    size_t save = b->len;
    if (!value || !*value)
        return;
    if (!milter_put_str(b->data, sizeof b->data, &b->len, name) ||
        !milter_put_str(b->data, sizeof b->data, &b->len, value))
        b->len = save;
}

/* Packs NULL-terminated args as NUL-terminated strings. */
static size_t pack_args(uint8_t *out, size_t cap, const char *const *args)
{
    size_t len = 0;
    for (size_t i = 0; args[i]; i++)
        if (!milter_put_str(out, cap, &len, args[i]))
            break;
    return len;
}

/* Is the transaction SMTPUTF8: MAIL FROM carried SMTPUTF8 (args[0] is
 * the address), or a sender that needs it? */
static bool has_smtputf8(const char *const *args)
{
    if (!args[0])
        return false;
    for (const char *p = args[0]; *p; p++)
        if ((unsigned char)*p >= 0x80)
            return true;
    for (size_t i = 1; args[i]; i++)
        if (!strcasecmp(args[i], "SMTPUTF8"))
            return true;
    return false;
}

/* --------------------------------------------------------- SMTP stages */

void milter_chain_connect(struct milter_chain *c, const struct milter_macros *mm,
                          const char *client_name, struct milter_result *r)
{
    static struct macro_buf b;
    uint8_t data[600];
    size_t len = 0;
    char underscore[400];
    snprintf(underscore, sizeof underscore, "%s [%s]", client_name,
             mm->client_addr);
    macro_begin(&b, SMFIC_CONNECT);
    macro_add(&b, "j", mm->hostname);
    macro_add(&b, "_", underscore);
    macro_add(&b, "{daemon_name}", mm->daemon_name);
    macro_add(&b, "{client_addr}", mm->client_addr);
    macro_add(&b, "{client_name}", client_name);
    macro_add(&b, "{client_port}", mm->client_port);
    macro_add(&b, "{if_addr}", mm->if_addr);
    milter_put_str(data, sizeof data, &len, client_name);
    bool v6 = strchr(mm->client_addr, ':') != NULL;
    bool inet = v6 || strchr(mm->client_addr, '.') != NULL;
    if (inet) {
        unsigned long port = 0;
        parse_ulong(mm->client_port ? mm->client_port : "0", 65535, &port);
        data[len++] = v6 ? '6' : '4';
        data[len++] = (uint8_t)(port >> 8);
        data[len++] = (uint8_t)port;
        milter_put_str(data, sizeof data, &len, mm->client_addr);
    } else {
        data[len++] = 'U';   /* a unix socket client: no address */
    }
    run_stage(c, &ST_CONNECT, b.data, b.len, data, len, r);
}

void milter_chain_helo(struct milter_chain *c, const struct milter_macros *mm,
                       struct milter_result *r)
{
    static struct macro_buf b;
    uint8_t data[600];
    size_t len = 0;
    macro_begin(&b, SMFIC_HELO);
    macro_add(&b, "{tls_version}", mm->tls_version);
    macro_add(&b, "{cipher}", mm->cipher);
    milter_put_str(data, sizeof data, &len, mm->helo);
    run_stage(c, &ST_HELO, b.data, b.len, data, len, r);
}

void milter_chain_mail(struct milter_chain *c, const struct milter_macros *mm,
                       const char *const *args, struct milter_result *r)
{
    static struct macro_buf b;
    static uint8_t data[4096];
    macro_begin(&b, SMFIC_MAIL);
    macro_add(&b, "{mail_addr}", mm->mail_addr);
    size_t len = pack_args(data, sizeof data, args);
    c->in_message = true;
    c->smtputf8 = has_smtputf8(args);
    c->msg.verdict = MILTER_CONTINUE;
    for (size_t i = 0; i < c->n; i++)
        c->conn[i].done_with_message = c->conn[i].skip_body =
            c->conn[i].aborted = false;
    run_stage(c, &ST_MAIL, b.data, b.len, data, len, r);
}

void milter_chain_rcpt(struct milter_chain *c, const struct milter_macros *mm,
                       const char *const *args, struct milter_result *r)
{
    static struct macro_buf b;
    static uint8_t data[4096];
    macro_begin(&b, SMFIC_RCPT);
    macro_add(&b, "{rcpt_addr}", mm->rcpt_addr);
    size_t len = pack_args(data, sizeof data, args);
    run_stage(c, &ST_RCPT, b.data, b.len, data, len, r);
}

/* DATA also starts the message's content. */
void milter_chain_data(struct milter_chain *c, const struct milter_macros *mm,
                       struct milter_result *r)
{
    static struct macro_buf b;
    macro_begin(&b, SMFIC_DATA);
    macro_add(&b, "i", mm->queue_id);
    c->hlen = c->blen = 0;
    c->in_hdr = c->hdr_over = c->eoh_sent = false;
    c->content_left_ms = EOM_TIMEOUTS_MAX * c->conf->milter_content_timeout * 1000;
    clear_result(&c->msg);
    run_stage(c, &ST_DATA, b.data, b.len, "", 0, r);
}

/* --------------------------------------------------------------- content */

/* The collected header as name NUL value NUL: folding kept as LF, the
 * final CRLF gone, the space after the colon kept only for milters that
 * asked for SMFIP_HDR_LEADSPC (which is why each milter gets its own). */
static size_t header_packet(const struct milter_chain *c, bool leadspc,
                            uint8_t *out, size_t cap)
{
    const char *h = c->hdr;
    const char *colon = memchr(h, ':', c->hlen);
    if (!colon || colon == h)
        return 0;    /* not a header: nothing to say about it */
    size_t len = 0, nlen = (size_t)(colon - h);
    while (nlen && (h[nlen - 1] == ' ' || h[nlen - 1] == '\t'))
        nlen--;
    memcpy(out, h, nlen);
    out[nlen] = '\0';
    len = nlen + 1;
    const char *v = colon + 1, *end = h + c->hlen;
    if (!leadspc)
        while (v < end && (*v == ' ' || *v == '\t'))
            v++;
    for (; v < end && len + 1 < cap; v++)
        if (*v != '\r' || v + 1 >= end || v[1] != '\n')
            out[len++] = (uint8_t)*v;
    while (len > nlen + 1 && out[len - 1] == '\n')
        len--;
    out[len++] = '\0';
    return len;
}

static void send_one_header(struct milter_chain *c)
{
    static uint8_t pkt[sizeof c->hdr + 2];
    struct milter_result r;
    clear_result(&r);
    for (size_t i = 0; i < c->n && r.verdict == MILTER_CONTINUE; i++) {
        struct milter_conn *m = &c->conn[i];
        if (m->broken) {
            apply_default(c, m, &r);
            continue;
        }
        if (m->fd < 0 || m->done_with_message || (m->neg.steps & SMFIP_NOHDRS))
            continue;
        size_t len = header_packet(c, m->neg.steps & SMFIP_HDR_LEADSPC, pkt,
                                   sizeof pkt);
        if (len)
            exchange(c, m, &ST_HEADER, NULL, 0, pkt, len, &r);
    }
    if (r.verdict != MILTER_CONTINUE)
        c->msg = r;
    c->hlen = 0;
    c->hdr_over = false;
}

void milter_chain_header_piece(struct milter_chain *c, const char *p,
                               size_t len, bool line_start)
{
    if (c->msg.verdict != MILTER_CONTINUE)
        return;
    bool folded = line_start && len && (p[0] == ' ' || p[0] == '\t');
    if (line_start && !folded && c->in_hdr)
        send_one_header(c);
    c->in_hdr = true;
    size_t room = sizeof c->hdr - c->hlen;
    if (len > room) {
        len = room;         /* a header this long is passed on truncated */
        c->hdr_over = true;
    }
    memcpy(c->hdr + c->hlen, p, len);
    c->hlen += len;
}

void milter_chain_end_of_headers(struct milter_chain *c,
                                 const struct milter_macros *mm)
{
    static struct macro_buf b;
    struct milter_result r;
    if (c->eoh_sent)
        return;
    c->eoh_sent = true;
    if (c->in_hdr && c->msg.verdict == MILTER_CONTINUE)
        send_one_header(c);
    c->in_hdr = false;
    if (c->msg.verdict != MILTER_CONTINUE)
        return;
    macro_begin(&b, SMFIC_EOH);
    macro_add(&b, "i", mm->queue_id);
    run_stage(c, &ST_EOH, b.data, b.len, "", 0, &r);
    if (r.verdict != MILTER_CONTINUE)
        c->msg = r;
}

static void flush_body(struct milter_chain *c)
{
    struct milter_result r;
    if (!c->blen || c->msg.verdict != MILTER_CONTINUE)
        return;
    run_stage(c, &ST_BODY, NULL, 0, c->body, c->blen, &r);
    c->blen = 0;
    if (r.verdict != MILTER_CONTINUE)
        c->msg = r;
}

void milter_chain_body(struct milter_chain *c, const char *p, size_t len)
{
    while (len && c->msg.verdict == MILTER_CONTINUE) {
        size_t take = sizeof c->body - c->blen;
        if (take > len)
            take = len;
        memcpy(c->body + c->blen, p, take);
        c->blen += take;
        p += take;
        len -= take;
        if (c->blen == sizeof c->body)
            flush_body(c);
    }
}

/* ------------------------------------------------------ end of message */

static bool edit_allowed(const struct milter_conn *m, char cmd)
{
    /* libmilter's smfi_insheader asks for ADDHDRS, as smfi_addheader
     * does: a filter such as OpenDKIM negotiates only that one */
    uint32_t need = cmd == SMFIR_ADDHEADER || cmd == SMFIR_INSHEADER
                        ? SMFIF_ADDHDRS
                    : cmd == SMFIR_CHGHEADER ? SMFIF_CHGHDRS
                    : cmd == SMFIR_REPLBODY ? SMFIF_CHGBODY
                    : cmd == SMFIR_ADDRCPT ? SMFIF_ADDRCPT
                    : cmd == SMFIR_ADDRCPT_PAR ? SMFIF_ADDRCPT_PAR
                    : cmd == SMFIR_DELRCPT ? SMFIF_DELRCPT
                    : cmd == SMFIR_CHGFROM ? SMFIF_CHGFROM
                    : cmd == SMFIR_QUARANTINE ? SMFIF_QUARANTINE : 0;
    return need && (m->neg.actions & need);
}

static bool add_header_edit(struct milter_edits *e, const struct milter_conn *m,
                            const struct milter_reply *rep, char *err, size_t n)
{
    size_t bytes = strlen(rep->name) + strlen(rep->value) + 2;
    if (e->nheaders >= MILTER_EDITS_MAX ||
        e->header_bytes + bytes > MILTER_EDIT_BYTES) {
        snprintf(err, n, "more header changes than odmrd applies (%d, %u bytes)",
                 MILTER_EDITS_MAX, MILTER_EDIT_BYTES);
        return false;
    }
    struct milter_header_edit *grown =
        realloc(e->headers, (e->nheaders + 1) * sizeof *grown);
    if (!grown) {
        snprintf(err, n, "out of memory");
        return false;
    }
    e->headers = grown;
    struct milter_header_edit *h = &e->headers[e->nheaders];
    h->cmd = rep->cmd;
    h->index = rep->index;
    h->name = strdup(rep->name);
    h->value = strdup(rep->value);
    h->leading_space = (m->neg.steps & SMFIP_HDR_LEADSPC) != 0;
    if (!h->name || !h->value) {
        free(h->name);
        free(h->value);
        snprintf(err, n, "out of memory");
        return false;
    }
    e->nheaders++;
    e->header_bytes += bytes;
    return true;
}

/* SMFIR_ADDRCPT_PAR's recipient as a RCPT TO argument with the args
 * odmrd keeps; the others are logged.  false when it is too long. */
static bool rcpt_with_args(const struct milter_chain *c,
                           const struct milter_conn *m,
                           const struct milter_reply *rep, char *out,
                           size_t on, char *err, size_t n)
{
    char ignored[256];
    if (!milter_rcpt_with_args(rep->text, rep->value, out, on, ignored,
                               sizeof ignored)) {
        snprintf(err, n, "recipient to add too long");
        return false;
    }
    if (ignored[0])
        log_info("%s: milter %s: recipient %.300s: ESMTP arguments ignored:%s",
                 c->queue_id, m->addr->name, rep->text, ignored);
    return true;
}

/* Recipient changes share the header changes' bounds. */
static bool add_rcpt_edit(const struct milter_chain *c, struct milter_edits *e,
                          const struct milter_conn *m,
                          const struct milter_reply *rep, char *err, size_t n)
{
    char with_args[SMTP_MAILRCPT_LINE_MAX];
    const char *text = rep->text;
    if (rep->cmd == SMFIR_ADDRCPT_PAR) {
        if (!rcpt_with_args(c, m, rep, with_args, sizeof with_args, err, n))
            return false;
        text = with_args;
    }
    size_t bytes = strlen(text) + 1;
    if (e->nrcpts >= MILTER_EDITS_MAX ||
        e->header_bytes + bytes > MILTER_EDIT_BYTES) {
        snprintf(err, n, "more recipient changes than odmrd applies (%d)",
                 MILTER_EDITS_MAX);
        return false;
    }
    struct milter_rcpt_edit *grown =
        realloc(e->rcpts, (e->nrcpts + 1) * sizeof *grown);
    if (!grown) {
        snprintf(err, n, "out of memory");
        return false;
    }
    e->rcpts = grown;
    struct milter_rcpt_edit *r = &e->rcpts[e->nrcpts];
    r->add = rep->cmd != SMFIR_DELRCPT;
    r->addr = strdup(text);
    str_copy(r->by, m->addr->name, sizeof r->by);
    if (!r->addr) {
        snprintf(err, n, "out of memory");
        return false;
    }
    e->nrcpts++;
    e->header_bytes += bytes;
    return true;
}

/* One milter's replacement body while it is being sent: it replaces an
 * earlier milter's only when this milter finishes well. */
struct new_body {
    int fd;
    uint64_t size;
    bool cr;
};

/* Appends a replacement body chunk, bare LF and bare CR made CRLF (the
 * queue holds CRLF lines, and a bare CR passed on to the customer is the
 * stuff of SMTP smuggling), to an unlinked file in tmp_dir.  A NUL is
 * refused, as in a client's message. */
static bool add_body_chunk(struct new_body *e, const char *tmp_dir,
                           uint64_t max, const uint8_t *p, size_t len,
                           char *err, size_t n)
{
    if (e->fd < 0) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/milter-body.XXXXXX", tmp_dir);
        e->fd = mkstemp(path);
        if (e->fd < 0) {
            snprintf(err, n, "cannot create %.200s: %s", path, strerror(errno));
            return false;
        }
        unlink(path);   /* nothing to clean up after a crash */
    }
    static char out[2 * MILTER_PACKET_MAX];
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\0') {
            snprintf(err, n, "replacement body contains a NUL octet");
            return false;
        }
        if (e->cr && p[i] != '\n')
            out[o++] = '\n';   /* a bare CR ends its line */
        if (p[i] == '\n' && !e->cr)
            out[o++] = '\r';
        out[o++] = (char)p[i];
        e->cr = p[i] == '\r';
    }
    /* A milter streaming body for its whole end-of-message time could
     * fill the spool; what it sends must fit what a client may send. */
    if (e->size + o > max) {
        snprintf(err, n, "replacement body over max_message_size (%llu "
                 "bytes)", (unsigned long long)max);
        return false;
    }
    if (!write_all(e->fd, out, o)) {
        snprintf(err, n, "replacement body: %s", strerror(errno));
        return false;
    }
    e->size += o;
    return true;
}

/* SMFIR_CHGFROM: a sender that does not parse is a broken milter (its
 * milter_default_action), as sending it on would be worse. */
static bool take_sender(const struct milter_chain *c,
                        const struct milter_conn *m,
                        const struct milter_reply *rep, struct milter_edits *e,
                        char *err, size_t n)
{
    char ignored[256];
    if (!milter_parse_chgfrom(rep->text, rep->value, c->smtputf8, &e->sender,
                              ignored, sizeof ignored, err, n))
        return false;
    if (ignored[0])
        log_info("%s: milter %s: sender %.300s: ESMTP arguments ignored:%s",
                 c->queue_id, m->addr->name, rep->text, ignored);
    e->sender_set = true;
    str_copy(e->sender_by, m->addr->name, sizeof e->sender_by);
    return true;
}

/* One modification from m; false + reason when it is not acceptable. */
static bool take_edit(const struct milter_chain *c, struct milter_conn *m,
                      const struct milter_reply *rep, const char *tmp_dir,
                      struct milter_edits *e, struct new_body *body, char *err,
                      size_t n)
{
    if (!edit_allowed(m, rep->cmd)) {
        snprintf(err, n, "modification '%c' not negotiated", rep->cmd);
        return false;
    }
    if (rep->cmd == SMFIR_REPLBODY)
        return add_body_chunk(body, tmp_dir, c->conf->max_message_size,
                              rep->data, rep->len, err, n);
    if (rep->cmd == SMFIR_QUARANTINE) {
        /* the first milter to hold the message names the reason */
        if (!e->quarantine[0]) {
            str_copy(e->quarantine, rep->text[0] ? rep->text : "(no reason)",
                     sizeof e->quarantine);
            str_copy(e->quarantined_by, m->addr->name, sizeof e->quarantined_by);
        }
        return true;
    }
    if (rep->cmd == SMFIR_CHGFROM)
        return take_sender(c, m, rep, e, err, n);
    if (rep->cmd == SMFIR_ADDRCPT || rep->cmd == SMFIR_ADDRCPT_PAR ||
        rep->cmd == SMFIR_DELRCPT)
        return add_rcpt_edit(c, e, m, rep, err, n);
    return add_header_edit(e, m, rep, err, n);
}

static const struct stage ST_EOM = {"end of message", SMFIC_BODYEOB, 0, 0,
                                    STAGE_MESSAGE, false};

/* What the edits were before a milter's end of message: a milter that
 * fails half-way leaves none of its changes behind. */
struct edits_mark {
    size_t nheaders, nrcpts, header_bytes;
    bool quarantined;
    bool sender_set;
    struct mail_args sender;
    char sender_by[300];
};

static void edits_mark(const struct milter_edits *e, struct edits_mark *k)
{
    k->nheaders = e->nheaders;
    k->nrcpts = e->nrcpts;
    k->header_bytes = e->header_bytes;
    k->quarantined = e->quarantine[0] != '\0';
    k->sender_set = e->sender_set;
    k->sender = e->sender;
    str_copy(k->sender_by, e->sender_by, sizeof k->sender_by);
}

static void edits_rollback(struct milter_edits *e, const struct edits_mark *k,
                           struct new_body *body)
{
    for (size_t i = k->nheaders; i < e->nheaders; i++) {
        free(e->headers[i].name);
        free(e->headers[i].value);
    }
    for (size_t i = k->nrcpts; i < e->nrcpts; i++)
        free(e->rcpts[i].addr);
    e->nheaders = k->nheaders;
    e->nrcpts = k->nrcpts;
    e->header_bytes = k->header_bytes;
    if (!k->quarantined)
        e->quarantine[0] = e->quarantined_by[0] = '\0';
    e->sender_set = k->sender_set;
    e->sender = k->sender;
    str_copy(e->sender_by, k->sender_by, sizeof e->sender_by);
    if (body->fd >= 0)
        close(body->fd);
    body->fd = -1;
}

/* A replacement body that ends in a bare CR: that CR ends a line too. */
static bool finish_body(struct new_body *e, char *err, size_t n)
{
    if (e->fd < 0 || !e->cr)
        return true;
    if (!write_all(e->fd, "\n", 1)) {
        snprintf(err, n, "replacement body: %s", strerror(errno));
        return false;
    }
    e->size++;
    e->cr = false;
    return true;
}

/* A milter that finished well: its body replaces any earlier one. */
static void edits_keep_body(struct milter_edits *e, struct new_body *body)
{
    if (body->fd < 0)
        return;
    if (e->body_fd >= 0)
        close(e->body_fd);
    e->body_fd = body->fd;
    e->body_size = body->size;
    body->fd = -1;
}

/* Reads m's changes up to its final reply into rep; false after
 * conn_failed. */
static bool eom_replies(struct milter_chain *c, struct milter_conn *m,
                        const char *tmp_dir, struct milter_edits *e,
                        struct new_body *body, struct milter_reply *rep,
                        struct milter_result *r)
{
    char err[ERR_MAX];
    int64_t start = io_clock_ms(), span = c->conf->milter_content_timeout * 1000;
    int64_t last = earlier(start + EOM_TIMEOUTS_MAX * span, c->eom_until);
    int64_t deadline = earlier(start + span, last);
    for (;;) {
        if (!recv_reply(c, m, deadline, rep, err, sizeof err)) {
            conn_failed(c, m, ST_EOM.name, err, r);
            return false;
        }
        if (rep->cmd == SMFIR_PROGRESS) {
            int64_t later = io_clock_ms() + span;
            deadline = later < last ? later : last;
        } else if (milter_reply_final(rep->cmd)) {
            return true;
        } else if (!take_edit(c, m, rep, tmp_dir, e, body, err, sizeof err)) {
            conn_failed(c, m, ST_EOM.name, err, r);
            return false;
        }
    }
}

/* End of message for one milter: its changes, then its verdict. */
static void eom_one(struct milter_chain *c, struct milter_conn *m,
                    const struct macro_buf *b, const char *tmp_dir,
                    struct milter_edits *e, struct milter_result *r)
{
    char err[ERR_MAX];
    struct milter_reply rep;
    struct new_body body = {-1, 0, false};
    struct edits_mark mark;
    edits_mark(e, &mark);
    int64_t deadline = earlier(io_clock_ms() +
                               c->conf->milter_content_timeout * 1000,
                               c->eom_until);
    if (!put_packet(m, SMFIC_MACRO, b->data, b->len, deadline, err,
                    sizeof err) ||
        !put_packet(m, SMFIC_BODYEOB, "", 0, deadline, err, sizeof err)) {
        conn_failed(c, m, ST_EOM.name, err, r);
        return;
    }
    bool ok = eom_replies(c, m, tmp_dir, e, &body, &rep, r);
    if (ok && (!take_final(m, &ST_EOM, &rep, r) || rep.cmd == SMFIR_SKIP)) {
        conn_failed(c, m, ST_EOM.name, "reply not allowed at end of message", r);
        ok = false;
    }
    if (ok && !finish_body(&body, err, sizeof err)) {
        conn_failed(c, m, ST_EOM.name, err, r);
        ok = false;
    }
    if (ok) {
        edits_keep_body(e, &body);
        m->aborted = true;   /* done with it: a later abort is not for m */
    } else {
        edits_rollback(e, &mark, &body);
    }
}

/* The chain's end of message has no time left for m: the verdict is
 * milter_default_action's, but m has not failed - it is not asked, hears
 * the abort, and keeps its connection for the session's next message. */
static void eom_out_of_time(struct milter_chain *c, struct milter_conn *m,
                            struct milter_result *r)
{
    log_warn("milter %s: end of message: not asked, the milters' time for it "
             "is spent (milter_default_action = %s)", m->addr->name,
             default_name(c->conf->milter_default_action));
    apply_default(c, m, r);
}

void milter_chain_end_of_message(struct milter_chain *c,
                                 const struct milter_macros *mm,
                                 const char *tmp_dir, struct milter_edits *e,
                                 struct milter_result *r)
{
    static struct macro_buf b;
    memset(e, 0, sizeof *e);
    e->body_fd = -1;
    /* From the final dot: the last piece of body still to send counts */
    c->eom_until = io_clock_ms() +
                   earlier(EOM_TIMEOUTS_MAX * c->conf->milter_content_timeout,
                           EOM_CHAIN_MAX_S) * 1000;
    c->content_left_ms = earlier(c->content_left_ms,
                                 c->eom_until - io_clock_ms());
    milter_chain_end_of_headers(c, mm);   /* a message without a body */
    flush_body(c);
    clear_result(r);
    if (c->msg.verdict != MILTER_CONTINUE) {
        *r = c->msg;
        milter_chain_abort(c);
        return;
    }
    macro_begin(&b, SMFIC_BODYEOB);
    macro_add(&b, "i", mm->queue_id);
    c->queue_id = mm->queue_id ? mm->queue_id : "-";
    bool late = false;
    for (size_t i = 0; i < c->n && r->verdict == MILTER_CONTINUE; i++) {
        struct milter_conn *m = &c->conn[i];
        if (m->broken)
            apply_default(c, m, r);
        else if (m->fd < 0 || m->done_with_message)
            continue;
        else if (io_clock_ms() >= c->eom_until) {
            eom_out_of_time(c, m, r);
            late = true;
        } else {
            eom_one(c, m, &b, tmp_dir, e, r);
        }
    }
    /* the ones after it (or not asked) heard nothing of the end yet */
    if (r->verdict != MILTER_CONTINUE || late)
        milter_chain_abort(c);
    c->in_message = false;
}

/* ------------------------------------------------------------- the end */

void milter_chain_abort(struct milter_chain *c)
{
    bool was = c->in_message;
    c->in_message = false;
    clear_result(&c->msg);
    c->hlen = c->blen = 0;
    c->in_hdr = false;
    if (was)
        abort_each(c);
}

void milter_chain_close(struct milter_chain *c)
{
    char err[ERR_MAX];
    if (!c->n)
        return;
    milter_chain_abort(c);
    int64_t deadline = io_clock_ms() + 1000;   /* best effort: we are leaving */
    for (size_t i = 0; i < c->n; i++) {
        struct milter_conn *m = &c->conn[i];
        if (m->fd >= 0) {
            if (put_packet(m, SMFIC_QUIT, "", 0, deadline, err, sizeof err))
                flush_out(m, deadline, err, sizeof err);
            conn_close(m);
        }
    }
    free(c->pkt);
    c->pkt = NULL;
    c->n = 0;
}

void milter_edits_free(struct milter_edits *e)
{
    for (size_t i = 0; i < e->nheaders; i++) {
        free(e->headers[i].name);
        free(e->headers[i].value);
    }
    free(e->headers);
    e->headers = NULL;
    e->nheaders = 0;
    for (size_t i = 0; i < e->nrcpts; i++)
        free(e->rcpts[i].addr);
    free(e->rcpts);
    e->rcpts = NULL;
    e->nrcpts = 0;
    if (e->body_fd >= 0)
        close(e->body_fd);
    e->body_fd = -1;
}

void milter_edits_apply_sender(const struct milter_edits *e,
                               const char *queue_id, struct mail_args *mail)
{
    char was[ADDR_MAX + 1] = "", now[ADDR_MAX + 1] = "";
    if (!e->sender_set)
        return;
    addr_format(&mail->from, was, sizeof was);
    addr_format(&e->sender.from, now, sizeof now);
    log_info("%s: milter %s: sender <%s> changed to <%s>", queue_id,
             e->sender_by, was, now);
    mail->from = e->sender.from;
    if (e->sender.body != BODY_UNSPEC)
        mail->body = e->sender.body;
    if (e->sender.ret != RET_UNSPEC)
        mail->ret = e->sender.ret;
    if (e->sender.envid[0])
        str_copy(mail->envid, e->sender.envid, sizeof mail->envid);
    if (e->sender.smtputf8)
        mail->smtputf8 = true;
}
