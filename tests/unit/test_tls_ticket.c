/* test_tls_ticket.c - odmrd's session ticket keys (common/tls_ticket.c):
 * the derivation, the rotation window, and a real TLS 1.2 and 1.3
 * resumption through two SSL_CTXs that share only the secret's process
 * (as odmrd's reload and its forked workers do). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "../../common/io.h"
#include "../../common/tls_ticket.h"
#include "check.h"

static unsigned char secret_a[TLS_TICKET_SECRET_LEN];
static unsigned char secret_b[TLS_TICKET_SECRET_LEN];

static void test_derivation(void)
{
    struct tls_ticket_keys k1, k2, k3;

    memset(secret_a, 0x11, sizeof secret_a);
    memset(secret_b, 0x22, sizeof secret_b);
    CHECK(tls_ticket_derive(secret_a, 1000, &k1));
    CHECK(tls_ticket_derive(secret_a, 1000, &k2));
    CHECK(memcmp(&k1, &k2, sizeof k1) == 0);          /* deterministic */
    CHECK(tls_ticket_derive(secret_a, 1001, &k3));
    CHECK(memcmp(k1.aes, k3.aes, sizeof k1.aes) != 0);  /* rotates */
    CHECK(memcmp(k1.hmac, k3.hmac, sizeof k1.hmac) != 0);
    CHECK(memcmp(k1.aes, k1.hmac, sizeof k1.aes) != 0); /* independent */
    CHECK(tls_ticket_derive(secret_b, 1000, &k2));
    CHECK(memcmp(k1.aes, k2.aes, sizeof k1.aes) != 0);  /* per secret */
    CHECK(memcmp(k1.name, k2.name, 8) == 0);   /* the period, in clear */
    CHECK(memcmp(k1.name + 8, k2.name + 8, 8) != 0);
}

static void test_window(void)
{
    struct tls_ticket_chain c, other;
    struct tls_ticket_keys k, got;

    CHECK(tls_ticket_chain_start(&c, secret_a, 500));
    k = c.cur;
    CHECK(tls_ticket_chain_lookup(&c, k.name, &got) == TICKET_CURRENT);
    CHECK(memcmp(got.aes, k.aes, sizeof k.aes) == 0);
    CHECK(tls_ticket_chain_advance(&c, 500) && c.epoch == 500);
    CHECK(tls_ticket_chain_advance(&c, 501) && c.epoch == 501);
    CHECK(tls_ticket_chain_lookup(&c, k.name, &got) == TICKET_RENEW);
    CHECK(memcmp(got.hmac, k.hmac, sizeof k.hmac) == 0);
    /* a clock that goes back leaves the chain where it is */
    CHECK(tls_ticket_chain_advance(&c, 499) && c.epoch == 501);
    CHECK(tls_ticket_chain_lookup(&c, k.name, &got) == TICKET_RENEW);
    CHECK(tls_ticket_chain_advance(&c, 502));
    CHECK(tls_ticket_chain_lookup(&c, k.name, &got) == TICKET_UNKNOWN);
    /* another secret (a restarted odmrd): not ours */
    CHECK(tls_ticket_chain_start(&other, secret_b, 500));
    CHECK(tls_ticket_chain_lookup(&other, k.name, &got) == TICKET_UNKNOWN);
    /* a forged name */
    unsigned char forged[TLS_TICKET_NAME_LEN];
    CHECK(tls_ticket_chain_start(&c, secret_a, 500));
    memcpy(forged, k.name, sizeof forged);
    forged[15] ^= 1;
    CHECK(tls_ticket_chain_lookup(&c, forged, &got) == TICKET_UNKNOWN);
    /* a new chain knows no period before its first */
    struct tls_ticket_keys before;
    CHECK(tls_ticket_derive(secret_a, 499, &before));
    CHECK(tls_ticket_chain_lookup(&c, before.name, &got) == TICKET_UNKNOWN);
}

/* Workers forked at different times reach the same keys; what a chain
 * holds after two periods cannot make the keys it started with. */
