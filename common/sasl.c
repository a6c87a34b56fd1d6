/* sasl.c - Cyrus SASL glue for SMTP AUTH, server and client (see sasl.h).
 *
 * Cyrus is configured entirely through callbacks, so its behaviour does
 * not depend on files an operator (or a distribution package) may have
 * left in /etc/sasl2: SASL_CB_GETOPT answers the options that decide where
 * passwords come from, and SASL_CB_VERIFYFILE refuses every configuration
 * and password file, which also keeps the sasldb plugin from opening
 * /etc/sasldb2.  Plugin libraries are still loaded from Cyrus' directory:
 * that is where the mechanisms live. */
#include "sasl.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sasl/sasl.h>
#include <sasl/saslplug.h>
#include <sasl/saslutil.h>

#include "log.h"
#include "util.h"

/* Our function type must be Cyrus', or registering the plugin would call
 * it through a mismatched pointer. */
_Static_assert(_Generic((sasl_glue_auxprop_init *)0,
                        sasl_auxprop_init_t *: 1, default: 0),
               "sasl_glue_auxprop_init differs from sasl_auxprop_init_t");

/* Cyrus stores every callback as int (*)(void).  Going through the
 * generic function pointer type keeps -Wcast-function-type quiet; Cyrus
 * casts back to the real type before calling. */
#define CB_PROC(f) ((int (*)(void))(void (*)(void))(f))

const char *sasl_glue_result_name(enum sasl_glue_result r)
{
    switch (r) {
    case SASL_GLUE_CONTINUE: return "continue";
    case SASL_GLUE_OK: return "ok";
    case SASL_GLUE_FAIL: return "fail";
    case SASL_GLUE_BADMECH: return "bad mechanism";
    case SASL_GLUE_BADB64: return "bad base64";
    case SASL_GLUE_ERROR: return "error";
    }
    return "?";
}

/* ---------------------------------------------------------------------- */
/* helpers shared by both sides                                           */

/* Cyrus' levels onto ours.  SASL_LOG_PASS may carry passwords and TRACE
 * whole protocol exchanges: neither is ever written. */
static int cb_log(void *ctx, int level, const char *message)
{
    /* ctx: the peer ("IP;PORT") of a server connection, so that a line
     * like "StoredKey mismatch" says whose; NULL for global messages */
    char who[96] = "";
    if (!message)
        return SASL_OK;
    if (ctx && *(const char *)ctx) {
        size_t ip = strcspn(ctx, ";");
        snprintf(who, sizeof who, "%.*s: ", (int)(ip < 80 ? ip : 80),
                 (const char *)ctx);
    }
    switch (level) {
    case SASL_LOG_ERR:
        log_warn("sasl: %s%s", who, message);
        break;
    case SASL_LOG_FAIL:
    case SASL_LOG_WARN:
    case SASL_LOG_NOTE:
        log_info("sasl: %s%s", who, message);
        break;
    case SASL_LOG_DEBUG:
        log_debug("sasl: %s%s", who, message);
        break;
    default:
        break;
    }
    return SASL_OK;
}

/* No SASL configuration file and no password file is ever used: all
 * settings come from cb_getopt and passwords from our auxprop plugin.
 * Plugins (the mechanisms themselves) are allowed. */
static int cb_verifyfile(void *ctx, const char *file, sasl_verify_type_t type)
{
    (void)ctx;
    (void)file;
    return type == SASL_VRFY_PLUGIN ? SASL_OK : SASL_CONTINUE;
}

static bool is_plaintext_mech(const char *mech)
{
    return !strcasecmp(mech, "PLAIN") || !strcasecmp(mech, "LOGIN");
}

/* RFC 4422 section 3.1: 1 to 20 of A-Z 0-9 - _ (we also accept lower
 * case, as SMTP verbs and arguments are case-insensitive). */
static bool mech_name_valid(const char *mech)
{
    size_t len = strlen(mech);
    if (len == 0 || len > SASL_GLUE_MECH_MAX)
        return false;
    for (const char *p = mech; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_')
            return false;
    return true;
}

/* Next word of a space/comma separated list into word (upper case).
 * Returns false at the end.  Overlong words are skipped. */
static bool next_word(const char **list, char *word, size_t n)
{
    const char *p = *list;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        if (!*p)
            return false;
        size_t len = strcspn(p, " ,\t");
        *list = p + len;
        if (len < n) {
            for (size_t i = 0; i < len; i++)
                word[i] = (char)toupper((unsigned char)p[i]);
            word[len] = '\0';
            return true;
        }
        p += len;
    }
}

static bool list_has(const char *list, const char *mech)
{
    char word[64];
    while (next_word(&list, word, sizeof word))
        if (!strcasecmp(word, mech))
            return true;
    return false;
}

