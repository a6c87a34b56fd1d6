/* fetch_session.c - odmr-fetch as the provider's client, up to the role
 * reversal (RFC 2645): greeting, EHLO, STARTTLS, AUTH, ATRN.
 *
 * Every way this can end maps onto one exit status (SPEC 4) and one line
 * on stderr that says what happened in the provider's words.  Nothing
 * secret is sent before TLS is up when TLS is required, and nothing at
 * all after a certificate check failed. */
#include "fetch.h"

#include <stdio.h>
#include <string.h>

#include "../common/sasl.h"

#define WHO "provider"
#define QUIT_TIMEOUT_MS 10000
#define AUTH_ROUNDS_MAX 10     /* SCRAM needs 3; more is a confused peer */
/* Internal: the saved TLS session failed; connect again without it. */
#define RETRY_FULL_HANDSHAKE (-1000)

struct provider {
    const struct fetch_conf *c;
    struct io io;
    SSL_CTX *tls_ctx;
    bool tls_active;
    struct tls_cache *cache;            /* the session kept between runs */
    bool resume;                        /* offer the saved session */
    struct smtp_reply ehlo;             /* the latest EHLO reply */
    struct sasl_glue_client *sasl;
    bool reversed;                      /* the connection is odmrd's now */
};

/* ---- reporting ------------------------------------------------------- */

static void first_line(const struct smtp_reply *r, char *buf, size_t n)
{
    size_t len = strcspn(r->text, "\n");
    if (len >= n)
        len = n - 1;
    memcpy(buf, r->text, len);
    buf[len] = '\0';
}

/* "odmr-fetch: WHAT: provider said 535 5.7.8 ..."; returns status. */
static int said(const char *what, const struct smtp_reply *r, int status)
{
    char text[SMTP_REPLY_LINE_MAX];

    first_line(r, text, sizeof text);
    fprintf(stderr, "odmr-fetch: %s: provider said %d %s\n", what, r->code,
            text);
    return status;
}

/* A failed read or write: 75, or 76 for a reply that is not SMTP. */
static int io_failed(const struct provider *p, int st, bool malformed,
                     const char *during)
{
    if (malformed) {
        fprintf(stderr, "odmr-fetch: malformed reply from %s during %s\n",
                p->c->server, during);
        return EX_PROTOCOL;
    }
    fprintf(stderr, "odmr-fetch: %s %s during %s\n", p->c->server,
            st == IO_TIMEOUT    ? "timed out"
            : st == IO_DEADLINE ? "sent a reply too slowly"
            : st == IO_EOF      ? "closed the connection"
                                : "connection failed",
            during);
    return EX_TEMPFAIL;
}

/* Sends line (when not NULL; traced as shown) and reads the reply.
 * Returns 0 or an exit status. */
static int exchange(struct provider *p, const char *line, const char *shown,
                    const char *during, struct smtp_reply *r)
{
    bool malformed = false;

    if (line && (!net_send(&p->io, WHO, line, shown) || !io_flush(&p->io)))
        return io_failed(p, p->io.status, false, during);
    int st = net_reply(&p->io, WHO, r, &malformed);
    return st == IO_OK ? 0 : io_failed(p, st, malformed, during);
}

/* ---- greeting, EHLO, STARTTLS ---------------------------------------- */

static int greeting(struct provider *p)
{
    struct smtp_reply r;
    int st = exchange(p, NULL, NULL, "the greeting", &r);

    if (st)
        return st;
    if (r.code == 220)
        return 0;
    return said("service not available", &r,
                r.code >= 500 ? EX_UNAVAILABLE : EX_TEMPFAIL);
}

static int ehlo(struct provider *p)
{
    char line[FETCH_HOST_MAX + 8];

    snprintf(line, sizeof line, "EHLO %s", p->c->fqdn);
    int st = exchange(p, line, NULL, "EHLO", &p->ehlo);
    if (st)
        return st;
    if (p->ehlo.code == 250)
        return 0;
    return said("EHLO refused", &p->ehlo,
                p->ehlo.code < 500 ? EX_TEMPFAIL : EX_PROTOCOL);
}

