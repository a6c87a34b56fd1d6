/* recipients.c - per-domain recipient lists (recipients.h). */
#include "recipients.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"
#include "accounts_db.h"

#define LIST_PREFIX "R:"
#define ENTRY_PREFIX "r:"
#define RKEY_MAX (2 + IDNA_KEY_MAX + 1 + ADDR_LOCAL_MAX)

/* "R:<domain key>"; false when the domain has no key. */
static bool list_key(char *buf, size_t n, const char *domain, char *dkey)
{
    return idna_domain_key(domain, dkey, IDNA_KEY_MAX + 1, NULL) == IDNA_OK &&
           str_fmt(buf, n, LIST_PREFIX "%s", dkey);
}

/* "r:<domain key>:<local, ASCII lower-cased>"; false for a local part that
 * cannot be one (empty, too long, control characters). */
static bool entry_key(char *buf, size_t n, const char *dkey, const char *local,
                      size_t len)
{
    addr_local_unquote(&local, &len);
    if (len == 0 || len > ADDR_LOCAL_MAX)
        return false;
    int head = snprintf(buf, n, ENTRY_PREFIX "%s:", dkey);
    if (head < 0 || (size_t)head + len >= n)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)local[i];
        if (c < 0x21 || c == 0x7f)
            return false;
        buf[head + i] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    buf[head + len] = '\0';
    return true;
}

static bool has_entry(GDBM_FILE dbf, const char *dkey, const char *local,
                      size_t len)
{
    char key[RKEY_MAX + 1];
    return entry_key(key, sizeof key, dkey, local, len) && acctdb_exists(dbf, key);
}

/* Listed as is, as "user" for "user+detail", caught by "@", or the
 * postmaster, whom every domain must accept (RFC 5321 4.5.1). */
static bool listed(GDBM_FILE dbf, const char *dkey, const char *local)
{
    size_t len = strlen(local);
    if (!strcasecmp(local, "postmaster"))
        return true;
    const char *plus = local[0] != '"' ? strchr(local, '+') : NULL;
    return has_entry(dbf, dkey, local, len) ||
           (plus && plus > local && has_entry(dbf, dkey, local, (size_t)(plus - local))) ||
           has_entry(dbf, dkey, RECIPIENT_CATCHALL, 1);
}

static enum rcpt_result owner_of(const char *db, GDBM_FILE dbf, const char *domain,
                                 char *owner, size_t n)
{
    char dk[ACCOUNTS_KEY_MAX + 1];
    size_t len;
    enum acct_result r;
    if (!acctdb_domain_key(dk, domain))
        return RCPT_NO_DOMAIN;
    char *name = acctdb_fetch(db, dbf, dk, &len, &r);
    if (!name)
        return r == ACCT_NOTFOUND ? RCPT_NO_DOMAIN : RCPT_TEMPFAIL;
    bool fits = !owner || str_copy(owner, name, n);
    free(name);
    return fits ? RCPT_VALID : RCPT_TEMPFAIL;
}

static enum rcpt_result from_acct(enum acct_result r)
{
    return r == ACCT_OK ? RCPT_VALID : r == ACCT_NOTFOUND ? RCPT_NO_DOMAIN
                                                          : RCPT_TEMPFAIL;
}

/* ------------------------------------------------------- kept answers */

/* Each RCPT opened the database: 13 system calls (open, lock, three reads,
 * mmap, ..., close), in session processes that live for many sessions and
 * mostly see the same few domains.  So the answers that do not depend on
 * the local part - a domain without a list, a domain not hosted - are
 * kept with the identity the file had when they were read (fstat under
 * GDBM's lock: device, inode, size, mtime, ctime) and given again while a
 * stat of the path still shows that identity: one system call.  odmrctl
 * changing the file in place or replacing it changes the identity, and
 * ctime cannot be set back.  File times have the kernel's coarse clock
 * granularity, so an answer read less than KEPT_SETTLE_S after the file's
 * last change is not kept (accounts.c's kept handle has the same rule).
 * A forked child may use its parent's answers: they are plain data. */
#define KEPT_SETTLE_S 2
#define KEPT_ANSWERS 16

struct kept_answer {
    char dkey[IDNA_KEY_MAX + 1];
    enum rcpt_result r;          /* RCPT_VALID (no list) or RCPT_NO_DOMAIN */
    char owner[ACCOUNT_NAME_MAX + 1];
};

