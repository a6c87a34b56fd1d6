/* test_sasl_lazy.c - the SASL glue's server object opens its Cyrus
 * connection only when needed and asks Cyrus for the mechanism list once
 * per process and kind of connection (common/sasl.c): the lists of TLS
 * and plain connections never mix, and an object whose list came from the
 * cache still authenticates.  (Addresses Cyrus refuses are not tried
 * here: its failed sasl_server_new leaks the connection, which
 * LeakSanitizer reports; the glue's retry without them is unchanged.) */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sasl/saslutil.h>

#include "../../common/log.h"
#include "../../common/sasl.h"
#include "../../server/accounts.h"
#include "../../server/auxprop.h"
#include "check.h"

#define CONFIGURED "SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"
#define PASSWORD "lazy horse"

static char dir[] = "/tmp/odmr-test-sasl-lazy-XXXXXX";
static char db[256];

static struct sasl_glue_server *server(bool tls, const char *local,
                                       const char *remote)
{
    char err[256];
    struct sasl_glue_server *s = sasl_glue_server_new(
        "smtp", "lazy.example", local, remote, tls, tls ? 256 : 0, err,
        sizeof err);
    if (!s)
        printf("server_new: %s\n", err);
    return s;
}

static void offer_is(bool tls, const char *local, const char *want)
{
    char list[512] = "";
    struct sasl_glue_server *s = server(tls, local, "127.0.0.1;40000");
    CHECK(s && sasl_glue_server_mechanisms(s, CONFIGURED, list, sizeof list));
    CHECK_STR(list, want);
    sasl_glue_server_free(s);
}

/* Plain, TLS, plain again: each from its own cache entry. */
static void test_lists_per_kind(void)
{
    for (int round = 0; round < 2; round++) {
        offer_is(false, "127.0.0.1;366", "SCRAM-SHA-256 CRAM-MD5");
        offer_is(true, "127.0.0.1;366", "SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN");
    }
}

/* PLAIN with an initial response: OK when the password is right. */
static enum sasl_glue_result plain_login(struct sasl_glue_server *s,
                                         const char *pw)
{
    char raw[256], b64[512], chal[512];
    unsigned len, outlen;
    len = (unsigned)snprintf(raw, sizeof raw, "%calice%c%s", 0, 0, pw);
    sasl_encode64(raw, len, b64, sizeof b64, &outlen);
    return sasl_glue_server_start(s, "PLAIN", b64, chal, sizeof chal);
}

/* The list came from the cache, so no Cyrus connection exists yet: the
 * exchange opens one, and a second attempt gets a fresh one. */
static void test_login_after_cached_list(void)
{
    char list[512];
    struct sasl_glue_server *s = server(true, "127.0.0.1;366",
                                        "127.0.0.1;40000");
    CHECK(s && sasl_glue_server_mechanisms(s, CONFIGURED, list, sizeof list));
    CHECK(s && plain_login(s, "wrong") == SASL_GLUE_FAIL);
    CHECK(s && plain_login(s, PASSWORD) == SASL_GLUE_OK);
    CHECK(s && !strcmp(sasl_glue_server_username(s), "alice"));
    sasl_glue_server_free(s);
    /* without mechanisms() first: start() accepts what Cyrus offers */
    s = server(false, NULL, NULL);
    char chal[512];
    CHECK(s && sasl_glue_server_start(s, "CRAM-MD5", NULL, chal,
                                      sizeof chal) == SASL_GLUE_CONTINUE);
    CHECK(chal[0] != '\0');
    sasl_glue_server_free(s);
}

int main(void)
{
    char err[256];
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    log_open("test_sasl_lazy", false, false);
    snprintf(db, sizeof db, "%s/accounts.db", dir);
    CHECK(accounts_user_add(db, "alice", PASSWORD) == ACCT_OK);
    auxprop_set_db(db);
    bool ok = sasl_glue_server_init(auxprop_plugin_init, AUXPROP_PLUGIN_NAME,
                                    err, sizeof err);
    if (!ok)
        printf("server init: %s\n", err);
    CHECK(ok);
    if (ok) {
        test_lists_per_kind();
        test_login_after_cached_list();
    }
    sasl_glue_server_done();
    unlink(db);
    rmdir(dir);
    CHECK_DONE();
}
