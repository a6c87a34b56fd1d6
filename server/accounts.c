/* accounts.c - the GDBM account and domain database (format in accounts.h).
 *
 * Writers and listings open the file, do their work and close it again;
 * the two lookups of a poll (password, domain owner) reuse a handle kept
 * open but unlocked between calls (see "kept open" below).  Either way
 * the GDBM lock is held for milliseconds and a running odmrd sees
 * odmrctl's changes at its next lookup.  GDBM locks are non-blocking: an open that
 * meets a writer's lock fails at once, so opens are retried with short
 * sleeps for a bounded time before giving up with ACCT_TEMPFAIL.
 *
 * Invalid arguments (a bad account name or domain, a password that cannot
 * be stored) are reported as ACCT_NOTFOUND: nothing by that name can exist
 * in the database.  Callers that want a precise message validate first
 * (account_name_valid, idna_domain_key).
 *
 * Passwords are never logged, and buffers that held one are wiped. */
#include "accounts.h"
#include "accounts_db.h"

#include <errno.h>
#include <fcntl.h>
#include <gdbm.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../common/addr.h"
#include "../common/idna.h"
#include "../common/log.h"
#include "../common/util.h"

#define USER_PREFIX "u:"
#define DOMAIN_PREFIX "d:"
#define PREFIX_LEN 2
#define VALUE_VERSION "v1\n"
#define VALUE_VERSION_LEN 3
/* Long enough for "u:<name>" and "d:<domain>". */
#define KEY_MAX (PREFIX_LEN + (ACCOUNT_NAME_MAX > ADDR_DOMAIN_MAX \
                               ? ACCOUNT_NAME_MAX : ADDR_DOMAIN_MAX))
/* Lock waits: 10 ms doubling to 100 ms, about 3 s in all.  Long enough to
 * outlast any odmrctl change, short enough that an SMTP client does not
 * time out while odmrd waits. */
#define LOCK_WAIT_FIRST_MS 10
#define LOCK_WAIT_STEP_MAX_MS 100
#define LOCK_WAIT_TOTAL_MS 3000


/* ------------------------------------------------------------ validation */

bool account_name_valid(const char *name)
{
    if (!name)
        return false;
    size_t len = strnlen(name, ACCOUNT_NAME_MAX + 1);
    if (len == 0 || len > ACCOUNT_NAME_MAX)
        return false;
    for (const char *p = name; *p; p++) {
        unsigned char c = (unsigned char)*p;
        /* ':' would make "u:a:b" ambiguous in tools that split keys. */
        if (c < 0x21 || c > 0x7e || c == ':')
            return false;
    }
    return true;
}

/* CR and LF would break the "v1\n<password>\n" value format. */
static bool password_storable(const char *password)
{
    if (!password)
        return false;
    size_t len = strnlen(password, PASSWORD_MAX + 1);
    return len > 0 && len <= PASSWORD_MAX && !strpbrk(password, "\r\n");
}

static bool domain_usable(const char *domain)
{
    char key[IDNA_KEY_MAX + 1];
    return domain && addr_valid_domain(domain, true) &&
           idna_domain_key(domain, key, sizeof key, NULL) == IDNA_OK;
}

/* "u:<name>" into key (KEY_MAX + 1 bytes). */
static bool user_key(char *key, const char *name)
{
    if (!account_name_valid(name))
        return false;
    snprintf(key, KEY_MAX + 1, USER_PREFIX "%s", name);
    return true;
}

/* "d:<domain key>" into key (KEY_MAX + 1 bytes): the IDNA key, so a
 * U-label domain and its A-label form are one binding.  A name that is not
 * a valid domain has no key and is simply not found. */
bool acctdb_domain_key(char *key, const char *domain)
{
    char dkey[IDNA_KEY_MAX + 1];
    if (!domain || idna_domain_key(domain, dkey, sizeof dkey, NULL) != IDNA_OK)
        return false;
    snprintf(key, KEY_MAX + 1, DOMAIN_PREFIX "%s", dkey);
    return true;
}

/* Databases written before IDNA keys stored a UTF-8 domain as written
 * (lower-cased ASCII only).  Such a binding is still found by this key
 * when the IDNA key finds nothing; false when there is no other key to
 * try (idna, the IDNA key or "", is the same). */
