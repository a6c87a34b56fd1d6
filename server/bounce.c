/* bounce.c - RFC 3464 delivery status notifications (see bounce.h).
 *
 * The DSN is written through a small output interface (struct dsn_out) so
 * that the same generator feeds a file descriptor (tests), an SMTP DATA
 * stream with dot-stuffing (the relay) or a queue_in (local queueing).
 * The original message is copied from its data file with pread() in
 * DSN_CHUNK pieces: nothing here depends on the size of the message. */
#include "bounce.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/connect.h"
#include "../common/io.h"
#include "../common/log.h"
#include "../common/smtp.h"
#include "../common/util.h"
#include "accounts.h"

/* Room for one formatted line of the DSN: the longest fields are an
 * address (ADDR_MAX) or a diagnostic (LAST_REPLY_MAX) plus a label, well
 * below RFC 5322's 998 octets. */
#define DSN_LINE_MAX 2048
/* Unit in which the original message is copied. */
#define DSN_CHUNK 65536
/* Random bytes in the boundary and the Message-ID. */
#define DSN_TAG_BYTES 8
/* The recipient list in a log line is cut here (log lines are 2 KB). */
#define LOG_LIST_MAX 1024
/* Replies from the relay: one line, and what we keep of a reply for logs. */
#define RELAY_LINE_MAX 1024
#define RELAY_TEXT_MAX 300

/* =========================================================== output */

struct dsn_out {
    bool (*write)(void *ctx, const void *data, size_t len);
    void *ctx;
    bool ok;      /* false after the first failed write */
};

static void emit(struct dsn_out *o, const void *data, size_t len)
{
    if (o->ok && len > 0 && !o->write(o->ctx, data, len))
        o->ok = false;
}

static void emit_str(struct dsn_out *o, const char *s)
{
    emit(o, s, strlen(s));
}

static void emit_fmt(struct dsn_out *o, const char *fmt, ...) PRINTF_LIKE(2, 3);

/* A formatted piece of at most DSN_LINE_MAX-1 bytes; longer would mean a
 * field escaped its limit, which must not produce a cut-off report. */
static void emit_fmt(struct dsn_out *o, const char *fmt, ...)
{
    char line[DSN_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= sizeof line) {
        o->ok = false;
        return;
    }
    emit(o, line, (size_t)len);
}

static bool fd_write(void *ctx, const void *data, size_t len)
{
    return write_all(*(int *)ctx, data, len);
}

static bool queue_in_sink(void *ctx, const void *data, size_t len)
{
    struct queue_in *in = ctx;
    queue_in_write(in, data, len);
    return in->error == 0;
}

/* ======================================================= the report */

struct dsn {
    const char *hostname;
    const struct envelope *e;
    int data_fd;
    const struct bounce_rcpt *r;
    size_t n;
    time_t now;
    bool utf8;            /* SMTPUTF8 message: RFC 6533 types, UTF-8 text */
    bool eightbit;        /* the original may hold 8-bit data */
    char tag[2 * DSN_TAG_BYTES + 1];
    char boundary[QID_MAX + 2 * DSN_TAG_BYTES + 64];
};

bool bounce_wants_notice(const struct bounce_rcpt *r)
{
    return r->notify == 0 || (r->notify & DSN_NOTIFY_FAILURE) != 0;
}

/* A recipient without a status code gets the generic permanent one. */
static const char *status_of(const struct bounce_rcpt *r)
{
    return r->status && r->status[0] ? r->status : "5.0.0";
}

static size_t count_wanted(const struct bounce_rcpt *r, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += bounce_wants_notice(&r[i]);
    return k;
}

/* Random hex for the boundary: a MIME boundary must not occur in the
 * enclosed message, and 64 random bits next to the queue id make that as
 * certain as a scan of the message would, without reading it twice. */
