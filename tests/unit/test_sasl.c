/* test_sasl.c - the Cyrus SASL glue (common/sasl.c) against our auxprop
 * plugin (server/auxprop.c) and a real GDBM account database: complete
 * in-process exchanges between the server and the client side. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sasl/sasl.h>
#include <sasl/saslutil.h>

#include "../../common/log.h"
#include "../../common/sasl.h"
#include "../../server/accounts.h"
#include "../../server/auxprop.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-sasl-XXXXXX";
static char db[256];

#define CONFIGURED "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN ANONYMOUS"
#define PASSWORD "correct horse battery"

static struct sasl_glue_server *new_server(bool tls)
{
    char err[256];
    struct sasl_glue_server *s = sasl_glue_server_new(
        "smtp", "provider.example", "127.0.0.1;366", "127.0.0.1;40000", tls,
        tls ? 256 : 0, err, sizeof err);
    if (!s)
        printf("server_new: %s\n", err);
    return s;
}

/* One full exchange: the client picks from `offer`, both sides talk until
 * the server decides.  Returns the server's verdict; *user gets the
 * authenticated name ("" if none), *client_done whether the client side
 * finished its mechanism too. */
struct outcome {
    enum sasl_glue_result server;
    char mech[32];
    char user[256];
    char reason[400];
    bool client_done;
    int rounds;
};

static struct outcome exchange(const char *offer, const char *allowed,
                               bool tls, const char *user, const char *pw)
{
    struct outcome o = {.server = SASL_GLUE_ERROR};
    char err[256], buf[SASL_GLUE_B64_MAX + 1], chal[SASL_GLUE_B64_MAX + 1];
    struct sasl_glue_server *s = new_server(tls);
    struct sasl_glue_client *c =
        sasl_glue_client_new("smtp", "provider.example", user, pw, err,
                             sizeof err);
    if (!s || !c)
        goto out;
    enum sasl_glue_result r = sasl_glue_client_start(
        c, offer, allowed, tls, o.mech, sizeof o.mech, buf, sizeof buf);
    if (r != SASL_GLUE_CONTINUE && r != SASL_GLUE_OK) {
        o.server = r;
        goto out;
    }
    o.server = sasl_glue_server_start(s, o.mech, buf[0] ? buf : NULL, chal,
                                      sizeof chal);
    while (o.server == SASL_GLUE_CONTINUE && o.rounds++ < 10) {
        r = sasl_glue_client_step(c, chal, buf, sizeof buf);
        if (r != SASL_GLUE_CONTINUE && r != SASL_GLUE_OK) {
            printf("client step: %s\n", sasl_glue_result_name(r));
            break;
        }
        o.server = sasl_glue_server_step(s, buf, chal, sizeof chal);
    }
    if (o.server == SASL_GLUE_OK)
        snprintf(o.user, sizeof o.user, "%s", sasl_glue_server_username(s));
    snprintf(o.reason, sizeof o.reason, "%s", sasl_glue_server_reason(s));
    o.client_done = sasl_glue_client_complete(c);
    if (getenv("TEST_SASL_DEBUG"))
        printf("# %s %s: %s after %d rounds\n", o.mech, user,
               sasl_glue_result_name(o.server), o.rounds);
out:
    sasl_glue_client_free(c);
    sasl_glue_server_free(s);
    return o;
}

static void test_mechanism(const char *mech)
{
    struct outcome o = exchange(mech, NULL, true, "alice", PASSWORD);
    printf("# %s: right password -> %s\n", mech,
           sasl_glue_result_name(o.server));
    CHECK_STR(o.mech, mech);
    CHECK(o.server == SASL_GLUE_OK);
    CHECK_STR(o.user, "alice");
    CHECK(o.client_done);

    o = exchange(mech, NULL, true, "alice", "wrong password");
    CHECK(o.server == SASL_GLUE_FAIL);
    CHECK_STR(o.user, "");

    o = exchange(mech, NULL, true, "mallory", PASSWORD);
    CHECK(o.server == SASL_GLUE_FAIL);

    /* A user name with '@' is one name, not user@realm. */
    o = exchange(mech, NULL, true, "bob@customer.example", "pw of bob");
    CHECK(o.server == SASL_GLUE_OK);
    CHECK_STR(o.user, "bob@customer.example");
}