static bool legacy_domain_key(char *key, const char *domain, const char *idna)
{
    if (!domain || !*domain || strnlen(domain, ADDR_DOMAIN_MAX + 1) > ADDR_DOMAIN_MAX)
        return false;
    char lower[ADDR_DOMAIN_MAX + 1];
    addr_domain_key(domain, lower, sizeof lower);
    snprintf(key, KEY_MAX + 1, DOMAIN_PREFIX "%s", lower);
    return strcmp(key, idna) != 0;
}

/* Every key an older database may hold this domain's binding under: the
 * spelling given, and the Unicode form of its IDNA key (sessions ask by
 * the IDNA key, which is not how a UTF-8 binding was once stored).
 * Returns how many (0 to 2), each different from key and from the other. */
static int legacy_domain_keys(char keys[2][KEY_MAX + 1], const char *domain,
                              const char *key)
{
    int n = legacy_domain_key(keys[0], domain, key) ? 1 : 0;
    if (*key) {
        char shown[4 * ADDR_DOMAIN_MAX + 1];
        idna_display(key + strlen(DOMAIN_PREFIX), shown, sizeof shown);
        if (legacy_domain_key(keys[n], shown, key) &&
            (n == 0 || strcmp(keys[0], keys[1]) != 0))
            n++;
    }
    return n;
}

static datum make_datum(const char *s, size_t len)
{
    datum d = {(char *)s, (int)len};
    return d;
}

static void wipe_free(void *p, size_t len)
{
    if (p) {
        explicit_bzero(p, len);
        free(p);
    }
}

/* ------------------------------------------------------------ open/close */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static bool lock_busy(int gerr, int err)
{
    return gerr == GDBM_CANT_BE_READER || gerr == GDBM_CANT_BE_WRITER ||
           err == EAGAIN || err == EWOULDBLOCK;
}

static enum acct_result open_failure(const char *db, int gerr, int err)
{
    if (gerr == GDBM_FILE_OPEN_ERROR || gerr == GDBM_FILE_STAT_ERROR) {
        if (err == ENOENT || err == ENOTDIR)
            return ACCT_NODB;
        if (err == EACCES || err == EPERM) {
            log_err("accounts database %s: %s", db, strerror(err));
            return ACCT_PERM;
        }
    }
    if (gdbm_check_syserr(gerr) && err)
        log_err("accounts database %s: %s: %s", db, gdbm_strerror(gerr),
                strerror(err));
    else
        log_err("accounts database %s: %s", db, gdbm_strerror(gerr));
    return ACCT_TEMPFAIL;
}

/* A database created by a writer is made mode 0600 explicitly: the mode
 * given to open() is reduced by the umask, and a umask such as 0277 would
 * otherwise leave a file its owner cannot update. */
static void set_private_mode(GDBM_FILE dbf)
{
    int fd = gdbm_fdesc(dbf);
    if (fd >= 0 && fchmod(fd, 0600) != 0)
        log_warn("accounts database: cannot set mode 0600: %s", strerror(errno));
}

/* An accounts file of 0 bytes: a writer creating it has not written its
 * header yet (no entries), or - once it has stayed empty for
 * EMPTY_SETTLE_S - it was truncated (a full disk, a slip of the shell).
 * Then every AUTH would be 535 and count towards the failure limits, and
 * every ATRN 450: a temporary failure with a clear line instead. */
#define EMPTY_SETTLE_S 5

static bool empty_means_none;

void accounts_empty_means_none(void)
{
    empty_means_none = true;
}

static enum acct_result empty_file(const char *db, const struct stat *st)
{
    if (empty_means_none || time(NULL) - st->st_mtim.tv_sec < EMPTY_SETTLE_S)
        return ACCT_OK;
    log_err("accounts database %s is empty (0 bytes) and nothing is writing "
            "it: restore it from a backup (every lookup fails until then)", db);
    return ACCT_TEMPFAIL;
}

/* Opens db, retrying while another process holds a conflicting lock.
 * For DB_READ, *dbf may be NULL with ACCT_OK: the file exists but is empty
 * (a writer is creating it right now, or odmrctl reading it), which means
 * "no entries"; empty for longer in a session, it is ACCT_TEMPFAIL
 * (empty_file). */