/* Appends " word" (no space first) to out; false when it does not fit. */
static bool list_append(char *out, size_t n, const char *word)
{
    size_t len = strlen(out);
    return str_fmt(out + len, n - len, "%s%s", len ? " " : "", word);
}

static bool b64_char(unsigned char c)
{
    return isalnum(c) || c == '+' || c == '/';
}

/* Strict RFC 4648 base64 check: whole quanta, '=' only as padding at the
 * end.  Cyrus' decoder is more forgiving than SMTP AUTH should be. */
static bool b64_valid(const char *s, size_t len)
{
    if (len % 4 != 0)
        return false;
    size_t pad = 0;
    while (pad < 2 && pad < len && s[len - 1 - pad] == '=')
        pad++;
    for (size_t i = 0; i < len - pad; i++)
        if (!b64_char((unsigned char)s[i]))
            return false;
    return true;
}

/* Frees memory that may have held a password (our copies, or decoded
 * PLAIN/LOGIN responses). */
static void wipe_free(void *p, size_t len)
{
    if (p) {
        explicit_bzero(p, len);
        free(p);
    }
}

/* Decodes the peer's text into a fresh buffer (*out, *outlen; release it
 * with wipe_free).  "" and "=" are the empty response.  Returns
 * SASL_GLUE_OK, SASL_GLUE_BADB64 or SASL_GLUE_ERROR. */
static enum sasl_glue_result b64_decode(const char *in, char **out,
                                        unsigned *outlen)
{
    size_t len = strlen(in);
    if (!strcmp(in, "="))
        len = 0;
    if (len > SASL_GLUE_B64_MAX || !b64_valid(in, len))
        return SASL_GLUE_BADB64;
    *out = malloc(len + 1);
    if (!*out)
        return SASL_GLUE_ERROR;
    **out = '\0';
    *outlen = 0;
    if (len > 0 && sasl_decode64(in, (unsigned)len, *out, (unsigned)len + 1,
                                 outlen) != SASL_OK) {
        wipe_free(*out, len + 1);
        *out = NULL;
        return SASL_GLUE_BADB64;
    }
    return SASL_GLUE_OK;
}

static bool b64_encode(const char *data, unsigned len, char *out, size_t n)
{
    unsigned outlen;
    if (n == 0 || n > UINT32_MAX)
        return false;
    if (len == 0) {
        *out = '\0';
        return true;
    }
    return sasl_encode64(data, len, out, (unsigned)n, &outlen) == SASL_OK;
}

/* ---------------------------------------------------------------------- */
/* server                                                                 */

static bool server_ready;
static char server_plugin[64];
static char server_log_level[4];
static const struct sasl_glue_accounts *accounts;

void sasl_glue_server_set_accounts(const struct sasl_glue_accounts *a)
{
    accounts = a && a->forget && a->last ? a : NULL;
}

/* The options that make our auxprop plugin the only password source.
 * Anything else falls back to Cyrus' defaults (no configuration file is
 * read, see cb_verifyfile). */
static int cb_server_getopt(void *ctx, const char *plugin, const char *opt,
                            const char **result, unsigned *len)
{
    (void)ctx;
    (void)plugin;
    const char *v = NULL;
    if (!strcmp(opt, "auxprop_plugin"))
        v = server_plugin;
    else if (!strcmp(opt, "pwcheck_method"))
        v = "auxprop";
    else if (!strcmp(opt, "log_level"))
        v = server_log_level;
    else if (!strcmp(opt, "canon_user_plugin"))
        v = "INTERNAL";
    if (!v)
        return SASL_FAIL;
    *result = v;
    if (len)
        *len = (unsigned)strlen(v);
    return SASL_OK;
}

/* Proxy authorization (acting as someone else) is never allowed: an
 * account may only dequeue its own domains. */
static int cb_proxy_policy(sasl_conn_t *conn, void *ctx, const char *req,
                           unsigned rlen, const char *auth, unsigned alen,
                           const char *realm, unsigned urlen,
                           struct propctx *props)
{
    (void)ctx;
    (void)realm;
    (void)urlen;
    (void)props;
    if (req && auth && rlen == alen && !memcmp(req, auth, rlen))
        return SASL_OK;
    sasl_seterror(conn, 0, "authorization identity differs from "
                           "authentication identity");
    return SASL_NOAUTHZ;
}

static const sasl_callback_t server_callbacks[] = {
    {SASL_CB_LOG, CB_PROC(cb_log), NULL},
    {SASL_CB_GETOPT, CB_PROC(cb_server_getopt), NULL},
    {SASL_CB_VERIFYFILE, CB_PROC(cb_verifyfile), NULL},
    {SASL_CB_PROXY_POLICY, CB_PROC(cb_proxy_policy), NULL},
    {SASL_CB_LIST_END, NULL, NULL},
};

