/* tls_ticket.h - odmrd's TLS session tickets (RFC 5077 / RFC 8446 4.6.1).
 *
 * Guarantee: ticket keys exist only in memory and rotate every
 * TLS_TICKET_PERIOD_S.  A ticket is issued under the current period's key
 * and accepted under the current or the previous one (so it lives between
 * one and two periods); every accepted ticket is renewed (a fresh one,
 * under the current key, is sent), so a client that keeps polling never
 * falls back to a full handshake because of rotation.
 *
 * Nothing is ever written to disk, and an old key cannot be made again:
 * the keys of period E are HMAC-SHA256(S(E), label || E), and S(E + 1) is
 * HMAC-SHA256(S(E), ratchet label || E), S(E) wiped once S(E + 1) is made.
 * A process holding S(E) (and the keys of E - 1, to accept the tickets
 * issued just before the rotation) can derive nothing older: someone who
 * reads its memory later cannot open tickets recorded two periods before
 * (TLS 1.2 tickets carry the session's master secret).  The first secret
 * is drawn from the CSPRNG once per process image, in the master before
 * it forks; the ratchet is deterministic, so every session worker reaches
 * the same keys without talking to the others, whenever it was forked.
 * The master advances its own copy at least once a second and then
 * replaces its idle workers (busy ones after their session), a worker
 * advances on each ticket it issues or accepts.  A reload (a new SSL_CTX in the same
 * process) keeps the chain, so tickets survive SIGHUP; a restart draws a
 * new secret, so every earlier ticket falls back to a full handshake. */
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

/* Advances the process's chain to the current period; true when it moved
 * to a new one (or failed, and issues no tickets from now on).  The master calls this from its loop, so that it never
 * holds an old secret, and renews its pool of workers when it returns
 * true, so that no idle worker does (a worker ticks only when it issues
 * or accepts a ticket). */
bool tls_ticket_tick(void);

/* ---- the logic, exposed for tests/unit/test_tls_ticket.c ---- */

/* The keys of one period under that period's secret; false if HMAC
 * fails. */
bool tls_ticket_derive(const unsigned char secret[TLS_TICKET_SECRET_LEN],
                       uint64_t epoch, struct tls_ticket_keys *k);

/* One process's place in the ratchet: the secret of period epoch, the
 * keys of epoch and of epoch - 1 (when this chain has been through it). */
struct tls_ticket_chain {
    bool valid;
    uint64_t epoch;
    unsigned char secret[TLS_TICKET_SECRET_LEN];
    struct tls_ticket_keys cur, prev;
    bool have_prev;
};

/* A chain whose period epoch has secret; false if HMAC fails. */
bool tls_ticket_chain_start(struct tls_ticket_chain *c,
                            const unsigned char secret[TLS_TICKET_SECRET_LEN],
                            uint64_t epoch);

/* Moves c forward to period now_epoch (a clock that went back leaves it
 * where it is), wiping what it leaves behind; false if HMAC fails, with
 * c wiped (it then finds no ticket). */
bool tls_ticket_chain_advance(struct tls_ticket_chain *c, uint64_t now_epoch);

enum tls_ticket_match {
    TICKET_UNKNOWN = 0,   /* not ours, or too old: full handshake */
    TICKET_CURRENT = 1,   /* current key */
    TICKET_RENEW = 2,     /* previous key: accept and issue a new ticket */
};

/* Which of c's keys a ticket named name is under; *k receives that key
 * when the answer is not TICKET_UNKNOWN. */
enum tls_ticket_match
tls_ticket_chain_lookup(const struct tls_ticket_chain *c,
                        const unsigned char name[TLS_TICKET_NAME_LEN],
                        struct tls_ticket_keys *k);

#endif