static struct {
    char db[PATH_MAX];
    struct stat st;              /* the file the answers were read from */
    size_t n, next;
    struct kept_answer a[KEPT_ANSWERS];
} kept;

/* The kept answer for dkey while db is still the file it came from. */
static const struct kept_answer *kept_find(const char *db, const char *dkey)
{
    struct stat now;
    const struct kept_answer *found = NULL;
    for (size_t i = 0; i < kept.n && !found; i++)
        if (!strcmp(kept.a[i].dkey, dkey))
            found = &kept.a[i];
    if (!found || strcmp(kept.db, db) || stat(db, &now) != 0 ||
        !stat_same_file(&now, &kept.st))
        return NULL;
    return found;
}

/* Keeps an answer read from the file st describes (st_ino 0: unknown). */
static void kept_add(const char *db, const struct stat *st, const char *dkey,
                     enum rcpt_result r, const char *owner)
{
    if (!st->st_ino || time(NULL) - st->st_ctim.tv_sec < KEPT_SETTLE_S)
        return;
    if (strcmp(kept.db, db) || !stat_same_file(st, &kept.st)) {
        if (!str_copy(kept.db, db, sizeof kept.db))
            return;
        kept.st = *st;
        kept.n = kept.next = 0;
    }
    struct kept_answer *a = &kept.a[kept.next];
    kept.next = (kept.next + 1) % KEPT_ANSWERS;
    if (kept.n < KEPT_ANSWERS)
        kept.n++;
    str_copy(a->dkey, dkey, sizeof a->dkey);
    a->r = r;
    str_copy(a->owner, owner ? owner : "", sizeof a->owner);
}

static enum rcpt_result kept_answer(const struct kept_answer *a, char *owner,
                                    size_t n)
{
    if (owner && n && a->r == RCPT_VALID && !str_copy(owner, a->owner, n))
        return RCPT_TEMPFAIL;
    return a->r;
}

/* ------------------------------------------------------------- lookup */

/* The database's answer; *st receives the file's identity under GDBM's
 * lock (st_ino 0 when it cannot be known). */
static enum rcpt_result lookup(const char *db, const char *domain,
                               const char *lkey, const char *dkey,
                               const char *local, char *owner, size_t n,
                               bool *list, struct stat *st)
{
    GDBM_FILE dbf;
    *list = false;
    st->st_ino = 0;
    enum acct_result ar = acctdb_open(db, DB_READ, &dbf);
    if (ar != ACCT_OK)
        return from_acct(ar == ACCT_NODB ? ACCT_NOTFOUND : ar);
    if (!dbf || fstat(gdbm_fdesc(dbf), st) != 0)
        st->st_ino = 0;
    enum rcpt_result r = owner_of(db, dbf, domain, owner, n);
    if (r == RCPT_VALID && (*list = acctdb_exists(dbf, lkey)) &&
        !listed(dbf, dkey, local))
        r = RCPT_UNKNOWN_USER;
    acctdb_close_reader(dbf);
    /* a binding stored by an older version under its UTF-8 spelling:
     * accounts.c knows how to find it (such domains have no list) */
    if (r == RCPT_NO_DOMAIN)
        r = from_acct(accounts_domain_owner(db, domain, owner, n));
    return r;
}

enum rcpt_result recipients_check(const char *db, const char *domain,
                                  const char *local, char *owner, size_t n,
                                  bool *has_list)
{
    char lkey[RKEY_MAX + 1], dkey[IDNA_KEY_MAX + 1];
    bool list = false;
    struct stat st;
    if (has_list)
        *has_list = false;
    if (!list_key(lkey, sizeof lkey, domain, dkey))
        return RCPT_NO_DOMAIN;
    const struct kept_answer *a = kept_find(db, dkey);
    if (a)
        return kept_answer(a, owner, n);
    enum rcpt_result r = lookup(db, domain, lkey, dkey, local, owner, n, &list,
                                &st);
    if (has_list)
        *has_list = list;
    if ((r == RCPT_VALID && !list) || r == RCPT_NO_DOMAIN)
        kept_add(db, &st, dkey, r, r == RCPT_VALID ? owner : NULL);
    return r;
}

struct local_list {
    char **v;
    size_t n, cap;
    bool count_only;   /* n counts the keys; nothing is kept */
};

