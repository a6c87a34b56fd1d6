/* odmrctl_enqueue.c - odmrctl enqueue (SPEC 3.3): queues one message read
 * from stdin, like a sendmail-compatible pipe transport. */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "envelope.h"
#include "odmrctl.h"
#include "recipients.h"

/* RFC 5321 6.3: a message that went through this many hops is looping. */
#define MAX_RECEIVED_HEADERS 50
#define RECEIVED_PREFIX "Received:"
#define RECEIVED_PREFIX_LEN 9
/* Input is read in chunks of this size; normalising line ends can at most
 * double a chunk. */
#define ENQUEUE_CHUNK 65536

/* =============================================================== enqueue */

/* The message's envelopes: one per recipient domain. */
struct submission {
    char sender[ADDR_MAX + 1];
    bool utf8;                 /* some address needs SMTPUTF8 */
    struct envelope **envs;
    size_t nenv;
    size_t nrcpt;
};

static void submission_free(struct submission *s)
{
    for (size_t i = 0; i < s->nenv; i++) {
        envelope_free(s->envs[i]);
        free(s->envs[i]);
    }
    free(s->envs);
    s->envs = NULL;
    s->nenv = 0;
}

static bool has_non_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return true;
    return false;
}

static int parse_sender(const char *arg, struct submission *s)
{
    struct mailbox mb;
    const char *end;
    if (!arg[0] || !strcmp(arg, "<>")) {
        s->sender[0] = '\0';
        return EX_OK;
    }
    enum addr_result r = addr_parse_path(arg, &end, &mb, ADDR_ALLOW_NULL |
                                         ADDR_ALLOW_BARE | ADDR_ALLOW_UTF8);
    if (r != ADDR_OK || *end != '\0' || !addr_format(&mb, s->sender,
                                                     sizeof s->sender))
        return fail(EX_DATAERR, "invalid sender address \"%s\"%s", arg,
                    r == ADDR_TOOLONG ? " (too long)" : "");
    s->utf8 |= has_non_ascii(s->sender);
    return EX_OK;
}

/* The envelope for the domain key, created when new. */
static struct envelope *envelope_for(struct submission *s, const char *key)
{
    for (size_t i = 0; i < s->nenv; i++)
        if (!strcmp(s->envs[i]->domain, key))
            return s->envs[i];
    struct envelope **more = realloc(s->envs, (s->nenv + 1) * sizeof *more);
    if (!more)
        return NULL;
    s->envs = more;
    struct envelope *e = malloc(sizeof *e);
    if (!e)
        return NULL;
    envelope_init(e);
    str_copy(e->domain, key, sizeof e->domain);
    str_copy(e->sender, s->sender, sizeof e->sender);
    str_copy(e->client, "localhost", sizeof e->client);
    e->body = BODY_UNSPEC;
    e->ret = RET_UNSPEC;
    s->envs[s->nenv++] = e;
    return e;
}

/* Same mailbox: local parts compare exactly, domains without case. */
static bool same_address(const char *a, const char *b)
{
    const char *da = addr_domain_of(a), *db = addr_domain_of(b);
    if (!da || !db || da - a != db - b)
        return false;
    return !strncmp(a, b, (size_t)(da - a)) && !strcasecmp(da, db);
}

static bool already_listed(const struct envelope *e, const char *addr)
{
    for (size_t i = 0; i < e->nrcpt; i++)
        if (same_address(e->rcpt[i].addr, addr))
            return true;
    return false;
}

static int add_recipient(struct ctl *c, struct submission *s, const char *arg)
{
    struct mailbox mb;
    const char *end;
    char addr[ADDR_MAX + 1], key[ADDR_DOMAIN_MAX + 1];
    enum addr_result r = addr_parse_path(arg, &end, &mb, ADDR_ALLOW_BARE |
                                         ADDR_ALLOW_UTF8);
    if (r != ADDR_OK || *end != '\0' || mb.null ||
        !addr_format(&mb, addr, sizeof addr))
        return fail(EX_DATAERR, "invalid recipient address \"%s\"%s", arg,
                    r == ADDR_TOOLONG ? " (too long)" : "");
    if (mb.literal)
        return fail(EX_NOUSER, "%s: address literals are not hosted here", arg);
    const char *why = NULL;
    if (idna_domain_key(mb.domain, key, sizeof key, &why) != IDNA_OK)
        return fail(EX_DATAERR, "invalid recipient address \"%s\": invalid "
                    "domain (%s)", arg, why);
    struct envelope *e = envelope_for(s, key);
    if (!e)
        return fail(EX_TEMPFAIL, "out of memory");
    if (already_listed(e, addr))
        return EX_OK;
    if (s->nrcpt >= c->conf.max_recipients)
        return fail(EX_DATAERR, "too many recipients (max_recipients is %lu)",
                    c->conf.max_recipients);
    if (!envelope_add_rcpt(e, addr, 0, "", c->conf.max_recipients))
        return fail(EX_TEMPFAIL, "out of memory");
    s->nrcpt++;
    s->utf8 |= has_non_ascii(addr);
    return EX_OK;
}