enum acct_result acctdb_open(const char *db, enum db_mode mode,
                                GDBM_FILE *dbf)
{
    int flags = mode == DB_READ ? GDBM_READER
              : mode == DB_WRITE ? GDBM_WRITER : GDBM_WRCREAT;
    struct stat st;
    bool existed = stat(db, &st) == 0;
    long waited = 0, step = LOCK_WAIT_FIRST_MS;

    *dbf = NULL;
    for (;;) {
        errno = 0;
        *dbf = gdbm_open(db, 0, flags | GDBM_CLOEXEC, 0600, NULL);
        int gerr = gdbm_errno, err = errno;
        if (*dbf) {
            if (mode == DB_CREATE && !existed)
                set_private_mode(*dbf);
            return ACCT_OK;
        }
        if (mode == DB_READ && gerr == GDBM_EMPTY_DATABASE)
            return stat(db, &st) == 0 ? empty_file(db, &st) : ACCT_OK;
        if (!lock_busy(gerr, err))
            return open_failure(db, gerr, err);
        if (waited >= LOCK_WAIT_TOTAL_MS) {
            log_warn("accounts database %s: still locked after %ld ms",
                     db, waited);
            return ACCT_TEMPFAIL;
        }
        sleep_ms(step);
        waited += step;
        step = step * 2 > LOCK_WAIT_STEP_MAX_MS ? LOCK_WAIT_STEP_MAX_MS : step * 2;
    }
}

void acctdb_close_reader(GDBM_FILE dbf)
{
    if (dbf)
        gdbm_close(dbf);
}

/* Writers sync before closing: a change odmrctl reported as done must
 * survive a crash.  A failure here turns an OK into TEMPFAIL. */
enum acct_result acctdb_close_writer(const char *db, GDBM_FILE dbf,
                                        enum acct_result r)
{
    bool ok = gdbm_sync(dbf) == 0;
    int gerr = gdbm_errno;
    ok = gdbm_close(dbf) == 0 && ok;
    if (!ok) {
        log_err("accounts database %s: sync/close failed: %s", db,
                gdbm_strerror(gerr));
        if (r == ACCT_OK)
            r = ACCT_TEMPFAIL;
    }
    return r;
}

/* ------------------------------------------------------------ records */

/* Value of key as a NUL-terminated heap string (caller frees; wipe it when
 * it may hold a password), or NULL with *r set to ACCT_NOTFOUND or
 * ACCT_TEMPFAIL. */
char *acctdb_fetch(const char *db, GDBM_FILE dbf, const char *key,
                          size_t *len, enum acct_result *r)
{
    *len = 0;
    if (!dbf) {
        *r = ACCT_NOTFOUND;
        return NULL;
    }
    datum v = gdbm_fetch(dbf, make_datum(key, strlen(key)));
    if (!v.dptr) {
        if (gdbm_errno == GDBM_ITEM_NOT_FOUND) {
            *r = ACCT_NOTFOUND;
        } else {
            log_err("accounts database %s: fetch: %s", db,
                    gdbm_strerror(gdbm_errno));
            *r = ACCT_TEMPFAIL;
        }
        return NULL;
    }
    size_t n = v.dsize > 0 ? (size_t)v.dsize : 0;
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, v.dptr, n);
        s[n] = '\0';
        *len = n;
        *r = ACCT_OK;
    } else {
        *r = ACCT_TEMPFAIL;
    }
    wipe_free(v.dptr, n);
    return s;
}

bool acctdb_exists(GDBM_FILE dbf, const char *key)
{
    return dbf && gdbm_exists(dbf, make_datum(key, strlen(key)));
}

/* Stores a text value; GDBM_INSERT or GDBM_REPLACE. */
enum acct_result acctdb_store(const char *db, GDBM_FILE dbf,
                                     const char *key, const char *value,
                                     size_t len, int how)
{
    int rc = gdbm_store(dbf, make_datum(key, strlen(key)),
                        make_datum(value, len), how);
    if (rc == 1)
        return ACCT_EXISTS;
    if (rc != 0) {
        log_err("accounts database %s: store: %s", db, gdbm_strerror(gdbm_errno));
        return ACCT_TEMPFAIL;
    }
    return ACCT_OK;
}