static void locals_free(struct local_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static bool locals_add(struct local_list *l, const char *s, size_t len)
{
    if (l->count_only) {
        l->n++;
        return true;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        char **v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return false;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n] = strndup(s, len);
    if (!l->v[l->n])
        return false;
    l->n++;
    return true;
}

/* The local parts of every key that starts with prefix (a traversal of
 * the whole file: for odmrctl, never for a session). */
static enum acct_result collect(const char *db, GDBM_FILE dbf, const char *prefix,
                                struct local_list *l)
{
    size_t plen = strlen(prefix);
    datum k = gdbm_firstkey(dbf);
    while (k.dptr) {
        size_t len = k.dsize > 0 ? (size_t)k.dsize : 0;
        bool ok = len <= plen || memcmp(k.dptr, prefix, plen) ||
                  memchr(k.dptr, '\0', len) ||
                  locals_add(l, k.dptr + plen, len - plen);
        datum next = gdbm_nextkey(dbf, k);
        free(k.dptr);
        if (!ok)
            return ACCT_TEMPFAIL;
        k = next;
    }
    if (gdbm_errno != GDBM_ITEM_NOT_FOUND) {
        log_err("accounts database %s: traversal: %s", db, gdbm_strerror(gdbm_errno));
        return ACCT_TEMPFAIL;
    }
    return ACCT_OK;
}

bool recipients_routed(const char *local)
{
    if (strpbrk(local, "%!"))
        return true;
    return local[0] == '"' && strchr(local, '@');
}

/* ------------------------------------------------------------ changes */

static unsigned long list_count(const char *db, GDBM_FILE dbf, const char *lkey)
{
    size_t len;
    enum acct_result r;
    char *v = acctdb_fetch(db, dbf, lkey, &len, &r);
    unsigned long count = 0;
    if (v && !parse_ulong(v, ~0UL, &count))
        count = 0;
    free(v);
    return count;
}

static enum acct_result set_count(const char *db, GDBM_FILE dbf, const char *lkey,
                                  unsigned long count)
{
    char v[32];
    if (count == 0)
        return acctdb_exists(dbf, lkey) ? acctdb_delete(db, dbf, lkey) : ACCT_OK;
    snprintf(v, sizeof v, "%lu", count);
    return acctdb_store(db, dbf, lkey, v, strlen(v), GDBM_REPLACE);
}

static enum acct_result change_one(const char *db, GDBM_FILE dbf, const char *dkey,
                                   const char *local, bool add, size_t *changed)
{
    char key[RKEY_MAX + 1];
    if (!entry_key(key, sizeof key, dkey, local, strlen(local)))
        return ACCT_NOTFOUND;
    enum acct_result r = add ? acctdb_store(db, dbf, key, "", 0, GDBM_INSERT)
                         : acctdb_exists(dbf, key) ? acctdb_delete(db, dbf, key)
                                                   : ACCT_EXISTS;
    if (r == ACCT_OK)
        ++*changed;
    return r == ACCT_EXISTS ? ACCT_OK : r;   /* already so: nothing to do */
}

/* The entries of a domain whose list is not on yet: those of held
 * batches before this one count too. */
static enum acct_result count_entries(const char *db, GDBM_FILE dbf,
                                      const char *dkey, unsigned long *count)
{
    char prefix[RKEY_MAX + 1];
    struct local_list l = {.count_only = true};
    snprintf(prefix, sizeof prefix, ENTRY_PREFIX "%s:", dkey);
    enum acct_result r = collect(db, dbf, prefix, &l);
    *count = l.n;
    return r;
}

/* After a batch failed half way on a list that is on: the entries it did
 * change are not in the stored count, and running it again would not
 * count them (they are there, or gone, already).  A count left too low
 * would switch the list off while entries remain, one too high leave an
 * empty list on.  Best effort: the batch has failed already. */
static void recount(const char *db, GDBM_FILE dbf, const char *lkey,
                    const char *dkey)
{
    unsigned long count;
    if (count_entries(db, dbf, dkey, &count) == ACCT_OK)
        set_count(db, dbf, lkey, count);
}

static enum acct_result store_count(const char *db, GDBM_FILE dbf,
                                    const char *lkey, const char *dkey,
                                    bool add, size_t changed)
{
    unsigned long count = 0;
    if (add && !acctdb_exists(dbf, lkey)) {
        enum acct_result r = count_entries(db, dbf, dkey, &count);
        if (r != ACCT_OK)
            return r;
    } else {
        count = list_count(db, dbf, lkey);
        count = add ? count + changed : count > changed ? count - changed : 0;
    }
    return set_count(db, dbf, lkey, count);
}

enum acct_result recipients_change(const char *db, const char *domain,
                                   const char *const *locals, size_t n,
                                   bool add, bool hold, size_t *changed)
{
    char lkey[RKEY_MAX + 1], dkey[IDNA_KEY_MAX + 1];
    *changed = 0;
    if (!list_key(lkey, sizeof lkey, domain, dkey))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_WRITE, &dbf);
    if (r != ACCT_OK)
        return r;
    if (owner_of(db, dbf, domain, NULL, 0) != RCPT_VALID)
        r = ACCT_NOTFOUND;   /* lists belong to hosted domains only */
    for (size_t i = 0; r == ACCT_OK && i < n; i++)
        r = change_one(db, dbf, dkey, locals[i], add, changed);
    if (r == ACCT_OK && !(hold && add && !acctdb_exists(dbf, lkey)))
        r = store_count(db, dbf, lkey, dkey, add, *changed);
    else if (r != ACCT_OK && *changed > 0 && acctdb_exists(dbf, lkey))
        recount(db, dbf, lkey, dkey);
    return acctdb_close_writer(db, dbf, r);
}