bool sasl_glue_server_init(sasl_glue_auxprop_init *plugin_init,
                           const char *plugin_name, char *err, size_t n)
{
    if (server_ready)
        return true;
    if (!str_copy(server_plugin, plugin_name, sizeof server_plugin)) {
        str_fmt(err, n, "auxprop plugin name too long");
        return false;
    }
    str_copy(server_log_level, log_debug_enabled() ? "5" : "4",
             sizeof server_log_level);
    /* The application name only names a configuration file, which
     * cb_verifyfile never lets Cyrus read. */
    int r = sasl_server_init(server_callbacks, "odmrd");
    if (r != SASL_OK) {
        str_fmt(err, n, "SASL server initialisation: %s",
                sasl_errstring(r, NULL, NULL));
        return false;
    }
    /* Registered after sasl_server_init: Cyrus hands the plugin its global
     * utilities, which exist only from then on. */
    r = sasl_auxprop_add_plugin(plugin_name, plugin_init);
    if (r != SASL_OK) {
        str_fmt(err, n, "SASL auxprop plugin %s: %s", plugin_name,
                sasl_errstring(r, NULL, NULL));
        sasl_server_done();
        return false;
    }
    server_ready = true;
    return true;
}

void sasl_glue_server_done(void)
{
    if (server_ready)
        sasl_server_done();
    server_ready = false;
}

struct sasl_glue_server {
    sasl_conn_t *conn;
    bool used;                 /* conn has seen a start(): make a new one */
    bool active;               /* an exchange waits for the next step() */
    bool done;                 /* authenticated */
    bool have_offer;           /* mechanisms() was called */
    bool tls;
    unsigned ssf;
    char service[32];
    char fqdn[256];
    char local[80];
    char remote[80];
    char offer[512];           /* what mechanisms() returned */
    char mech[SASL_GLUE_MECH_MAX + 1];
    char user[256];
    char reason[384];          /* room for a quoted 255-byte name */
    sasl_callback_t callbacks[2];   /* the connection's log, with remote */
};

/* Security properties: no SASL security layer (SMTP AUTH over TLS needs
 * none, and Postfix-style servers do not negotiate one), never anonymous,
 * no plaintext mechanisms outside TLS. */
static bool server_conn_props(struct sasl_glue_server *s)
{
    sasl_security_properties_t sp;
    memset(&sp, 0, sizeof sp);
    sp.min_ssf = 0;
    sp.max_ssf = 0;
    sp.maxbufsize = 0;
    sp.security_flags = SASL_SEC_NOANONYMOUS;
    if (!s->tls)
        sp.security_flags |= SASL_SEC_NOPLAINTEXT;
    sasl_ssf_t ext = s->tls ? s->ssf : 0;
    return sasl_setprop(s->conn, SASL_SEC_PROPS, &sp) == SASL_OK &&
           sasl_setprop(s->conn, SASL_SSF_EXTERNAL, &ext) == SASL_OK;
}

static bool server_conn_open(struct sasl_glue_server *s, char *err, size_t n)
{
    s->callbacks[0] = (sasl_callback_t){SASL_CB_LOG, CB_PROC(cb_log), s->remote};
    s->callbacks[1] = (sasl_callback_t){SASL_CB_LIST_END, NULL, NULL};
    int r = sasl_server_new(s->service, s->fqdn, NULL,
                            s->local[0] ? s->local : NULL,
                            s->remote[0] ? s->remote : NULL, s->callbacks, 0,
                            &s->conn);
    if (r != SASL_OK) {
        str_fmt(err, n, "SASL server connection: %s",
                sasl_errstring(r, NULL, NULL));
        s->conn = NULL;
        return false;
    }
    if (!server_conn_props(s)) {
        str_fmt(err, n, "SASL security properties: %s",
                sasl_errdetail(s->conn));
        sasl_dispose(&s->conn);
        return false;
    }
    s->used = false;
    return true;
}

/* Cyrus checks the "IP;PORT" strings it gets; an address it does not
 * like only costs the mechanisms that use it (DIGEST-MD5, GSSAPI). */
static void copy_ipport(char *dst, size_t n, const char *src)
{
    if (!src || !str_copy(dst, src, n))
        dst[0] = '\0';
}

/* The Cyrus connection, opened now if there is none: with the addresses,
 * else (Cyrus may refuse them) without. */
static bool server_conn_ensure(struct sasl_glue_server *s, char *err, size_t n)
{
    if (s->conn)
        return true;
    if (server_conn_open(s, err, n))
        return true;
    s->local[0] = s->remote[0] = '\0';
    return server_conn_open(s, err, n);
}

