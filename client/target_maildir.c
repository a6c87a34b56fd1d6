/* target_maildir.c - maildir:PATH, one file per recipient.
 *
 * PATH may hold %d and %u, the recipient's domain and local part (both
 * lower-cased, quoting that adds nothing removed: "bob" is bob; a local
 * part with '/', a leading '.' or control characters is refused, so an
 * address can never climb out of the tree).  With %u
 * the maildir must exist - a missing one is an unknown user, 550 5.1.1 -
 * otherwise it is created (mode 0700) as needed.
 *
 * Delivery is the Maildir protocol: each recipient's copy is written to
 * tmp/ under a unique name, starting with "Return-Path: <sender>" and
 * "Delivered-To: recipient", with LF line ends as mail readers expect;
 * at the end of the data every copy is fsync'ed, then all are renamed
 * into new/ and the new/ directories fsync'ed, and only then is the 250
 * given.  Any failure before that removes every copy and answers 4xx, so
 * odmrd keeps the message and the recipients get it exactly once. */
#include "target.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "../common/addr.h"

/* One open file per recipient: keep well inside the usual 1024 fds. */
#define MAILDIR_RCPT_MAX 256
#define MD_BUF 65536
#define NAME_MAX_LEN 200

struct md_rcpt {
    char *dir;                    /* the recipient's maildir */
    char *addr;
    char name[NAME_MAX_LEN];      /* unique, in tmp/ and then new/ */
    int fd;
};

struct maildir {
    char sender[ADDR_MAX + 1];
    struct md_rcpt r[MAILDIR_RCPT_MAX];
    size_t n;
    bool open_files;              /* tmp/ files exist */
    int err;                      /* errno of a write failure, 0 = none */
    char host[100];               /* for unique names (cut if longer) */
    unsigned long counter;
    char buf[MD_BUF];
    size_t blen;
};

static struct maildir *D(struct target *t)
{
    return t->impl;
}

/* Maildir names must not contain '/' or ':' (the info separator). */
static void name_host(const char *fqdn, char *out, size_t n)
{
    size_t o = 0;

    for (; *fqdn && o + 5 < n; fqdn++) {
        if (*fqdn == '/' || *fqdn == ':')
            o += (size_t)snprintf(out + o, n - o, "\\%03o",
                                  (unsigned char)*fqdn);
        else
            out[o++] = *fqdn;
    }
    out[o] = '\0';
}

static bool md_open(struct target *t, char *err, size_t n)
{
    struct maildir *d = calloc(1, sizeof *d);

    t->impl = d;
    if (!d) {
        snprintf(err, n, "out of memory");
        return false;
    }
    name_host(t->conf->fqdn, d->host, sizeof d->host);
    t->caps = (struct target_caps){.eightbit = true, .smtputf8 = true};
    return true;
}

/* ---- recipients ------------------------------------------------------ */

static bool component_ok(const char *s)
{
    if (!s[0] || s[0] == '.')
        return false;
    for (; *s; s++)
        if (*s == '/' || (unsigned char)*s < 32 || *s == 127)
            return false;
    return true;
}

static void lower_copy(char *dst, const char *src, size_t n)
{
    str_copy(dst, src, n);
    str_lower(dst);
}

/* PATH with %d/%u filled in; false when it is too long. */
static bool expand_path(const char *tmpl, const char *local,
                        const char *domain, char *out, size_t n)
{
    size_t o = 0;

    for (const char *p = tmpl; *p; p++) {
        const char *sub = NULL;
        if (p[0] == '%' && p[1])
            sub = p[1] == 'd' ? domain : p[1] == 'u' ? local : "%";
        size_t len = sub ? strlen(sub) : 1;
        if (o + len >= n)
            return false;
        memcpy(out + o, sub ? sub : p, len);
        o += len;
        p += sub ? 1 : 0;
    }
    out[o] = '\0';
    return true;
}

/* mkdir, and when it made the directory, a sync of its parent: the new
 * entry must survive a power loss as the mail that goes into it will
 * (SPEC 3.4, "directory entry synced").  0, or errno (EEXIST kept). */
static int mkdir_synced(char *path)
{
    if (mkdir(path, 0700) != 0)
        return errno;
    char *slash = strrchr(path, '/');
    if (!slash)
        return fsync_dir(".") ? 0 : errno;
    if (slash == path)
        return fsync_dir("/") ? 0 : errno;
    *slash = '\0';
    int e = fsync_dir(path) ? 0 : errno;
    *slash = '/';
    return e;
}

static int mkdir_p(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int r = mkdir_synced(path);
        *p = '/';
        if (r != 0 && r != EEXIST)
            return r;
    }
    int r = mkdir_synced(path);
    return r == EEXIST ? 0 : r;
}

