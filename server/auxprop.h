/* auxprop.h - the in-process Cyrus SASL auxprop plugin that serves
 * passwords from our GDBM account database (SPEC 3.2).
 *
 * Register it with sasl_glue_server_init(auxprop_plugin_init,
 * AUXPROP_PLUGIN_NAME, ...) from common/sasl.h, and tell it the database
 * with auxprop_set_db() before the first authentication (again after a
 * reload).  It answers the authentication identity's "userPassword"
 * property, which every password mechanism of Cyrus uses: CRAM-MD5,
 * DIGEST-MD5, SCRAM-* (without a stored "authPassword" it derives its
 * keys from userPassword) and, through pwcheck_method auxprop, PLAIN and
 * LOGIN.  The database being missing or unreadable makes the exchange end
 * with SASL_GLUE_ERROR (a temporary failure), never with "bad password".
 *
 * A name that is not in the database is answered like a wrong password in
 * every mechanism and at every step (see auxprop.c): clients cannot probe
 * for account names.  The plugin tells the glue (sasl_glue_accounts in
 * common/sasl.h) which names it did not know, so that the log still says
 * `unknown account "x"` and a stand-in secret never authenticates. */
#ifndef ODMR_AUXPROP_H
#define ODMR_AUXPROP_H

#include <stdbool.h>
#include <stddef.h>

#include "../common/sasl.h"

#define AUXPROP_PLUGIN_NAME "odmrdb"

/* Copies path; an empty or overlong path makes every lookup fail
 * temporarily. */
void auxprop_set_db(const char *path);

/* The plugin's init function, for sasl_auxprop_add_plugin (via
 * sasl_glue_server_init). */
int auxprop_plugin_init(const struct sasl_utils *utils, int max_version,
                        int *out_version, struct sasl_auxprop_plug **plug,
                        const char *plugname);

/* The account name this exchange's last password lookup was for (cut to
 * ACCOUNT_NAME_MAX bytes), NULL when there was none since the exchange
 * began; *exists (may be NULL): whether the account is in the database
 * (false as well when the guard refused the lookup).  For counting
 * failures per account after SASL_GLUE_FAIL. */
const char *auxprop_last_account(bool *exists);

/* guard(account) is called before each password lookup, for known and
 * unknown names alike; false makes the lookup fail with SASL_UNAVAIL, so
 * the exchange ends with SASL_GLUE_ERROR (454, not a failed attempt).
 * NULL: no guard. */
void auxprop_set_guard(bool (*guard)(const char *account));

/* For tests only: the stand-in password that name gets when it is not an
 * account (n >= AUXPROP_FAKE_PASSWORD_SIZE). */
#define AUXPROP_FAKE_PASSWORD_SIZE 45
bool auxprop_fake_password(const char *name, char *out, size_t n);

#endif