static void random_tag(char *out, size_t n)
{
    unsigned char b[DSN_TAG_BYTES];
    if (getentropy(b, sizeof b) != 0) {
        /* No kernel randomness (very old kernel): still unique per call. */
        static unsigned long counter;
        unsigned long long x = (unsigned long long)now_ms() * 2654435761u ^
                               (unsigned long long)getpid() << 32 ^ ++counter;
        for (size_t i = 0; i < sizeof b; i++, x >>= 8)
            b[i] = (unsigned char)x;
    }
    size_t o = 0;
    for (size_t i = 0; i < sizeof b && o + 2 < n; i++, o += 2)
        snprintf(out + o, n - o, "%02X", b[i]);
}

static void dsn_init(struct dsn *d, const char *hostname,
                     const struct envelope *e, int data_fd,
                     const struct bounce_rcpt *r, size_t n, time_t now)
{
    memset(d, 0, sizeof *d);
    d->hostname = hostname;
    d->e = e;
    d->data_fd = data_fd;
    d->r = r;
    d->n = n;
    d->now = now;
    d->utf8 = e->smtputf8;
    d->eightbit = e->body == BODY_8BITMIME || e->smtputf8;
    random_tag(d->tag, sizeof d->tag);
    /* Only bcharsnospace characters (RFC 2046 5.1.1): ids are hex. */
    snprintf(d->boundary, sizeof d->boundary, "%s.%lld.%s/odmr", e->id,
             (long long)now, d->tag);
}

/* Copies s for a header or report field: control characters (which could
 * end the line and inject fields) become '?', and so does 8-bit data
 * unless the report may carry UTF-8. */
static const char *clean(const char *s, char *out, size_t n, bool utf8)
{
    size_t i = 0;
    for (; s[i] && i + 1 < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        bool bad = ch < 0x20 || ch == 0x7f || (ch >= 0x80 && !utf8);
        out[i] = bad ? '?' : (char)ch;
    }
    out[i] = '\0';
    return out;
}

static void emit_headers(const struct dsn *d, struct dsn_out *o)
{
    char date[64], to[ADDR_MAX + 1];
    rfc5322_date(d->now, date, sizeof date);
    emit_fmt(o, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n",
             d->hostname);
    emit_fmt(o, "To: <%s>\r\n", clean(d->e->sender, to, sizeof to, d->utf8));
    emit_str(o, "Subject: Undelivered Mail Returned to Sender\r\n");
    emit_fmt(o, "Date: %s\r\n", date);
    emit_fmt(o, "Message-ID: <%s.bounce.%lld.%s@%s>\r\n", d->e->id,
             (long long)d->now, d->tag, d->hostname);
    /* RFC 3834: no auto-responder should answer this. */
    emit_str(o, "Auto-Submitted: auto-replied\r\n");
    emit_str(o, "MIME-Version: 1.0\r\n");
    emit_fmt(o, "Content-Type: multipart/report; report-type=%s;\r\n"
             "\tboundary=\"%s\"\r\n",
             d->utf8 ? "global-delivery-status" : "delivery-status",
             d->boundary);
    if (d->eightbit)
        emit_str(o, "Content-Transfer-Encoding: 8bit\r\n");
    emit_str(o, "\r\n");
    emit_str(o, "This is a MIME-encapsulated delivery status notification.\r\n");
}

static void emit_part_start(const struct dsn *d, struct dsn_out *o,
                            const char *description, const char *type)
{
    emit_fmt(o, "\r\n--%s\r\nContent-Description: %s\r\nContent-Type: %s\r\n",
             d->boundary, description, type);
}

/* Diagnostic-Code type (RFC 3464 2.3.6): "smtp" for an SMTP reply
 * ("550 5.1.1 ..."), our own extension type for a text of ours. */
static const char *diagnostic_type(const char *diag)
{
    bool reply = diag[0] >= '2' && diag[0] <= '5' &&
                 diag[1] >= '0' && diag[1] <= '9' &&
                 diag[2] >= '0' && diag[2] <= '9' &&
                 (diag[3] == ' ' || diag[3] == '-' || diag[3] == '\0');
    return reply ? "smtp" : "x-odmr";
}

