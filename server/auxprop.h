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
 * with SASL_GLUE_ERROR (a temporary failure), never with "bad password". */
#ifndef ODMR_AUXPROP_H
#define ODMR_AUXPROP_H

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

#endif