struct sasl_glue_server *sasl_glue_server_new(const char *service,
                                              const char *fqdn,
                                              const char *local_ipport,
                                              const char *remote_ipport,
                                              bool tls_active,
                                              unsigned tls_ssf, char *err,
                                              size_t n)
{
    if (!server_ready) {
        str_fmt(err, n, "SASL server not initialised");
        return NULL;
    }
    struct sasl_glue_server *s = calloc(1, sizeof *s);
    if (!s) {
        str_fmt(err, n, "out of memory");
        return NULL;
    }
    s->tls = tls_active;
    s->ssf = tls_ssf;
    if (!str_copy(s->service, service, sizeof s->service) ||
        !str_copy(s->fqdn, fqdn, sizeof s->fqdn)) {
        str_fmt(err, n, "SASL service or host name too long");
        free(s);
        return NULL;
    }
    copy_ipport(s->local, sizeof s->local, local_ipport);
    copy_ipport(s->remote, sizeof s->remote, remote_ipport);
    /* Cyrus' connection is made when first needed (server_conn_ensure):
     * a STARTTLS session replaces this object before any AUTH, and its
     * mechanism lists come from mech_cache. */
    return s;
}

void sasl_glue_server_free(struct sasl_glue_server *s)
{
    if (!s)
        return;
    if (s->conn)
        sasl_dispose(&s->conn);
    explicit_bzero(s, sizeof *s);
    free(s);
}

/* Cyrus' answer to sasl_listmech depends on the plugins (loaded once, by
 * sasl_glue_server_init) and on the connection's security properties,
 * i.e. on TLS and its strength; so it is asked once per process and kind
 * of connection, not for every EHLO (a STARTTLS session has two). */
struct mech_cache_entry {
    bool valid, tls, addresses;
    unsigned ssf;
    char list[512];
};
static struct mech_cache_entry mech_cache[4];

static struct mech_cache_entry *
mech_cache_slot(const struct sasl_glue_server *s)
{
    bool addresses = s->local[0] || s->remote[0];
    struct mech_cache_entry *e = &mech_cache[(s->tls ? 2 : 0) + addresses];
    return e->valid && e->tls == s->tls && e->addresses == addresses &&
                   e->ssf == s->ssf
               ? e : NULL;
}

static void mech_cache_store(const struct sasl_glue_server *s,
                             const char *list)
{
    bool addresses = s->local[0] || s->remote[0];
    struct mech_cache_entry *e = &mech_cache[(s->tls ? 2 : 0) + addresses];
    e->valid = str_copy(e->list, list, sizeof e->list);
    e->tls = s->tls;
    e->addresses = addresses;
    e->ssf = s->ssf;
}

/* What Cyrus can do on this connection (its security properties already
 * exclude ANONYMOUS, and PLAIN/LOGIN without TLS); NULL on error. */
static const char *server_cyrus_list(struct sasl_glue_server *s)
{
    const struct mech_cache_entry *hit = mech_cache_slot(s);
    if (hit)
        return hit->list;
    char err[256];
    const char *list;
    unsigned len;
    int count;
    if (!server_conn_ensure(s, err, sizeof err)) {
        log_warn("SASL: %s", err);
        return NULL;
    }
    if (sasl_listmech(s->conn, NULL, "", " ", "", &list, &len, &count) !=
        SASL_OK)
        return NULL;
    mech_cache_store(s, list);
    return list;
}

/* The rules that hold whatever the configuration says, checked here too
 * so that they do not depend on Cyrus' plugins honouring the flags. */
static bool server_mech_permitted(struct sasl_glue_server *s,
                                  const char *cyrus, const char *mech)
{
    if (!mech_name_valid(mech) || !strcasecmp(mech, "ANONYMOUS"))
        return false;
    if (is_plaintext_mech(mech) && !s->tls)
        return false;
    return list_has(cyrus, mech);
}

bool sasl_glue_server_mechanisms(struct sasl_glue_server *s,
                                 const char *configured, char *out,
                                 size_t n)
{
    char word[64];
    /* From here on only the offer counts, and a failure offers nothing:
     * falling back to all Cyrus has loaded would accept mechanisms the
     * administrator never configured. */
    s->have_offer = true;
    s->offer[0] = '\0';
    if (n == 0)
        return false;
    out[0] = '\0';
    const char *cyrus = server_cyrus_list(s);
    if (!cyrus)
        return false;
    while (next_word(&configured, word, sizeof word)) {
        if (list_has(out, word) || !server_mech_permitted(s, cyrus, word))
            continue;
        if (!list_append(out, n, word) ||
            !list_append(s->offer, sizeof s->offer, word)) {
            out[0] = s->offer[0] = '\0';
            return false;
        }
    }
    return true;
}

/* Cyrus' result code onto ours.  Anything that is not clearly our own
 * trouble counts as a failed attempt, so that a client cannot find a
 * way around the limit on failed AUTH commands. */