static void emit_text_part(const struct dsn *d, struct dsn_out *o)
{
    char date[64], buf[DSN_LINE_MAX / 2], addr[ADDR_MAX + 1];
    emit_part_start(d, o, "Notification", d->utf8 ?
                    "text/plain; charset=utf-8" : "text/plain; charset=us-ascii");
    if (d->utf8)
        emit_str(o, "Content-Transfer-Encoding: 8bit\r\n");
    rfc5322_date(d->e->arrival, date, sizeof date);
    emit_fmt(o, "\r\nThis is the mail delivery system at %s.\r\n\r\n"
             "Your message could not be delivered to the recipients listed\r\n"
             "below, so it is returned to you. The reason is given for each\r\n"
             "recipient. The message arrived here on\r\n%s\r\n"
             "and was queued under the id %s.\r\n\r\n",
             d->hostname, date, d->e->id);
    for (size_t i = 0; i < d->n; i++) {
        const struct bounce_rcpt *r = &d->r[i];
        if (!bounce_wants_notice(r))
            continue;
        clean(r->addr, addr, sizeof addr, d->utf8);
        if (r->diagnostic && r->diagnostic[0])
            emit_fmt(o, "<%s>: %s\r\n", addr,
                     clean(r->diagnostic, buf, sizeof buf, d->utf8));
        else
            emit_fmt(o, "<%s>: delivery failed (status %s)\r\n", addr,
                     clean(status_of(r), buf, sizeof buf, false));
    }
    emit_fmt(o, "\r\nA report for programs follows, then %s.\r\n"
             "If you need help, contact the postmaster of %s and include\r\n"
             "this report.\r\n",
             d->e->ret == RET_HDRS ? "the header section of your message"
                                   : "your message",
             d->hostname);
}

/* Original-Recipient (RFC 3464 2.3.1): the ORCPT's address type and its
 * value, xtext-decoded.  A value that does not decode is shown as given. */
static void emit_original_recipient(const struct dsn *d, struct dsn_out *o,
                                    const char *orcpt)
{
    char type[32], decoded[SMTP_ORCPT_MAX + 1], shown[SMTP_ORCPT_MAX + 1];
    const char *semi = strchr(orcpt, ';');
    size_t tlen = semi ? (size_t)(semi - orcpt) : 0;
    if (!semi || tlen == 0 || tlen >= sizeof type)
        return;
    memcpy(type, orcpt, tlen);
    type[tlen] = '\0';
    for (char *p = type; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
              (*p >= '0' && *p <= '9') || *p == '-'))
            return;
    const char *value = semi + 1;
    if (xtext_decode(value, decoded, sizeof decoded))
        value = decoded;
    emit_fmt(o, "Original-Recipient: %s; %s\r\n", type,
             clean(value, shown, sizeof shown, d->utf8));
}

static void emit_per_message(const struct dsn *d, struct dsn_out *o)
{
    char date[64], buf[SMTP_ENVID_MAX + 1], shown[HELO_MAX + CLIENT_ADDR_MAX + 8];
    const struct envelope *e = d->e;
    emit_fmt(o, "\r\nReporting-MTA: dns; %s\r\n", d->hostname);
    emit_fmt(o, "X-Odmr-Queue-ID: %s\r\n", e->id);
    if (e->envid[0]) {
        const char *v = xtext_decode(e->envid, buf, sizeof buf) ? buf : e->envid;
        char env[SMTP_ENVID_MAX + 1];
        emit_fmt(o, "Original-Envelope-Id: %s\r\n",
                 clean(v, env, sizeof env, false));
    }
    if (e->helo[0]) {
        char helo[HELO_MAX + 1], client[CLIENT_ADDR_MAX];
        snprintf(shown, sizeof shown, "%s ([%s])",
                 clean(e->helo, helo, sizeof helo, false),
                 clean(e->client, client, sizeof client, false));
        emit_fmt(o, "Received-From-MTA: dns; %s\r\n", shown);
    }
    rfc5322_date(e->arrival, date, sizeof date);
    emit_fmt(o, "Arrival-Date: %s\r\n", date);
}