static void test_offer(void)
{
    char list[512];
    struct sasl_glue_server *s = new_server(false);
    CHECK(s != NULL);
    if (!s)
        return;
    CHECK(sasl_glue_server_mechanisms(s, CONFIGURED, list, sizeof list));
    CHECK_STR(list, "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5");
    /* Configured order, commas, case and duplicates. */
    CHECK(sasl_glue_server_mechanisms(s, "cram-md5,scram-sha-1 CRAM-MD5",
                                      list, sizeof list));
    CHECK_STR(list, "CRAM-MD5 SCRAM-SHA-1");
    CHECK(sasl_glue_server_mechanisms(s, "ANONYMOUS PLAIN LOGIN NOSUCH", list,
                                      sizeof list));
    CHECK_STR(list, "");
    CHECK(!sasl_glue_server_mechanisms(s, CONFIGURED, list, 10));
    /* a failed offer offers nothing, not everything Cyrus has */
    char chal[512];
    CHECK(sasl_glue_server_start(s, "CRAM-MD5", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    sasl_glue_server_free(s);

    s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    CHECK(sasl_glue_server_mechanisms(s, CONFIGURED, list, sizeof list));
    CHECK_STR(list, "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN");
    sasl_glue_server_free(s);
}

static enum sasl_glue_result start(bool tls, const char *configured,
                                   const char *mech, const char *initial,
                                   char *chal, size_t n)
{
    char list[512];
    struct sasl_glue_server *s = new_server(tls);
    if (!s)
        return SASL_GLUE_ERROR;
    if (configured)
        sasl_glue_server_mechanisms(s, configured, list, sizeof list);
    enum sasl_glue_result r = sasl_glue_server_start(s, mech, initial, chal, n);
    sasl_glue_server_free(s);
    return r;
}

/* base64 of a PLAIN message authzid NUL authcid NUL password. */
static void plain_b64(const char *authz, const char *authc, const char *pw,
                      char *out, size_t n)
{
    char raw[512];
    unsigned len = 0, outlen;
    len += (unsigned)snprintf(raw, sizeof raw, "%s", authz) + 1;
    len += (unsigned)snprintf(raw + len, sizeof raw - len, "%s", authc) + 1;
    len += (unsigned)snprintf(raw + len, sizeof raw - len, "%s", pw);
    sasl_encode64(raw, len, out, (unsigned)n, &outlen);
}

static void test_mechanism_refusals(void)
{
    char chal[1024];
    CHECK(start(true, NULL, "NO-SUCH-MECH", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    CHECK(start(true, NULL, "NOT A MECH!", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    CHECK(start(true, NULL, "ANONYMOUS", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    CHECK(start(true, CONFIGURED, "ANONYMOUS", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    CHECK(start(false, NULL, "PLAIN", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    CHECK(start(false, CONFIGURED, "LOGIN", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    /* Offered by Cyrus, but not configured. */
    CHECK(start(true, "CRAM-MD5", "SCRAM-SHA-1", NULL, chal, sizeof chal) ==
          SASL_GLUE_BADMECH);
    /* Case-insensitive mechanism names. */
    CHECK(start(true, CONFIGURED, "cram-md5", NULL, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(chal[0] != '\0');
}

static void test_plain_details(void)
{
    char chal[1024], b64[1024];
    plain_b64("", "alice", PASSWORD, b64, sizeof b64);
    CHECK(start(true, CONFIGURED, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_OK);
    plain_b64("alice", "alice", PASSWORD, b64, sizeof b64);
    CHECK(start(true, CONFIGURED, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_OK);
    /* Proxy authorization: alice's password, acting as bob. */
    plain_b64("bob@customer.example", "alice", PASSWORD, b64, sizeof b64);
    CHECK(start(true, CONFIGURED, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_FAIL);
    /* No initial response: an empty challenge ("334 "). */
    strcpy(chal, "x");
    CHECK(start(true, CONFIGURED, "PLAIN", NULL, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK_STR(chal, "");
    /* "=" is an empty initial response, which PLAIN cannot accept. */
    CHECK(start(true, CONFIGURED, "PLAIN", "=", chal, sizeof chal) ==
          SASL_GLUE_FAIL);
    /* A server-first mechanism must not get an initial response. */
    CHECK(start(true, CONFIGURED, "CRAM-MD5", "YWJj", chal, sizeof chal) ==
          SASL_GLUE_FAIL);
}

static void test_bad_base64(void)
{
    char chal[1024];
    const char *bad[] = {"abc", "ab!d", "a===", "YW Jj", "YWJj\r", "=YWJ",
                         "YQ==YQ==", "===="};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        enum sasl_glue_result r =
            start(true, CONFIGURED, "PLAIN", bad[i], chal, sizeof chal);
        if (r != SASL_GLUE_BADB64)
            printf("# base64 \"%s\" -> %s\n", bad[i], sasl_glue_result_name(r));
        CHECK(r == SASL_GLUE_BADB64);
    }
    /* In a continuation line too, and the exchange can go on after it. */
    struct sasl_glue_server *s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    CHECK(sasl_glue_server_start(s, "LOGIN", NULL, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_glue_server_step(s, "%%%%", chal, sizeof chal) ==
          SASL_GLUE_BADB64);
    CHECK(sasl_glue_server_username(s) == NULL);
    /* 501 ended that AUTH command: nothing more to step... */
    CHECK(sasl_glue_server_step(s, "YWxpY2U=", chal, sizeof chal) ==
          SASL_GLUE_ERROR);
    /* ...but a new AUTH works. */
    CHECK(sasl_glue_server_start(s, "LOGIN", "YWxpY2U=", chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    sasl_glue_server_free(s);
}

/* Several attempts on one connection, then no more after success. */
static void test_retry(void)
{
    char chal[1024], b64[1024];
    struct sasl_glue_server *s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    plain_b64("", "alice", "nope", b64, sizeof b64);
    CHECK(sasl_glue_server_start(s, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_FAIL);
    CHECK(sasl_glue_server_reason(s)[0] != '\0');
    CHECK(strstr(sasl_glue_server_reason(s), "nope") == NULL);
    plain_b64("", "alice", PASSWORD, b64, sizeof b64);
    CHECK(sasl_glue_server_start(s, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_OK);
    CHECK_STR(sasl_glue_server_username(s), "alice");
    CHECK_STR(sasl_glue_server_mech(s), "PLAIN");
    CHECK(sasl_glue_server_start(s, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_ERROR);
    sasl_glue_server_free(s);
}

/* The database going away is our trouble, not a wrong password. */
static void test_database_trouble(void)
{
    char path[300];
    snprintf(path, sizeof path, "%s/missing.db", dir);
    auxprop_set_db(path);
    struct outcome o = exchange("CRAM-MD5", NULL, true, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_ERROR);
    o = exchange("SCRAM-SHA-256", NULL, true, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_ERROR);
    o = exchange("PLAIN", NULL, true, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_ERROR);
    auxprop_set_db(db);
    o = exchange("CRAM-MD5", NULL, true, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_OK);
}

/* A password changed with odmrctl counts at once. */
static void test_password_change(void)
{
    CHECK(accounts_user_passwd(db, "alice", "new secret") == ACCT_OK);
    struct outcome o =
        exchange("SCRAM-SHA-256", NULL, true, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_FAIL);
    o = exchange("SCRAM-SHA-256", NULL, true, "alice", "new secret");
    CHECK(o.server == SASL_GLUE_OK);
    CHECK(accounts_user_passwd(db, "alice", PASSWORD) == ACCT_OK);
}

static void test_client_choice(void)
{
    char out[256];
    const char *all = "LOGIN PLAIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256";
    CHECK(sasl_glue_client_candidates(all, NULL, true, out, sizeof out));
    CHECK_STR(out, "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN");
    CHECK(sasl_glue_client_candidates(all, NULL, false, out, sizeof out));
    CHECK_STR(out, "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5");
    CHECK(sasl_glue_client_candidates(all, "plain,cram-md5", true, out,
                                      sizeof out));
    CHECK_STR(out, "CRAM-MD5 PLAIN");
    CHECK(sasl_glue_client_candidates("plain login", "", true, out,
                                      sizeof out));
    CHECK_STR(out, "PLAIN LOGIN");
    CHECK(!sasl_glue_client_candidates("PLAIN LOGIN", NULL, false, out,
                                       sizeof out));
    CHECK(!sasl_glue_client_candidates("ANONYMOUS DIGEST-MD5 GSSAPI", NULL,
                                       true, out, sizeof out));
    CHECK(!sasl_glue_client_candidates(all, "DIGEST-MD5", true, out,
                                       sizeof out));

    /* The real exchange takes the strongest one. */
    struct outcome o = exchange(all, NULL, true, "alice", PASSWORD);
    CHECK_STR(o.mech, "SCRAM-SHA-256");
    CHECK(o.server == SASL_GLUE_OK);
    o = exchange("CRAM-MD5 SCRAM-SHA-1", NULL, false, "alice", PASSWORD);
    CHECK_STR(o.mech, "SCRAM-SHA-1");
    o = exchange("PLAIN LOGIN", NULL, false, "alice", PASSWORD);
    CHECK(o.server == SASL_GLUE_BADMECH);
    CHECK_STR(o.mech, "");
}

/* LOGIN with the user name as initial response (RFC 4954 allows it), and
 * "=" / "" as empty continuation lines. */
static void test_login_initial(void)
{
    char chal[1024], b64[256], raw[256];
    unsigned len;
    struct sasl_glue_server *s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    sasl_encode64("alice", 5, b64, sizeof b64, &len);
    CHECK(sasl_glue_server_start(s, "LOGIN", b64, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_decode64(chal, (unsigned)strlen(chal), raw, sizeof raw,
                        &len) == SASL_OK);
    raw[len] = '\0';
    CHECK_STR(raw, "Password:");
    sasl_encode64(PASSWORD, (unsigned)strlen(PASSWORD), b64, sizeof b64,
                  &len);
    CHECK(sasl_glue_server_step(s, b64, chal, sizeof chal) == SASL_GLUE_OK);
    CHECK_STR(sasl_glue_server_username(s), "alice");
    sasl_glue_server_free(s);

    /* An empty password line fails, it does not hang. */
    s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    sasl_encode64("alice", 5, b64, sizeof b64, &len);
    CHECK(sasl_glue_server_start(s, "LOGIN", b64, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_glue_server_step(s, "=", chal, sizeof chal) == SASL_GLUE_FAIL);
    sasl_glue_server_free(s);
}

/* Mutual authentication: a SCRAM server-final message ("v=...") that does
 * not carry the right server signature is refused by the client. */
static void test_scram_server_signature(void)
{
    char err[256], mech[32], buf[1024], chal[1024], raw[1024];
    unsigned len;
    struct sasl_glue_server *s = new_server(false);
    struct sasl_glue_client *c = sasl_glue_client_new(
        "smtp", "provider.example", "alice", PASSWORD, err, sizeof err);
    CHECK(s && c);
    if (!s || !c)
        goto out;
    CHECK(sasl_glue_client_start(c, "SCRAM-SHA-256", NULL, false, mech,
                                 sizeof mech, buf, sizeof buf) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_glue_server_start(s, mech, buf, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_glue_client_step(c, chal, buf, sizeof buf) ==
          SASL_GLUE_CONTINUE);
    /* The genuine server-final message comes as one more challenge. */
    CHECK(sasl_glue_server_step(s, buf, chal, sizeof chal) ==
          SASL_GLUE_CONTINUE);
    CHECK(sasl_decode64(chal, (unsigned)strlen(chal), raw, sizeof raw,
                        &len) == SASL_OK);
    CHECK(len > 2 && !memcmp(raw, "v=", 2));
    /* Flip one character of the signature. */
    raw[2] = raw[2] == 'A' ? 'B' : 'A';
    sasl_encode64(raw, len, chal, sizeof chal, &len);
    CHECK(sasl_glue_client_step(c, chal, buf, sizeof buf) == SASL_GLUE_FAIL);
    CHECK(!sasl_glue_client_complete(c));
out:
    sasl_glue_client_free(c);
    sasl_glue_server_free(s);
}

/* odmrd initialises Cyrus once and forks a process per session: the
 * sessions must not share a random state, or they would send the same
 * CRAM-MD5 challenge and SCRAM nonce. */
static void child_challenge(int fd, const char *mech)
{
    char chal[1024], b64[256];
    unsigned len;
    struct sasl_glue_server *s = new_server(false);
    const char *initial = NULL;
    if (!strcmp(mech, "SCRAM-SHA-256")) {
        const char *first = "n,,n=alice,r=fixedclientnonce";
        sasl_encode64(first, (unsigned)strlen(first), b64, sizeof b64, &len);
        initial = b64;
    }
    if (s && sasl_glue_server_start(s, mech, initial, chal, sizeof chal) ==
                 SASL_GLUE_CONTINUE)
        (void)!write(fd, chal, strlen(chal));
    _exit(0);
}

static void test_fork_randomness(const char *mech)
{
    char a[1024] = "", b[1024] = "";
    char *out[2] = {a, b};
    for (int i = 0; i < 2; i++) {
        int p[2];
        if (pipe(p) != 0)
            return;
        pid_t pid = fork();
        if (pid == 0) {
            close(p[0]);
            child_challenge(p[1], mech);
        }
        close(p[1]);
        ssize_t got = read(p[0], out[i], 1023);
        out[i][got > 0 ? got : 0] = '\0';
        close(p[0]);
        waitpid(pid, NULL, 0);
    }
    CHECK(a[0] != '\0' && b[0] != '\0');
    CHECK(strcmp(a, b) != 0);
}

/* The client refuses garbage from the server. */
static void test_client_refusals(void)
{
    char err[256], mech[32], buf[1024];
    struct sasl_glue_client *c = sasl_glue_client_new(
        "smtp", "provider.example", "alice", PASSWORD, err, sizeof err);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK(sasl_glue_client_start(c, "CRAM-MD5", NULL, false, mech,
                                 sizeof mech, buf, sizeof buf) ==
          SASL_GLUE_CONTINUE);
    CHECK_STR(mech, "CRAM-MD5");
    CHECK_STR(buf, "");   /* server-first: no initial response */
    CHECK(sasl_glue_client_step(c, "not base64!", buf, sizeof buf) ==
          SASL_GLUE_BADB64);

    /* SCRAM: a server-final message that does not verify. */
    CHECK(sasl_glue_client_start(c, "SCRAM-SHA-1", NULL, false, mech,
                                 sizeof mech, buf, sizeof buf) ==
          SASL_GLUE_CONTINUE);
    CHECK(buf[0] != '\0');
    CHECK(!sasl_glue_client_complete(c));
    sasl_glue_client_free(c);
}

/* No account probing: an unknown name fails like a wrong password, after
 * as many rounds, and only the reason (for the log) tells them apart. */
static void test_unknown_like_wrong(const char *mech)
{
    bool exists = true;
    struct outcome wrong = exchange(mech, NULL, true, "alice", "wrong");
    CHECK(wrong.server == SASL_GLUE_FAIL);
    CHECK_STR(wrong.reason, "wrong password for \"alice\"");
    CHECK_STR(auxprop_last_account(&exists), "alice");
    CHECK(exists);
    struct outcome unknown = exchange(mech, NULL, true, "mallory", "wrong");
    CHECK(unknown.server == SASL_GLUE_FAIL);
    CHECK(unknown.rounds == wrong.rounds);
    CHECK_STR(unknown.reason, "unknown account \"mallory\"");
    CHECK_STR(auxprop_last_account(&exists), "mallory");
    CHECK(!exists);
    if (unknown.rounds != wrong.rounds)
        printf("# %s: %d rounds for an unknown name, %d for a wrong "
               "password\n", mech, unknown.rounds, wrong.rounds);
}

/* SCRAM server-first for user (client nonce "fixedclientnonce"): salt and
 * iteration count; false when the server did not send one. */
static bool scram_first(const char *mech, const char *user, char *salt,
                        size_t n, unsigned *salt_len, unsigned long *iters)
{
    char first[256], b64[512], chal[1024], raw[1024];
    unsigned len;
    snprintf(first, sizeof first, "n,,n=%s,r=fixedclientnonce", user);
    sasl_encode64(first, (unsigned)strlen(first), b64, sizeof b64, &len);
    struct sasl_glue_server *s = new_server(false);
    bool ok = s && sasl_glue_server_start(s, mech, b64, chal, sizeof chal) ==
                       SASL_GLUE_CONTINUE;
    sasl_glue_server_free(s);
    if (!ok || sasl_decode64(chal, (unsigned)strlen(chal), raw,
                             sizeof raw - 1, &len) != SASL_OK)
        return false;
    raw[len] = '\0';
    char *sp = strstr(raw, ",s="), *ip = strstr(raw, ",i=");
    if (strncmp(raw, "r=fixedclientnonce", 18) || !sp || !ip || ip < sp)
        return false;
    *iters = strtoul(ip + 3, NULL, 10);
    return sasl_decode64(sp + 3, (unsigned)(ip - sp - 3), salt, (unsigned)n,
                         salt_len) == SASL_OK;
}

/* Cyrus derives a real account's salt from the name and a key drawn at
 * plugin init, so it is stable; an unknown name gets the same treatment. */
static void test_scram_unknown_server_first(const char *mech, unsigned size)
{
    char a1[128], a2[128], m1[128], m2[128], e1[128];
    unsigned la1 = 0, la2 = 0, lm1 = 0, lm2 = 0, le1 = 0;
    unsigned long ia = 0, im = 0, x = 0;
    CHECK(scram_first(mech, "alice", a1, sizeof a1, &la1, &ia));
    CHECK(scram_first(mech, "alice", a2, sizeof a2, &la2, &x));
    CHECK(scram_first(mech, "mallory", m1, sizeof m1, &lm1, &im));
    CHECK(scram_first(mech, "mallory", m2, sizeof m2, &lm2, &x));
    CHECK(scram_first(mech, "eve", e1, sizeof e1, &le1, &x));
    CHECK(la1 == size && lm1 == size && le1 == size);
    CHECK(ia == im && ia >= 4096);
    CHECK(la1 == la2 && !memcmp(a1, a2, la1));
    CHECK(lm1 == lm2 && !memcmp(m1, m2, lm1));
    CHECK(memcmp(a1, m1, size) != 0 && memcmp(m1, e1, size) != 0);
}

/* The stand-in secret of an unknown name never authenticates, not even
 * when a client somehow presents it. */
static void test_fake_never_authenticates(void)
{
    char fake[AUXPROP_FAKE_PASSWORD_SIZE], other[AUXPROP_FAKE_PASSWORD_SIZE];
    CHECK(!auxprop_fake_password("mallory", fake, sizeof fake - 1));
    CHECK(auxprop_fake_password("mallory", fake, sizeof fake));
    CHECK(auxprop_fake_password("eve", other, sizeof other));
    CHECK(strlen(fake) == 44 && strcmp(fake, other) != 0);
    const char *mechs[] = {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256",
                           "SCRAM-SHA-1"};
    for (size_t i = 0; i < sizeof mechs / sizeof *mechs; i++) {
        struct outcome o = exchange(mechs[i], NULL, true, "mallory", fake);
        CHECK(o.server == SASL_GLUE_FAIL);
        CHECK_STR(o.user, "");
        CHECK_STR(o.reason, "unknown account \"mallory\"");
    }
    /* A real account's name is checked against its real password. */
    CHECK(auxprop_fake_password("alice", fake, sizeof fake));
    CHECK(exchange("PLAIN", NULL, true, "alice", fake).server ==
          SASL_GLUE_FAIL);
}

/* What the plugin remembers belongs to the current exchange only. */
static void test_forget_between_exchanges(void)
{
    char chal[1024];
    CHECK(exchange("CRAM-MD5", NULL, true, "mallory", "x").server ==
          SASL_GLUE_FAIL);
    CHECK(auxprop_last_account(NULL) != NULL);
    struct sasl_glue_server *s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    /* "eA==" is "x": not a SCRAM client-first message, no lookup */
    CHECK(sasl_glue_server_start(s, "SCRAM-SHA-256", "eA==", chal,
                                 sizeof chal) == SASL_GLUE_FAIL);
    CHECK(auxprop_last_account(NULL) == NULL);
    CHECK(strstr(sasl_glue_server_reason(s), "mallory") == NULL);
    CHECK(strstr(sasl_glue_server_reason(s), "account") == NULL);
    sasl_glue_server_free(s);
}

/* A name from the client is quoted for the log, never copied raw. */
static void test_reason_quoting(void)
{
    struct outcome o =
        exchange("PLAIN", NULL, true, "ev\"il\\ \x01\x7f\xc3\xa9", "x");
    CHECK(o.server == SASL_GLUE_FAIL);
    CHECK_STR(o.reason,
              "unknown account \"ev\\x22il\\x5C\\x20\\x01\\x7F\\xC3\\xA9\"");
    /* The right password but a refused authorization: not "wrong". */
    char chal[1024], b64[1024];
    plain_b64("bob@customer.example", "alice", PASSWORD, b64, sizeof b64);
    struct sasl_glue_server *s = new_server(true);
    CHECK(s != NULL);
    if (!s)
        return;
    CHECK(sasl_glue_server_start(s, "PLAIN", b64, chal, sizeof chal) ==
          SASL_GLUE_FAIL);
    const char *why = sasl_glue_server_reason(s);
    printf("# proxy refused: %s\n", why);
    CHECK(strstr(why, "(account \"alice\")") != NULL);
    CHECK(strstr(why, "wrong password") == NULL);
    sasl_glue_server_free(s);
}

static char guard_saw[8][64];
static int guard_calls;
static bool guard_answer;

static bool test_guard_fn(const char *account)
{
    if (guard_calls < 8)
        snprintf(guard_saw[guard_calls], sizeof guard_saw[0], "%s", account);
    guard_calls++;
    return guard_answer;
}

/* The hook before each password lookup: false is a temporary failure
 * (not a failed attempt), for known and unknown names alike.  (Not with
 * LOGIN here: Cyrus' LOGIN plugin leaks the password it was sent when the
 * check fails temporarily, which the sanitizer build would report.) */
static void test_guard(void)
{
    const char *mechs[] = {"CRAM-MD5", "SCRAM-SHA-256", "PLAIN"};
    auxprop_set_guard(test_guard_fn);
    for (size_t i = 0; i < sizeof mechs / sizeof *mechs; i++) {
        guard_answer = false;
        guard_calls = 0;
        struct outcome o = exchange(mechs[i], NULL, true, "alice", PASSWORD);
        CHECK(o.server == SASL_GLUE_ERROR);
        CHECK(guard_calls >= 1);
        CHECK_STR(guard_saw[0], "alice");
        guard_calls = 0;
        o = exchange(mechs[i], NULL, true, "mallory", PASSWORD);
        CHECK(o.server == SASL_GLUE_ERROR);
        CHECK(guard_calls >= 1);
        CHECK_STR(guard_saw[0], "mallory");
        guard_answer = true;
        guard_calls = 0;
        o = exchange(mechs[i], NULL, true, "alice", PASSWORD);
        CHECK(o.server == SASL_GLUE_OK);
        CHECK(guard_calls >= 1);
        printf("# %s: %d password lookups in a successful exchange\n",
               mechs[i], guard_calls);
    }
    auxprop_set_guard(NULL);
    guard_calls = 0;
    CHECK(exchange("CRAM-MD5", NULL, true, "alice", PASSWORD).server ==
          SASL_GLUE_OK);
    CHECK(guard_calls == 0);
}

/* Issue 10: unknown names cannot be told from wrong passwords. */
static void test_no_probing(void)
{
    const char *mechs[] = {"SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5",
                           "PLAIN", "LOGIN"};
    for (size_t i = 0; i < sizeof mechs / sizeof *mechs; i++)
        test_unknown_like_wrong(mechs[i]);
    test_scram_unknown_server_first("SCRAM-SHA-256", 32);
    test_scram_unknown_server_first("SCRAM-SHA-1", 20);
    test_fake_never_authenticates();
    test_forget_between_exchanges();
    test_reason_quoting();
    test_guard();
}

/* A SASL configuration file must not change anything. */
static void write_hostile_conf(void)
{
    char path[300];
    snprintf(path, sizeof path, "%s/odmrd.conf", dir);
    FILE *f = fopen(path, "w");
    if (f) {
        fputs("mech_list: PLAIN\nauxprop_plugin: sasldb\n"
              "pwcheck_method: saslauthd\n",
              f);
        fclose(f);
    }
    setenv("SASL_CONF_PATH", dir, 1);
}

int main(void)
{
    char err[256];
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    /* TEST_SASL_DEBUG=1 shows what Cyrus logs. */
    bool debug = getenv("TEST_SASL_DEBUG") != NULL;
    log_open("test_sasl", debug, debug);
    snprintf(db, sizeof db, "%s/accounts.db", dir);
    CHECK(accounts_user_add(db, "alice", PASSWORD) == ACCT_OK);
    CHECK(accounts_user_add(db, "bob@customer.example", "pw of bob") ==
          ACCT_OK);
    write_hostile_conf();
    auxprop_set_db(db);
    bool ok = sasl_glue_server_init(auxprop_plugin_init, AUXPROP_PLUGIN_NAME,
                                    err, sizeof err);
    if (!ok)
        printf("server init: %s\n", err);
    CHECK(ok);
    ok = sasl_glue_client_init(err, sizeof err);
    if (!ok)
        printf("client init: %s\n", err);
    CHECK(ok);

    test_offer();
    test_mechanism("SCRAM-SHA-256");
    test_mechanism("SCRAM-SHA-1");
    test_mechanism("CRAM-MD5");
    test_mechanism("PLAIN");
    test_mechanism("LOGIN");
    test_mechanism_refusals();
    test_plain_details();
    test_bad_base64();
    test_retry();
    test_client_choice();
    test_client_refusals();
    test_login_initial();
    test_scram_server_signature();
    test_password_change();
    test_fork_randomness("CRAM-MD5");
    test_fork_randomness("SCRAM-SHA-256");
    test_database_trouble();
    test_no_probing();

    sasl_glue_client_done();
    sasl_glue_server_done();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        printf("could not remove %s\n", dir);
    CHECK_DONE();
}