static enum sasl_glue_result server_map(int r)
{
    switch (r) {
    case SASL_OK:
        return SASL_GLUE_OK;
    case SASL_CONTINUE:
        return SASL_GLUE_CONTINUE;
    case SASL_NOMECH:
    case SASL_TOOWEAK:
    case SASL_ENCRYPT:
        return SASL_GLUE_BADMECH;
    case SASL_NOMEM:
    case SASL_UNAVAIL:
    case SASL_TRYAGAIN:
    case SASL_NOTINIT:
    case SASL_BUFOVER:
        return SASL_GLUE_ERROR;
    default:
        return SASL_GLUE_FAIL;
    }
}

#define ACCOUNT_QUOTED_MAX 288

/* name as "name" for a log line: the client chose it, so quotes,
 * backslashes and unprintable bytes become \xNN; cut to fit. */
static void quote_name(char *out, size_t n, const char *name)
{
    size_t o = 0;
    if (n < 3)
        return;
    out[o++] = '"';
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        bool plain = *p > ' ' && *p < 0x7f && *p != '"' && *p != '\\';
        if (o + (plain ? 1 : 4) + 2 > n)
            break;
        if (plain)
            out[o++] = (char)*p;
        else
            o += (size_t)snprintf(out + o, n - o, "\\x%02X", *p);
    }
    out[o++] = '"';
    out[o] = '\0';
}

/* For a failure after a password lookup, the account tells an
 * administrator (and fail2ban) more than Cyrus' text: an unknown name
 * is probing, a known one with a bad proof is a wrong password. */
static void server_set_reason(struct sasl_glue_server *s, int r)
{
    const char *detail = s->conn ? sasl_errdetail(s->conn) : NULL;
    if (!detail)
        detail = sasl_errstring(r, NULL, NULL);
    bool exists = false;
    const char *name = accounts ? accounts->last(&exists) : NULL;
    char quoted[ACCOUNT_QUOTED_MAX];
    if (!name || server_map(r) != SASL_GLUE_FAIL) {
        str_fmt(s->reason, sizeof s->reason, "%s", detail);
        return;
    }
    quote_name(quoted, sizeof quoted, name);
    if (!exists)
        str_fmt(s->reason, sizeof s->reason, "unknown account %s", quoted);
    else if (r == SASL_BADAUTH)
        str_fmt(s->reason, sizeof s->reason, "wrong password for %s",
                quoted);
    else
        str_fmt(s->reason, sizeof s->reason, "%s (account %s)", detail,
                quoted);
}

/* Defence in depth behind the stand-in secrets of unknown names: Cyrus'
 * yes only counts when this exchange looked up exactly this account and
 * it exists. */
static bool server_account_real(struct sasl_glue_server *s, const char *user)
{
    bool exists = false;
    const char *name = accounts ? accounts->last(&exists) : NULL;
    if (!accounts || (name && exists && !strcmp(name, user)))
        return true;
    char quoted[ACCOUNT_QUOTED_MAX];
    quote_name(quoted, sizeof quoted, user);
    str_fmt(s->reason, sizeof s->reason, "unknown account %s", quoted);
    return false;
}

/* Success: remember who.  Cyrus' SASL_USERNAME is the canonical
 * authorization identity, which cb_proxy_policy made equal to the
 * authentication identity. */
static enum sasl_glue_result server_success(struct sasl_glue_server *s)
{
    const void *user = NULL;
    if (sasl_getprop(s->conn, SASL_USERNAME, &user) != SASL_OK || !user) {
        str_copy(s->reason, "no user name after authentication",
                 sizeof s->reason);
        return SASL_GLUE_ERROR;
    }
    if (!server_account_real(s, user))
        return SASL_GLUE_FAIL;
    if (!str_copy(s->user, user, sizeof s->user)) {
        str_copy(s->reason, "user name too long", sizeof s->reason);
        return SASL_GLUE_ERROR;
    }
    s->done = true;
    return SASL_GLUE_OK;
}

/* Common tail of start() and step(). */
static enum sasl_glue_result server_result(struct sasl_glue_server *s, int r,
                                           const char *out, unsigned outlen,
                                           char *chal, size_t n)
{
    enum sasl_glue_result g = server_map(r);
    if (n > 0)
        chal[0] = '\0';
    s->active = false;
    if (g == SASL_GLUE_OK)
        return server_success(s);
    if (g != SASL_GLUE_CONTINUE) {
        server_set_reason(s, r);
        return g;
    }
    if (!b64_encode(out, outlen, chal, n)) {
        str_copy(s->reason, "challenge too long", sizeof s->reason);
        return SASL_GLUE_ERROR;
    }
    s->active = true;
    return SASL_GLUE_CONTINUE;
}

/* The client's text could not be decoded (BADB64) or we ran out of
 * memory (ERROR); the exchange is over either way. */
static enum sasl_glue_result server_input_error(struct sasl_glue_server *s,
                                                enum sasl_glue_result d)
{
    s->active = false;
    str_copy(s->reason,
             d == SASL_GLUE_BADB64 ? "invalid base64 from client"
                                   : "out of memory",
             sizeof s->reason);
    return d;
}