/* A recipient RCPT would refuse - sender routing, or a user missing from
 * its domain's recipient list - is refused here too: queued, it would only
 * come back as a bounce (backscatter, which the lists exist to stop). */
static int check_listed(struct ctl *c, const struct envelope *e,
                        const char *addr)
{
    struct mailbox mb;
    const char *end;
    char owner[ACCOUNT_NAME_MAX + 1];
    if (addr_parse_path(addr, &end, &mb, ADDR_ALLOW_BARE | ADDR_ALLOW_UTF8) !=
        ADDR_OK)
        return fail(EX_DATAERR, "invalid recipient address \"%s\"", addr);
    if (recipients_routed(mb.local))
        return fail(EX_NOUSER, "%s: sender-specified routing (%%, ! or a "
                    "quoted @) is refused, as over SMTP", addr);
    switch (recipients_check(c->conf.accounts_db, e->domain, mb.local, owner,
                             sizeof owner, NULL)) {
    case RCPT_VALID:
        return EX_OK;
    case RCPT_UNKNOWN_USER:
        return fail(EX_NOUSER, "%s: unknown user (not in the recipient list "
                    "of %s)", addr, e->domain);
    case RCPT_NO_DOMAIN:
        return fail(EX_NOUSER, "%s: domain %s is not hosted here", addr,
                    e->domain);
    default:
        return fail(EX_TEMPFAIL, "%s: the recipient list of %s cannot be "
                    "read now", addr, e->domain);
    }
}

/* Every recipient domain must be bound to an account: odmrd would refuse
 * the mail with 550 5.7.1 over SMTP, and nothing could ever dequeue it. */
static int check_hosted(struct ctl *c, const struct submission *s)
{
    for (size_t i = 0; i < s->nenv; i++) {
        const struct envelope *e = s->envs[i];
        enum acct_result r = accounts_domain_owner(c->conf.accounts_db,
                                                   e->domain, NULL, 0);
        if (r == ACCT_NOTFOUND || r == ACCT_NODB)
            return fail(EX_NOUSER, "%s: domain %s is not hosted here",
                        e->nrcpt ? e->rcpt[0].addr : e->domain, e->domain);
        if (r != ACCT_OK)
            return acct_status(c, r);
        for (size_t k = 0; k < e->nrcpt; k++) {
            int rc = check_listed(c, e, e->rcpt[k].addr);
            if (rc != EX_OK)
                return rc;
        }
    }
    return EX_OK;
}

/* Streaming copy of stdin into the queue: line ends become CRLF (a lone CR
 * too), the last line gets one if it lacks it, Received: headers are
 * counted, and the size limit is enforced as the data arrives, so memory
 * use does not depend on the message size. */
struct reader {
    struct queue_in *in;
    uint64_t limit;            /* max_message_size, 0 = none */
    uint64_t bytes;            /* message bytes as stored */
    bool pending_cr;           /* last input byte was CR */
    bool mid_line;             /* bytes written since the last CRLF */
    bool in_headers;
    size_t line_len;           /* bytes of the current header line so far */
    char prefix[RECEIVED_PREFIX_LEN];
    unsigned received;
    size_t olen;
    char out[2 * ENQUEUE_CHUNK + 2];
};

static void emit_byte(struct reader *r, char ch)
{
    r->out[r->olen++] = ch;
    r->mid_line = true;
    if (!r->in_headers)
        return;
    if (r->line_len < RECEIVED_PREFIX_LEN)
        r->prefix[r->line_len] = ch;
    if (++r->line_len == RECEIVED_PREFIX_LEN &&
        !strncasecmp(r->prefix, RECEIVED_PREFIX, RECEIVED_PREFIX_LEN))
        r->received++;
}

static void emit_eol(struct reader *r)
{
    r->out[r->olen++] = '\r';
    r->out[r->olen++] = '\n';
    /* The first empty line ends the header section. */
    if (r->in_headers && r->line_len == 0)
        r->in_headers = false;
    r->line_len = 0;
    r->mid_line = false;
}

static void convert_chunk(struct reader *r, const char *data, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char ch = data[i];
        if (r->pending_cr) {
            r->pending_cr = false;
            emit_eol(r);
            if (ch == '\n')
                continue;
        }
        if (ch == '\r')
            r->pending_cr = true;
        else if (ch == '\n')
            emit_eol(r);
        else
            emit_byte(r, ch);
    }
}

