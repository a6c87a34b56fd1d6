/* throttle.c - the master's authentication failure table (throttle.h). */
#include "throttle.h"

#include <arpa/inet.h>
#include <string.h>

#include "../common/util.h"

struct addr_entry {
    char key[THROTTLE_KEY_MAX];          /* "" = free */
    unsigned long failures;              /* in the window that began at first_ms */
    int64_t first_ms, last_ms, blocked_until;
};

struct account_entry {
    char name[ACCOUNT_NAME_MAX + 1];     /* "" = free */
    unsigned long failures;              /* from addresses not known good */
    int64_t first_ms, last_ms, next_slot_ms;
    char known[THROTTLE_KNOWN][THROTTLE_KEY_MAX];
    int64_t known_ms[THROTTLE_KNOWN];
};

static struct throttle_conf conf = {10, 600000};
static struct addr_entry addrs[THROTTLE_ADDRS];
static struct account_entry accounts[THROTTLE_ACCOUNTS];

void throttle_configure(const struct throttle_conf *c)
{
    conf = *c;
    if (conf.limit == 0)
        conf.limit = 1;
}

void throttle_reset(void)
{
    memset(addrs, 0, sizeof addrs);
    memset(accounts, 0, sizeof accounts);
}

void throttle_addr_key(const char *addr, char *key, size_t n)
{
    struct in6_addr a6;
    if (strchr(addr, ':') && inet_pton(AF_INET6, addr, &a6) == 1) {
        char text[INET6_ADDRSTRLEN];
        memset(a6.s6_addr + 8, 0, 8);
        inet_ntop(AF_INET6, &a6, text, sizeof text);
        str_fmt(key, n, "%s/64", text);
        return;
    }
    str_copy(key, addr, n);
}

/* ------------------------------------------------------------ addresses */

/* Which entry makes room: a free one, else one that blocks nothing (so
 * that flooding the table does not lift a block cheaply), the oldest. */
static bool better_victim(const struct addr_entry *cand,
                          const struct addr_entry *cur, int64_t now)
{
    if (!cur)
        return true;
    if (!cur->key[0])
        return false;
    if (!cand->key[0])
        return true;
    bool cand_blocks = cand->blocked_until > now, cur_blocks = cur->blocked_until > now;
    if (cand_blocks != cur_blocks)
        return !cand_blocks;
    return cand->last_ms < cur->last_ms;
}

/* The entry of key, or (create) a new one in the room of a victim. */
static struct addr_entry *addr_entry(const char *key, bool create, int64_t now)
{
    struct addr_entry *victim = NULL;
    for (size_t i = 0; i < THROTTLE_ADDRS; i++) {
        struct addr_entry *e = &addrs[i];
        if (e->key[0] && !strcmp(e->key, key))
            return e;
        if (better_victim(e, victim, now))
            victim = e;
    }
    if (!create)
        return NULL;
    memset(victim, 0, sizeof *victim);
    str_copy(victim->key, key, sizeof victim->key);
    victim->first_ms = now;
    return victim;
}

/* A window that has passed (and no block running) starts over. */
static void addr_age(struct addr_entry *e, int64_t now)
{
    if (e->blocked_until > now)
        return;
    if (e->blocked_until || now - e->first_ms > conf.window_ms) {
        e->failures = 0;
        e->blocked_until = 0;
        e->first_ms = now;
    }
}

struct throttle_begin throttle_auth_begins(const char *addr, int64_t now_ms)
{
    struct throttle_begin b = {true, 0};
    char key[THROTTLE_KEY_MAX];
    throttle_addr_key(addr, key, sizeof key);
    struct addr_entry *e = addr_entry(key, false, now_ms);
    if (!e)
        return b;
    addr_age(e, now_ms);
    b.attempts = e->failures;
    b.allowed = e->blocked_until <= now_ms;
    return b;
}

static int64_t failure_delay(unsigned long failures)
{
    int64_t d = THROTTLE_DELAY_FIRST_MS;
    for (unsigned long i = 1; i < failures && d < THROTTLE_DELAY_MAX_MS; i++)
        d *= 2;
    return d < THROTTLE_DELAY_MAX_MS ? d : THROTTLE_DELAY_MAX_MS;
}

/* ------------------------------------------------------------- accounts */