enum acct_result acctdb_delete(const char *db, GDBM_FILE dbf,
                                      const char *key)
{
    if (gdbm_delete(dbf, make_datum(key, strlen(key))) == 0)
        return ACCT_OK;
    if (gdbm_errno == GDBM_ITEM_NOT_FOUND)
        return ACCT_NOTFOUND;
    log_err("accounts database %s: delete: %s", db, gdbm_strerror(gdbm_errno));
    return ACCT_TEMPFAIL;
}

/* "v1\n<password>\n" as a heap string (wipe and free), NULL if no memory. */
static char *encode_password(const char *password, size_t *len)
{
    size_t plen = strlen(password);
    *len = VALUE_VERSION_LEN + plen + 1;
    char *v = malloc(*len + 1);
    if (v)
        snprintf(v, *len + 1, VALUE_VERSION "%s\n", password);
    return v;
}

/* Copies the password out of a stored value.  A value in an unknown format
 * is refused rather than guessed at. */
static enum acct_result decode_password(const char *value, size_t len,
                                        char *password, size_t n)
{
    if (len < VALUE_VERSION_LEN + 1 ||
        memcmp(value, VALUE_VERSION, VALUE_VERSION_LEN) != 0)
        return ACCT_TEMPFAIL;
    const char *p = value + VALUE_VERSION_LEN;
    const char *nl = memchr(p, '\n', len - VALUE_VERSION_LEN);
    if (!nl || (size_t)(nl - p) >= n)
        return ACCT_TEMPFAIL;
    memcpy(password, p, (size_t)(nl - p));
    password[nl - p] = '\0';
    return ACCT_OK;
}

/* ------------------------------------------------------------ key lists */

struct entry {
    char *key;      /* without its "u:" / "d:" prefix */
    char *value;    /* NULL unless asked for; never a password */
};

struct entry_list {
    struct entry *v;
    size_t n, cap;
};

static void entries_free(struct entry_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].key);
        free(l->v[i].value);
    }
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

static bool entries_add(struct entry_list *l, const char *key, size_t len)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        struct entry *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return false;
        l->v = v;
        l->cap = cap;
    }
    char *k = malloc(len + 1);
    if (!k)
        return false;
    memcpy(k, key, len);
    k[len] = '\0';
    l->v[l->n].key = k;
    l->v[l->n].value = NULL;
    l->n++;
    return true;
}

/* Adds the key to the list when it starts with prefix.  Keys with a NUL
 * inside are skipped: this module never writes them. */
static bool collect_key(struct entry_list *l, datum k, const char *prefix)
{
    size_t len = k.dsize > 0 ? (size_t)k.dsize : 0;
    if (len <= PREFIX_LEN || memcmp(k.dptr, prefix, PREFIX_LEN) != 0 ||
        memchr(k.dptr, '\0', len))
        return true;
    return entries_add(l, k.dptr + PREFIX_LEN, len - PREFIX_LEN);
}

/* Every key that starts with prefix.  GDBM's traversal order is a hash
 * order, so callers sort.  The list is built completely before anything is
 * deleted, because deleting during a traversal can skip keys. */
static enum acct_result collect_keys(const char *db, GDBM_FILE dbf,
                                     const char *prefix, struct entry_list *l)
{
    if (!dbf)
        return ACCT_OK;
    datum k = gdbm_firstkey(dbf);
    while (k.dptr) {
        if (!collect_key(l, k, prefix)) {
            free(k.dptr);
            return ACCT_TEMPFAIL;
        }
        datum next = gdbm_nextkey(dbf, k);
        free(k.dptr);
        k = next;
    }
    if (gdbm_errno != GDBM_ITEM_NOT_FOUND) {
        log_err("accounts database %s: traversal: %s", db,
                gdbm_strerror(gdbm_errno));
        return ACCT_TEMPFAIL;
    }
    return ACCT_OK;
}

