/* throttle.c - the master's authentication failure table (throttle.h). */
#include "throttle.h"

#include <arpa/inet.h>
#include <string.h>

#include "../common/util.h"

struct addr_entry {
    char key[THROTTLE_KEY_MAX];          /* "" = free */
    unsigned long failures;              /* in the window that began at first_ms */
    int64_t first_ms, last_ms, blocked_until;
    int64_t forgiven_ms;                 /* last success that reset it, 0 */
};

struct account_entry {
    char name[ACCOUNT_NAME_MAX + 1];     /* "" = free */
    unsigned long failures;              /* from addresses not known good */
    int64_t first_ms, last_ms, next_slot_ms;
    char known[THROTTLE_KNOWN][THROTTLE_KEY_MAX];
    int64_t known_ms[THROTTLE_KNOWN];
};

static struct throttle_conf conf = {10, 600000};
static int64_t last_attack_ms = -1;      /* an account last came under attack */
static struct addr_entry addrs[THROTTLE_ADDRS];
static struct account_entry accounts[THROTTLE_ACCOUNTS];

/* ------------------------------------------------------------- indexes */

/* Every AUTH looks an address and an account up: a hash index (open
 * addressing, twice the table's size, tombstones) finds an entry in about
 * one probe instead of a scan of thousands.  Only a new entry, which must
 * find room, scans its table. */
#define SLOT_FREE (-1)
#define SLOT_GONE (-2)

struct name_index {
    int16_t slot[2 * THROTTLE_ADDRS];
    size_t nslots, gone;
    const char *(*key_of)(size_t entry);
};

static const char *addr_key_of(size_t i) { return addrs[i].key; }
static const char *account_key_of(size_t i) { return accounts[i].name; }

static struct name_index addr_index = {.nslots = 2 * THROTTLE_ADDRS,
                                       .key_of = addr_key_of};
static struct name_index account_index = {.nslots = 2 * THROTTLE_ACCOUNTS,
                                          .key_of = account_key_of};

static size_t name_hash(const char *s, size_t nslots)
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % nslots;
}

static void index_clear(struct name_index *ix)
{
    for (size_t i = 0; i < ix->nslots; i++)
        ix->slot[i] = SLOT_FREE;
    ix->gone = 0;
}

/* The slot holding key, or -1. */
static long index_find(const struct name_index *ix, const char *key)
{
    size_t h = name_hash(key, ix->nslots);
    for (size_t n = 0; n < ix->nslots; n++, h = (h + 1) % ix->nslots) {
        int e = ix->slot[h];
        if (e == SLOT_FREE)
            return -1;
        if (e >= 0 && !strcmp(ix->key_of((size_t)e), key))
            return (long)h;
    }
    return -1;
}

static void index_add(struct name_index *ix, const char *key, size_t entry)
{
    size_t h = name_hash(key, ix->nslots);
    while (ix->slot[h] >= 0)
        h = (h + 1) % ix->nslots;
    if (ix->slot[h] == SLOT_GONE)
        ix->gone--;
    ix->slot[h] = (int16_t)entry;
}

static void index_rebuild(struct name_index *ix, size_t entries)
{
    index_clear(ix);
    for (size_t i = 0; i < entries; i++)
        if (ix->key_of(i)[0])
            index_add(ix, ix->key_of(i), i);
}

/* key (still in its entry) leaves the index; the caller then changes the
 * entry and calls index_tidy. */
static void index_remove(struct name_index *ix, const char *key)
{
    long h = index_find(ix, key);
    if (h >= 0) {
        ix->slot[h] = SLOT_GONE;
        ix->gone++;
    }
}

/* Too many tombstones make probes long: start afresh. */
static void index_tidy(struct name_index *ix, size_t entries)
{
    if (ix->gone > ix->nslots / 4)
        index_rebuild(ix, entries);
}

static void tables_ready(void)
{
    static bool ready;
    if (!ready) {
        index_clear(&addr_index);
        index_clear(&account_index);
        ready = true;
    }
}

static long index_entry(const struct name_index *ix, const char *key)
{
    long h = index_find(ix, key);
    return h < 0 ? -1 : ix->slot[h];
}

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
    last_attack_ms = -1;
    index_clear(&addr_index);
    index_clear(&account_index);
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
    tables_ready();
    long found = index_entry(&addr_index, key);
    if (found >= 0)
        return &addrs[found];
    if (!create)
        return NULL;
    struct addr_entry *victim = NULL;
    for (size_t i = 0; i < THROTTLE_ADDRS; i++)
        if (better_victim(&addrs[i], victim, now))
            victim = &addrs[i];
    if (victim->key[0])
        index_remove(&addr_index, victim->key);
    memset(victim, 0, sizeof *victim);
    str_copy(victim->key, key, sizeof victim->key);
    victim->first_ms = now;
    index_add(&addr_index, victim->key, (size_t)(victim - addrs));
    index_tidy(&addr_index, THROTTLE_ADDRS);
    return victim;
}

/* A success forgets the address's failures, once per window: the
 * customers behind a NAT should not pay for one typing error, but a
 * guesser that owns one account must not wipe its count with a login
 * after every few guesses. */
static void addr_forgive(struct addr_entry *e, int64_t now)
{
    if (e->forgiven_ms && now - e->forgiven_ms <= conf.window_ms)
        return;
    e->failures = 0;
    e->blocked_until = 0;
    e->first_ms = now;
    e->forgiven_ms = now;
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
    tables_ready();
    long found = index_entry(&account_index, name);
    if (found >= 0)
        return &accounts[found];
    if (!create)
        return NULL;
    struct account_entry *victim = NULL;
    for (size_t i = 0; i < THROTTLE_ACCOUNTS; i++) {
        struct account_entry *e = &accounts[i];
        if (!victim || (victim->name[0] && (!e->name[0] || e->last_ms < victim->last_ms)))
            victim = e;
    }
    if (victim->name[0])
        index_remove(&account_index, victim->name);
    memset(victim, 0, sizeof *victim);
    str_copy(victim->name, name, sizeof victim->name);
    victim->first_ms = now;
    index_add(&account_index, victim->name, (size_t)(victim - accounts));
    index_tidy(&account_index, THROTTLE_ACCOUNTS);
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
    if (!known_address(e, key) && ++e->failures >= THROTTLE_ATTACK_FAILURES) {
        f->account_attacked = e->failures == THROTTLE_ATTACK_FAILURES;
        last_attack_ms = now;
    }
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
    f.blocked = e->blocked_until > now_ms;
    f.delay_ms = failure_delay(e->failures);
    account_failed(&f, key, account ? account : "", now_ms);
    return f;
}

bool throttle_any_attack(int64_t now_ms)
{
    return last_attack_ms >= 0 && now_ms - last_attack_ms <= conf.window_ms;
}

void throttle_succeeded(const char *addr, const char *account, int64_t now_ms)
{
    char key[THROTTLE_KEY_MAX];
    throttle_addr_key(addr, key, sizeof key);
    struct addr_entry *e = addr_entry(key, false, now_ms);
    if (e)
        addr_forgive(e, now_ms);
    if (!account || !account[0])
        return;
    struct account_entry *a = account_entry(account, true, now_ms);
    a->last_ms = now_ms;
    remember_address(a, key, now_ms);
}
