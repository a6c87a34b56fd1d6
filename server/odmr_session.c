/* odmr_session.c - the ODMR service (RFC 2645) on odmr_listen.
 *
 * Before the role reversal this is a restricted ESMTP server: EHLO/HELO,
 * STARTTLS, AUTH (RFC 4954 through Cyrus SASL, common/sasl.h), ATRN, NOOP,
 * RSET, HELP, QUIT; everything else is 502.  A successful ATRN locks the
 * requested domains (flock: released by the kernel if this process dies)
 * and hands the connection to delivery.c, where odmrd is the client. */
#include "session.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/io.h"
#include "../common/log.h"
#include "../common/sasl.h"
#include "../common/smtp.h"
#include "../common/util.h"
#include "accounts.h"
#include "auxprop.h"
#include "delivery.h"
#include "guard.h"
#include "linger.h"
#include "queue.h"

#define MAX_AUTH_FAILURES 3      /* SPEC 3.5: then 421 */
#define MAX_ATRN_DOMAINS 100

struct odmr {
    const struct odmrd_conf *conf;
    SSL_CTX *tls_ctx;
    const struct session_peer *peer;
    bool greeted, esmtp, tls_on, done;
    int linger_slot;             /* XLINGER asked and granted, else -1 */
    struct sasl_glue_server *sasl;
    char mechs[512];
    char user[ACCOUNT_NAME_MAX + 1];   /* "" until authenticated */
    unsigned auth_failures, bad_commands;
    char local_ipport[80], remote_ipport[80];
    /* Last, and not cleared per session (odmr_session_run): queue_open and
     * io_init set what they use, and clearing 36 KB of buffers cost more
     * than the rest of the set-up. */
    struct queue q;
    struct io io;
};

struct domain_set {
    char *names[MAX_ATRN_DOMAINS];
    int locks[MAX_ATRN_DOMAINS];          /* .lock, see linger.h */
    int linger_locks[MAX_ATRN_DOMAINS];   /* .linger */
    bool optional[MAX_ATRN_DOMAINS];   /* bare ATRN, no mail yet: skipped
                                          when another session holds it */
    size_t n;
};

/* Every reply of this session goes to its connection, traced with its
 * peer; refusals count (an ATRN or AUTH refused over and over). */
#define reply(s, ...) \
    session_reply_counted(&(s)->io, (s)->peer->addr, &(s)->bad_commands, \
                          __VA_ARGS__)

static void sockaddr_ipport(const struct sockaddr_storage *ss, char *buf,
                            size_t n)
{
    char ip[INET6_ADDRSTRLEN] = "";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        port = ntohs(in->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        port = ntohs(in6->sin6_port);
    }
    buf[0] = '\0';
    if (ip[0])
        snprintf(buf, n, "%s;%u", ip, port);
}

/* Cyrus wants "IP;PORT" for both ends (some mechanisms bind to them). */
static void socket_names(struct odmr *s)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(s->peer->fd, (struct sockaddr *)&ss, &sl) == 0)
        sockaddr_ipport(&ss, s->local_ipport, sizeof s->local_ipport);
    sl = sizeof ss;
    if (getpeername(s->peer->fd, (struct sockaddr *)&ss, &sl) == 0)
        sockaddr_ipport(&ss, s->remote_ipport, sizeof s->remote_ipport);
}

/* A fresh SASL server object for the current TLS state. */
static bool sasl_renew(struct odmr *s)
{
    char err[256];
    unsigned bits = s->tls_on && s->io.ssl
                        ? (unsigned)SSL_get_cipher_bits(s->io.ssl, NULL) : 0;
    sasl_glue_server_free(s->sasl);
    s->mechs[0] = '\0';
    s->sasl = sasl_glue_server_new("smtp", s->conf->hostname,
                                   s->local_ipport[0] ? s->local_ipport : NULL,
                                   s->remote_ipport[0] ? s->remote_ipport : NULL,
                                   s->tls_on, bits, err, sizeof err);
    if (!s->sasl) {
        log_err("%s: SASL: %s", s->peer->addr, err);
        return false;
    }
    if (!sasl_glue_server_mechanisms(s->sasl, s->conf->sasl_mechanisms, s->mechs,
                                     sizeof s->mechs))
        s->mechs[0] = '\0';
    return true;
}

/* ------------------------------------------------------------ commands */

static bool push_offered(const struct odmrd_conf *conf)
{
    return conf->odmr_linger_max > 0 && conf->odmr_max_lingering > 0;
}