/* Fills in the value of every "d:" entry (the bound account name). */
static enum acct_result fetch_bindings(const char *db, GDBM_FILE dbf,
                                       struct entry_list *l)
{
    char key[KEY_MAX + 1];
    for (size_t i = 0; i < l->n; i++) {
        size_t len;
        enum acct_result r;
        snprintf(key, sizeof key, DOMAIN_PREFIX "%s", l->v[i].key);
        l->v[i].value = acctdb_fetch(db, dbf, key, &len, &r);
        if (r == ACCT_TEMPFAIL)
            return r;
    }
    return ACCT_OK;
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const struct entry *)a)->key,
                  ((const struct entry *)b)->key);
}

/* Reads all entries of one kind with the database open, sorted. */
static enum acct_result read_entries(const char *db, const char *prefix,
                                     bool with_values, struct entry_list *l)
{
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_READ, &dbf);
    if (r != ACCT_OK)
        return r;
    r = collect_keys(db, dbf, prefix, l);
    if (r == ACCT_OK && with_values)
        r = fetch_bindings(db, dbf, l);
    acctdb_close_reader(dbf);
    if (r != ACCT_OK)
        entries_free(l);
    else if (l->n > 1)
        qsort(l->v, l->n, sizeof *l->v, entry_cmp);
    return r;
}

/* ------------------------------------------------------------ readers */

/* ------------------------------------------------------------ kept open */

/* A session worker looks up a password and domain owners in every poll;
 * opening the file each time was about an eighth of a poll.  So one read
 * handle stays open between lookups, under these rules:
 *
 *  - It is opened with GDBM_NOLOCK and locked (flock, shared, as GDBM's
 *    own readers do) only for the moment of a lookup, so an idle handle
 *    never blocks odmrctl's writer.
 *  - Under that lock, the file's identity (stat of the path: dev, inode,
 *    size, mtime, ctime) is compared with the one it had at open; any
 *    difference (odmrctl changed it in place, or it was replaced) means
 *    a fresh open.  ctime cannot be set back by utime(), so a copy that
 *    keeps old timestamps is noticed too.
 *  - File times have the kernel's coarse clock granularity: a change made
 *    within the same tick as the open could keep them equal.  A handle
 *    whose file was changed less than KEPT_SETTLE_S before the open is
 *    therefore used once only.
 *  - GDBM_NOMMAP: a file someone truncates under us yields read errors,
 *    not SIGBUS.  A forked child never uses its parent's handle (the file
 *    offset and the flock are shared with the parent); it opens its own.
 *  - Where flock is not available the old open-per-lookup path is used. */
#define KEPT_SETTLE_S 2

static struct {
    char path[PATH_MAX];
    GDBM_FILE dbf;
    struct stat st;          /* the file as it was at open */
    pid_t pid;               /* the process that opened it */
    bool reusable;           /* its times were settled at open */
    bool no_flock;           /* flock failed: open per lookup */
} kept;

static void kept_drop(void)
{
    if (kept.dbf)
        gdbm_close(kept.dbf);
    kept.dbf = NULL;
}

/* Shared lock on fd, waiting out a writer as acctdb_open does.  ACCT_OK,
 * ACCT_TEMPFAIL, or ACCT_NODB when flock does not work here at all. */
static enum acct_result lock_shared(const char *db, int fd)
{
    long waited = 0, step = LOCK_WAIT_FIRST_MS;

    while (flock(fd, LOCK_SH | LOCK_NB) != 0) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK)
            return ACCT_NODB;
        if (waited >= LOCK_WAIT_TOTAL_MS) {
            log_warn("accounts database %s: still locked after %ld ms",
                     db, waited);
            return ACCT_TEMPFAIL;
        }
        sleep_ms(step);
        waited += step;
        step = step * 2 > LOCK_WAIT_STEP_MAX_MS ? LOCK_WAIT_STEP_MAX_MS : step * 2;
    }
    return ACCT_OK;
}

static enum acct_result open_errno(const char *db, int err)
{
    if (err == ENOENT || err == ENOTDIR)
        return ACCT_NODB;
    log_err("accounts database %s: %s", db, strerror(err));
    return err == EACCES || err == EPERM ? ACCT_PERM : ACCT_TEMPFAIL;
}

/* Opens db into kept, returning with the shared lock held; kept.dbf is
 * NULL with ACCT_OK for an empty file (no entries, and not kept). */