static bool server_mech_accepted(struct sasl_glue_server *s,
                                 const char *mech)
{
    if (s->have_offer)
        return mech_name_valid(mech) && list_has(s->offer, mech);
    const char *cyrus = server_cyrus_list(s);
    return cyrus && server_mech_permitted(s, cyrus, mech);
}

/* dst (SASL_GLUE_MECH_MAX + 1 bytes) = mech in upper case; mech is a
 * valid name, hence short enough. */
static void mech_upper(char *dst, const char *mech)
{
    size_t i = 0;
    for (; mech[i] && i < SASL_GLUE_MECH_MAX; i++)
        dst[i] = (char)toupper((unsigned char)mech[i]);
    dst[i] = '\0';
}

enum sasl_glue_result sasl_glue_server_start(struct sasl_glue_server *s,
                                             const char *mech,
                                             const char *initial_b64,
                                             char *chal, size_t n)
{
    char err[256];
    if (n > 0)
        chal[0] = '\0';
    s->reason[0] = '\0';
    s->mech[0] = '\0';
    s->active = false;
    if (accounts)
        accounts->forget();
    if (s->done) {
        str_copy(s->reason, "already authenticated", sizeof s->reason);
        return SASL_GLUE_ERROR;
    }
    if (!server_mech_accepted(s, mech)) {
        str_copy(s->reason, "mechanism not offered", sizeof s->reason);
        return SASL_GLUE_BADMECH;
    }
    mech_upper(s->mech, mech);
    char *in = NULL;
    unsigned inlen = 0;
    if (initial_b64) {
        enum sasl_glue_result d = b64_decode(initial_b64, &in, &inlen);
        if (d != SASL_GLUE_OK)
            return server_input_error(s, d);
    }
    /* A fresh Cyrus connection for every exchange: nothing of a failed
     * attempt can leak into the next one. */
    if (s->used || !s->conn) {
        if (s->conn)
            sasl_dispose(&s->conn);
        if (!server_conn_ensure(s, err, sizeof err)) {
            wipe_free(in, inlen);
            str_copy(s->reason, err, sizeof s->reason);
            return SASL_GLUE_ERROR;
        }
    }
    s->used = true;
    const char *out = NULL;
    unsigned outlen = 0;
    int r = sasl_server_start(s->conn, s->mech, in, inlen, &out, &outlen);
    wipe_free(in, inlen);
    return server_result(s, r, out, outlen, chal, n);
}

enum sasl_glue_result sasl_glue_server_step(struct sasl_glue_server *s,
                                            const char *response_b64,
                                            char *chal, size_t n)
{
    if (n > 0)
        chal[0] = '\0';
    s->reason[0] = '\0';
    if (!s->active) {
        str_copy(s->reason, "no exchange in progress", sizeof s->reason);
        return SASL_GLUE_ERROR;
    }
    char *in = NULL;
    unsigned inlen = 0;
    enum sasl_glue_result d = b64_decode(response_b64, &in, &inlen);
    if (d != SASL_GLUE_OK)
        return server_input_error(s, d);
    const char *out = NULL;
    unsigned outlen = 0;
    int r = sasl_server_step(s->conn, in, inlen, &out, &outlen);
    wipe_free(in, inlen);
    return server_result(s, r, out, outlen, chal, n);
}

const char *sasl_glue_server_username(const struct sasl_glue_server *s)
{
    return s->done ? s->user : NULL;
}

const char *sasl_glue_server_mech(const struct sasl_glue_server *s)
{
    return s->mech;
}

const char *sasl_glue_server_reason(const struct sasl_glue_server *s)
{
    return s->reason;
}

/* ---------------------------------------------------------------------- */
/* client                                                                 */

static bool client_ready;

/* The client needs no options: answering none here keeps Cyrus from
 * looking for them anywhere else. */
static int cb_client_getopt(void *ctx, const char *plugin, const char *opt,
                            const char **result, unsigned *len)
{
    (void)ctx;
    (void)plugin;
    (void)opt;
    (void)result;
    (void)len;
    return SASL_FAIL;
}

static const sasl_callback_t client_global_callbacks[] = {
    {SASL_CB_LOG, CB_PROC(cb_log), NULL},
    {SASL_CB_GETOPT, CB_PROC(cb_client_getopt), NULL},
    {SASL_CB_VERIFYFILE, CB_PROC(cb_verifyfile), NULL},
    {SASL_CB_LIST_END, NULL, NULL},
};

bool sasl_glue_client_init(char *err, size_t n)
{
    if (client_ready)
        return true;
    int r = sasl_client_init(client_global_callbacks);
    if (r != SASL_OK) {
        str_fmt(err, n, "SASL client initialisation: %s",
                sasl_errstring(r, NULL, NULL));
        return false;
    }
    client_ready = true;
    return true;
}