static void emit_per_recipient(const struct dsn *d, struct dsn_out *o,
                               const struct bounce_rcpt *r)
{
    char addr[ADDR_MAX + 1], buf[DSN_LINE_MAX / 2], date[64];
    emit_str(o, "\r\n");
    if (r->orcpt && r->orcpt[0])
        emit_original_recipient(d, o, r->orcpt);
    /* RFC 6533 3.3: the utf-8 address type for a non-ASCII address. */
    clean(r->addr, addr, sizeof addr, d->utf8);
    bool ascii = true;
    for (const char *p = addr; *p; p++)
        ascii &= (unsigned char)*p < 0x80;
    emit_fmt(o, "Final-Recipient: %s; %s\r\n", ascii ? "rfc822" : "utf-8", addr);
    emit_str(o, "Action: failed\r\n");
    emit_fmt(o, "Status: %s\r\n", clean(status_of(r), buf, sizeof buf, false));
    if (r->diagnostic && r->diagnostic[0])
        emit_fmt(o, "Diagnostic-Code: %s; %s\r\n",
                 diagnostic_type(r->diagnostic),
                 clean(r->diagnostic, buf, sizeof buf, d->utf8));
    if (d->e->last_attempt) {
        rfc5322_date(d->e->last_attempt, date, sizeof date);
        emit_fmt(o, "Last-Attempt-Date: %s\r\n", date);
    }
}

static void emit_status_part(const struct dsn *d, struct dsn_out *o)
{
    emit_part_start(d, o, "Delivery report", d->utf8 ?
                    "message/global-delivery-status" : "message/delivery-status");
    if (d->utf8)
        emit_str(o, "Content-Transfer-Encoding: 8bit\r\n");
    emit_per_message(d, o);
    for (size_t i = 0; i < d->n; i++)
        if (bounce_wants_notice(&d->r[i]))
            emit_per_recipient(d, o, &d->r[i]);
}

/* Offset where the header section of the data (its first len octets)
 * ends: the start of the first empty line, or the end of the data when
 * there is none. */
static off_t header_end(int fd, char *chunk, off_t len)
{
    off_t off = 0, cr_at = -1;
    bool bol = true;
    for (;;) {
        size_t want = len - off < DSN_CHUNK ? (size_t)(len - off) : DSN_CHUNK;
        ssize_t got = want ? pread(fd, chunk, want, off) : 0;
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return got < 0 ? -1 : off;
        for (ssize_t i = 0; i < got; i++, off++) {
            char ch = chunk[i];
            if (cr_at >= 0 && ch == '\n')
                return cr_at;
            cr_at = (bol && ch == '\r') ? off : -1;
            if (bol && ch == '\n')   /* LF-only data: be tolerant */
                return off;
            bol = ch == '\n';
        }
    }
}

/* Copies data bytes [0, end) to the output.  The data is the envelope's
 * size of octets: a queue file holds its envelope after them. */