/* Hands the converted bytes to the queue and checks the limits. */
static int flush_output(struct reader *r)
{
    queue_in_write(r->in, r->out, r->olen);
    r->bytes += r->olen;
    r->olen = 0;
    if (r->in->error)
        return fail(errno_status(r->in->error), "cannot write to the queue: %s",
                    strerror(r->in->error));
    if (r->limit && r->bytes > r->limit)
        return fail(EX_DATAERR, "message too large (max_message_size is %"
                    PRIu64 " bytes)", r->limit);
    if (r->received > MAX_RECEIVED_HEADERS)
        return fail(EX_DATAERR, "more than %d Received: headers, mail loop",
                    MAX_RECEIVED_HEADERS);
    return EX_OK;
}

static int copy_stdin(struct reader *r)
{
    static char chunk[ENQUEUE_CHUNK];
    for (;;) {
        ssize_t got = read(STDIN_FILENO, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return fail(EX_TEMPFAIL, "cannot read the message: %s",
                        strerror(errno));
        if (got == 0)
            break;
        /* RFC 5321 and RFC 2045 2.8 allow no NUL in mail data, and a later
         * hop that strips it could end the data early (smuggling). */
        if (memchr(chunk, '\0', (size_t)got))
            return fail(EX_DATAERR, "the message contains a NUL character "
                        "(not accepted)");
        convert_chunk(r, chunk, (size_t)got);
        int rc = flush_output(r);
        if (rc != EX_OK)
            return rc;
    }
    if (r->pending_cr || r->mid_line)
        emit_eol(r);
    r->pending_cr = false;
    return flush_output(r);
}

static void write_received(struct ctl *c, struct queue_in *in)
{
    char date[64], header[512];
    rfc5322_date(time(NULL), date, sizeof date);
    snprintf(header, sizeof header,
             "Received: by %s (odmrctl, from uid %lu)\r\n\tid %s; %s\r\n",
             c->conf.hostname, (unsigned long)c->caller, in->id, date);
    queue_in_write(in, header, strlen(header));
}

/* domain_quota: what is queued plus this message must fit. */
static int check_quota(struct ctl *c, const struct submission *s, uint64_t size)
{
    uint64_t quota = c->conf.domain_quota;
    for (size_t i = 0; quota && i < s->nenv; i++) {
        uint64_t bytes;
        unsigned long count;
        const char *d = s->envs[i]->domain;
        if (!queue_usage(&c->q, d, &bytes, &count))
            return queue_read_error(c, d);
        if (bytes + size > quota)
            return fail(EX_TEMPFAIL, "domain %s is over its quota: %" PRIu64
                        " bytes queued, this message %" PRIu64 ", domain_quota %"
                        PRIu64, d, bytes, size, quota);
    }
    return EX_OK;
}

static int queue_message(struct ctl *c, struct submission *s)
{
    static struct queue_in in;
    static struct reader r;
    char err[PATH_MAX + 64];
    if (!queue_open(&c->q, c->conf.spool_dir, err, sizeof err))
        return fail(errno_status(errno), "%s", err);
    if (!queue_in_begin(&c->q, &in))
        return fail(errno_status(errno), "cannot create a file in %s/tmp: %s",
                    c->conf.spool_dir, strerror(errno));
    write_received(c, &in);
    memset(&r, 0, offsetof(struct reader, out));
    r.in = &in;
    r.limit = c->conf.max_message_size;
    r.in_headers = true;
    int rc = copy_stdin(&r);
    if (rc == EX_OK)
        rc = check_quota(c, s, in.size);
    if (rc != EX_OK) {
        queue_in_abort(&in);
        return rc;
    }
    for (size_t i = 0; i < s->nenv; i++)
        s->envs[i]->smtputf8 = s->utf8;
    int e = queue_in_commit(&c->q, &in, s->envs, s->nenv);
    if (e)
        return fail(errno_status(e), "cannot queue the message: %s", strerror(e));
    log_info("%s: from=<%s>, size=%" PRIu64 ", nrcpt=%zu (queued by odmrctl "
             "uid %lu)", in.id, s->sender, in.size, s->nrcpt,
             (unsigned long)c->caller);
    return EX_OK;
}

int cmd_enqueue(struct ctl *c, int argc, char **argv)
{
    static const char usage[] = "enqueue [-f SENDER] [--] RCPT...";
    const char *sender = "";
    int i = 0;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (!strcmp(argv[i], "-f") && i + 1 < argc)
            sender = argv[++i];
        else if (!strncmp(argv[i], "-f", 2) && argv[i][2])
            sender = argv[i] + 2;
        else
            return usage_error(usage);
    }
    if (i >= argc)
        return usage_error(usage);
    int rc = ctl_prepare(c);
    if (rc != EX_OK)
        return rc;
    struct submission s;
    memset(&s, 0, sizeof s);
    rc = parse_sender(sender, &s);
    for (; rc == EX_OK && i < argc; i++)
        rc = add_recipient(c, &s, argv[i]);
    if (rc == EX_OK)
        rc = check_hosted(c, &s);
    if (rc == EX_OK)
        rc = queue_message(c, &s);
    submission_free(&s);
    return rc;
}