static int tls_handshake(struct provider *p)
{
    char err[512];

    p->tls_ctx = tls_client_ctx(p->c->ca_file[0] ? p->c->ca_file : NULL, err,
                                sizeof err);
    if (!p->tls_ctx) {
        fprintf(stderr, "odmr-fetch: %s\n", err);
        return EX_CONFIG;
    }
    tls_cache_attach(p->cache, p->tls_ctx);
    SSL_SESSION *saved = p->resume ? tls_cache_load(p->cache) : NULL;
    bool ok = io_starttls_client_resume(&p->io, p->tls_ctx, p->c->server,
                                        saved, err, sizeof err);
    bool offered = saved != NULL;
    SSL_SESSION_free(saved);
    if (!ok) {
        tls_cache_discard(p->cache);
        bool lost = p->io.status == IO_TIMEOUT || p->io.status == IO_EOF ||
                    p->io.status == IO_DEADLINE;
        if (offered && !lost) {
            fprintf(stderr, "odmr-fetch: TLS with the saved session failed "
                            "(%s); trying a full handshake\n", err);
            return RETRY_FULL_HANDSHAKE;
        }
        fprintf(stderr, "odmr-fetch: TLS with %s failed: %s; not "
                        "authenticating\n", p->c->server, err);
        return lost ? EX_TEMPFAIL : EX_PROTOCOL;
    }
    p->tls_active = true;
    if (p->c->verbose >= 1) {
        char info[256];
        io_tls_info(&p->io, info, sizeof info);
        fprintf(stderr, "odmr-fetch: TLS established: %s (%s)\n", info,
                io_tls_resumed(&p->io) ? "resumed" : "full handshake");
    }
    return ehlo(p);   /* RFC 3207 4.2: learn the extensions anew */
}

static int starttls(struct provider *p)
{
    const struct fetch_conf *c = p->c;
    struct smtp_reply r;

    if (c->tls == TLS_OFF)
        return 0;
    if (!smtp_ehlo_has(&p->ehlo, "STARTTLS", NULL, 0)) {
        if (c->tls == TLS_AUTO)
            return 0;
        fprintf(stderr, "odmr-fetch: %s does not offer STARTTLS, and --tls "
                        "require does not allow authenticating in clear "
                        "text (--tls auto or off would)\n", c->server);
        return EX_PROTOCOL;
    }
    int st = exchange(p, "STARTTLS", NULL, "STARTTLS", &r);
    if (st)
        return st;
    if (r.code == 220)
        return tls_handshake(p);
    if (c->tls == TLS_AUTO && r.code != 421)
        return 0;   /* opportunistic: carry on in clear text */
    return said("STARTTLS refused", &r,
                r.code < 500 ? EX_TEMPFAIL : EX_PROTOCOL);
}

/* ---- AUTH ------------------------------------------------------------ */

static int auth_refused(const struct smtp_reply *r)
{
    /* 4xx: try again later; 5xx syntax/sequence trouble is a protocol
     * mismatch; everything else (535, 534, 530, 504, ...) means these
     * credentials or mechanisms do not work here. */
    if (r->code < 500)
        return said("authentication failed temporarily", r, EX_TEMPFAIL);
    if (r->code == 500 || r->code == 501 || r->code == 502 || r->code == 503)
        return said("AUTH failed", r, EX_PROTOCOL);
    return said("authentication failed", r, EX_NOPERM);
}

/* Our side of the exchange cannot go on: cancel it (RFC 4954 "*"). */
static int auth_cancel(struct provider *p, const char *why, int status)
{
    struct smtp_reply r;

    fprintf(stderr, "odmr-fetch: authentication with %s abandoned: %s\n",
            p->c->server, why);
    (void)exchange(p, "*", NULL, "AUTH", &r);
    return status;
}

static int auth_step(struct provider *p, const struct smtp_reply *r,
                     char *resp, size_t n)
{
    enum sasl_glue_result g = sasl_glue_client_step(p->sasl, r->text, resp, n);

    switch (g) {
    case SASL_GLUE_CONTINUE:
    case SASL_GLUE_OK:
        return 0;
    case SASL_GLUE_FAIL:
        return auth_cancel(p, "the provider's proof of the password did not "
                              "verify", EX_NOPERM);
    case SASL_GLUE_BADB64:
        return auth_cancel(p, "invalid base64 from the provider", EX_PROTOCOL);
    default:
        return auth_cancel(p, "SASL error", EX_TEMPFAIL);
    }
}