static enum acct_result kept_open(const char *db)
{
    int fd = open(db, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return open_errno(db, errno);
    enum acct_result r = lock_shared(db, fd);
    if (r != ACCT_OK) {
        kept.no_flock = r == ACCT_NODB;
        close(fd);
        return r == ACCT_NODB ? ACCT_TEMPFAIL : r;
    }
    if (fstat(fd, &kept.st) != 0) {
        int err = errno;
        close(fd);
        return open_errno(db, err);
    }
    if (kept.st.st_size == 0) {   /* a writer creating it, or truncated */
        close(fd);
        return empty_file(db, &kept.st);
    }
    kept.dbf = gdbm_fd_open(fd, db, 0, GDBM_READER | GDBM_NOLOCK |
                                           GDBM_NOMMAP | GDBM_CLOEXEC, NULL);
    if (!kept.dbf) {
        int gerr = gdbm_errno, err = errno;
        close(fd);
        return gerr == GDBM_EMPTY_DATABASE ? empty_file(db, &kept.st)
                                           : open_failure(db, gerr, err);
    }
    kept.pid = getpid();
    kept.reusable = time(NULL) - kept.st.st_ctim.tv_sec >= KEPT_SETTLE_S;
    return ACCT_OK;
}

/* Whether the open handle still shows db as it is now; takes the shared
 * lock first, so that no writer is halfway through. */
static bool kept_current(const char *db)
{
    struct stat now;

    if (!kept.dbf || !kept.reusable || kept.pid != getpid() ||
        strcmp(kept.path, db) != 0)
        return false;
    if (lock_shared(db, gdbm_fdesc(kept.dbf)) != ACCT_OK)
        return false;
    if (stat(db, &now) == 0 && stat_same_file(&now, &kept.st))
        return true;
    flock(gdbm_fdesc(kept.dbf), LOCK_UN);
    return false;
}

/* The kept handle for db, locked shared: release with kept_release.
 * *dbf is NULL with ACCT_OK for an empty database. */
static enum acct_result kept_acquire(const char *db, GDBM_FILE *dbf)
{
    *dbf = NULL;
    if (kept_current(db)) {
        *dbf = kept.dbf;
        return ACCT_OK;
    }
    if (kept.dbf && kept.pid != getpid())
        kept.dbf = NULL;   /* the parent's: leave its file alone */
    kept_drop();
    if (!str_copy(kept.path, db, sizeof kept.path))
        return open_errno(db, ENAMETOOLONG);
    enum acct_result r = kept_open(db);
    *dbf = kept.dbf;
    return r;
}

static void kept_release(void)
{
    if (!kept.dbf)
        return;
    flock(gdbm_fdesc(kept.dbf), LOCK_UN);
    if (!kept.reusable)
        kept_drop();
}

/* One record; NULL with *r telling why (ACCT_NOTFOUND, ACCT_NODB, ...). */
static char *read_record(const char *db, const char *key, size_t *len,
                         enum acct_result *r)
{
    GDBM_FILE dbf;
    char *value;