static void test_ratchet(void)
{
    struct tls_ticket_chain a, b, jump;
    struct tls_ticket_keys k0, again;

    CHECK(tls_ticket_chain_start(&a, secret_a, 700));
    CHECK(tls_ticket_chain_start(&b, secret_a, 700));
    k0 = a.cur;
    for (uint64_t e = 701; e <= 705; e++)
        CHECK(tls_ticket_chain_advance(&a, e));
    CHECK(tls_ticket_chain_advance(&b, 705));
    CHECK(memcmp(&a.cur, &b.cur, sizeof a.cur) == 0);
    CHECK(memcmp(&a.prev, &b.prev, sizeof a.prev) == 0);
    CHECK(memcmp(a.secret, b.secret, sizeof a.secret) == 0);
    CHECK(a.have_prev && a.prev.epoch == 704 && a.cur.epoch == 705);
    /* the secret moved on: neither it nor the derivation under the old
     * secret's place gives the first period's keys back */
    CHECK(memcmp(a.secret, secret_a, sizeof a.secret) != 0);
    CHECK(tls_ticket_derive(a.secret, 700, &again));
    CHECK(memcmp(again.aes, k0.aes, sizeof k0.aes) != 0);
    CHECK(memcmp(again.hmac, k0.hmac, sizeof k0.hmac) != 0);
    CHECK(tls_ticket_derive(secret_a, 705, &again));
    CHECK(memcmp(again.aes, a.cur.aes, sizeof again.aes) != 0);
    /* a wild clock: one jump, not billions of steps */
    CHECK(tls_ticket_chain_start(&jump, secret_a, 700));
    CHECK(tls_ticket_chain_advance(&jump, UINT64_MAX / 2));
    CHECK(jump.epoch == UINT64_MAX / 2 && jump.cur.epoch == jump.epoch);
    CHECK(tls_ticket_chain_lookup(&jump, k0.name, &again) == TICKET_UNKNOWN);
    CHECK(tls_ticket_chain_lookup(&jump, jump.cur.name, &again) ==
          TICKET_CURRENT);
}

/* ---- a real resumption over a socketpair ---- */

static char dir[] = "/tmp/odmr-test-ticket-XXXXXX";
static char cert[300], key[300];

static bool make_cert(void)
{
    char cmd[1024];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    snprintf(cmd, sizeof cmd,
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-nodes -keyout %s -out %s -days 2 -subj /CN=tick.test "
             "-addext subjectAltName=DNS:tick.test >/dev/null 2>&1",
             key, cert);
    return system(cmd) == 0;
}

/* One handshake; the server runs in a child.  Returns whether the client
 * resumed; *out receives the client's session (TLS 1.3: after reading). */
static char client_err[256];

static int handshake_as(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION *offer,
                        SSL_SESSION **out, const char *host)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        struct io io;
        char err[256], line[64];
        close(sv[0]);
        io_init(&io, sv[1], 5000);
        bool ok = io_starttls_server(&io, sctx, err, sizeof err) &&
                  io_puts(&io, "hello\r\n") && io_flush(&io) &&
                  io_getline(&io, line, sizeof line, NULL) >= 0;
        io_close(&io);
        _exit(ok ? 0 : 1);
    }
    close(sv[1]);
    struct io io;
    char line[64];
    io_init(&io, sv[0], 5000);
    int resumed = -1;
    client_err[0] = '\0';
    if (io_starttls_client_resume(&io, cctx, host, offer, client_err,
                                  sizeof client_err) &&
        io_getline(&io, line, sizeof line, NULL) >= 0) {
        resumed = io_tls_resumed(&io);
        *out = SSL_get1_session(io.ssl);
        io_puts(&io, "bye\r\n");
        io_flush(&io);
    }
    io_close(&io);
    int status;
    waitpid(pid, &status, 0);
    return resumed;
}

static int handshake(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION *offer,
                     SSL_SESSION **out)
{
    return handshake_as(sctx, cctx, offer, out, "tick.test");
}

static void test_resumption(int version)
{
    char err[256];
    SSL_CTX *s1 = tls_server_ctx(cert, key, err, sizeof err);
    SSL_CTX *s2 = tls_server_ctx(cert, key, err, sizeof err);  /* "reload" */
    SSL_CTX *c = tls_client_ctx(cert, err, sizeof err);
    CHECK(s1 && s2 && c);
    if (!s1 || !s2 || !c)
        return;
    SSL_CTX_set_max_proto_version(c, version);
    SSL_SESSION *first = NULL, *second = NULL, *third = NULL;
    CHECK(handshake(s1, c, NULL, &first) == 0);
    CHECK(first && SSL_SESSION_is_resumable(first));
    CHECK(handshake(s2, c, first, &second) == 1);   /* survives reload */
    CHECK(second != NULL);
    CHECK(handshake(s1, c, second, &third) == 1);
    /* OpenSSL does not check the name on resumption; io.c must */
    SSL_SESSION *none = NULL;
    CHECK(handshake_as(s1, c, third, &none, "other.test") == -1);
    CHECK(strstr(client_err, "resumed TLS session does not match host "
                             "other.test") != NULL);
    CHECK(none == NULL);
    SSL_SESSION_free(first);
    SSL_SESSION_free(second);
    SSL_SESSION_free(third);
    SSL_CTX_free(s1);
    SSL_CTX_free(s2);
    SSL_CTX_free(c);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);   /* a refused peer closes early */
    test_derivation();
    test_window();
    test_ratchet();
    if (!mkdtemp(dir) || !make_cert()) {
        printf("FAIL cannot make a test certificate\n");
        CHECK(0);
        CHECK_DONE();
    }
    test_resumption(TLS1_3_VERSION);
    test_resumption(TLS1_2_VERSION);
    unlink(cert);
    unlink(key);
    rmdir(dir);
    CHECK_DONE();
}