/* 0 when dir is a usable maildir (made so when may_create), else errno. */
static int ensure_maildir(char *dir, bool may_create)
{
    static const char *const sub[] = {"tmp", "new", "cur"};
    struct stat st;
    char path[PATH_MAX];

    /* as root, the maildir itself is no user's link either (below) */
    if (geteuid() == 0 && lstat(dir, &st) == 0 && S_ISLNK(st.st_mode) &&
        st.st_uid != 0)
        return ELOOP;
    if (stat(dir, &st) != 0) {
        if (errno != ENOENT || !may_create)
            return errno;
        int e = mkdir_p(dir);
        if (e)
            return e;
    } else if (!S_ISDIR(st.st_mode)) {
        return ENOTDIR;
    }
    for (size_t i = 0; i < 3; i++) {
        if (!str_fmt(path, sizeof path, "%s/%s", dir, sub[i]))
            return ENAMETOOLONG;
        int e = mkdir_synced(path);
        if (e && e != EEXIST)
            return e;
        /* Run as root into maildirs users own, a tmp/ or new/ that a user
         * made a symbolic link would have root write mail wherever it
         * points (a directory that takes any file name as configuration,
         * say).  Root follows no such link; its own (an administrator's)
         * it does. */
        if (e == EEXIST && geteuid() == 0 &&
            (lstat(path, &st) != 0 || (S_ISLNK(st.st_mode) && st.st_uid != 0)))
            return ELOOP;
    }
    return 0;
}

static void md_mail(struct target *t, const struct mail_args *m,
                    struct reply *r)
{
    struct maildir *d = D(t);

    t->ops->reset(t);
    addr_format(&m->from, d->sender, sizeof d->sender);
    reply_set(r, 250, "2.1.0 Ok");
}

/* Where addr's copy goes; a reply when it cannot go anywhere. */
static bool rcpt_dir(struct target *t, const struct mailbox *mb,
                     char *dir, size_t n, struct reply *r)
{
    char local[ADDR_LOCAL_MAX + 1], domain[ADDR_DOMAIN_MAX + 1];
    const char *tmpl = t->spec->arg;
    bool per_user = strstr(tmpl, "%u") != NULL;

    char plain[ADDR_LOCAL_MAX + 1];
    if (!addr_local_plain(mb->local, plain, sizeof plain))
        plain[0] = '\0';   /* cannot happen: a local part fits */
    lower_copy(local, plain, sizeof local);
    addr_domain_key(mb->domain, domain, sizeof domain);
    if ((per_user && !component_ok(local)) ||
        (strstr(tmpl, "%d") && !component_ok(domain))) {
        reply_set(r, 550, "5.1.3 Mailbox name not allowed");
        return false;
    }
    if (!expand_path(tmpl, local, domain, dir, n)) {
        reply_set(r, 550, "5.1.3 Mailbox path too long");
        return false;
    }
    int e = ensure_maildir(dir, !per_user);
    if (e == ENOENT && per_user) {
        reply_set(r, 550, "5.1.1 No such mailbox");
        return false;
    }
    if (e) {
        reply_set(r, 451, "4.3.0 Cannot use maildir %.200s: %s", dir,
                  strerror(e));
        return false;
    }
    return true;
}

static void md_rcpt(struct target *t, const struct rcpt_args *a,
                    const char *addr, struct reply *r)
{
    struct maildir *d = D(t);
    char dir[PATH_MAX];

    if (d->n == MAILDIR_RCPT_MAX) {
        reply_set(r, 452, "4.5.3 Too many recipients");
        return;
    }
    if (!rcpt_dir(t, &a->to, dir, sizeof dir, r))
        return;
    struct md_rcpt *x = &d->r[d->n];
    x->dir = strdup(dir);
    x->addr = strdup(addr);
    x->fd = -1;
    if (!x->dir || !x->addr) {
        free(x->dir);
        free(x->addr);
        reply_set(r, 452, "4.3.0 Out of memory");
        return;
    }
    d->n++;
    reply_set(r, 250, "2.1.5 Ok");
}

/* ---- the data -------------------------------------------------------- */

static bool file_path(const struct md_rcpt *x, const char *sub, char *buf,
                      size_t n)
{
    return str_fmt(buf, n, "%s/%s/%s", x->dir, sub, x->name);
}

/* Closes and removes every copy that is not in new/ yet. */
static void discard(struct maildir *d)
{
    char path[PATH_MAX];

    for (size_t i = 0; i < d->n; i++) {
        struct md_rcpt *x = &d->r[i];
        if (x->fd >= 0)
            close(x->fd);
        x->fd = -1;
        if (d->open_files && file_path(x, "tmp", path, sizeof path))
            unlink(path);
    }
    d->open_files = false;
}

static void storage_error(struct reply *r, int e)
{
    if (e == ENOSPC || e == EDQUOT)
        reply_set(r, 452, "4.3.1 Insufficient system storage");
    else
        reply_set(r, 451, "4.3.0 Maildir delivery failed: %s", strerror(e));
}

static int create_copy(struct maildir *d, struct md_rcpt *x)
{
    struct timeval tv;
    char path[PATH_MAX], head[2 * ADDR_MAX + 64];

    gettimeofday(&tv, NULL);
    snprintf(x->name, sizeof x->name, "%lld.M%06ldP%ldQ%lu.%s",
             (long long)tv.tv_sec, (long)tv.tv_usec, (long)getpid(),
             ++d->counter, d->host);
    if (!file_path(x, "tmp", path, sizeof path))
        return ENAMETOOLONG;
    x->fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (x->fd < 0)
        return errno;
    int len = snprintf(head, sizeof head, "Return-Path: <%s>\n"
                                          "Delivered-To: %s\n",
                       d->sender, x->addr);
    return write_all(x->fd, head, (size_t)len) ? 0 : errno ? errno : EIO;
}

