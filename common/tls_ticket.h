/* tls_ticket.h - odmrd's TLS session tickets (RFC 5077 / RFC 8446 4.6.1).
 *
 * Guarantee: ticket keys exist only in memory and rotate every
 * TLS_TICKET_PERIOD_S.  A ticket is issued under the current period's key
 * and accepted under the current or the previous one (so it lives between
 * one and two periods); every accepted ticket is renewed (a fresh one,
 * under the current key, is sent), so a client that keeps polling never
 * falls back to a full handshake because of rotation.  Nothing is ever written to disk: the keys of period E are
 * HMAC-SHA256(secret, label || E), and the 32-byte secret is drawn from
 * the CSPRNG once per process image, in the master before it forks, so
 * every session worker derives the same keys without talking to the
 * others.  A reload (a new SSL_CTX in the same process) keeps the secret,
 * so tickets survive SIGHUP; a restart draws a new one, so every earlier
 * ticket falls back to a full handshake. */
#ifndef ODMR_TLS_TICKET_H
#define ODMR_TLS_TICKET_H

#include <stdbool.h>
#include <stdint.h>

#include <openssl/ssl.h>

#define TLS_TICKET_PERIOD_S (12 * 3600)
#define TLS_TICKET_SECRET_LEN 32
#define TLS_TICKET_NAME_LEN 16   /* what OpenSSL calls key_name */

struct tls_ticket_keys {
    uint64_t epoch;
    unsigned char name[TLS_TICKET_NAME_LEN];   /* 8 bytes epoch, 8 bytes MAC */
    unsigned char aes[32];                     /* AES-256-CBC */
    unsigned char hmac[32];                    /* HMAC-SHA256 over the ticket */
};

/* Turns tickets on for a server context: the key callback, TLS 1.3 ticket
 * count and lifetime, no per-process session cache.  Draws the secret on
 * first use.  False (with OpenSSL's error queue set) on failure. */
bool tls_ticket_enable(SSL_CTX *ctx);

/* ---- the logic, exposed for tests/unit/test_tls_ticket.c ---- */

/* The keys of one period under secret; false if HMAC fails. */
bool tls_ticket_derive(const unsigned char secret[TLS_TICKET_SECRET_LEN],
                       uint64_t epoch, struct tls_ticket_keys *k);

enum tls_ticket_match {
    TICKET_UNKNOWN = 0,   /* not ours, or too old: full handshake */
    TICKET_CURRENT = 1,   /* current key */
    TICKET_RENEW = 2,     /* previous key: accept and issue a new ticket */
};

/* Which key a ticket named name is under at period now_epoch; *k receives
 * that key when the answer is not TICKET_UNKNOWN. */
enum tls_ticket_match
tls_ticket_lookup(const unsigned char secret[TLS_TICKET_SECRET_LEN],
                  const unsigned char name[TLS_TICKET_NAME_LEN],
                  uint64_t now_epoch, struct tls_ticket_keys *k);

#endif
