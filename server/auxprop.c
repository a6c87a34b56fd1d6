/* auxprop.c - Cyrus SASL auxprop plugin "odmrdb": userPassword from the
 * GDBM account database (server/accounts.h).
 *
 * The database is opened per lookup (accounts_password does that), so a
 * password changed with odmrctl counts from the next AUTH on, without a
 * reload.  The stored form is the plaintext password: CRAM-MD5, which RFC
 * 2645 makes mandatory, and DIGEST-MD5 cannot work from anything else,
 * and SCRAM derives its salted keys from it per exchange.
 *
 * No account probing: a name that is not in the database gets a stand-in
 * password instead of "no such user", so every mechanism runs exactly
 * as for a wrong password - SCRAM sends its server-first message with a
 * salt Cyrus derives from its per-start key and the name, as for a real
 * account, spends the same iterations, and fails after the client proof;
 * CRAM-MD5, PLAIN and LOGIN compare against it and fail.  The stand-in
 * is HMAC-SHA-256(key, name) with a key drawn at plugin init, i.e. in
 * the master before it forks: no client can compute it, and the common
 * glue (common/sasl.h, sasl_glue_accounts) refuses a success for an
 * account that does not exist anyway. */
#include "auxprop.h"

#include <limits.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sasl/sasl.h>
#include <sasl/saslplug.h>

#include "../common/log.h"
#include "../common/util.h"
#include "accounts.h"

_Static_assert(_Generic(&auxprop_plugin_init, sasl_auxprop_init_t *: 1,
                        default: 0),
               "auxprop_plugin_init must be a sasl_auxprop_init_t");

#define FAKE_KEY_LEN 32

static char auxprop_db[PATH_MAX];

/* Drawn once per plugin init; the same in every session process, so a
 * name's stand-in does not depend on which process answers. */
static unsigned char fake_key[FAKE_KEY_LEN];
static bool fake_key_ready;

/* The last lookup of the current exchange (reset by forget_last, which
 * the glue calls as each exchange begins). */
static struct {
    bool valid;
    bool exists;
    char name[ACCOUNT_NAME_MAX + 1];
} last;

static bool (*lookup_guard)(const char *account);

void auxprop_set_db(const char *path)
{
    if (!path || !str_copy(auxprop_db, path, sizeof auxprop_db))
        auxprop_db[0] = '\0';
}

/* The authentication identity's properties are requested with a leading
 * '*'; the authorization identity's without.  Returns the bare name of a
 * property that belongs to this lookup, else NULL. */
static const char *prop_for_lookup(const char *name, unsigned flags)
{
    if (flags & SASL_AUXPROP_AUTHZID)
        return name[0] == '*' ? NULL : name;
    return name[0] == '*' ? name + 1 : NULL;
}

/* Hands the password to every request for userPassword.  A value that is
 * already there stays unless Cyrus asks to override it, or to verify
 * against the stored form (then the value present is the one the client
 * typed, not a stored one). */
static void set_password(sasl_server_params_t *sp, unsigned flags,
                         const char *pw, size_t len)
{
    const struct propval *want = sp->utils->prop_get(sp->propctx);
    for (const struct propval *cur = want; cur && cur->name; cur++) {
        const char *name = prop_for_lookup(cur->name, flags);
        if (!name || strcasecmp(name, SASL_AUX_PASSWORD_PROP) != 0)
            continue;
        if (cur->values) {
            if (!(flags & (SASL_AUXPROP_OVERRIDE |
                           SASL_AUXPROP_VERIFY_AGAINST_HASH)))
                continue;
            sp->utils->prop_erase(sp->propctx, cur->name);
        }
        sp->utils->prop_set(sp->propctx, cur->name, pw, (int)len);
    }
}

/* Our account database's answer as a Cyrus result.  Every trouble is
 * temporary, so a broken database never counts against a customer's
 * failed attempts (and hides known and unknown names alike). */
static int lookup_result(enum acct_result r, const char *name)
{
    if (r == ACCT_OK)
        return SASL_OK;
    log_err("accounts database %s: password of %s: %s",
            auxprop_db[0] ? auxprop_db : "(not set)", name, acct_strerror(r));
    return SASL_UNAVAIL;
}

/* The stand-in password of an unknown name: printable, never empty (SCRAM
 * refuses an empty secret, which would fail earlier than a real one),
 * and the same on every lookup of that name, like a stored password. */
