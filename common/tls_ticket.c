/* tls_ticket.c - rotating, memory-only session ticket keys (tls_ticket.h).
 *
 * OpenSSL's own ticket keys are random per SSL_CTX, i.e. per process and
 * per reload: a ticket issued by one session worker would be useless to
 * the next, and every SIGHUP would void them all.  Deriving the keys from
 * one secret drawn before the fork, moved forward by a one-way ratchet at
 * each period, gives every worker the same keys, with nothing on disk and
 * no way back to an earlier period's keys (tls_ticket.h). */
#include "tls_ticket.h"

#include <string.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "log.h"

#define EPOCH_BYTES 8

/* Periods a chain steps through one by one; a clock that jumps further
 * (a machine whose clock was years off) is met with one jump step, so
 * that nothing loops for ever on a wild time.  Workers at different
 * periods then disagree about keys: a full handshake, once. */
#define CHAIN_STEPS_MAX 1000

static struct tls_ticket_chain chain;
static bool have_chain;

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = EPOCH_BYTES - 1; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
}

/* HMAC-SHA256(secret, label || be64(epoch)) into out (32 bytes).  The
 * labels keep the name, the cipher key and the MAC key independent. */
static bool derive_one(const unsigned char *key, const char *label,
                       uint64_t epoch, unsigned char out[32])
{
    unsigned char msg[32 + EPOCH_BYTES];
    size_t llen = strlen(label);
    unsigned int outlen = 0;

    if (llen > 32)
        return false;
    memcpy(msg, label, llen);
    put_be64(msg + llen, epoch);
    return HMAC(EVP_sha256(), key, TLS_TICKET_SECRET_LEN, msg,
                llen + EPOCH_BYTES, out, &outlen) != NULL && outlen == 32;
}

bool tls_ticket_derive(const unsigned char key[TLS_TICKET_SECRET_LEN],
                       uint64_t epoch, struct tls_ticket_keys *k)
{
    unsigned char tag[32];

    memset(k, 0, sizeof *k);
    k->epoch = epoch;
    if (!derive_one(key, "odmrd ticket name", epoch, tag) ||
        !derive_one(key, "odmrd ticket aes", epoch, k->aes) ||
        !derive_one(key, "odmrd ticket mac", epoch, k->hmac))
        return false;
    /* The period in clear, then a MAC part: names of two periods never
     * collide, and a foreign name fails the comparison. */
    put_be64(k->name, epoch);
    memcpy(k->name + EPOCH_BYTES, tag, TLS_TICKET_NAME_LEN - EPOCH_BYTES);
    return true;
}

/* The next secret from s (period epoch, under label), s wiped. */
static bool ratchet(unsigned char s[TLS_TICKET_SECRET_LEN], const char *label,
                    uint64_t epoch)
{
    unsigned char next[32];
    bool ok = derive_one(s, label, epoch, next);
    OPENSSL_cleanse(s, TLS_TICKET_SECRET_LEN);
    if (ok)
        memcpy(s, next, TLS_TICKET_SECRET_LEN);
    OPENSSL_cleanse(next, sizeof next);
    return ok;
}

bool tls_ticket_chain_start(struct tls_ticket_chain *c,
                            const unsigned char key[TLS_TICKET_SECRET_LEN],
                            uint64_t epoch)
{
    memset(c, 0, sizeof *c);
    c->epoch = epoch;
    memcpy(c->secret, key, TLS_TICKET_SECRET_LEN);
    c->valid = tls_ticket_derive(c->secret, epoch, &c->cur);
    if (!c->valid)
        OPENSSL_cleanse(c, sizeof *c);
    return c->valid;
}

/* One period forward: the keys of the period left become prev. */
static bool chain_step(struct tls_ticket_chain *c, uint64_t to, const char *label)
{
    if (!ratchet(c->secret, label, c->epoch))
        return false;
    c->prev = c->cur;
    c->have_prev = to == c->epoch + 1;   /* a jump leaves no prev period */
    c->epoch = to;
    return tls_ticket_derive(c->secret, to, &c->cur);
}

bool tls_ticket_chain_advance(struct tls_ticket_chain *c, uint64_t now_epoch)
{
    bool ok = c->valid;
    if (ok && now_epoch > c->epoch && now_epoch - c->epoch > CHAIN_STEPS_MAX)
        ok = chain_step(c, now_epoch - 1, "odmrd ticket jump");
    while (ok && c->epoch < now_epoch)
        ok = chain_step(c, c->epoch + 1, "odmrd ticket ratchet");
    if (!ok)
        OPENSSL_cleanse(c, sizeof *c);   /* valid false: no ticket found */
    return ok;
}

