/* throttle.h - the master's memory of authentication failures.
 *
 * Guarantees, whatever the number of connections and session processes
 * (they all report to the one master, which keeps this table):
 *   - one client address (IPv6: its /64) gets at most auth_failure_limit
 *     failed AUTHs per auth_failure_window, plus those already under way
 *     when the limit was reached (at most max_connections_per_ip - 1:
 *     attempts are counted when they fail, so that many customers behind
 *     one address - a NAT, a CGNAT - can log in at the same moment); after
 *     that every AUTH from it is refused until the window has passed.
 *     Each failure is answered later than the one before (0.5 s
 *     doubling, at most 15 s);
 *   - once an account has THROTTLE_ATTACK_FAILURES failures in the window,
 *     passwords for it are checked at most once per THROTTLE_SPACING_MS for
 *     all addresses together, except from the addresses that logged in to
 *     it before: so a botnet cannot guess fast, and the customer, from its
 *     own address, still logs in at the first try;
 *   - a success resets its address, at most once per window (a guesser
 *     with one account of its own could otherwise log in between guesses);
 *   - memory is bounded: THROTTLE_ADDRS addresses and THROTTLE_ACCOUNTS
 *     accounts (names that do not exist count too), the oldest entry
 *     making room.
 * The table lives in the master's memory only: a restart starts empty,
 * a reload (SIGHUP) keeps it (docs/admin-guide.md says why).
 *
 * Pure logic: the caller passes the time, so unit tests need no clock. */
#ifndef ODMR_THROTTLE_H
#define ODMR_THROTTLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "accounts.h"

#define THROTTLE_ADDRS 4096
#define THROTTLE_ACCOUNTS 1024
#define THROTTLE_KNOWN 8                 /* remembered good addresses per account */
#define THROTTLE_ATTACK_FAILURES 5
#define THROTTLE_SPACING_MS 2000
#define THROTTLE_MAX_WAIT_MS 10000       /* beyond this an attempt is refused */
#define THROTTLE_DELAY_FIRST_MS 500
#define THROTTLE_DELAY_MAX_MS 15000
#define THROTTLE_KEY_MAX 64

struct throttle_conf {
    unsigned long limit;                 /* auth_failure_limit */
    int64_t window_ms;                   /* auth_failure_window */
};

/* The key an address counts under: the address itself, or for IPv6 its
 * /64 ("2001:db8:1:2::/64"), since one host there has a whole /64. */
void throttle_addr_key(const char *addr, char *key, size_t n);

void throttle_configure(const struct throttle_conf *c);
void throttle_reset(void);

struct throttle_begin {
    bool allowed;                        /* false: blocked */
    unsigned long attempts;              /* failures in the window */
};
/* An AUTH begins: refused when the address is blocked. */
struct throttle_begin throttle_auth_begins(const char *addr, int64_t now_ms);

enum throttle_verdict { THROTTLE_GO, THROTTLE_WAIT, THROTTLE_REFUSE };
/* Before a password of account is checked for addr: go now, wait
 * *wait_ms first, or refuse (the account is under attack and the queue of
 * checks is longer than THROTTLE_MAX_WAIT_MS). */
enum throttle_verdict throttle_account_turn(const char *addr, const char *account,
                                            int64_t now_ms, int64_t *wait_ms);

/* Has any account been under attack within the window?  When not, no
 * account's turn needs asking for (sessions skip that question). */
bool throttle_any_attack(int64_t now_ms);

struct throttle_failure {
    int64_t delay_ms;                    /* wait this long before 535 */
    unsigned long addr_failures;         /* in the window, this one included */
    unsigned long account_failures;
    bool now_blocked;                    /* this failure reached the limit */
    bool blocked;                        /* the address is blocked now */
    bool account_attacked;               /* this failure started the spacing */
};
/* Records a failed AUTH that began with throttle_auth_begins (account
 * may be "" when no name was given). */
struct throttle_failure throttle_failed(const char *addr, const char *account,
                                        int64_t now_ms);
/* Records a success: the address is forgiven and remembered as good for
 * the account. */
void throttle_succeeded(const char *addr, const char *account, int64_t now_ms);

#endif