void sasl_glue_client_done(void)
{
    if (client_ready)
        sasl_client_done();
    client_ready = false;
}

struct sasl_glue_client {
    sasl_conn_t *conn;
    bool complete;
    char service[32];
    char fqdn[256];
    char *user;
    char *password;            /* our copy, wiped on free */
    size_t pwlen;
    sasl_secret_t *secret;     /* what Cyrus gets, refilled on each ask */
    sasl_callback_t callbacks[4];
};

/* SASL_CB_USER is the authorization identity: empty, i.e. "the same as
 * the authentication identity"; SASL_CB_AUTHNAME is the account name. */
static int cb_client_simple(void *ctx, int id, const char **result,
                            unsigned *len)
{
    struct sasl_glue_client *c = ctx;
    const char *v;
    if (id == SASL_CB_USER)
        v = "";
    else if (id == SASL_CB_AUTHNAME)
        v = c->user;
    else
        return SASL_BADPARAM;
    *result = v;
    if (len)
        *len = (unsigned)strlen(v);
    return SASL_OK;
}

/* Cyrus may wipe the secret it was given once a mechanism is done with
 * it, so it gets a fresh copy each time it asks. */
static int cb_client_pass(sasl_conn_t *conn, void *ctx, int id,
                          sasl_secret_t **psecret)
{
    struct sasl_glue_client *c = ctx;
    (void)conn;
    if (id != SASL_CB_PASS || !psecret)
        return SASL_BADPARAM;
    c->secret->len = c->pwlen;
    memcpy(c->secret->data, c->password, c->pwlen);
    c->secret->data[c->pwlen] = '\0';
    *psecret = c->secret;
    return SASL_OK;
}

static void client_set_callbacks(struct sasl_glue_client *c)
{
    sasl_callback_t *cb = c->callbacks;
    cb[0] = (sasl_callback_t){SASL_CB_USER, CB_PROC(cb_client_simple), c};
    cb[1] = (sasl_callback_t){SASL_CB_AUTHNAME, CB_PROC(cb_client_simple), c};
    cb[2] = (sasl_callback_t){SASL_CB_PASS, CB_PROC(cb_client_pass), c};
    cb[3] = (sasl_callback_t){SASL_CB_LIST_END, NULL, NULL};
}

static bool client_copy_secrets(struct sasl_glue_client *c, const char *user,
                                const char *password)
{
    c->pwlen = strlen(password);
    c->user = strdup(user);
    c->password = malloc(c->pwlen + 1);
    c->secret = calloc(1, sizeof *c->secret + c->pwlen + 1);
    if (!c->user || !c->password || !c->secret)
        return false;
    memcpy(c->password, password, c->pwlen + 1);
    return true;
}

struct sasl_glue_client *sasl_glue_client_new(const char *service,
                                              const char *server_fqdn,
                                              const char *user,
                                              const char *password,
                                              char *err, size_t n)
{
    if (!client_ready) {
        str_fmt(err, n, "SASL client not initialised");
        return NULL;
    }
    struct sasl_glue_client *c = calloc(1, sizeof *c);
    if (!c) {
        str_fmt(err, n, "out of memory");
        return NULL;
    }
    if (!str_copy(c->service, service, sizeof c->service) ||
        !str_copy(c->fqdn, server_fqdn, sizeof c->fqdn)) {
        str_fmt(err, n, "SASL service or server name too long");
        sasl_glue_client_free(c);
        return NULL;
    }
    if (!client_copy_secrets(c, user, password)) {
        str_fmt(err, n, "out of memory");
        sasl_glue_client_free(c);
        return NULL;
    }
    client_set_callbacks(c);
    return c;
}

void sasl_glue_client_free(struct sasl_glue_client *c)
{
    if (!c)
        return;
    if (c->conn)
        sasl_dispose(&c->conn);
    if (c->user)
        wipe_free(c->user, strlen(c->user));
    wipe_free(c->password, c->pwlen + 1);
    wipe_free(c->secret, sizeof *c->secret + c->pwlen + 1);
    explicit_bzero(c, sizeof *c);
    free(c);
}

/* Strongest first; nothing outside this list is ever chosen. */
static const char *const client_order[] = {
    "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN",
};

bool sasl_glue_client_candidates(const char *server_mechs,
                                 const char *allowed, bool tls_active,
                                 char *out, size_t n)
{
    bool any_allowed = !allowed || !allowed[0];
    if (n == 0)
        return false;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof client_order / sizeof *client_order; i++) {
        const char *m = client_order[i];
        if (is_plaintext_mech(m) && !tls_active)
            continue;
        if (!list_has(server_mechs, m))
            continue;
        if (!any_allowed && !list_has(allowed, m))
            continue;
        if (!list_append(out, n, m))
            return false;
    }
    return out[0] != '\0';
}