enum acct_result recipients_count(const char *db, const char *domain,
                                  unsigned long *count)
{
    char lkey[RKEY_MAX + 1], dkey[IDNA_KEY_MAX + 1];
    *count = 0;
    if (!list_key(lkey, sizeof lkey, domain, dkey))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_READ, &dbf);
    if (r != ACCT_OK || !dbf)
        return r == ACCT_OK || r == ACCT_NODB ? ACCT_NOTFOUND : r;
    r = acctdb_exists(dbf, lkey) ? ACCT_OK : ACCT_NOTFOUND;
    if (r == ACCT_OK)
        *count = list_count(db, dbf, lkey);
    acctdb_close_reader(dbf);
    return r;
}

/* ------------------------------------------------------------ listing */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

enum acct_result recipients_list(const char *db, const char *domain,
                                 void (*fn)(void *ctx, const char *local),
                                 void *ctx)
{
    char lkey[RKEY_MAX + 1], dkey[IDNA_KEY_MAX + 1], prefix[RKEY_MAX + 1];
    if (!list_key(lkey, sizeof lkey, domain, dkey))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_READ, &dbf);
    if (r != ACCT_OK || !dbf)
        return r == ACCT_OK || r == ACCT_NODB ? ACCT_NOTFOUND : r;
    struct local_list l = {0};
    snprintf(prefix, sizeof prefix, ENTRY_PREFIX "%s:", dkey);
    r = acctdb_exists(dbf, lkey) ? collect(db, dbf, prefix, &l) : ACCT_NOTFOUND;
    acctdb_close_reader(dbf);
    if (r == ACCT_OK) {
        qsort(l.v, l.n, sizeof *l.v, cmp_str);
        for (size_t i = 0; i < l.n; i++)
            fn(ctx, l.v[i]);
    }
    locals_free(&l);
    return r;
}

enum acct_result recipients_drop(const char *db, const char *domain)
{
    char lkey[RKEY_MAX + 1], dkey[IDNA_KEY_MAX + 1], prefix[RKEY_MAX + 1];
    char key[RKEY_MAX + 1];
    if (!list_key(lkey, sizeof lkey, domain, dkey))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_WRITE, &dbf);
    if (r != ACCT_OK)
        return r;
    struct local_list l = {0};
    snprintf(prefix, sizeof prefix, ENTRY_PREFIX "%s:", dkey);
    /* the whole list is collected first: deleting during a traversal can
     * skip keys */
    r = collect(db, dbf, prefix, &l);
    for (size_t i = 0; r == ACCT_OK && i < l.n; i++)
        if (str_fmt(key, sizeof key, "%s%s", prefix, l.v[i]))
            r = acctdb_delete(db, dbf, key);
    if (r == ACCT_OK)
        r = set_count(db, dbf, lkey, 0);
    locals_free(&l);
    return acctdb_close_writer(db, dbf, r);
}