static struct account_entry *account_entry(const char *name, bool create,
                                           int64_t now)
{
    struct account_entry *victim = NULL;
    for (size_t i = 0; i < THROTTLE_ACCOUNTS; i++) {
        struct account_entry *e = &accounts[i];
        if (e->name[0] && !strcmp(e->name, name))
            return e;
        if (!e->name[0] || !victim || (victim->name[0] && e->last_ms < victim->last_ms))
            victim = e;
    }
    if (!create)
        return NULL;
    memset(victim, 0, sizeof *victim);
    str_copy(victim->name, name, sizeof victim->name);
    victim->first_ms = now;
    return victim;
}

static void account_age(struct account_entry *e, int64_t now)
{
    if (now - e->first_ms > conf.window_ms) {
        e->failures = 0;
        e->first_ms = now;
    }
}

static bool known_address(const struct account_entry *e, const char *key)
{
    for (size_t i = 0; i < THROTTLE_KNOWN; i++)
        if (e->known[i][0] && !strcmp(e->known[i], key))
            return true;
    return false;
}

static void remember_address(struct account_entry *e, const char *key, int64_t now)
{
    size_t slot = 0;
    for (size_t i = 0; i < THROTTLE_KNOWN; i++) {
        if (!strcmp(e->known[i], key)) {
            slot = i;
            break;
        }
        if (e->known_ms[i] < e->known_ms[slot])
            slot = i;   /* the free (0) or least recently used one */
    }
    str_copy(e->known[slot], key, sizeof e->known[slot]);
    e->known_ms[slot] = now;
}

enum throttle_verdict throttle_account_turn(const char *addr, const char *account,
                                            int64_t now_ms, int64_t *wait_ms)
{
    char key[THROTTLE_KEY_MAX];
    *wait_ms = 0;
    struct account_entry *e = account_entry(account, false, now_ms);
    if (!e)
        return THROTTLE_GO;
    account_age(e, now_ms);
    throttle_addr_key(addr, key, sizeof key);
    if (e->failures < THROTTLE_ATTACK_FAILURES || known_address(e, key))
        return THROTTLE_GO;
    int64_t slot = e->next_slot_ms > now_ms ? e->next_slot_ms : now_ms;
    if (slot - now_ms > THROTTLE_MAX_WAIT_MS)
        return THROTTLE_REFUSE;
    e->next_slot_ms = slot + THROTTLE_SPACING_MS;
    *wait_ms = slot - now_ms;
    return *wait_ms ? THROTTLE_WAIT : THROTTLE_GO;
}

/* ------------------------------------------------------------- outcomes */

static void account_failed(struct throttle_failure *f, const char *key,
                           const char *account, int64_t now)
{
    if (!account[0])
        return;
    struct account_entry *e = account_entry(account, true, now);
    e->last_ms = now;
    account_age(e, now);
    if (!known_address(e, key) && ++e->failures == THROTTLE_ATTACK_FAILURES)
        f->account_attacked = true;
    f->account_failures = e->failures;
}

struct throttle_failure throttle_failed(const char *addr, const char *account,
                                        int64_t now_ms)
{
    struct throttle_failure f = {0};
    char key[THROTTLE_KEY_MAX];
    throttle_addr_key(addr, key, sizeof key);
    struct addr_entry *e = addr_entry(key, true, now_ms);
    e->last_ms = now_ms;
    addr_age(e, now_ms);
    f.addr_failures = ++e->failures;
    if (e->failures >= conf.limit && e->blocked_until <= now_ms) {
        e->blocked_until = now_ms + conf.window_ms;
        f.now_blocked = true;
    }
    f.delay_ms = failure_delay(e->failures);
    account_failed(&f, key, account ? account : "", now_ms);
    return f;
}

void throttle_succeeded(const char *addr, const char *account, int64_t now_ms)
{
    char key[THROTTLE_KEY_MAX];
    throttle_addr_key(addr, key, sizeof key);
    struct addr_entry *e = addr_entry(key, false, now_ms);
    if (e)
        memset(e, 0, sizeof *e);
    if (!account || !account[0])
        return;
    struct account_entry *a = account_entry(account, true, now_ms);
    a->last_ms = now_ms;
    remember_address(a, key, now_ms);
}