    if (!kept.no_flock) {
        *r = kept_acquire(db, &dbf);
        if (!kept.no_flock) {
            if (*r != ACCT_OK)
                return NULL;
            value = acctdb_fetch(db, dbf, key, len, r);
            kept_release();
            return value;
        }
        log_warn("accounts database %s: flock does not work here; opening "
                 "the file for each lookup", db);
    }
    /* open per lookup, with GDBM's own locking */
    *r = acctdb_open(db, DB_READ, &dbf);
    if (*r != ACCT_OK)
        return NULL;
    value = acctdb_fetch(db, dbf, key, len, r);
    acctdb_close_reader(dbf);
    return value;
}

enum acct_result accounts_domain_owner(const char *db, const char *domain,
                                       char *account, size_t n)
{
    char key[KEY_MAX + 1], legacy[2][KEY_MAX + 1];
    if (!acctdb_domain_key(key, domain))
        return ACCT_NOTFOUND;
    size_t len;
    enum acct_result r;
    char *owner = read_record(db, key, &len, &r);
    int legacies = 0;
    if (!owner && r == ACCT_NOTFOUND)
        legacies = legacy_domain_keys(legacy, domain, key);
    for (int i = 0; i < legacies && !owner && r == ACCT_NOTFOUND; i++)
        owner = read_record(db, legacy[i], &len, &r);
    if (owner && account && n > 0 && !str_copy(account, owner, n)) {
        log_err("accounts database %s: account name of %s too long", db, key);
        r = ACCT_TEMPFAIL;
    }
    free(owner);
    return r;
}

enum acct_result accounts_password(const char *db, const char *name,
                                   char *password, size_t n)
{
    char key[KEY_MAX + 1];
    if (!user_key(key, name))
        return ACCT_NOTFOUND;
    size_t len;
    enum acct_result r;
    char *value = read_record(db, key, &len, &r);
    if (value && password && n > 0) {
        r = decode_password(value, len, password, n);
        if (r != ACCT_OK)
            log_err("accounts database %s: record of account %s is malformed "
                    "or too long", db, name);
    }
    wipe_free(value, len);
    return r;
}

enum acct_result accounts_users(const char *db,
                                void (*fn)(void *ctx, const char *name),
                                void *ctx)
{
    struct entry_list l = {0};
    enum acct_result r = read_entries(db, USER_PREFIX, false, &l);
    if (r != ACCT_OK)
        return r;
    /* The database is closed by now: fn may do lookups of its own. */
    for (size_t i = 0; i < l.n; i++)
        fn(ctx, l.v[i].key);
    entries_free(&l);
    return ACCT_OK;
}

enum acct_result accounts_domains(const char *db,
                                  void (*fn)(void *ctx, const char *domain,
                                             const char *name),
                                  void *ctx)
{
    struct entry_list l = {0};
    enum acct_result r = read_entries(db, DOMAIN_PREFIX, true, &l);
    if (r != ACCT_OK)
        return r;
    for (size_t i = 0; i < l.n; i++)
        if (l.v[i].value)   /* deleted between traversal and fetch */
            fn(ctx, l.v[i].key, l.v[i].value);
    entries_free(&l);
    return ACCT_OK;
}

/* ------------------------------------------------------------ writers */

static enum acct_result store_password(const char *db, const char *name,
                                       const char *password, enum db_mode mode,
                                       int how)
{
    char key[KEY_MAX + 1];
    if (!user_key(key, name) || !password_storable(password))
        return ACCT_NOTFOUND;
    size_t len;
    char *value = encode_password(password, &len);
    if (!value)
        return ACCT_TEMPFAIL;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, mode, &dbf);
    if (r == ACCT_OK) {
        if (how == GDBM_REPLACE && !acctdb_exists(dbf, key))
            r = ACCT_NOTFOUND;
        else
            r = acctdb_store(db, dbf, key, value, len, how);
        r = acctdb_close_writer(db, dbf, r);
    }
    wipe_free(value, len);
    return r;
}

enum acct_result accounts_user_add(const char *db, const char *name,
                                   const char *password)
{
    return store_password(db, name, password, DB_CREATE, GDBM_INSERT);
}

enum acct_result accounts_user_passwd(const char *db, const char *name,
                                      const char *password)
{
    return store_password(db, name, password, DB_WRITE, GDBM_REPLACE);
}

/* Deletes every "d:" binding whose account is name. */
static enum acct_result delete_bindings_of(const char *db, GDBM_FILE dbf,
                                           const char *name)
{
    struct entry_list l = {0};
    enum acct_result r = collect_keys(db, dbf, DOMAIN_PREFIX, &l);
    if (r == ACCT_OK)
        r = fetch_bindings(db, dbf, &l);
    char key[KEY_MAX + 1];
    for (size_t i = 0; r == ACCT_OK && i < l.n; i++) {
        if (!l.v[i].value || strcmp(l.v[i].value, name) != 0)
            continue;
        snprintf(key, sizeof key, DOMAIN_PREFIX "%s", l.v[i].key);
        r = acctdb_delete(db, dbf, key);
        if (r == ACCT_NOTFOUND)
            r = ACCT_OK;
    }
    entries_free(&l);
    return r;
}

enum acct_result accounts_user_del(const char *db, const char *name)
{
    char key[KEY_MAX + 1];
    if (!user_key(key, name))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_WRITE, &dbf);
    if (r != ACCT_OK)
        return r;
    /* Bindings go first: a crash in between leaves an account with fewer
     * domains, never a domain bound to an account that does not exist. */
    if (!acctdb_exists(dbf, key))
        r = ACCT_NOTFOUND;
    else
        r = delete_bindings_of(db, dbf, name);
    if (r == ACCT_OK)
        r = acctdb_delete(db, dbf, key);
    return acctdb_close_writer(db, dbf, r);
}