static bool copy_data(const struct dsn *d, struct dsn_out *o, char *chunk,
                      off_t end)
{
    off_t off = 0;
    while (o->ok && off < end) {
        size_t want = DSN_CHUNK;
        if ((off_t)want > end - off)
            want = (size_t)(end - off);
        ssize_t got = pread(d->data_fd, chunk, want, off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return false;
        if (got == 0) {   /* a damaged spool: the report still goes */
            log_warn("%s: the returned message is cut short: its data file "
                     "ends after %lld of %lld octets", d->e->id,
                     (long long)off, (long long)end);
            break;
        }
        emit(o, chunk, (size_t)got);
        off += got;
    }
    return o->ok;
}

static void emit_original_part(const struct dsn *d, struct dsn_out *o)
{
    static char chunk[DSN_CHUNK];
    if (d->data_fd < 0) {
        /* The data file is gone (damaged spool): the report is still
         * worth sending; RFC 3464 makes the third part optional. */
        emit_fmt(o, "\r\n--%s--\r\n", d->boundary);
        return;
    }
    bool hdrs = d->e->ret == RET_HDRS;
    const char *type = hdrs ? (d->utf8 ? "message/global-headers"
                                       : "text/rfc822-headers")
                            : (d->utf8 ? "message/global" : "message/rfc822");
    emit_part_start(d, o, hdrs ? "Undelivered Message Headers"
                               : "Undelivered Message", type);
    if (d->eightbit)
        emit_str(o, "Content-Transfer-Encoding: 8bit\r\n");
    emit_str(o, "\r\n");
    off_t end = (off_t)d->e->size;
    if (hdrs && (end = header_end(d->data_fd, chunk, end)) < 0) {
        o->ok = false;
        return;
    }
    if (o->ok && !copy_data(d, o, chunk, end))
        o->ok = false;
    /* The CRLF before the closing delimiter belongs to the delimiter
     * (RFC 2046 5.1.1), so the message keeps its own last line end. */
    emit_fmt(o, "\r\n--%s--\r\n", d->boundary);
}

static bool dsn_generate(const struct dsn *d, struct dsn_out *o)
{
    emit_headers(d, o);
    emit_text_part(d, o);
    emit_status_part(d, o);
    emit_original_part(d, o);
    return o->ok;
}

bool bounce_write_dsn(int out_fd, const char *hostname,
                      const struct envelope *e, int data_fd,
                      const struct bounce_rcpt *r, size_t n, time_t now)
{
    if (count_wanted(r, n) == 0)
        return false;
    struct dsn d;
    dsn_init(&d, hostname, e, data_fd, r, n, now);
    struct dsn_out o = {fd_write, &out_fd, true};
    return dsn_generate(&d, &o);
}

/* ===================================================== the relay */

struct relay {
    struct io io;
    const char *host, *port;
    struct smtp_reply reply;
    bool ehlo_8bit, ehlo_utf8;
    bool in_data;   /* between 354 and the final dot: QUIT would be data */
    bool refused;   /* for good (5xx, SMTPUTF8 missing), not just for now */
};

/* "550 5.1.1 text" from a reply, on one line, bounded. */
static void reply_summary(const struct smtp_reply *r, char *buf, size_t n)
{
    char text[RELAY_TEXT_MAX];
    str_copy(text, r->text, sizeof text);
    for (char *p = text; *p; p++)
        if (*p == '\n')
            *p = ' ';
    snprintf(buf, n, "%d %s", r->code, text);
}

/* Reads one complete reply into rl->reply; false with a reason on an I/O
 * failure or a malformed reply. */
static bool relay_read(struct relay *rl, const char *stage, char *why, size_t n)
{
    char line[RELAY_LINE_MAX];
    smtp_reply_init(&rl->reply);
    for (;;) {
        long len = io_getline(&rl->io, line, sizeof line, NULL);
        if (len < 0 && len != IO_TOOLONG) {
            snprintf(why, n, "lost connection with %s[%s] %s: %s", rl->host,
                     rl->port, stage, len == IO_TIMEOUT ? "timeout" :
                     len == IO_EOF ? "connection closed" : "I/O error");
            return false;
        }
        int done = smtp_reply_feed(&rl->reply, line);
        if (done < 0) {
            snprintf(why, n, "malformed reply from %s[%s] %s", rl->host,
                     rl->port, stage);
            return false;
        }
        if (done)
            return true;
    }
}

/* Sends a command and checks the reply class (2 or 3). */
static bool relay_cmd(struct relay *rl, const char *cmd, int want_class,
                      char *why, size_t n)
{
    char stage[64], summary[RELAY_TEXT_MAX + 8];
    /* "MAIL FROM:<x>" -> "MAIL FROM": the log needs the verb only. */
    size_t verb = strcspn(cmd, ":");
    if (!strcmp(cmd, "."))
        str_copy(stage, "in reply to end of DATA", sizeof stage);
    else
        snprintf(stage, sizeof stage, "in reply to %.*s",
                 (int)(verb < 40 ? verb : 40), cmd);
    if (!io_printf(&rl->io, "%s\r\n", cmd) || !relay_read(rl, stage, why, n))
        return false;
    if (rl->reply.code / 100 == want_class)
        return true;
    rl->refused = rl->reply.code / 100 == 5;
    reply_summary(&rl->reply, summary, sizeof summary);
    snprintf(why, n, "%s[%s] said: %s (%s)", rl->host, rl->port, summary, stage);
    return false;
}

/* Greeting and EHLO (HELO when EHLO gets a 5xx, RFC 5321 4.1.4). */
static bool relay_hello(struct relay *rl, const char *hostname, char *why,
                        size_t n)
{
    char cmd[300], summary[RELAY_TEXT_MAX + 8];
    if (!relay_read(rl, "while waiting for the greeting", why, n))
        return false;
    if (rl->reply.code / 100 != 2) {
        rl->refused = rl->reply.code / 100 == 5;
        reply_summary(&rl->reply, summary, sizeof summary);
        snprintf(why, n, "%s[%s] refused to talk: %s", rl->host, rl->port,
                 summary);
        return false;
    }
    snprintf(cmd, sizeof cmd, "EHLO %s", hostname);
    if (relay_cmd(rl, cmd, 2, why, n)) {
        rl->ehlo_8bit = smtp_ehlo_has(&rl->reply, "8BITMIME", NULL, 0);
        rl->ehlo_utf8 = smtp_ehlo_has(&rl->reply, "SMTPUTF8", NULL, 0);
        return true;
    }
    if (rl->reply.code / 100 != 5)
        return false;
    rl->refused = false;
    snprintf(cmd, sizeof cmd, "HELO %s", hostname);
    return relay_cmd(rl, cmd, 2, why, n);
}

/* Output to the relay's DATA: dot-stuffing (RFC 5321 4.5.2) as it goes. */
struct stuffer {
    struct io *io;
    bool bol;     /* the next byte starts a line */
};

static bool stuff_write(void *ctx, const void *data, size_t len)
{
    struct stuffer *st = ctx;
    const char *p = data, *end = p + len;
    while (p < end) {
        if (st->bol && *p == '.' && !io_write(st->io, ".", 1))
            return false;
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t seg = nl ? (size_t)(nl - p) + 1 : (size_t)(end - p);
        if (!io_write(st->io, p, seg))
            return false;
        st->bol = nl != NULL;
        p += seg;
    }
    return true;
}

static bool has_non_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return true;
    return false;
}