enum tls_ticket_match
tls_ticket_chain_lookup(const struct tls_ticket_chain *c,
                        const unsigned char name[TLS_TICKET_NAME_LEN],
                        struct tls_ticket_keys *k)
{
    enum tls_ticket_match m = TICKET_UNKNOWN;
    if (!c->valid)
        return m;
    if (CRYPTO_memcmp(c->cur.name, name, TLS_TICKET_NAME_LEN) == 0) {
        *k = c->cur;
        m = TICKET_CURRENT;
    } else if (c->have_prev &&
               CRYPTO_memcmp(c->prev.name, name, TLS_TICKET_NAME_LEN) == 0) {
        *k = c->prev;
        m = TICKET_RENEW;
    }
    return m;
}

static uint64_t current_epoch(void)
{
    time_t now = time(NULL);
    return now > 0 ? (uint64_t)now / TLS_TICKET_PERIOD_S : 0;
}

bool tls_ticket_tick(void)
{
    if (!have_chain)
        return false;
    uint64_t was = chain.epoch;
    if (!tls_ticket_chain_advance(&chain, current_epoch())) {
        have_chain = false;
        log_warn("TLS: cannot derive session ticket keys; not issuing "
                 "tickets until the next reload or restart");
        return true;   /* renew the workers all the same: none goes on */
    }
    return chain.epoch != was;
}

static bool set_mac_key(EVP_MAC_CTX *hctx, unsigned char *key)
{
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, key, 32),
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    return EVP_MAC_CTX_set_params(hctx, params) == 1;
}

/* Issuing: 1 with the ticket set up, 0 to send no ticket (the handshake
 * still succeeds, only resumption is lost). */
static int ticket_issue(unsigned char *name, unsigned char *iv,
                        EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx)
{
    struct tls_ticket_keys k;
    int iv_len = EVP_CIPHER_iv_length(EVP_aes_256_cbc());

    tls_ticket_tick();
    if (!have_chain)
        return 0;
    k = chain.cur;
    if (RAND_bytes(iv, iv_len) != 1 ||
        EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv) != 1 ||
        !set_mac_key(hctx, k.hmac)) {
        log_warn("TLS: cannot set up a session ticket; not issuing one");
        OPENSSL_cleanse(&k, sizeof k);
        return 0;
    }
    memcpy(name, k.name, TLS_TICKET_NAME_LEN);
    OPENSSL_cleanse(&k, sizeof k);
    return 1;
}

/* Accepting: 0 for a ticket we cannot use (full handshake), else 2:
 * accept and issue a fresh ticket, whichever key this one was under.  A
 * ticket is then used once (RFC 8446 C.4: reuse links connections), the
 * client's copy never ages out while it keeps polling, and the server
 * has something to send after the client's Finished (without it, a
 * client that Nagles its first command waits for a delayed ACK: 40 ms
 * per poll, measured). */
static int ticket_accept(const unsigned char *name, const unsigned char *iv,
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx)
{
    struct tls_ticket_keys k;
    tls_ticket_tick();
    enum tls_ticket_match m = have_chain ? tls_ticket_chain_lookup(&chain, name, &k)
                                         : TICKET_UNKNOWN;
    if (m != TICKET_UNKNOWN &&
        (EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv) != 1 ||
         !set_mac_key(hctx, k.hmac)))
        m = TICKET_UNKNOWN;
    OPENSSL_cleanse(&k, sizeof k);
    return m == TICKET_UNKNOWN ? 0 : 2;
}

static int ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv,
                     EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    (void)ssl;
    return enc ? ticket_issue(name, iv, cctx, hctx)
               : ticket_accept(name, iv, cctx, hctx);
}

bool tls_ticket_enable(SSL_CTX *ctx)
{
    static const unsigned char sid_ctx[] = "odmrd";

    if (!have_chain) {
        unsigned char secret[TLS_TICKET_SECRET_LEN];
        have_chain = RAND_priv_bytes(secret, sizeof secret) == 1 &&
                     tls_ticket_chain_start(&chain, secret, current_epoch());
        OPENSSL_cleanse(secret, sizeof secret);
        if (!have_chain)
            return false;
    }
    SSL_CTX_clear_options(ctx, SSL_OP_NO_TICKET);
    /* Workers are separate processes: a server-side session cache would
     * only grow in each of them and never be hit.  Tickets are the state. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    /* The lifetime hint: a ticket is accepted at least this long. */
    SSL_CTX_set_timeout(ctx, TLS_TICKET_PERIOD_S);
    /* One ticket per handshake: odmr-fetch keeps only the latest. */
    return SSL_CTX_set_num_tickets(ctx, 1) == 1 &&
           SSL_CTX_set_session_id_context(ctx, sid_ctx,
                                          sizeof sid_ctx - 1) == 1 &&
           SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb) == 1;
}