/* ACCT_OK when dkey is bound to name, ACCT_EXISTS when to another
 * account, ACCT_NOTFOUND when unbound. */
static enum acct_result binding_of(const char *db, GDBM_FILE dbf,
                                   const char *dkey, const char *name)
{
    size_t len;
    enum acct_result r;
    char *owner = acctdb_fetch(db, dbf, dkey, &len, &r);
    if (owner) {
        /* Binding a domain to the account it already has is not an error:
         * provisioning scripts may run twice. */
        r = strcmp(owner, name) == 0 ? ACCT_OK : ACCT_EXISTS;
        free(owner);
    }
    return r;
}

/* Binds the domain (IDNA key dkey) to name inside an open writer.  A
 * binding an older version stored under a legacy key counts as the
 * domain's binding: otherwise the two would coexist, and removing the new
 * one would hand the domain back to the old owner. */
static enum acct_result bind_domain(const char *db, GDBM_FILE dbf,
                                    const char *domain, const char *dkey,
                                    const char *name)
{
    char ukey[KEY_MAX + 1], legacy[2][KEY_MAX + 1];
    user_key(ukey, name);
    if (!acctdb_exists(dbf, ukey))
        return ACCT_NOTFOUND;
    enum acct_result r = binding_of(db, dbf, dkey, name);
    int legacies = legacy_domain_keys(legacy, domain, dkey);
    for (int i = 0; i < legacies && r == ACCT_NOTFOUND; i++)
        r = binding_of(db, dbf, legacy[i], name);
    if (r != ACCT_NOTFOUND)
        return r;
    return acctdb_store(db, dbf, dkey, name, strlen(name), GDBM_INSERT);
}

enum acct_result accounts_domain_add(const char *db, const char *domain,
                                     const char *name)
{
    char dkey[KEY_MAX + 1];
    if (!domain_usable(domain) || !acctdb_domain_key(dkey, domain) ||
        !account_name_valid(name))
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_WRITE, &dbf);
    if (r != ACCT_OK)
        return r;
    r = bind_domain(db, dbf, domain, dkey, name);
    return acctdb_close_writer(db, dbf, r);
}

/* Deletes key; a key that was never there leaves *r as it was. */
static void delete_binding_key(const char *db, GDBM_FILE dbf, const char *key,
                               enum acct_result *r)
{
    enum acct_result d = acctdb_delete(db, dbf, key);
    if (d == ACCT_TEMPFAIL || (d == ACCT_OK && *r == ACCT_NOTFOUND))
        *r = d;
}

enum acct_result accounts_domain_del(const char *db, const char *domain)
{
    /* Every key the binding may be under goes, legacy ones too: a legacy
     * binding left behind would still route the domain.  One whose name
     * is not valid IDNA has only its old key and must still be removable. */
    char key[KEY_MAX + 1] = "", legacy[2][KEY_MAX + 1];
    bool has_key = acctdb_domain_key(key, domain);
    int legacies = legacy_domain_keys(legacy, domain, key);
    if (!has_key && legacies == 0)
        return ACCT_NOTFOUND;
    GDBM_FILE dbf;
    enum acct_result r = acctdb_open(db, DB_WRITE, &dbf);
    if (r != ACCT_OK)
        return r;
    r = ACCT_NOTFOUND;
    if (has_key)
        delete_binding_key(db, dbf, key, &r);
    for (int i = 0; i < legacies; i++)
        delete_binding_key(db, dbf, legacy[i], &r);
    return acctdb_close_writer(db, dbf, r);
}

const char *acct_strerror(enum acct_result r)
{
    switch (r) {
    case ACCT_OK:
        return "success";
    case ACCT_NOTFOUND:
        return "not found";
    case ACCT_EXISTS:
        return "already exists";
    case ACCT_TEMPFAIL:
        return "account database temporarily unavailable";
    case ACCT_NODB:
        return "account database does not exist";
    case ACCT_PERM:
        return "permission denied on the account database";
    }
    return "unknown error";
}