/* MAIL, RCPT, DATA, the DSN, the final dot.  why gets the reply to the
 * final dot on success, the reason otherwise. */
static bool relay_transaction(struct relay *rl, const struct dsn *d,
                              char *why, size_t n)
{
    char cmd[ADDR_MAX + 64];
    const char *sender = d->e->sender;
    if (has_non_ascii(sender) && !rl->ehlo_utf8) {
        rl->refused = true;
        snprintf(why, n, "%s[%s] does not support SMTPUTF8, needed for <%s>",
                 rl->host, rl->port, sender);
        return false;
    }
    snprintf(cmd, sizeof cmd, "MAIL FROM:<>%s%s",
             d->eightbit && rl->ehlo_8bit ? " BODY=8BITMIME" : "",
             d->utf8 && rl->ehlo_utf8 ? " SMTPUTF8" : "");
    if (!relay_cmd(rl, cmd, 2, why, n))
        return false;
    snprintf(cmd, sizeof cmd, "RCPT TO:<%s>", sender);
    if (!relay_cmd(rl, cmd, 2, why, n) || !relay_cmd(rl, "DATA", 3, why, n))
        return false;
    rl->in_data = true;
    struct stuffer st = {&rl->io, true};
    struct dsn_out o = {stuff_write, &st, true};
    if (!dsn_generate(d, &o)) {
        snprintf(why, n, "%s while sending the report to %s[%s]",
                 rl->io.status != IO_OK ? "lost connection" :
                 "cannot read the queued message", rl->host, rl->port);
        return false;
    }
    if (!st.bol)
        io_write(&rl->io, "\r\n", 2);
    bool accepted = relay_cmd(rl, ".", 2, why, n);
    rl->in_data = false;
    if (!accepted)
        return false;
    reply_summary(&rl->reply, why, n);
    return true;
}

/* Hands the DSN to bounce_relay.  result: the relay's reply to the final
 * dot, or why it failed; *refused: it failed for good (a 5xx), not for
 * now (unreachable, a timeout, a 4xx, the queued data unreadable). */