static bool client_conn_open(struct sasl_glue_client *c, bool tls)
{
    if (c->conn)
        sasl_dispose(&c->conn);
    if (sasl_client_new(c->service, c->fqdn, NULL, NULL, c->callbacks, 0,
                        &c->conn) != SASL_OK) {
        c->conn = NULL;
        return false;
    }
    sasl_security_properties_t sp;
    memset(&sp, 0, sizeof sp);
    sp.security_flags = SASL_SEC_NOANONYMOUS;
    if (!tls)
        sp.security_flags |= SASL_SEC_NOPLAINTEXT;
    return sasl_setprop(c->conn, SASL_SEC_PROPS, &sp) == SASL_OK;
}

/* Client-side mapping: the server's data being wrong is a failure of the
 * exchange (it may be an impostor), not our internal error. */
static enum sasl_glue_result client_map(int r)
{
    switch (r) {
    case SASL_OK:
        return SASL_GLUE_OK;
    case SASL_CONTINUE:
        return SASL_GLUE_CONTINUE;
    case SASL_NOMECH:
    case SASL_TOOWEAK:
        return SASL_GLUE_BADMECH;
    case SASL_BADPROT:
    case SASL_BADSERV:
    case SASL_BADAUTH:
    case SASL_FAIL:
        return SASL_GLUE_FAIL;
    default:
        return SASL_GLUE_ERROR;
    }
}

/* Encodes what Cyrus produced; for an initial response NULL means "none"
 * and a zero-length one is "=" (RFC 4954 section 4). */
static enum sasl_glue_result client_output(struct sasl_glue_client *c, int r,
                                           const char *out, unsigned outlen,
                                           bool initial, char *buf, size_t n)
{
    enum sasl_glue_result g = client_map(r);
    if (g != SASL_GLUE_OK && g != SASL_GLUE_CONTINUE)
        return g;
    c->complete = g == SASL_GLUE_OK;
    if (initial && out && outlen == 0)
        return str_copy(buf, "=", n) ? g : SASL_GLUE_ERROR;
    if (!out)
        outlen = 0;
    return b64_encode(out, outlen, buf, n) ? g : SASL_GLUE_ERROR;
}

/* One mechanism: BADMECH when Cyrus has no client plugin for it. */
static enum sasl_glue_result client_try(struct sasl_glue_client *c,
                                        const char *mech, bool tls,
                                        char *initial, size_t n)
{
    if (!client_conn_open(c, tls))
        return SASL_GLUE_ERROR;
    const char *out = NULL, *chosen = NULL;
    unsigned outlen = 0;
    int r = sasl_client_start(c->conn, mech, NULL, &out, &outlen, &chosen);
    if (r == SASL_INTERACT) /* a callback is missing: our bug */
        return SASL_GLUE_ERROR;
    return client_output(c, r, out, outlen, true, initial, n);
}

enum sasl_glue_result sasl_glue_client_start(struct sasl_glue_client *c,
                                             const char *server_mechs,
                                             const char *allowed,
                                             bool tls_active, char *mech,
                                             size_t mech_n, char *initial,
                                             size_t n)
{
    char cands[128], word[64];
    const char *p = cands;
    enum sasl_glue_result r = SASL_GLUE_BADMECH;
    c->complete = false;
    if (mech_n > 0)
        mech[0] = '\0';
    if (n > 0)
        initial[0] = '\0';
    if (!sasl_glue_client_candidates(server_mechs, allowed, tls_active, cands,
                                     sizeof cands))
        return SASL_GLUE_BADMECH;
    while (next_word(&p, word, sizeof word)) {
        r = client_try(c, word, tls_active, initial, n);
        if (r == SASL_GLUE_BADMECH)
            continue;
        if (!str_copy(mech, word, mech_n))
            return SASL_GLUE_ERROR;
        return r;
    }
    return r;
}

enum sasl_glue_result sasl_glue_client_step(struct sasl_glue_client *c,
                                            const char *challenge_b64,
                                            char *resp, size_t n)
{
    if (n > 0)
        resp[0] = '\0';
    if (!c->conn)
        return SASL_GLUE_ERROR;
    char *in = NULL;
    unsigned inlen = 0;
    enum sasl_glue_result d = b64_decode(challenge_b64, &in, &inlen);
    if (d != SASL_GLUE_OK)
        return d;
    const char *out = NULL;
    unsigned outlen = 0;
    int r = sasl_client_step(c->conn, in, inlen, NULL, &out, &outlen);
    wipe_free(in, inlen);
    if (r == SASL_INTERACT)
        return SASL_GLUE_ERROR;
    return client_output(c, r, out, outlen, false, resp, n);
}

bool sasl_glue_client_complete(const struct sasl_glue_client *c)
{
    return c->complete;
}