static void do_helo(struct odmr *s, const char *arg, bool extended)
{
    if (!*arg) {
        reply(s, "501 5.5.4 Syntax: %s hostname", extended ? "EHLO" : "HELO");
        return;
    }
    s->greeted = true;
    s->esmtp = extended;
    if (!extended) {
        reply(s, "250 %s", s->conf->hostname);
        return;
    }
    if (!s->sasl)
        sasl_renew(s);
    bool auth_usable = s->mechs[0] && !s->user[0] &&
                       (!s->conf->require_tls || s->tls_on);
    reply(s, "250-%s", s->conf->hostname);
    if (auth_usable)
        reply(s, "250-AUTH %s", s->mechs);
    if (s->tls_ctx && !s->tls_on)
        reply(s, "250-STARTTLS");
    reply(s, "250-ENHANCEDSTATUSCODES");
    if (push_offered(s->conf))
        reply(s, "250-XLINGER %ld", s->conf->odmr_linger_max);
    reply(s, "250 ATRN");
}

static void do_starttls(struct odmr *s, const char *arg)
{
    enum starttls_result r = session_starttls(&s->io, s->tls_ctx, s->tls_on, arg,
                                              s->peer->addr, &s->bad_commands);
    if (r == STARTTLS_FAILED)
        s->done = true;
    if (r != STARTTLS_ON)
        return;
    /* RFC 3207 section 4.2: start over as if the session were new. */
    s->tls_on = true;
    s->greeted = s->esmtp = false;
    s->user[0] = '\0';
    if (s->linger_slot >= 0)   /* granted to the account, which is gone */
        close(s->linger_slot);
    s->linger_slot = -1;
    sasl_renew(s);
}

/* Reads the client's answer to a 334; NULL after replying when the
 * exchange must stop (cancel, bad line, connection gone). */
static const char *auth_response(struct odmr *s, char *line, size_t n)
{
    long len = io_getline(&s->io, line, n, NULL);
    if (len == IO_TOOLONG) {
        reply(s, "500 5.5.6 Authentication line too long");
        return NULL;
    }
    if (len < 0) {
        s->done = true;
        return NULL;
    }
    if (!strcmp(line, "*")) {
        reply(s, "501 5.7.0 Authentication cancelled");
        return NULL;
    }
    return line;
}

static void auth_failed(struct odmr *s, const char *mech)
{
    s->auth_failures++;
    log_info("%s: authentication failed, mechanism %s (%s)", s->peer->addr, mech,
             sasl_glue_server_reason(s->sasl));
    if (s->auth_failures >= MAX_AUTH_FAILURES) {
        reply(s, "421 4.7.0 %s Too many authentication failures",
              s->conf->hostname);
        s->done = true;
        return;
    }
    reply(s, "535 5.7.8 Authentication credentials invalid");
}

/* The account name the failed exchange was about (the last password
 * lookup's, known or not), "" when it got no further than that. */
static const char *attempted_account(void)
{
    const char *name = auxprop_last_account(NULL);
    return name ? name : "";
}

static void auth_result(struct odmr *s, enum sasl_glue_result r, const char *mech)
{
    switch (r) {
    case SASL_GLUE_OK:
        str_copy(s->user, sasl_glue_server_username(s->sasl), sizeof s->user);
        guard_succeeded(s->user);
        log_info("%s: authenticated as %s with %s%s", s->peer->addr, s->user,
                 mech, s->tls_on ? " over TLS" : "");
        reply(s, "235 2.7.0 Authentication successful");
        break;
    case SASL_GLUE_FAIL:
        /* the master's table decides how long this failure waits */
        guard_failed(attempted_account());
        auth_failed(s, mech);
        break;
    case SASL_GLUE_BADMECH:
        reply(s, "504 5.5.4 Unrecognized authentication type");
        break;
    case SASL_GLUE_BADB64: reply(s, "501 5.5.2 Invalid base64 data"); break;
    default: reply(s, "454 4.7.0 Temporary authentication failure"); break;
    }
}

/* Is mech (any case) one of the words of the sasl_mechanisms list? */
static bool configured_mech(const char *list, const char *mech)
{
    size_t len = strlen(mech);
    for (const char *p = list; *p;) {
        p += strspn(p, " ,");
        size_t w = strcspn(p, " ,");
        if (w == len && !strncasecmp(p, mech, len))
            return true;
        p += w;
    }
    return false;
}