static bool relay_send(const struct odmrd_conf *conf, const struct dsn *d,
                       char *result, size_t n, bool *refused)
{
    *refused = false;
    long t = conf->timeout > 0 && conf->timeout < 86400 ? conf->timeout : 300;
    unsigned long port = 0;
    parse_ulong(conf->bounce_relay_port, 65535, &port);   /* checked by conf.c */
    int fd = net_connect(conf->bounce_relay_host, (unsigned)port, t, result, n);
    if (fd < 0)
        return false;
    struct relay *rl = malloc(sizeof *rl);
    if (!rl) {
        close(fd);
        snprintf(result, n, "out of memory");
        return false;
    }
    memset(rl, 0, sizeof *rl);
    io_init(&rl->io, fd, (int)(t * 1000));
    rl->host = conf->bounce_relay_host;
    rl->port = conf->bounce_relay_port;
    bool ok = relay_hello(rl, conf->hostname, result, n) &&
              relay_transaction(rl, d, result, n);
    if (rl->io.status == IO_OK && !rl->in_data &&
        io_puts(&rl->io, "QUIT\r\n")) {
        char quit_why[64];
        relay_read(rl, "after QUIT", quit_why, sizeof quit_why);
    }
    *refused = !ok && rl->refused;
    io_close(&rl->io);
    free(rl);
    return ok;
}

/* ================================================ local queueing */

/* Queues the DSN for the sender's domain (key).  Returns 0 or an errno
 * value; newid receives the queue id of the DSN. */
static int queue_dsn(struct queue *q, const struct dsn *d, const char *key,
                     char *newid, size_t idn)
{
    struct queue_in *in = malloc(sizeof *in);
    if (!in)
        return ENOMEM;
    int err = 0;
    if (!queue_in_begin(q, in)) {
        err = errno ? errno : EIO;
        free(in);
        return err;
    }
    struct dsn_out o = {queue_in_sink, in, true};
    struct envelope env;
    envelope_init(&env);
    str_copy(env.domain, key, sizeof env.domain);
    str_copy(env.client, "localhost", sizeof env.client);
    str_copy(env.helo, d->hostname, sizeof env.helo);
    env.body = d->eightbit ? BODY_8BITMIME : BODY_UNSPEC;
    /* The report's envelope and header need SMTPUTF8 only for a UTF-8
     * address; UTF-8 inside its message/global parts is 8-bit body data.
     * Flagging it otherwise would make a site without SMTPUTF8 return
     * the report, and a report about a report is never sent. */
    env.smtputf8 = d->utf8 && has_non_ascii(d->e->sender);
    if (!dsn_generate(d, &o))
        err = in->error ? in->error : (errno ? errno : EIO);
    else if (!envelope_add_rcpt(&env, d->e->sender, 0, "", 1))
        err = ENOMEM;
    if (err) {
        queue_in_abort(in);
    } else {
        struct envelope *list[1] = {&env};
        err = queue_in_commit(q, in, list, 1);
        str_copy(newid, in->id, idn);
        if (!err)
            log_info("%s: from=<>, size=%llu, nrcpt=1 (delivery status "
                     "notification for %s)", in->id,
                     (unsigned long long)in->size, d->e->id);
    }
    envelope_free(&env);
    free(in);
    return err;
}

/* ========================================================= driver */

/* "a@x, b@y (and 3 more)" for log lines. */
static void rcpt_list(const struct bounce_rcpt *r, size_t n, bool wanted_only,
                      char *buf, size_t len)
{
    size_t used = 0, shown = 0, total = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (wanted_only && !bounce_wants_notice(&r[i]))
            continue;
        total++;
        size_t need = strlen(r[i].addr) + 2;
        if (used + need + 20 >= len)
            continue;
        used += (size_t)snprintf(buf + used, len - used, "%s%s",
                                 shown ? ", " : "", r[i].addr);
        shown++;
    }
    if (shown < total)
        snprintf(buf + used, len - used, " (and %zu more)", total - shown);
}

/* A bounce the relay could not take for now is tried again while its
 * message has been queued for less than twice queue_lifetime: as long
 * again as the message itself had (Postfix's bounce_queue_lifetime). */
static bool still_retrying(const struct odmrd_conf *conf,
                           const struct envelope *e)
{
    time_t now = time(NULL);
    return now - e->arrival < 2 * (time_t)conf->queue_lifetime;
}