/* Runs the exchange that "AUTH ..." (first, traced as shown) opens;
 * resp (n bytes) holds our responses. */
static int auth_rounds(struct provider *p, const char *first,
                       const char *shown, char *resp, size_t n)
{
    struct smtp_reply r;
    const char *out = first;

    for (int round = 0; round < AUTH_ROUNDS_MAX; round++) {
        int st = exchange(p, out, round ? "(SASL response redacted)" : shown,
                          "AUTH", &r);
        if (st)
            return st;
        if (r.code == 235) {
            if (sasl_glue_client_complete(p->sasl))
                return 0;
            fprintf(stderr, "odmr-fetch: %s accepted the authentication "
                            "without proving it knows the password\n",
                    p->c->server);
            return EX_NOPERM;
        }
        if (r.code != 334)
            return auth_refused(&r);
        if (sasl_glue_client_complete(p->sasl))
            return auth_cancel(p, "the provider asked for more after the "
                                  "exchange was complete", EX_PROTOCOL);
        if ((st = auth_step(p, &r, resp, n)) != 0)
            return st;
        out = resp;
    }
    return auth_cancel(p, "too many SASL rounds", EX_PROTOCOL);
}

static int auth_exchange(struct provider *p, const char *first,
                         const char *shown)
{
    static char resp[SASL_GLUE_B64_MAX + 1];
    int st = auth_rounds(p, first, shown, resp, sizeof resp);

    explicit_bzero(resp, sizeof resp);   /* PLAIN/LOGIN carry the password */
    return st;
}

static int authenticate(struct provider *p)
{
    static char initial[SASL_GLUE_B64_MAX + 1];
    static char line[SASL_GLUE_B64_MAX + 64];
    char offered[512], mech[SASL_GLUE_MECH_MAX + 1], err[256];
    const struct fetch_conf *c = p->c;

    if (!smtp_ehlo_has(&p->ehlo, "AUTH", offered, sizeof offered)) {
        fprintf(stderr, "odmr-fetch: %s offers no authentication%s\n",
                c->server, p->tls_active ? "" : " (before TLS)");
        return p->tls_active ? EX_PROTOCOL : EX_NOPERM;
    }
    if (!sasl_glue_client_init(err, sizeof err) ||
        !(p->sasl = sasl_glue_client_new("smtp", c->server, c->user,
                                         c->password, err, sizeof err))) {
        fprintf(stderr, "odmr-fetch: %s\n", err);
        return EX_CONFIG;
    }
    enum sasl_glue_result g = sasl_glue_client_start(
        p->sasl, offered, c->mechanisms, p->tls_active, mech, sizeof mech,
        initial, sizeof initial);
    if (g == SASL_GLUE_BADMECH) {
        fprintf(stderr, "odmr-fetch: no usable SASL mechanism: %s offers "
                        "\"%s\", allowed \"%s\"%s\n", c->server, offered,
                c->mechanisms[0] ? c->mechanisms : "any",
                p->tls_active ? "" : " (PLAIN and LOGIN only over TLS)");
        return EX_NOPERM;
    }
    if (g != SASL_GLUE_CONTINUE && g != SASL_GLUE_OK) {
        fprintf(stderr, "odmr-fetch: SASL client error with %s\n", mech);
        return EX_TEMPFAIL;
    }
    char shown[64];
    snprintf(line, sizeof line, "AUTH %s%s%s", mech, initial[0] ? " " : "",
             initial);
    snprintf(shown, sizeof shown, "AUTH %s%s", mech,
             initial[0] ? " (initial response redacted)" : "");
    explicit_bzero(initial, sizeof initial);
    int st = auth_exchange(p, line, shown);
    explicit_bzero(line, sizeof line);
    return st;
}

/* ---- ATRN and the reversal ------------------------------------------- */

/* Push delivery (--linger): odmrd offers XLINGER in its EHLO reply; asked
 * before ATRN, it reverses the connection even with no mail queued and
 * keeps it open for as long as our EHLO reply's XLINGER says.  A refusal
 * (no room, not offered) only means this run polls, as without --linger. */