static void md_data(struct target *t, struct reply *r)
{
    struct maildir *d = D(t);

    d->err = 0;
    d->blen = 0;
    d->open_files = true;
    for (size_t i = 0; i < d->n; i++) {
        int e = create_copy(d, &d->r[i]);
        if (e) {
            discard(d);
            storage_error(r, e);
            return;
        }
    }
    reply_set(r, 354, "Go ahead");
}

static bool flush_all(struct maildir *d)
{
    for (size_t i = 0; i < d->n && !d->err; i++)
        if (!write_all(d->r[i].fd, d->buf, d->blen))
            d->err = errno ? errno : EIO;
    d->blen = 0;
    return !d->err;
}

static bool md_write(struct target *t, const char *p, size_t len)
{
    struct maildir *d = D(t);

    /* CRLF -> LF; every CR here is followed by LF (receiver.c). */
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\r')
            continue;
        if (d->blen == sizeof d->buf && !flush_all(d))
            return false;
        d->buf[d->blen++] = p[i];
    }
    return !d->err;
}

/* fsync and close every copy; 0 or errno. */
static int sync_all(struct maildir *d)
{
    for (size_t i = 0; i < d->n; i++) {
        struct md_rcpt *x = &d->r[i];
        int e = fsync(x->fd) == 0 ? 0 : errno;
        if (close(x->fd) != 0 && !e)
            e = errno;
        x->fd = -1;
        if (e)
            return e;
    }
    return 0;
}

/* tmp/ to new/ without ever replacing a message there: rename() would,
 * if a name ever came back (a pid reused after a reboot with the clock
 * set back, two hosts of one name sharing the maildir).  link() fails
 * instead, as the Maildir convention has it; a file system without hard
 * links gets the rename after a check. */
static int move_new(const char *from, const char *to)
{
    struct stat st;
    if (link(from, to) == 0) {
        unlink(from);
        return 0;
    }
    if (errno != EPERM && errno != EOPNOTSUPP && errno != ENOSYS &&
        errno != EMLINK)
        return errno;
    if (lstat(to, &st) == 0)
        return EEXIST;
    return rename(from, to) == 0 ? 0 : errno;
}

/* Moves every copy into new/; on failure takes back the ones moved. */
static int publish(struct maildir *d)
{
    char from[PATH_MAX], to[PATH_MAX];
    size_t i;
    int e = 0;

    for (i = 0; i < d->n && !e; i++) {
        if (!file_path(&d->r[i], "tmp", from, sizeof from) ||
            !file_path(&d->r[i], "new", to, sizeof to))
            e = ENAMETOOLONG;
        else
            e = move_new(from, to);
    }
    if (!e)
        return 0;
    for (size_t k = 0; k + 1 < i; k++)
        if (file_path(&d->r[k], "new", to, sizeof to))
            unlink(to);
    return e;
}

/* The renames are durable once each new/ directory is synced. */
static int sync_dirs(struct maildir *d)
{
    char path[PATH_MAX];

    for (size_t i = 0; i < d->n; i++) {
        bool seen = false;
        for (size_t k = 0; k < i && !seen; k++)
            seen = !strcmp(d->r[k].dir, d->r[i].dir);
        if (seen)
            continue;
        if (!str_fmt(path, sizeof path, "%s/new", d->r[i].dir) ||
            !fsync_dir(path))
            return errno ? errno : EIO;
    }
    return 0;
}

static void md_end(struct target *t, bool abort, struct reply *r)
{
    struct maildir *d = D(t);
    int e = abort ? ECANCELED : d->err;

    if (!e && d->blen && !flush_all(d))
        e = d->err;
    if (!e)
        e = sync_all(d);
    if (!e)
        e = publish(d);
    if (e) {
        discard(d);
        storage_error(r, e);
        return;
    }
    d->open_files = false;
    e = sync_dirs(d);
    if (e)   /* in new/ already: a duplicate is better than a loss */
        storage_error(r, e);
    else
        reply_set(r, 250, "2.0.0 Ok: delivered to %zu maildir(s)", d->n);
}

static void md_reset(struct target *t)
{
    struct maildir *d = D(t);

    if (!d)
        return;
    discard(d);
    for (size_t i = 0; i < d->n; i++) {
        free(d->r[i].dir);
        free(d->r[i].addr);
    }
    d->n = 0;
}

static void md_close(struct target *t)
{
    md_reset(t);
    free(t->impl);
    t->impl = NULL;
}

const struct target_ops target_maildir_ops = {
    .open = md_open,
    .mail = md_mail,
    .rcpt = md_rcpt,
    .data = md_data,
    .write = md_write,
    .end = md_end,
    .reset = md_reset,
    .close = md_close,
};