/* The relay could not take the DSN (why; temporary: for now only): queue
 * it for a hosted sender domain, keep the message to try again, or log
 * it as undeliverable. */
static enum bounce_result fallback(const struct odmrd_conf *conf,
                                   struct queue *q, const struct dsn *d,
                                   const char *why, bool temporary)
{
    const struct envelope *e = d->e;
    char key[ADDR_DOMAIN_MAX + 1] = "", newid[QID_MAX], list[LOG_LIST_MAX];
    const char *domain = addr_domain_of(e->sender);
    enum acct_result hosted = ACCT_NOTFOUND;
    if (domain && domain[0] != '[' &&
        idna_domain_key(domain, key, sizeof key, NULL) == IDNA_OK)
        hosted = accounts_domain_owner(conf->accounts_db, key, NULL, 0);
    if (hosted == ACCT_OK) {
        int err = queue_dsn(q, d, key, newid, sizeof newid);
        if (!err) {
            log_info("%s: sender non-delivery notification: %s (queued for "
                     "%s; %s)", e->id, newid, key, why);
            return BOUNCE_QUEUED;
        }
        log_err("%s: cannot queue the non-delivery notification to <%s>: %s; "
                "will try again later", e->id, e->sender, strerror(err));
        return BOUNCE_RETRY;
    }
    /* whether the sender is hosted here cannot be told: as for a relay
     * failing for now, tried again for a while */
    if ((hosted == ACCT_TEMPFAIL || hosted == ACCT_PERM) &&
        still_retrying(conf, e)) {
        log_warn("%s: bounce to <%s> deferred: account database unavailable "
                 "(%s)", e->id, e->sender, why);
        return BOUNCE_RETRY;
    }
    if (temporary && still_retrying(conf, e)) {
        log_warn("%s: bounce to <%s> deferred: %s; trying again later",
                 e->id, e->sender, why);
        return BOUNCE_RETRY;
    }
    rcpt_list(d->r, d->n, true, list, sizeof list);
    log_err("%s: bounce to <%s> undeliverable: %s; recipients: %s", e->id,
            e->sender, why, list);
    return BOUNCE_LOGGED;
}

enum bounce_result bounce_message(const struct odmrd_conf *conf,
                                  struct queue *q, const struct envelope *e,
                                  int data_fd, const struct bounce_rcpt *r,
                                  size_t n)
{
    char list[LOG_LIST_MAX], why[1024];
    if (!e->sender[0]) {
        rcpt_list(r, n, false, list, sizeof list);
        log_info("%s: no bounce for null sender; recipients: %s", e->id, list);
        return BOUNCE_NOT_NEEDED;
    }
    for (size_t i = 0; i < n; i++)
        if (!bounce_wants_notice(&r[i]))
            log_info("%s: to=<%s>, no non-delivery notification: DSN NOTIFY "
                     "without FAILURE", e->id, r[i].addr);
    if (count_wanted(r, n) == 0)
        return BOUNCE_NOT_NEEDED;
    struct dsn d;
    dsn_init(&d, conf->hostname, e, data_fd, r, n, time(NULL));
    bool refused = true;    /* no relay: nowhere else to try later */
    if (!conf->bounce_relay_host[0]) {
        str_copy(why, "no bounce_relay configured", sizeof why);
    } else if (relay_send(conf, &d, why, sizeof why, &refused)) {
        log_info("%s: sender non-delivery notification: to=<%s>, relay=%s[%s], "
                 "%s", e->id, e->sender, conf->bounce_relay_host,
                 conf->bounce_relay_port, why);
        return BOUNCE_SENT;
    }
    return fallback(conf, q, &d, why, !refused);
}

void bounce_format_age(long seconds, char *buf, size_t n)
{
    static const struct { long secs; const char *name; } units[] = {
        {86400, "day"}, {3600, "hour"}, {60, "minute"}, {1, "second"},
    };
    if (seconds < 0)
        seconds = 0;
    size_t i = 0;
    while (i + 1 < sizeof units / sizeof units[0] && seconds < units[i].secs)
        i++;
    long count = seconds / units[i].secs;
    snprintf(buf, n, "%ld %s%s", count, units[i].name, count == 1 ? "" : "s");
}