static int ask_linger(struct provider *p)
{
    const struct fetch_conf *c = p->c;
    struct smtp_reply r;
    char line[48];

    if (!c->linger)
        return 0;
    if (!smtp_ehlo_has(&p->ehlo, "XLINGER", NULL, 0)) {
        fprintf(stderr, "odmr-fetch: %s does not offer push delivery "
                        "(XLINGER): this run polls\n", c->server);
        return 0;
    }
    snprintf(line, sizeof line, "XLINGER %ld", c->linger);
    int st = exchange(p, line, NULL, "XLINGER", &r);
    if (st || r.code == 250)
        return st;
    if (r.code == 421)
        return said("XLINGER refused", &r, EX_TEMPFAIL);
    return said("push delivery refused, this run polls", &r, 0);
}

static int atrn(struct provider *p, struct fetch_stats *stats)
{
    /* conf_load keeps the list short enough for a 512-octet line */
    char line[sizeof p->c->domains + 8];
    struct smtp_reply r;
    const struct fetch_conf *c = p->c;

    snprintf(line, sizeof line, "ATRN%s%s", c->domains[0] ? " " : "",
             c->domains);
    int st = exchange(p, line, NULL, "ATRN", &r);
    if (st)
        return st;
    switch (r.code) {
    case 250:
        p->reversed = true;
        return receiver_run(c, &p->io, stats);
    case 453:
        return EX_OK;
    case 450:
    case 530:
        return said("ATRN refused", &r, EX_NOPERM);
    default:
        return said("ATRN failed", &r,
                    r.code < 500 ? EX_TEMPFAIL : EX_PROTOCOL);
    }
}

static int session(struct provider *p, struct fetch_stats *stats)
{
    int st = greeting(p);

    if (!st)
        st = ehlo(p);
    if (!st)
        st = starttls(p);
    if (!st && !smtp_ehlo_has(&p->ehlo, "ATRN", NULL, 0)) {
        fprintf(stderr, "odmr-fetch: %s does not offer ATRN: not an ODMR "
                        "service (RFC 2645)?\n", p->c->server);
        st = EX_PROTOCOL;
    }
    if (!st)
        st = authenticate(p);
    if (!st)
        st = ask_linger(p);
    if (!st)
        st = atrn(p, stats);
    return st;
}

/* One connection; resume: offer the saved TLS session. */
static int connect_and_run(const struct fetch_conf *c,
                           struct fetch_stats *stats, struct tls_cache *cache,
                           bool resume)
{
    static struct provider p;
    char err[512];

    memset(&p, 0, sizeof p);
    p.c = c;
    p.cache = cache;
    p.resume = resume;
    int fd = net_connect(c->server, c->port, c->timeout, err, sizeof err);
    if (fd < 0) {
        fprintf(stderr, "odmr-fetch: %s\n", err);
        return EX_TEMPFAIL;
    }
    io_init(&p.io, fd, (int)(c->timeout * 1000));
    /* A line, and the TLS handshake, must be complete within the timeout
     * of its first octet: a provider trickling bytes cannot hold the run
     * (and its lock) for ever. */
    io_set_line_deadline(&p.io, (int)(c->timeout * 1000));
    int st = session(&p, stats);
    /* RFC 5321 4.1.1.10: end politely whenever the connection still
     * works and is still ours to end. */
    if (!p.reversed && p.io.status == IO_OK) {
        struct smtp_reply r;
        if (p.io.timeout_ms > QUIT_TIMEOUT_MS)
            p.io.timeout_ms = QUIT_TIMEOUT_MS;   /* nothing depends on it */
        (void)exchange(&p, "QUIT", NULL, "QUIT", &r);
    }
    io_close(&p.io);
    sasl_glue_client_free(p.sasl);
    if (p.tls_ctx)
        SSL_CTX_free(p.tls_ctx);
    return st;
}

int fetch_run(const struct fetch_conf *c, struct fetch_stats *stats)
{
    static struct tls_cache cache;

    bool keep = c->tls != TLS_OFF && tls_cache_init(&cache, c);
    int st = connect_and_run(c, stats, &cache, keep);
    /* Nothing of the first attempt got as far as AUTH: a second is safe. */
    if (st == RETRY_FULL_HANDSHAKE)
        st = connect_and_run(c, stats, &cache, false);
    return st == RETRY_FULL_HANDSHAKE ? EX_PROTOCOL : st;
}