static bool fake_password(const char *user, size_t ulen, char *out, size_t n)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned maclen = 0;
    if (!fake_key_ready || n < AUXPROP_FAKE_PASSWORD_SIZE)
        return false;
    if (!HMAC(EVP_sha256(), fake_key, sizeof fake_key,
              (const unsigned char *)user, ulen, mac, &maclen))
        return false;
    _Static_assert(AUXPROP_FAKE_PASSWORD_SIZE == 4 * ((32 + 2) / 3) + 1,
                   "room for base64 of a SHA-256 HMAC");
    EVP_EncodeBlock((unsigned char *)out, mac, (int)maclen);
    explicit_bzero(mac, sizeof mac);
    return true;
}

bool auxprop_fake_password(const char *name, char *out, size_t n)
{
    return fake_password(name, strlen(name), out, n);
}

static void remember(const char *user, unsigned ulen)
{
    size_t len = ulen < ACCOUNT_NAME_MAX ? ulen : ACCOUNT_NAME_MAX;
    memcpy(last.name, user, len);
    last.name[len] = '\0';
    last.valid = true;
    last.exists = false;
}

/* pw = the account's password, or an unknown name's stand-in. */
static int password_for(const char *user, unsigned ulen, char *pw, size_t n)
{
    enum acct_result a = ACCT_NOTFOUND;
    /* A name that cannot be stored cannot exist: no need to ask. */
    if (ulen > 0 && ulen <= ACCOUNT_NAME_MAX && !memchr(user, '\0', ulen))
        a = auxprop_db[0] ? accounts_password(auxprop_db, last.name, pw, n)
                          : ACCT_NODB;
    if (a == ACCT_NOTFOUND) {
        if (fake_password(user, ulen, pw, n))
            return SASL_OK;
        log_err("no stand-in password for an unknown name (OpenSSL)");
        return SASL_UNAVAIL;
    }
    last.exists = a == ACCT_OK;
    return lookup_result(a, last.name);
}

static int odmrdb_lookup(void *glob, sasl_server_params_t *sp,
                         unsigned flags, const char *user, unsigned ulen)
{
    (void)glob;
    if (!sp || !user)
        return SASL_BADPARAM;
    /* We know nothing about authorization identities, and "no user" here
     * would be taken as an error; cb_proxy_policy refuses any that differs
     * from the authenticated one anyway. */
    if (flags & SASL_AUXPROP_AUTHZID)
        return SASL_OK;
    remember(user, ulen);
    if (lookup_guard && !lookup_guard(last.name)) {
        sp->utils->seterror(sp->utils->conn, 0,
                            "password lookup refused for now");
        return SASL_UNAVAIL;
    }
    char pw[PASSWORD_MAX + 1];
    int r = password_for(user, ulen, pw, sizeof pw);
    if (r == SASL_OK)
        set_password(sp, flags, pw, strlen(pw));
    explicit_bzero(pw, sizeof pw);
    return r;
}

const char *auxprop_last_account(bool *exists)
{
    if (exists)
        *exists = last.valid && last.exists;
    return last.valid ? last.name : NULL;
}

static void forget_last(void)
{
    explicit_bzero(&last, sizeof last);
}

void auxprop_set_guard(bool (*guard)(const char *account))
{
    lookup_guard = guard;
}

static const struct sasl_glue_accounts odmrdb_accounts = {
    .forget = forget_last,
    .last = auxprop_last_account,
};

/* sasl_server_done: the key goes with the plugin. */
static void odmrdb_free(void *glob, const sasl_utils_t *utils)
{
    (void)glob;
    (void)utils;
    explicit_bzero(fake_key, sizeof fake_key);
    fake_key_ready = false;
    forget_last();
    sasl_glue_server_set_accounts(NULL);
}

static char odmrdb_name[] = AUXPROP_PLUGIN_NAME;

static sasl_auxprop_plug_t odmrdb_plugin = {
    .features = 0,
    .spare_int1 = 0,
    .glob_context = NULL,
    .auxprop_free = odmrdb_free,
    .auxprop_lookup = odmrdb_lookup,
    .name = odmrdb_name,
    .auxprop_store = NULL,      /* odmrctl writes the database, not Cyrus */
};

int auxprop_plugin_init(const struct sasl_utils *utils, int max_version,
                        int *out_version, struct sasl_auxprop_plug **plug,
                        const char *plugname)
{
    (void)utils;
    (void)plugname;
    if (!out_version || !plug)
        return SASL_BADPARAM;
    if (max_version < SASL_AUXPROP_PLUG_VERSION)
        return SASL_BADVERS;
    /* Here, in the master before it forks: all sessions share the key,
     * and a restart draws a new one, as Cyrus does for SCRAM salts. */
    if (RAND_bytes(fake_key, sizeof fake_key) != 1)
        return SASL_FAIL;
    fake_key_ready = true;
    forget_last();
    sasl_glue_server_set_accounts(&odmrdb_accounts);
    *out_version = SASL_AUXPROP_PLUG_VERSION;
    *plug = &odmrdb_plugin;
    return SASL_OK;
}
