/* tls_ticket.c - rotating, memory-only session ticket keys (tls_ticket.h).
 *
 * OpenSSL's own ticket keys are random per SSL_CTX, i.e. per process and
 * per reload: a ticket issued by one session worker would be useless to
 * the next, and every SIGHUP would void them all.  Deriving the keys from
 * one secret drawn before the fork gives every worker the same keys, with
 * nothing on disk and rotation for free (the period number is an input). */
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

static unsigned char secret[TLS_TICKET_SECRET_LEN];
static bool have_secret;
/* The keys of the last two periods asked for: a ticket operation then
 * costs one AES and one HMAC, not three more HMACs to derive keys. */
static struct tls_ticket_keys cached[2];
static bool cached_valid[2];

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = EPOCH_BYTES - 1; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
}

static uint64_t get_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < EPOCH_BYTES; i++)
        v = v << 8 | p[i];
    return v;
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
    /* The period in clear lets a lookup find the key without trying
     * each; the MAC part makes foreign names fail the comparison. */
    put_be64(k->name, epoch);
    memcpy(k->name + EPOCH_BYTES, tag, TLS_TICKET_NAME_LEN - EPOCH_BYTES);
    return true;
}

/* Whether a ticket's period (the clear first half of its name) is the
 * current or the previous one. */
static enum tls_ticket_match period_match(const unsigned char *name,
                                          uint64_t now_epoch, uint64_t *epoch)
{
    *epoch = get_be64(name);
    if (*epoch == now_epoch)
        return TICKET_CURRENT;
    if (now_epoch != 0 && *epoch == now_epoch - 1)
        return TICKET_RENEW;
    return TICKET_UNKNOWN;
}

enum tls_ticket_match
tls_ticket_lookup(const unsigned char key[TLS_TICKET_SECRET_LEN],
                  const unsigned char name[TLS_TICKET_NAME_LEN],
                  uint64_t now_epoch, struct tls_ticket_keys *k)
{
    uint64_t epoch;
    enum tls_ticket_match m = period_match(name, now_epoch, &epoch);

    if (m == TICKET_UNKNOWN || !tls_ticket_derive(key, epoch, k) ||
        CRYPTO_memcmp(k->name, name, TLS_TICKET_NAME_LEN) != 0)
        return TICKET_UNKNOWN;
    return m;
}

static uint64_t current_epoch(void)
{
    time_t now = time(NULL);
    return now > 0 ? (uint64_t)now / TLS_TICKET_PERIOD_S : 0;
}

static bool keys_for(uint64_t epoch, struct tls_ticket_keys *k)
{
    size_t slot = (size_t)(epoch & 1);

    if (!cached_valid[slot] || cached[slot].epoch != epoch) {
        cached_valid[slot] = tls_ticket_derive(secret, epoch, &cached[slot]);
        if (!cached_valid[slot])
            return false;
    }
    *k = cached[slot];
    return true;
}

/* tls_ticket_lookup under our secret, from the cache: a resumption then
 * derives nothing (three HMACs per ticket were 7% of a resumed
 * handshake's CPU in odmrd). */
static enum tls_ticket_match cached_lookup(const unsigned char *name,
                                           struct tls_ticket_keys *k)
{
    uint64_t epoch;
    enum tls_ticket_match m = period_match(name, current_epoch(), &epoch);

    if (m == TICKET_UNKNOWN || !keys_for(epoch, k) ||
        CRYPTO_memcmp(k->name, name, TLS_TICKET_NAME_LEN) != 0)
        return TICKET_UNKNOWN;
    return m;
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

    if (!keys_for(current_epoch(), &k) || RAND_bytes(iv, iv_len) != 1 ||
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
    enum tls_ticket_match m = cached_lookup(name, &k);
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
    if (!have_secret)
        return 0;
    return enc ? ticket_issue(name, iv, cctx, hctx)
               : ticket_accept(name, iv, cctx, hctx);
}

bool tls_ticket_enable(SSL_CTX *ctx)
{
    static const unsigned char sid_ctx[] = "odmrd";

    if (!have_secret) {
        if (RAND_priv_bytes(secret, sizeof secret) != 1)
            return false;
        have_secret = true;
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