static void do_auth(struct odmr *s, const char *arg)
{
    static char chal[SASL_GLUE_B64_MAX + 1], line[SASL_GLUE_B64_MAX + 2];
    char mech[SASL_GLUE_MECH_MAX + 1];
    if (!s->esmtp) {
        reply(s, "503 5.5.1 Send EHLO first");
        return;
    }
    if (s->user[0]) {
        reply(s, "503 5.5.1 Already authenticated");
        return;
    }
    if (s->conf->require_tls && !s->tls_on) {
        /* the administrator's only clue why a customer cannot log in */
        log_info("%s: AUTH refused: require_tls = yes and the session is not "
                 "encrypted (fetchmail never uses STARTTLS for ODMR)",
                 s->peer->addr);
        reply(s, "530 5.7.0 Must issue a STARTTLS command first");
        return;
    }
    size_t mlen = strcspn(arg, " ");
    if (mlen == 0 || mlen > SASL_GLUE_MECH_MAX) {
        reply(s, "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
        return;
    }
    memcpy(mech, arg, mlen);
    mech[mlen] = '\0';
    if (!s->tls_on && (!strcasecmp(mech, "PLAIN") || !strcasecmp(mech, "LOGIN")) &&
        configured_mech(s->conf->sasl_mechanisms, mech)) {
        /* RFC 4954 section 6: the mechanism exists, but only inside TLS */
        reply(s, "538 5.7.11 Encryption required for requested authentication "
                 "mechanism");
        return;
    }
    const char *initial = arg[mlen] == ' ' ? arg + mlen + 1 : NULL;
    if (!guard_may_auth()) {
        /* this address failed auth_failure_limit times in the window */
        reply(s, "454 4.7.0 Too many authentication failures, try again later");
        s->done = true;
        return;
    }
    if (!s->sasl && !sasl_renew(s)) {
        reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    enum sasl_glue_result r = sasl_glue_server_start(s->sasl, mech, initial, chal,
                                                     sizeof chal);
    while (r == SASL_GLUE_CONTINUE) {
        reply(s, "334 %s", chal);
        const char *resp = auth_response(s, line, sizeof line);
        if (!resp)
            return;
        r = sasl_glue_server_step(s->sasl, resp, chal, sizeof chal);
    }
    auth_result(s, r, mech);
}

/* ---------------------------------------------------------------- ATRN */

static void release(struct domain_set *set)
{
    for (size_t i = 0; i < set->n; i++) {
        if (set->locks[i] >= 0)
            close(set->locks[i]);
        if (set->linger_locks[i] >= 0)
            close(set->linger_locks[i]);
        free(set->names[i]);
    }
    set->n = 0;
}

/* Adds a domain by its key (either IDNA spelling is the same domain);
 * false when it has none or the set is full. */
static bool add_domain(struct domain_set *set, const char *domain)
{
    char key[IDNA_KEY_MAX + 1];
    if (idna_domain_key(domain, key, sizeof key, NULL) != IDNA_OK)
        return false;
    for (size_t i = 0; i < set->n; i++)
        if (!strcmp(set->names[i], key))
            return true;
    if (set->n == MAX_ATRN_DOMAINS)
        return false;
    set->names[set->n] = strdup(key);
    set->locks[set->n] = set->linger_locks[set->n] = -1;
    set->optional[set->n] = false;
    if (!set->names[set->n])
        return false;
    set->n++;
    return true;
}

struct own_ctx {
    const char *user;
    struct queue *q;
    struct domain_set *set;
    size_t left_over;          /* domains with mail beyond the set's size */
    char *empty[MAX_ATRN_DOMAINS];   /* owned domains without mail */
    size_t nempty;
};

/* A bare ATRN takes the account's domains that have mail first: an
 * account may own more domains than one session serves, and drained
 * domains drop out, so every ATRN makes progress.  Free places go to the
 * domains without mail, for mail that arrives during the session. */
static void collect_owned(void *ctx, const char *domain, const char *name)
{
    struct own_ctx *o = ctx;
    char key[IDNA_KEY_MAX + 1];
    if (strcmp(name, o->user) ||
        idna_domain_key(domain, key, sizeof key, NULL) != IDNA_OK)
        return;
    if (!queue_has_mail(o->q, key)) {
        if (o->nempty < MAX_ATRN_DOMAINS && (o->empty[o->nempty] = strdup(key)))
            o->nempty++;
        return;
    }
    if (!add_domain(o->set, domain))
        o->left_over++;
}

static void add_empty_domains(struct own_ctx *o)
{
    for (size_t i = 0; i < o->nempty; i++) {
        size_t before = o->set->n;
        if (add_domain(o->set, o->empty[i]) && o->set->n > before)
            o->set->optional[before] = true;
        free(o->empty[i]);
    }
    o->nempty = 0;
}

/* Parses "d1,d2,..."; false on a syntax error. */
static bool parse_domains(const char *arg, struct domain_set *set)
{
    char buf[SMTP_LINE_MAX + 1];
    if (!str_copy(buf, arg, sizeof buf))
        return false;
    char *save = NULL;
    size_t len = strlen(buf);
    if (len == 0 || buf[0] == ',' || buf[len - 1] == ',' || strstr(buf, ",,"))
        return false;
    for (char *d = strtok_r(buf, ",", &save); d; d = strtok_r(NULL, ",", &save)) {
        if (!addr_valid_domain(d, true) || !add_domain(set, d))
            return false;
    }
    return set->n > 0;
}

/* Every domain must belong to the account; reply and false otherwise. */
static bool check_ownership(struct odmr *s, struct domain_set *set)
{
    char owner[ACCOUNT_NAME_MAX + 1];
    for (size_t i = 0; i < set->n; i++) {
        enum acct_result r = accounts_domain_owner(s->conf->accounts_db,
                                                   set->names[i], owner,
                                                   sizeof owner);
        if (r == ACCT_OK && !strcmp(owner, s->user))
            continue;
        if (r == ACCT_OK || r == ACCT_NOTFOUND) {
            /* Same reply whether the domain exists or not (RFC 2645 7). */
            log_info("%s: ATRN refused: %s is not a domain of %s", s->peer->addr,
                     set->names[i], s->user);
            reply(s, "450 4.7.1 ATRN request refused");
        } else {
            log_err("accounts database %s: %s", s->conf->accounts_db,
                    acct_strerror(r));
            reply(s, "451 4.3.0 Temporary lookup failure");
        }
        return false;
    }
    return true;
}

/* Leaves set[i] out (its lock is not held). */
static void drop_domain(struct domain_set *set, size_t i)
{
    free(set->names[i]);
    set->n--;
    set->names[i] = set->names[set->n];
    set->locks[i] = set->locks[set->n];
    set->linger_locks[i] = set->linger_locks[set->n];
    set->optional[i] = set->optional[set->n];
}

/* Both locks of a domain (linger.h): the delivery lock, then the linger
 * lock, which a lingering session keeps while it waits without the first.
 * The fd of the first, -2 when another session holds either, -1 + errno. */
static int lock_domain(struct odmr *s, struct domain_set *set, size_t i)
{
    set->locks[i] = queue_lock_domain(&s->q, set->names[i]);
    if (set->locks[i] < 0)
        return set->locks[i];
    set->linger_locks[i] = linger_lock_domain(&s->q, set->names[i]);
    if (set->linger_locks[i] >= 0)
        return set->locks[i];
    int rc = set->linger_locks[i], err = errno;
    close(set->locks[i]);
    set->locks[i] = set->linger_locks[i] = -1;
    errno = err;
    return rc;
}

static bool lock_all(struct odmr *s, struct domain_set *set)
{
    for (size_t i = 0; i < set->n; i++) {
        int rc = lock_domain(s, set, i);
        if (rc >= 0)
            continue;
        if (rc == -2 && set->optional[i]) {
            drop_domain(set, i--);   /* nothing to wait for there */
            continue;
        }
        if (rc == -2) {
            log_info("%s: ATRN for %s: being dequeued by another session "
                     "(or one lingering on it)", s->peer->addr, set->names[i]);
            reply(s, "451 4.4.0 Unable to process ATRN request now");
        } else if (errno == ELOOP || errno == ENOTDIR) {
            log_err("ATRN for %s refused: %s/q/%s is not a directory of the "
                    "queue (a symbolic link?); left alone", set->names[i],
                    s->q.spool, set->names[i]);
            reply(s, "451 4.3.0 Unable to process ATRN request now");
        } else {
            log_err("cannot lock queue of %s: %s", set->names[i], strerror(errno));
            reply(s, "451 4.3.0 Unable to process ATRN request now");
        }
        return false;
    }
    return true;
}

static bool any_mail(struct odmr *s, const struct domain_set *set)
{
    for (size_t i = 0; i < set->n; i++)
        if (queue_has_mail(&s->q, set->names[i]))
            return true;
    return false;
}

/* Which domains the ATRN asks for; false after replying. */
static bool atrn_domains(struct odmr *s, const char *arg, struct domain_set *set)
{
    if (*arg) {
        if (!parse_domains(arg, set)) {
            reply(s, "501 5.5.4 Syntax: ATRN [domain[,domain...]]");
            return false;
        }
        return check_ownership(s, set);
    }
    struct own_ctx o = {.user = s->user, .q = &s->q, .set = set};
    enum acct_result r = accounts_domains(s->conf->accounts_db, collect_owned, &o);
    add_empty_domains(&o);
    if (r != ACCT_OK) {
        reply(s, "451 4.3.0 Temporary lookup failure");
        return false;
    }
    if (o.left_over)
        log_warn("%s: ATRN by %s: %zu more domain(s) with mail than one "
                 "session serves (%d); they wait for the next ATRN",
                 s->peer->addr, s->user, o.left_over, MAX_ATRN_DOMAINS);
    return true;
}

/* "XLINGER seconds" before ATRN (linger.h, docs/rfc-conformance.md): the
 * customer will advertise XLINGER after the reversal, so ATRN reverses
 * even with no mail queued.  The slot is taken now, so a customer that
 * finds no room hears it before ATRN and polls as usual. */
static void do_xlinger(struct odmr *s, const char *arg)
{
    unsigned long secs;
    if (!push_offered(s->conf)) {
        reply(s, "502 5.5.1 Command not implemented");
    } else if (!s->user[0]) {
        reply(s, "530 5.7.0 Authentication required");
    } else if (!parse_ulong(arg, 366UL * 86400, &secs) || secs == 0) {
        reply(s, "501 5.5.4 Syntax: XLINGER seconds");
    } else if (s->linger_slot < 0 &&
               (s->linger_slot = linger_take_slot(s->conf)) < 0) {
        if (s->linger_slot == -2)
            log_info("%s: XLINGER by %s refused: odmr_max_lingering (%lu) "
                     "sessions linger already", s->peer->addr, s->user,
                     s->conf->odmr_max_lingering);
        s->linger_slot = -1;
        reply(s, "451 4.3.2 No room for another lingering session; ATRN "
                 "works as usual");
    } else {
        reply(s, "250 2.0.0 ATRN will reverse the connection even without "
                 "mail; up to %lds if your EHLO reply offers XLINGER",
              secs < (unsigned long)s->conf->odmr_linger_max
                  ? (long)secs : s->conf->odmr_linger_max);
    }
}

static void do_atrn(struct odmr *s, const char *arg)
{
    struct domain_set set = {.n = 0};
    if (!s->user[0]) {
        reply(s, "530 5.7.0 Authentication required");
        return;
    }
    if (!atrn_domains(s, arg, &set)) {
        release(&set);
        return;
    }
    /* "No mail" first, without the locks: a customer polling an empty
     * domain while another session of its own is on it should hear 453,
     * not a 451 that makes it retry.  After locking, look again: the
     * other session may have just delivered everything. */
    bool push = s->linger_slot >= 0;   /* reverse even without mail */
    bool mail = set.n > 0 && any_mail(s, &set);
    if ((mail || push) && !lock_all(s, &set)) {   /* replied 451 */
        release(&set);
        return;
    }
    if (set.n == 0 || (!push && (!mail || !any_mail(s, &set)))) {
        release(&set);
        reply(s, "453 You have no mail");
        return;
    }
    reply(s, "250 OK now reversing the connection");
    if (!io_flush(&s->io)) {
        release(&set);
        s->done = true;
        return;
    }
    log_info("%s: ATRN by %s for %zu domain(s): reversing the connection",
             s->peer->addr, s->user, set.n);
    struct delivery_ctx d = {.conf = s->conf, .q = &s->q, .io = &s->io,
                             .account = s->user, .peer = s->peer->addr,
                             .locks = set.locks,
                             .linger_slot = s->linger_slot};
    s->linger_slot = -1;   /* deliver_domains frees it */
    /* A stop request now ends the delivery after the message in hand
     * (delivery.c checks it), not in the middle of it. */
    session_idle = 0;
    deliver_domains(&d, set.names, set.n);
    session_idle = 1;
    release(&set);
    s->done = true;   /* after the reversal the connection is the customer's */
}

/* ------------------------------------------------------------ dispatch */

/* XLINGER is odmrd's own verb, unknown to the shared SMTP parser. */
static bool is_xlinger(const char *line, const char **arg)
{
    if (strncasecmp(line, "XLINGER", 7) != 0 || (line[7] && line[7] != ' '))
        return false;
    *arg = line + 7 + (line[7] == ' ');
    return true;
}

static void dispatch(struct odmr *s, const struct smtp_cmd *cmd,
                     const char *line)
{
    const char *xarg;
    const char *arg = cmd->arg ? cmd->arg : "";
    switch (cmd->verb) {
    case SMTP_EHLO: do_helo(s, arg, true); break;
    case SMTP_HELO: do_helo(s, arg, false); break;
    case SMTP_STARTTLS: do_starttls(s, arg); break;
    case SMTP_AUTH: do_auth(s, arg); break;
    case SMTP_ATRN: do_atrn(s, arg); break;
    case SMTP_NOOP: reply(s, "250 2.0.0 Ok"); break;
    case SMTP_RSET: reply(s, "250 2.0.0 Ok"); break;
    case SMTP_HELP:
        reply(s, "214 2.0.0 ODMR service (RFC 2645): EHLO, AUTH, ATRN, QUIT");
        break;
    case SMTP_QUIT:
        reply(s, "221 2.0.0 Bye");
        s->done = true;
        break;
    default:
        if (is_xlinger(line, &xarg)) {
            do_xlinger(s, xarg);
            break;
        }
        reply(s, "502 5.5.1 Command not implemented");
        break;
    }
}

/* AUTH may carry an initial response of up to 12288 octets (RFC 4954
 * section 4, within the line buffer); every other command is held to 512. */
static size_t command_limit(int verb)
{
    return verb == SMTP_AUTH ? SIZE_MAX : SMTP_LINE_MAX;
}

/* ATRN and XLINGER count with NOOP: an ATRN that does not reverse the
 * connection (453 no mail, 450 busy, or refused) and XLINGER move no
 * mail, and a client repeating them could hold a connection (and a linger
 * slot) for ever.  Every ATRN counts: one that reverses ends the command
 * loop, so its count is never looked at again. */
static int junk_verb(const struct smtp_cmd *cmd, const char *line)
{
    const char *arg;
    if (cmd->verb == SMTP_ATRN || is_xlinger(line, &arg))
        return SMTP_NOOP;
    return cmd->verb;
}

static void session_loop(struct odmr *s)
{
    static char line[SASL_GLUE_B64_MAX + 64];   /* see command_limit */
    unsigned junk_commands = 0;
    while (!s->done) {
        if (session_stop_requested) {
            reply(s, "421 4.3.2 %s Service shutting down", s->conf->hostname);
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
                                  junk_verb(&cmd, line), &junk_commands))
            return;
        dispatch(s, &cmd, line);
        /* A SASL response line that timed out or trickled past
         * command_deadline ended the exchange; say why (the connection is
         * not reversed yet, so a reply still goes to the client). */
        if (cmd.verb == SMTP_AUTH && s->done)
            session_timed_out(&s->io, s->peer->addr, s->conf->hostname);
    }
}

void odmr_session_run(const struct odmrd_conf *conf, SSL_CTX *tls,
                      const struct session_peer *peer)
{
    static struct odmr s;
    char err[PATH_MAX + 64];
    memset(&s, 0, offsetof(struct odmr, q));
    s.conf = conf;
    s.tls_ctx = tls;
    s.linger_slot = -1;
    s.peer = peer;
    socket_names(&s);
    log_info("connect from %s (ODMR)", peer->addr);
    session_start_io(&s.io, conf, peer);
    if (!queue_open(&s.q, conf->spool_dir, err, sizeof err)) {
        log_err("queue: %s", err);
        reply(&s, "421 4.3.0 %s Service temporarily unavailable", conf->hostname);
    } else {
        reply(&s, "220 %s ESMTP ODMR service ready", conf->hostname);
        session_loop(&s);
    }
    /* The last reply is left to io_close: with TLS it then leaves with
     * close_notify in one packet. */
    log_info("disconnect from %s%s%s", peer->addr, s.user[0] ? " account=" : "",
             s.user);
    if (s.linger_slot >= 0)   /* asked for, no ATRN followed */
        close(s.linger_slot);
    linger_drop_reserve();
    sasl_glue_server_free(s.sasl);
    io_close(&s.io);
}
