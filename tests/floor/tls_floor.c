/* tls_floor.c - OpenSSL's own server-side work per TLS session, with no
 * network, no processes and no SMTP around it.
 *
 * The odmr-polls-tls row compares odmrd's CPU per poll with a full
 * handshake and with a resumed one.  Part of every poll is the same in
 * both (the connection, the SMTP dialogue, AUTH, the queue lookup), so
 * the ratio of whole polls is bounded by what the handshakes themselves
 * cost.  This program measures that: a client and a server SSL in one
 * process, joined by a BIO pair, N sessions in a row, the server with the
 * certificate and key given and settings like odmrd's (one ticket per
 * handshake, no server-side cache; OpenSSL's own ticket keys, where odmrd
 * derives its keys once per period: the same AES and HMAC per ticket).  Only the server's calls are timed
 * (thread CPU time): SSL_new, the handshake, one short record each way,
 * SSL_shutdown and SSL_free.  MODE "resumed" offers each session the
 * ticket of the one before.
 *
 * Prints "server_ms X" (CPU milliseconds per session).
 * usage: tls_floor CERT KEY N full|resumed */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static SSL_SESSION *latest;   /* the client's newest ticket */

static int keep_session(SSL *ssl, SSL_SESSION *sess)
{
    (void)ssl;
    SSL_SESSION_free(latest);
    latest = sess;
    return 1;   /* the reference is ours now */
}

static double cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static SSL_CTX *server_ctx(const char *cert, const char *key)
{
    static const unsigned char sid_ctx[] = "tls_floor";
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof sid_ctx - 1) != 1 ||
        SSL_CTX_set_num_tickets(ctx, 1) != 1)
        return NULL;
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return ctx;
}

static SSL_CTX *client_ctx(void)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        return NULL;
    /* tickets reach the client through this callback (TLS 1.3) */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
                                        SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, keep_session);
    return ctx;
}

/* Steps both ends until both have finished the handshake; adds the
 * server's CPU time to *spent.  false if it does not finish. */
static bool handshake(SSL *c, SSL *s, double *spent)
{
    for (int i = 0; i < 10; i++) {
        int rc = SSL_do_handshake(c);
        double t0 = cpu_seconds();
        int rs = SSL_do_handshake(s);
        *spent += cpu_seconds() - t0;
        if (rc == 1 && rs == 1)
            return true;
    }
    return false;
}

/* One session: the server's CPU seconds, or -1 on failure (or when a
 * resumption was asked for and not made). */
static double one_session(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION *offer)
{
    char buf[64];
    size_t n;
    double spent = 0, t0 = cpu_seconds();
    SSL *s = SSL_new(sctx);
    spent += cpu_seconds() - t0;
    SSL *c = SSL_new(cctx);
    BIO *cb = NULL, *sb = NULL;
    if (!s || !c || BIO_new_bio_pair(&cb, 0, &sb, 0) != 1)
        return -1;
    SSL_set_bio(c, cb, cb);
    SSL_set_bio(s, sb, sb);
    SSL_set_connect_state(c);
    SSL_set_accept_state(s);
    if (offer)
        SSL_set_session(c, offer);
    bool ok = handshake(c, s, &spent);
    t0 = cpu_seconds();
    ok = ok && SSL_write_ex(s, "220 ok\r\n", 8, &n) == 1;
    spent += cpu_seconds() - t0;
    ok = ok && SSL_read_ex(c, buf, sizeof buf, &n) == 1 &&
         SSL_write_ex(c, "QUIT\r\n", 6, &n) == 1;
    t0 = cpu_seconds();
    ok = ok && SSL_read_ex(s, buf, sizeof buf, &n) == 1;
    SSL_shutdown(s);
    SSL_free(s);
    spent += cpu_seconds() - t0;
    ok = ok && (!offer || SSL_session_reused(c) == 1);
    SSL_shutdown(c);   /* without it the client's session is voided */
    SSL_free(c);
    return ok ? spent : -1;
}

int main(int argc, char **argv)
{
    if (argc != 5 || (strcmp(argv[4], "full") && strcmp(argv[4], "resumed"))) {
        fprintf(stderr, "usage: tls_floor CERT KEY N full|resumed\n");
        return 2;
    }
    char *end;
    long n = strtol(argv[3], &end, 10);
    if (*end)
        n = 0;
    bool resume = !strcmp(argv[4], "resumed");
    SSL_CTX *sctx = server_ctx(argv[1], argv[2]), *cctx = client_ctx();
    if (n < 1 || !sctx || !cctx) {
        fprintf(stderr, "tls_floor: cannot set up TLS (N must be positive)\n");
        ERR_print_errors_fp(stderr);
        return 1;
    }
    double total = 0;
    /* session 0 is a full one in either mode: it warms up and, for
     * "resumed", gets the first ticket; it is not counted */
    for (long i = 0; i <= n; i++) {
        SSL_SESSION *offer = resume ? latest : NULL;
        if (resume && i > 0 && !offer) {
            fprintf(stderr, "tls_floor: no ticket to resume with\n");
            return 1;
        }
        if (offer)
            SSL_SESSION_up_ref(offer);
        double t = one_session(sctx, cctx, offer);
        SSL_SESSION_free(offer);
        if (t < 0) {
            fprintf(stderr, "tls_floor: session %ld failed%s\n", i,
                    resume && i ? " or was not resumed" : "");
            ERR_print_errors_fp(stderr);
            return 1;
        }
        if (i > 0)
            total += t;
    }
    printf("server_ms %.4f\n", 1000 * total / (double)n);
    return 0;
}
