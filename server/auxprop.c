/* auxprop.c - Cyrus SASL auxprop plugin "odmrdb": userPassword from the
 * GDBM account database (server/accounts.h).
 *
 * The database is opened per lookup (accounts_password does that), so a
 * password changed with odmrctl counts from the next AUTH on, without a
 * reload.  The stored form is the plaintext password: CRAM-MD5, which RFC
 * 2645 makes mandatory, and DIGEST-MD5 cannot work from anything else,
 * and SCRAM derives its salted keys from it per exchange. */
#include "auxprop.h"

#include <limits.h>
#include <string.h>

#include <sasl/sasl.h>
#include <sasl/saslplug.h>

#include "../common/log.h"
#include "../common/util.h"
#include "accounts.h"

_Static_assert(_Generic(&auxprop_plugin_init, sasl_auxprop_init_t *: 1,
                        default: 0),
               "auxprop_plugin_init must be a sasl_auxprop_init_t");

static char auxprop_db[PATH_MAX];

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

/* Our account database's answer as a Cyrus result.  Only "no such user"
 * may look like bad credentials; every other trouble is temporary, so a
 * broken database never counts against a customer's failed attempts. */
static int lookup_result(enum acct_result r, const char *name)
{
    switch (r) {
    case ACCT_OK:
        return SASL_OK;
    case ACCT_NOTFOUND:
        return SASL_NOUSER;
    default:
        log_err("accounts database %s: password of %s: %s",
                auxprop_db[0] ? auxprop_db : "(not set)", name,
                acct_strerror(r));
        return SASL_UNAVAIL;
    }
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
    char name[ACCOUNT_NAME_MAX + 1];
    if (ulen == 0 || ulen > ACCOUNT_NAME_MAX || memchr(user, '\0', ulen))
        return SASL_NOUSER;
    memcpy(name, user, ulen);
    name[ulen] = '\0';
    if (!auxprop_db[0])
        return lookup_result(ACCT_NODB, name);
    char pw[PASSWORD_MAX + 1];
    int r = lookup_result(accounts_password(auxprop_db, name, pw, sizeof pw),
                          name);
    if (r == SASL_OK)
        set_password(sp, flags, pw, strlen(pw));
    explicit_bzero(pw, sizeof pw);
    return r;
}

static char odmrdb_name[] = AUXPROP_PLUGIN_NAME;

static sasl_auxprop_plug_t odmrdb_plugin = {
    .features = 0,
    .spare_int1 = 0,
    .glob_context = NULL,
    .auxprop_free = NULL,
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
    *out_version = SASL_AUXPROP_PLUG_VERSION;
    *plug = &odmrdb_plugin;
    return SASL_OK;
}
