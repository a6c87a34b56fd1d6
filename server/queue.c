/* queue.c - the durable per-domain filesystem queue (layout in queue.h). */
#define _GNU_SOURCE   /* O_TMPFILE */
#include "queue.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "../common/log.h"
#include "../common/util.h"
#include "qfile.h"

/* Queue ids and domain keys become file names: refuse anything that could
 * climb out of the spool or hide as a dot file.  Domain keys come from
 * idna_domain_key(), which never makes such a name; this is the last line
 * of defence, not the rule. */
static bool safe_name(const char *s)
{
    if (!*s || *s == '.' || strlen(s) > ADDR_DOMAIN_MAX)
        return false;
    for (; *s; s++)
        if (*s == '/' || (unsigned char)*s < 33 || (unsigned char)*s > 126)
            return false;
    return true;
}

static bool qpath(char *buf, const struct queue *q, const char *domain,
                  const char *id, const char *suffix)
{
    if (!safe_name(domain) || (id && !safe_name(id)))
        return false;
    if (id)
        return str_fmt(buf, PATH_MAX, "%s/q/%s/%s%s", q->spool, domain, id, suffix);
    return str_fmt(buf, PATH_MAX, "%s/q/%s%s", q->spool, domain, suffix);
}

static bool make_dir(const char *path)
{
    return mkdir(path, 0700) == 0 || errno == EEXIST;
}

/* Queue directories are opened without following a symbolic link: the
 * spool delivers only what odmrd wrote, never a file elsewhere that a link
 * in the spool points at. */
static DIR *open_dir_nofollow(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    DIR *d = fdopendir(fd);
    if (!d) {
        int err = errno;
        close(fd);
        errno = err;
    }
    return d;
}

/* Opens a spool file to read it.  A FIFO or device placed in the spool
 * would block the open or the reads with the domain's lock held: anything
 * but a regular file fails with EINVAL (damage), a symbolic link with
 * ELOOP. */
static int open_spool_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    struct stat sb;
    if (fd < 0 || (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode)))
        return fd;
    close(fd);
    errno = EINVAL;
    return -1;
}

/* Why a spool file could not be opened, for the log. */
static const char *open_failure(int err)
{
    return err == ELOOP    ? "a symbolic link, not a queue file (left alone)"
           : err == EINVAL ? "not a regular file (left alone)"
                           : strerror(err);
}

/* 0 when path is a real directory, ELOOP for a symbolic link (O_NOFOLLOW's
 * errno), another errno otherwise. */
static int real_dir(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno;
    if (S_ISLNK(st.st_mode))
        return ELOOP;
    return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
}

bool queue_open(struct queue *q, const char *spool_dir, char *err, size_t n)
{
    /* A session process opens the queue for every session, up to 200
     * times: the directories it made once stay (nothing removes them). */
    static char made[PATH_MAX];
    char path[PATH_MAX];
    if (!str_copy(q->spool, spool_dir, sizeof q->spool)) {
        snprintf(err, n, "%s: path too long", spool_dir);
        return false;
    }
    if (!strcmp(made, spool_dir))
        return true;
    const char *subs[] = {"", "/tmp", "/q"};
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        if (!str_fmt(path, sizeof path, "%s%s", spool_dir, subs[i]) ||
            !make_dir(path)) {
            snprintf(err, n, "%s: %s", path, strerror(errno));
            return false;
        }
    }
    str_copy(made, spool_dir, sizeof made);
    return true;
}

void queue_new_id(char *id, size_t n)
{
    /* Time first so that ids sort in arrival order; the pid makes them
     * unique across processes, the bump below within one process. */
    static struct timeval last;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    if (tv.tv_sec < last.tv_sec ||
        (tv.tv_sec == last.tv_sec && tv.tv_usec <= last.tv_usec)) {
        tv = last;
        if (++tv.tv_usec >= 1000000) {
            tv.tv_usec = 0;
            tv.tv_sec++;
        }
    }
    last = tv;
    snprintf(id, n, "%08llX%05lX%lX", (unsigned long long)tv.tv_sec,
             (unsigned long)tv.tv_usec, (unsigned long)getpid());
}

/* ---------------------------------------------------------------- in */

static int open_domain_dir(struct queue *q, const char *domain);

static void in_release_dir(struct queue_in *in)
{
    if (in->dirfd >= 0)
        close(in->dirfd);
    in->dirfd = -1;
}

/* /proc/self/fd/<fd>: the name linkat() gives an unnamed file by. */
static void fd_path(char *buf, size_t n, int fd)
{
    snprintf(buf, n, "/proc/self/fd/%d", fd);
}

/* An unnamed file (O_TMPFILE) in dirfd, or -1 where there is none to be
 * had: a file system without O_TMPFILE, or no /proc to link it by (both
 * found out once per process, then the named file is used).
 * Why: creating a named file allocates its inode under the directory's
 * lock, and every session receiving for the same domain waits on that
 * lock; an unnamed file's inode is allocated outside it, and its one
 * directory operation is the link that commits it. */
static int open_unnamed(int dirfd)
{
    static int works = -1;   /* not known yet, 1 yes, 0 no */
    char path[32];
    if (works == 0)
        return -1;
    int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)
            works = 0;
        return -1;
    }
    if (works < 0) {
        fd_path(path, sizeof path, fd);
        works = access(path, F_OK) == 0;
        if (!works) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

/* Gives an unnamed data file its name, tmp_path, for the steps that link
 * or open it by name: 0 or an errno value. */
static int in_name(struct queue_in *in)
{
    char path[32];
    if (!in->unnamed)
        return 0;
    fd_path(path, sizeof path, in->fd);
    if (linkat(AT_FDCWD, path, AT_FDCWD, in->tmp_path, AT_SYMLINK_FOLLOW) != 0)
        return errno;
    in->unnamed = false;
    return 0;
}

/* The data file in q/<home>/ (home != NULL) or tmp/. */
static bool in_open(struct queue *q, struct queue_in *in, const char *home)
{
    if (!home) {
        in->fd = open(in->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC |
                      O_NOFOLLOW, 0600);
        return in->fd >= 0;
    }
    in->dirfd = open_domain_dir(q, home);
    if (in->dirfd < 0)
        return false;
    in->fd = open_unnamed(in->dirfd);
    in->unnamed = in->fd >= 0;
    /* relative to the directory: no second walk of the whole path */
    if (in->fd < 0)
        in->fd = openat(in->dirfd, strrchr(in->tmp_path, '/') + 1,
                        O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (in->fd < 0) {
        int err = errno;
        in_release_dir(in);
        errno = err;
        return false;
    }
    str_copy(in->home, home, sizeof in->home);
    return true;
}

static bool in_begin(struct queue *q, struct queue_in *in, const char *home)
{
    in->fd = in->dirfd = -1;
    in->unnamed = false;
    in->size = 0;
    in->error = 0;
    in->blen = 0;
    in->home[0] = '\0';
    in->tmp_path[0] = '\0';
    queue_new_id(in->id, sizeof in->id);
    bool named = home ? qpath(in->tmp_path, q, home, in->id, ".m")
                      : str_fmt(in->tmp_path, sizeof in->tmp_path, "%s/tmp/%s.m",
                                q->spool, in->id);
    if (!named) {
        errno = ENAMETOOLONG;
        return false;
    }
    return in_open(q, in, home);
}

bool queue_in_begin(struct queue *q, struct queue_in *in)
{
    return in_begin(q, in, NULL);
}

bool queue_in_begin_at(struct queue *q, struct queue_in *in, const char *domain)
{
    return in_begin(q, in, domain);
}

static void in_flush(struct queue_in *in)
{
    if (in->blen && !in->error && !write_all(in->fd, in->buf, in->blen))
        in->error = errno ? errno : EIO;
    in->blen = 0;
}

int queue_in_reread(struct queue_in *in)
{
    in_flush(in);
    if (!in->error)
        in->error = in_name(in);
    if (in->error) {
        errno = in->error;
        return -1;
    }
    return open(in->tmp_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
}

bool queue_in_begin_copy(struct queue *q, struct queue_in *in,
                         const struct queue_in *orig)
{
    memset(in, 0, offsetof(struct queue_in, buf));
    in->fd = in->dirfd = -1;
    str_copy(in->id, orig->id, sizeof in->id);
    if (!orig->home[0]) {
        errno = EINVAL;   /* orig's own name is tmp/<id>.m */
        return false;
    }
    if (!str_fmt(in->tmp_path, sizeof in->tmp_path, "%s/tmp/%s.r", q->spool,
                 in->id)) {
        errno = ENAMETOOLONG;
        return false;
    }
    in->fd = open(in->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                  0600);
    return in->fd >= 0;
}

/* Buffered write that is not counted as data (a queue file's envelope). */
static void in_append(struct queue_in *in, const void *data, size_t len)
{
    if (in->error)
        return;
    if (in->blen + len > sizeof in->buf)
        in_flush(in);
    if (len >= sizeof in->buf) {
        if (!in->error && !write_all(in->fd, data, len))
            in->error = errno ? errno : EIO;
        return;
    }
    memcpy(in->buf + in->blen, data, len);
    in->blen += len;
}

void queue_in_write(struct queue_in *in, const void *data, size_t len)
{
    in->size += len;
    in_append(in, data, len);
}

void queue_in_abort(struct queue_in *in)
{
    if (in->fd >= 0)
        close(in->fd);
    in->fd = -1;
    if (in->tmp_path[0] && !in->unnamed)
        unlink(in->tmp_path);
    in->tmp_path[0] = '\0';
    in->unnamed = false;
    in_release_dir(in);
}

/* The envelope's text in memory (caller frees *text); 0 or an errno.
 * Formatting in memory and writing once costs one write(2), where a
 * stdio stream on the file also asked the kernel about the descriptor. */
static int format_envelope(const struct envelope *e, char **text, size_t *len)
{
    *text = NULL;
    *len = 0;
    FILE *f = open_memstream(text, len);
    if (!f)
        return errno ? errno : ENOMEM;
    bool ok = envelope_write(f, e);
    if (fclose(f) != 0)
        ok = false;
    if (!ok) {
        free(*text);
        *text = NULL;
        return ENOMEM;
    }
    return 0;
}

/* Writes env to a temporary file, syncs it and renames it to final. */
static int write_envelope_file(const char *tmp, const char *final,
                               const struct envelope *e)
{
    char *text;
    size_t len;
    int err = format_envelope(e, &text, &len);
    if (err)
        return err;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        err = errno;
        free(text);
        return err;
    }
    bool ok = write_all(fd, text, len) && fsync(fd) == 0;
    err = ok ? 0 : (errno ? errno : EIO);
    free(text);
    if (close(fd) != 0 && ok) {
        ok = false;
        err = errno ? errno : EIO;
    }
    if (ok && rename(tmp, final) != 0) {
        ok = false;
        err = errno;
    }
    if (!ok)
        unlink(tmp);
    return err;
}

/* Makes the domain directory dir: 0, EEXIST or another errno value. */
static int make_domain_dir(struct queue *q, const char *dir)
{
    char top[PATH_MAX];
    if (mkdir(dir, 0700) != 0)
        return errno;
    /* A new directory entry must be durable before mail relies on it. */
    str_fmt(top, sizeof top, "%s/q", q->spool);
    return fsync_dir(top) ? 0 : errno;
}

static int ensure_domain_dir(struct queue *q, const char *domain)
{
    char dir[PATH_MAX];
    if (!qpath(dir, q, domain, NULL, ""))
        return EINVAL;
    /* Nearly always there already: one lstat instead of mkdir + lstat. */
    int err = real_dir(dir);
    if (err != ENOENT)
        return err;
    err = make_domain_dir(q, dir);
    return err == EEXIST ? real_dir(dir) : err;
}

/* Opens dir, a directory and not a symbolic link: a descriptor, or -1
 * with real_dir's errno (ELOOP for a link, where open says ENOTDIR). */
static int open_real_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOTDIR) {
        int err = real_dir(dir);
        errno = err ? err : ENOTDIR;
    }
    return fd;
}

/* The domain directory opened (made when missing): a descriptor or -1.
 * The open stands in for ensure_domain_dir's lstat. */
static int open_domain_dir(struct queue *q, const char *domain)
{
    char dir[PATH_MAX];
    if (!qpath(dir, q, domain, NULL, "")) {
        errno = EINVAL;
        return -1;
    }
    int fd = open_real_dir(dir);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    int err = make_domain_dir(q, dir);
    if (err && err != EEXIST) {
        errno = err;
        return -1;
    }
    return open_real_dir(dir);
}

/* Links the data and commits the envelope of one domain. */
static void usage_adjust(struct queue *q, const char *domain, int sign,
                         uint64_t size);

static int commit_domain(struct queue *q, struct queue_in *in,
                         const struct envelope *e)
{
    char data[PATH_MAX], env[PATH_MAX], tmp[PATH_MAX], dir[PATH_MAX];
    bool home = !strcmp(e->domain, in->home);   /* data already in place */
    /* The home directory was checked when the data file was made in it. */
    int err = home ? 0 : ensure_domain_dir(q, e->domain);
    if (err)
        return err;
    if (!qpath(data, q, e->domain, in->id, ".m") ||
        !qpath(env, q, e->domain, in->id, ".e") ||
        !qpath(dir, q, e->domain, NULL, "") ||
        !str_fmt(tmp, sizeof tmp, "%s/tmp/%s.e", q->spool, in->id))
        return ENAMETOOLONG;
    if (!home && link(in->tmp_path, data) != 0)
        return errno;
    err = write_envelope_file(tmp, env, e);
    /* the home directory is open already: its descriptor is synced */
    if (!err && !(home && in->dirfd >= 0 ? fsync(in->dirfd) == 0 : fsync_dir(dir)))
        err = errno;
    if (err) {
        unlink(env);
        if (!home)
            unlink(data);
    } else {
        usage_adjust(q, e->domain, +1, e->size);
    }
    return err;
}

/* The data durable, still open: 0 or an errno value. */
static int in_sync(struct queue_in *in)
{
    in_flush(in);
    int err = in->error;
    if (!err && fsync(in->fd) != 0)
        err = errno;
    return err;
}

static int in_close(struct queue_in *in, int err)
{
    if (close(in->fd) != 0 && !err)
        err = errno;
    in->fd = -1;
    return err;
}

/* The data durable, named and closed: 0 or an errno value. */
static int in_finish(struct queue_in *in)
{
    int err = in_sync(in);
    if (!err)
        err = in_name(in);
    return in_close(in, err);
}

static void stamp_envelope(struct envelope *e, const struct queue_in *in,
                           time_t now)
{
    str_copy(e->id, in->id, sizeof e->id);
    e->size = in->size;
    if (!e->arrival)
        e->arrival = now;
}

/* Names the synced file q/<domain>/<id>.q (a link of the unnamed file, or
 * a rename) and syncs that directory: 0, or an errno value and then
 * nothing is queued. */
static int name_queue_file(struct queue *q, struct queue_in *in,
                           const char *domain)
{
    char final[PATH_MAX], dir[PATH_MAX];
    if (!strcmp(domain, in->home) && in->dirfd >= 0) {
        /* written in place: its first name, or a rename, inside the open
         * directory */
        char from[QID_MAX + 3], to[QID_MAX + 3], path[32];
        snprintf(from, sizeof from, "%s.m", in->id);
        snprintf(to, sizeof to, "%s.q", in->id);
        fd_path(path, sizeof path, in->fd);
        if (in->unnamed ? linkat(AT_FDCWD, path, in->dirfd, to, AT_SYMLINK_FOLLOW) != 0
                        : renameat(in->dirfd, from, in->dirfd, to) != 0)
            return errno;
        in->unnamed = false;
        if (fsync(in->dirfd) == 0)
            return 0;
        int err = errno;
        unlinkat(in->dirfd, to, 0);
        return err;
    }
    int err = ensure_domain_dir(q, domain);
    if (!err)
        err = in_name(in);   /* a milter took the message out of home */
    if (err)
        return err;
    if (!qpath(final, q, domain, in->id, ".q") || !qpath(dir, q, domain, NULL, ""))
        return ENAMETOOLONG;
    if (rename(in->tmp_path, final) != 0)
        return errno;
    if (fsync_dir(dir))
        return 0;
    err = errno;
    unlink(final);
    return err;
}

/* A message for one domain becomes one queue file (qfile.h): the envelope
 * and trailer follow the data, one sync, one link or rename.  -1 when the
 * envelope is too large for the trailer (nothing done yet). */
static int commit_one_file(struct queue *q, struct queue_in *in,
                           struct envelope *e)
{
    char *text, trailer[QFILE_TRAILER_LEN + 1];
    size_t len;
    stamp_envelope(e, in, time(NULL));
    int err = format_envelope(e, &text, &len);
    if (!err && len > QFILE_ENVELOPE_MAX) {
        free(text);
        return -1;
    }
    if (!err) {
        qfile_trailer(trailer, in->size, len);
        in_append(in, text, len);
        in_append(in, trailer, QFILE_TRAILER_LEN);
        free(text);
        err = in_sync(in);
    }
    if (!err)
        err = name_queue_file(q, in, e->domain);
    /* open until named (an unnamed file is linked by its descriptor);
     * after the fsync, what close says changes nothing */
    close(in->fd);
    in->fd = -1;
    if (!err)
        usage_adjust(q, e->domain, +1, e->size);
    else if (!in->unnamed)
        unlink(in->tmp_path);
    in->unnamed = false;
    in->tmp_path[0] = '\0';
    in_release_dir(in);
    return err;
}

int queue_in_commit(struct queue *q, struct queue_in *in,
                    struct envelope **envs, size_t nenv)
{
    int err = nenv == 1 ? commit_one_file(q, in, envs[0]) : -1;
    if (err >= 0)
        return err;
    err = in_finish(in);
    time_t now = time(NULL);
    size_t done = 0;
    for (; !err && done < nenv; done++) {
        stamp_envelope(envs[done], in, now);
        err = commit_domain(q, in, envs[done]);
    }
    if (err) {
        /* All or nothing: take back the domains already committed. */
        for (size_t i = 0; i + 1 < done; i++)
            queue_remove(q, envs[i]->domain, in->id);
        queue_sync_removals();   /* rare; the client is told 452 */
    }
    /* The tmp/ name goes; data written in place stays, unless the commit
     * failed (then it is an invisible leftover anyway). */
    if (err || !in->home[0])
        unlink(in->tmp_path);
    in->tmp_path[0] = '\0';
    in_release_dir(in);
    return err;
}

/* ------------------------------------------------------------ inspect */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The length of the queue id that name commits (an envelope "<id>.e" or a
 * queue file "<id>.q"), 0 for any other name. */
static size_t committed_id_len(const char *name, size_t len)
{
    if (len <= 2 || name[len - 2] != '.')
        return 0;
    return name[len - 1] == 'e' || name[len - 1] == 'q' ? len - 2 : 0;
}

/* Drops adjacent duplicates of a sorted list (an id listed as both .e and
 * .q is one message to its readers): the new count. */
static size_t unique_names(char **names, size_t n)
{
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (kept && !strcmp(names[kept - 1], names[i]))
            free(names[i]);
        else
            names[kept++] = names[i];
    }
    return kept;
}

static void free_list(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* Sorted non-dot names in dir, or with ids, the committed queue ids
 * (committed_id_len; each once). Caller frees.  NULL with errno when dir
 * cannot be read or memory runs out: a list cut short would pass for the
 * whole (a delete of a domain's mail exiting 0 with some left). */
static char **list_dir(const char *dir, bool ids, size_t *count)
{
    DIR *d = open_dir_nofollow(dir);
    *count = 0;
    if (!d)
        return NULL;
    size_t cap = 64, n = 0;
    char **names = malloc(cap * sizeof *names);
    struct dirent *de;
    bool short_of_memory = !names;
    while (!short_of_memory && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        size_t len = strlen(de->d_name), keep = len;
        if (ids && (keep = committed_id_len(de->d_name, len)) == 0)
            continue;
        if (n == cap) {
            char **more = realloc(names, (cap *= 2) * sizeof *names);
            if (!more) {
                short_of_memory = true;
                break;
            }
            names = more;
        }
        names[n] = strndup(de->d_name, keep);
        if (names[n])
            n++;
        else
            short_of_memory = true;
    }
    closedir(d);
    if (short_of_memory) {
        free_list(names, n);
        errno = ENOMEM;
        return NULL;
    }
    qsort(names, n, sizeof *names, cmp_str);
    if (ids)
        n = unique_names(names, n);
    *count = n;
    return names;
}

/* fn for each name of dir (sorted; with ids, the committed ids) until it
 * returns non-zero; returns that value, or -1 when dir cannot be read (0
 * when it does not exist and missing_ok).  *visited (may be NULL): names
 * passed. */
static int each_name(const char *dir, bool ids, bool missing_ok,
                     int (*fn)(void *ctx, const char *name), void *ctx,
                     size_t *visited)
{
    size_t n, i = 0;
    char **names = list_dir(dir, ids, &n);
    if (visited)
        *visited = 0;
    if (!names)
        return missing_ok && errno == ENOENT ? 0 : -1;
    int r = 0;
    for (; i < n && r == 0; i++)
        r = fn(ctx, names[i]);
    free_list(names, n);
    if (visited)
        *visited = i;
    return r;
}

int queue_domains(struct queue *q, int (*fn)(void *ctx, const char *domain),
                  void *ctx)
{
    char dir[PATH_MAX];
    str_fmt(dir, sizeof dir, "%s/q", q->spool);
    return each_name(dir, false, false, fn, ctx, NULL);
}

/* The ids of a domain directory named by path (queue or quarantine). */
static int ids_in(bool named, const char *dir,
                  int (*fn)(void *ctx, const char *id), void *ctx)
{
    size_t visited;
    if (!named) {
        errno = EINVAL;
        return -1;
    }
    int r = each_name(dir, true, true, fn, ctx, &visited);
    return r < 0 ? -1 : (int)visited;
}

int queue_ids(struct queue *q, const char *domain,
              int (*fn)(void *ctx, const char *id), void *ctx)
{
    char dir[PATH_MAX];
    queue_sync_removals();   /* a delivery pass ends here: see unsynced */
    return ids_in(qpath(dir, q, domain, NULL, ""), dir, fn, ctx);
}

bool queue_name_commits(const char *name)
{
    return name[0] != '.' && committed_id_len(name, strlen(name)) > 0;
}

bool queue_has_mail(struct queue *q, const char *domain)
{
    char dir[PATH_MAX];
    if (!qpath(dir, q, domain, NULL, ""))
        return false;
    DIR *d = open_dir_nofollow(dir);
    if (!d)
        return errno != ENOENT;
    bool found = false;
    struct dirent *de;
    while (!found && (de = readdir(d)) != NULL) {
        found = queue_name_commits(de->d_name);
    }
    closedir(d);
    return found;
}

/* The data length of the queue file at path, 0 when it cannot be read
 * (the usage counter is then off until the next recount). */
static uint64_t queue_file_data_len(const char *path)
{
    uint64_t len = 0;
    int fd = open_spool_file(path);
    if (fd < 0)
        return 0;
    if (!qfile_data_len(fd, &len))
        len = 0;
    close(fd);
    return len;
}

struct usage_ctx {
    struct queue *q;
    const char *domain;
    uint64_t bytes;
    unsigned long count;
};

static int add_usage(void *ctx, const char *id)
{
    struct usage_ctx *u = ctx;
    char path[PATH_MAX];
    struct stat st;
    if (qpath(path, u->q, u->domain, id, ".m") && stat(path, &st) == 0)
        u->bytes += (uint64_t)st.st_size;
    else if (qpath(path, u->q, u->domain, id, ".q"))
        u->bytes += queue_file_data_len(path);
    u->count++;
    return 0;
}

bool queue_usage_exact(struct queue *q, const char *domain, uint64_t *bytes,
                       unsigned long *count)
{
    struct usage_ctx u = {q, domain, 0, 0};
    if (queue_ids(q, domain, add_usage, &u) < 0)
        return false;
    *bytes = u.bytes;
    *count = u.count;
    return true;
}

/* The usage counter, q/<domain>/.usage: "bytes count".  Counting every
 * message on every RCPT cost 36 ms with 10,000 queued for the domain;
 * the counter makes the quota check constant time.  Commits add, removals
 * subtract, each under an flock of the file; it is not synced, and a crash
 * between a change of the queue and its adjustment skews it until the
 * maintenance pass recounts (queue_usage_refresh).  A missing or
 * unreadable counter is recounted by the next reader. */
#define USAGE_MAX 64

static bool usage_path(char *buf, const struct queue *q, const char *domain)
{
    return qpath(buf, q, domain, NULL, "/.usage");
}

static bool usage_read(int fd, uint64_t *bytes, unsigned long *count)
{
    char buf[USAGE_MAX];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    unsigned long long b;
    unsigned long c;
    char end;
    if (sscanf(buf, "%llu %lu%c", &b, &c, &end) != 3 || end != '\n')
        return false;
    *bytes = b;
    *count = c;
    return true;
}

static void usage_write(int fd, uint64_t bytes, unsigned long count)
{
    char buf[USAGE_MAX];
    int n = snprintf(buf, sizeof buf, "%llu %lu\n", (unsigned long long)bytes, count);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)n, 0) != n) {
        /* a short write leaves it unreadable: the next reader recounts */
        if (ftruncate(fd, 0) != 0)
            log_debug("usage counter: %s", strerror(errno));
    }
}

/* Opens and locks the counter; -1 when it cannot (no domain directory). */
static int usage_lock(struct queue *q, const char *domain, bool create)
{
    char path[PATH_MAX];
    if (!usage_path(path, q, domain))
        return -1;
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0600);
    if (fd >= 0 && flock(fd, LOCK_EX) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static void usage_adjust(struct queue *q, const char *domain, int sign,
                         uint64_t size)
{
    uint64_t bytes;
    unsigned long count;
    int fd = usage_lock(q, domain, false);
    if (fd < 0)
        return;   /* no counter yet: the first reader counts */
    if (usage_read(fd, &bytes, &count)) {
        if (sign > 0) {
            bytes += size;
            count++;
        } else {
            bytes = bytes > size ? bytes - size : 0;
            count = count ? count - 1 : 0;
        }
        usage_write(fd, bytes, count);
    }
    close(fd);
}

bool queue_usage(struct queue *q, const char *domain, uint64_t *bytes,
                 unsigned long *count)
{
    int fd = usage_lock(q, domain, true);
    if (fd < 0)
        return queue_usage_exact(q, domain, bytes, count);
    bool ok = usage_read(fd, bytes, count);
    if (!ok && (ok = queue_usage_exact(q, domain, bytes, count)))
        usage_write(fd, *bytes, *count);
    close(fd);
    return ok;
}

static int refresh_domain(void *ctx, const char *domain)
{
    struct queue *q = ctx;
    uint64_t bytes;
    unsigned long count;
    int fd = usage_lock(q, domain, true);
    if (fd < 0)
        return 0;
    if (queue_usage_exact(q, domain, &bytes, &count))
        usage_write(fd, bytes, count);
    close(fd);
    return 0;
}

void queue_usage_refresh(struct queue *q)
{
    queue_domains(q, refresh_domain, q);
}

/* Reads an envelope file (.e, .n): false with err, errno ENOENT when it
 * is not there, EINVAL when it does not parse, another errno otherwise. */
static bool read_envelope_file(const char *path, struct envelope *e, char *err,
                               size_t n)
{
    int fd = open_spool_file(path);
    struct stat sb;
    if (fd >= 0 && fstat(fd, &sb) == 0 && sb.st_size > QFILE_ENVELOPE_MAX) {
        /* as for the envelope inside a queue file: beyond this it is
         * damage, and parsing it would expand into gigabytes */
        close(fd);
        snprintf(err, n, "%s: an envelope of %lld bytes (at most %u)", path,
                 (long long)sb.st_size, QFILE_ENVELOPE_MAX);
        errno = EINVAL;
        return false;
    }
    FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
    if (!f) {
        int oerr = errno;
        if (fd >= 0)
            close(fd);
        snprintf(err, n, "%s: %s", path, open_failure(oerr));
        errno = oerr;
        return false;
    }
    bool ok = envelope_read(f, e, err, n);
    fclose(f);
    if (!ok)
        errno = EINVAL;
    return ok;
}

/* A newer envelope in <id>.n replaces the one inside the queue file (see
 * queue_update); it must describe the same data. */
static bool apply_newer_envelope(const char *path, uint64_t data_len,
                                 struct envelope *e, char *err, size_t n)
{
    struct envelope newer;
    if (!read_envelope_file(path, &newer, err, n))
        return errno == ENOENT;
    envelope_free(e);
    *e = newer;
    if (e->size == data_len)
        return true;
    snprintf(err, n, "%s: the envelope says %llu octets of data, the queue "
             "file holds %llu", path, (unsigned long long)e->size,
             (unsigned long long)data_len);
    errno = EINVAL;
    return false;
}

/* The envelope of q/<domain>/<id>.q: 1 when read, 0 when there is no such
 * file (the message uses the two-file layout, or is gone), -1 on error. */
static int load_queue_file(struct queue *q, const char *domain, const char *id,
                           struct envelope *e, char *err, size_t n)
{
    char path[PATH_MAX], newer[PATH_MAX], why[256];
    if (!qpath(path, q, domain, id, ".q") || !qpath(newer, q, domain, id, ".n"))
        return 0;
    int fd = open_spool_file(path);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        int oerr = errno;
        snprintf(err, n, "%s: %s", path, open_failure(oerr));
        errno = oerr;
        return -1;
    }
    uint64_t len;
    bool ok = qfile_read(fd, e, &len, why, sizeof why);
    int oerr = errno;
    close(fd);
    if (!ok) {
        snprintf(err, n, "%s: %s", path, why);
        errno = oerr;
        return -1;
    }
    if (apply_newer_envelope(newer, len, e, err, n))
        return 1;
    oerr = errno;
    envelope_free(e);
    errno = oerr;
    return -1;
}

/* The id and domain inside decide what delivery and odmrctl remove or
 * rewrite, so an envelope that disagrees with its own file name (a
 * damaged or hand-edited file) is unreadable, not someone else's. */
static bool envelope_is_for(const struct envelope *e, const char *domain,
                            const char *id, char *err, size_t n)
{
    if (strcmp(e->id, id) || strcmp(e->domain, domain)) {
        snprintf(err, n, "%s/%s: the envelope names %s in %s", domain, id,
                 e->id, e->domain);
        return false;
    }
    if (e->nrcpt == 0) {
        snprintf(err, n, "%s/%s: no recipients", domain, id);
        return false;
    }
    return true;
}

/* A .m shorter than its envelope's size (a damaged spool) would go out
 * cut short and be answered 250: it is damage, as a bad envelope is.
 * (A queue file's trailer check covers the one-file layout.) */
static bool data_covers_envelope(const struct queue *q, const char *domain,
                                 const char *id, const struct envelope *e,
                                 char *err, size_t n)
{
    char path[PATH_MAX];
    struct stat sb;
    if (!qpath(path, q, domain, id, ".m") || lstat(path, &sb) != 0 ||
        !S_ISREG(sb.st_mode) || (uint64_t)sb.st_size >= e->size)
        return true;   /* missing, a link, a FIFO: the reader's to report */
    snprintf(err, n, "%s: message data shorter than its envelope says (%lld "
             "of %llu bytes)", path, (long long)sb.st_size,
             (unsigned long long)e->size);
    return false;
}

bool queue_load(struct queue *q, const char *domain, const char *id,
                struct envelope *e, char *err, size_t n)
{
    char path[PATH_MAX];
    if (!qpath(path, q, domain, id, ".e")) {
        snprintf(err, n, "bad queue id or domain");
        errno = EINVAL;
        return false;
    }
    envelope_init(e);   /* freeing it is safe on every path */
    int found = load_queue_file(q, domain, id, e, err, n);
    if (found < 0 || (found == 0 && !read_envelope_file(path, e, err, n))) {
        int oerr = errno;
        envelope_free(e);
        errno = oerr;   /* ENOENT is kept for "removed meanwhile" */
        return false;
    }
    if (envelope_is_for(e, domain, id, err, n) &&
        (found || data_covers_envelope(q, domain, id, e, err, n)))
        return true;
    envelope_free(e);
    errno = EINVAL;
    return false;
}

int queue_open_data(struct queue *q, const char *domain, const char *id)
{
    char path[PATH_MAX];
    if (!qpath(path, q, domain, id, ".q")) {
        errno = EINVAL;
        return -1;
    }
    int fd = open_spool_file(path);
    if (fd >= 0 || errno != ENOENT || !qpath(path, q, domain, id, ".m"))
        return fd;
    return open_spool_file(path);
}

/* Whether the message is a queue file (and not a .m/.e pair). */
static bool is_queue_file(const struct queue *q, const char *domain,
                          const char *id)
{
    char path[PATH_MAX];
    struct stat st;
    return qpath(path, q, domain, id, ".q") && lstat(path, &st) == 0;
}

bool queue_update(struct queue *q, const struct envelope *e)
{
    char env[PATH_MAX], tmp[PATH_MAX], dir[PATH_MAX];
    /* A queue file is never rewritten: its newer envelope goes beside it. */
    const char *suffix = is_queue_file(q, e->domain, e->id) ? ".n" : ".e";
    if (!qpath(env, q, e->domain, e->id, suffix) ||
        !qpath(dir, q, e->domain, NULL, "") ||
        !str_fmt(tmp, sizeof tmp, "%s/tmp/%s.%ld.u", q->spool, e->id,
                 (long)getpid()))
        return false;
    int err = write_envelope_file(tmp, env, e);
    if (!err && !fsync_dir(dir))
        err = errno;
    errno = err;
    return err == 0;
}

/* Removals whose directory entry is not synced yet.  A removal needs no
 * sync to be correct: if a power loss brings an unsynced removal back, the
 * message is delivered twice, never lost (Postfix never syncs a removal).
 * Syncing the directory after each one put a disk write between every two
 * messages of a drain; instead it is synced once per REMOVAL_SYNC_BATCH
 * removals, whenever the removals move to another directory, before a
 * domain is listed (the end of every delivery pass) or locked, and at
 * exit().  A process that ends with _exit() or is killed leaves the rest
 * to the kernel's own writeback (seconds): kill -9 loses nothing either
 * way, the unlinks are already done. */
#define REMOVAL_SYNC_BATCH 64

static struct {
    char dir[PATH_MAX];        /* "" when nothing is pending */
    unsigned count;
    bool at_exit;              /* the exit handler is registered */
} unsynced;

void queue_sync_removals(void)
{
    if (unsynced.dir[0] && !fsync_dir(unsynced.dir))
        log_debug("%s: directory sync after removals: %s", unsynced.dir,
                  strerror(errno));
    unsynced.dir[0] = '\0';
    unsynced.count = 0;
}

static void removal_unsynced(const char *dir)
{
    if (unsynced.dir[0] && strcmp(unsynced.dir, dir))
        queue_sync_removals();
    if (!unsynced.at_exit)
        unsynced.at_exit = atexit(queue_sync_removals) == 0;
    str_copy(unsynced.dir, dir, sizeof unsynced.dir);
    if (++unsynced.count >= REMOVAL_SYNC_BATCH)
        queue_sync_removals();
}

/* Removes a queue file and its newer envelope, if any: 1 when removed,
 * 0 when the message has no queue file, -1 + errno on failure. */
static int remove_queue_file(struct queue *q, const char *domain,
                             const char *id, const char *dir)
{
    char path[PATH_MAX], newer[PATH_MAX];
    if (!qpath(path, q, domain, id, ".q") || !qpath(newer, q, domain, id, ".n")) {
        errno = EINVAL;
        return -1;
    }
    uint64_t size = queue_file_data_len(path);
    /* The queue file first: once it is gone the message is no longer
     * queued; a newer envelope left by a crash here is garbage for
     * queue_cleanup(). */
    if (unlink(path) != 0)
        return errno == ENOENT ? 0 : -1;
    unlink(newer);
    removal_unsynced(dir);
    usage_adjust(q, domain, -1, size);
    return 1;
}

bool queue_remove(struct queue *q, const char *domain, const char *id)
{
    char env[PATH_MAX], data[PATH_MAX], dir[PATH_MAX];
    if (!qpath(env, q, domain, id, ".e") || !qpath(data, q, domain, id, ".m") ||
        !qpath(dir, q, domain, NULL, "")) {
        errno = EINVAL;
        return false;
    }
    int one_file = remove_queue_file(q, domain, id, dir);
    if (one_file != 0)
        return one_file > 0;
    struct stat st;
    uint64_t size = stat(data, &st) == 0 ? (uint64_t)st.st_size : 0;
    /* Envelope first: once it is gone the message is no longer queued; a
     * data file left by a crash here is garbage for queue_cleanup(). */
    if (unlink(env) != 0)
        return false;
    unlink(data);
    removal_unsynced(dir);
    usage_adjust(q, domain, -1, size);
    return true;
}

/* Moves a queue file (and its newer envelope) into where: 1 when moved,
 * 0 when the message has no queue file, -1 + errno on failure. */
static int quarantine_queue_file(struct queue *q, const char *domain,
                                 const char *id, const char *where)
{
    char path[PATH_MAX], newer[PATH_MAX], to_q[PATH_MAX], to_n[PATH_MAX];
    struct stat st;
    if (!qpath(path, q, domain, id, ".q") || !qpath(newer, q, domain, id, ".n") ||
        !str_fmt(to_q, sizeof to_q, "%s/%s.q", where, id) ||
        !str_fmt(to_n, sizeof to_n, "%s/%s.n", where, id)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -1;
    uint64_t size = queue_file_data_len(path);
    /* The newer envelope first: the queue file leaving is what dequeues. */
    bool moved_newer = rename(newer, to_n) == 0;
    if (!moved_newer && errno != ENOENT)
        return -1;
    if (rename(path, to_q) != 0) {
        int err = errno;
        if (moved_newer && rename(to_n, newer) != 0)
            log_err("%s: newer envelope left in %s: %s", id, to_n, strerror(errno));
        errno = err;
        return -1;
    }
    usage_adjust(q, domain, -1, size);
    return 1;
}

bool queue_quarantine(struct queue *q, const char *domain, const char *id,
                      char *where, size_t n)
{
    char env[PATH_MAX], data[PATH_MAX], dir[PATH_MAX], to_e[PATH_MAX], to_m[PATH_MAX];
    char top[PATH_MAX];
    if (!qpath(env, q, domain, id, ".e") || !qpath(data, q, domain, id, ".m") ||
        !qpath(dir, q, domain, NULL, "") ||
        !str_fmt(top, sizeof top, "%s/corrupt", q->spool) ||
        !str_fmt(where, n, "%s/%s", top, domain) ||
        !str_fmt(to_e, sizeof to_e, "%s/%s.e", where, id) ||
        !str_fmt(to_m, sizeof to_m, "%s/%s.m", where, id)) {
        errno = ENAMETOOLONG;
        return false;
    }
    if (!make_dir(top) || !make_dir(where))
        return false;
    int one_file = quarantine_queue_file(q, domain, id, where);
    if (one_file != 0) {
        if (one_file > 0)
            fsync_dir(dir);
        return one_file > 0;
    }
    struct stat st;
    uint64_t size = stat(data, &st) == 0 ? (uint64_t)st.st_size : 0;
    /* Data first: the envelope leaving the queue is what dequeues it. */
    bool moved_data = rename(data, to_m) == 0;
    if (!moved_data && errno != ENOENT)
        return false;
    if (rename(env, to_e) != 0) {
        int err = errno;
        if (moved_data && rename(to_m, data) != 0)   /* keep the pair together */
            log_err("%s: data left in %s: %s", id, to_m, strerror(errno));
        errno = err;
        return false;
    }
    fsync_dir(dir);
    usage_adjust(q, domain, -1, size);
    return true;
}

/* queue_find and queue_held_find: the same search over the queue or the
 * quarantine area, told apart by how they name files and list domains. */
typedef bool (*path_fn)(char *buf, const struct queue *q, const char *domain,
                        const char *id, const char *suffix);
typedef int (*domains_fn)(struct queue *q, int (*fn)(void *ctx, const char *domain),
                          void *ctx);

struct find_ctx {
    struct queue *q;
    const char *id;
    path_fn path;
    int (*fn)(void *ctx, const char *domain);
    void *ctx;
    int found;
};

static int find_in_domain(void *ctx, const char *domain)
{
    struct find_ctx *f = ctx;
    char path[PATH_MAX];
    bool there = (f->path(path, f->q, domain, f->id, ".e") &&
                  access(path, F_OK) == 0) ||
                 (f->path(path, f->q, domain, f->id, ".q") &&
                  access(path, F_OK) == 0);
    if (there) {
        f->found++;
        return f->fn(f->ctx, domain);
    }
    return 0;
}

static int find_id(struct queue *q, const char *id, path_fn path,
                   domains_fn domains, int (*fn)(void *ctx, const char *domain),
                   void *ctx)
{
    if (!safe_name(id))
        return 0;
    struct find_ctx f = {q, id, path, fn, ctx, 0};
    if (domains(q, find_in_domain, &f) < 0)
        return -1;
    return f.found;
}

int queue_find(struct queue *q, const char *id,
               int (*fn)(void *ctx, const char *domain), void *ctx)
{
    return find_id(q, id, qpath, queue_domains, fn, ctx);
}

int queue_lock_domain(struct queue *q, const char *domain)
{
    char path[PATH_MAX];
    queue_sync_removals();
    int err = ensure_domain_dir(q, domain);
    if (err) {
        errno = err;
        return -1;
    }
    if (!qpath(path, q, domain, NULL, "/.lock"))
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        err = errno;
        close(fd);
        errno = err;
        return err == EWOULDBLOCK ? -2 : -1;
    }
    return fd;
}

/* ------------------------------------------------------------ cleanup */

static bool older_than(const char *path, time_t limit)
{
    struct stat st;
    return lstat(path, &st) == 0 && st.st_mtime < limit;
}

/* The process writing name: an envelope update "<id>.<pid>.u" names its
 * writer in decimal (queue_update), since the id's own pid is that of the
 * process that received the message, long gone; other names are ids. */
static long writer_of(const char *name)
{
    char *end;
    const char *dot = strchr(name, '.');
    size_t len = strlen(name);
    if (dot && len > 2 && !strcmp(name + len - 2, ".u")) {
        long pid = strtol(dot + 1, &end, 10);
        return end == name + len - 2 ? pid : 0;
    }
    if (len < 14)
        return 0;
    long pid = strtol(name + 13, &end, 16);
    return *end == '\0' || *end == '.' ? pid : 0;
}

/* Queue ids end in the hex pid of the process that made them (see
 * queue_new_id): when that process is gone, whatever it left unfinished
 * can go at once instead of waiting for the age limit. */
static bool writer_gone(const char *name)
{
    long pid = writer_of(name);
    if (pid <= 0)
        return false;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static bool stale(const char *path, const char *name, time_t limit)
{
    return older_than(path, limit) || writer_gone(name);
}

static void clean_tmp(struct queue *q, time_t limit)
{
    char dir[PATH_MAX], path[PATH_MAX];
    size_t n;
    str_fmt(dir, sizeof dir, "%s/tmp", q->spool);
    char **names = list_dir(dir, false, &n);
    for (size_t i = 0; names && i < n; i++)
        if (str_fmt(path, sizeof path, "%s/%s", dir, names[i]) &&
            stale(path, names[i], limit))
            unlink(path);
    free_list(names, n);
}

struct clean_ctx {
    struct queue *q;
    time_t limit;
};

/* name without suffix into id (QID_MAX); false when it has another one. */
static bool id_with_suffix(const char *name, const char *suffix, char *id)
{
    size_t len = strlen(name), sl = strlen(suffix);
    if (len <= sl || len - sl >= QID_MAX || strcmp(name + len - sl, suffix))
        return false;
    memcpy(id, name, len - sl);
    id[len - sl] = '\0';
    return true;
}

/* Whether name is id's envelope. */
static bool envelope_of(const char *name, const char *id)
{
    char eid[QID_MAX];
    return name && id_with_suffix(name, ".e", eid) && !strcmp(eid, id);
}

/* A data file without its envelope (what a crash or a failed commit
 * left) is removed once stale.  prev is the name sorted before name (NULL
 * for the first): "<id>.e" sorts right before "<id>.m" ('.' sorts before
 * every hex digit), so a committed message costs no system call here (it
 * cost an access() of its envelope); a .m without one in the listing is
 * checked again, since the envelope may have come since. */
static bool hpath(char *buf, const struct queue *q, const char *domain,
                  const char *id, const char *suffix);

static void clean_leftover(struct clean_ctx *c, const char *domain,
                           const char *prev, const char *name)
{
    char id[QID_MAX], path[PATH_MAX], env[PATH_MAX], held[PATH_MAX];
    if (!id_with_suffix(name, ".m", id) || envelope_of(prev, id))
        return;
    /* a held copy: queue_release is between its link and its rename */
    if (hpath(held, c->q, domain, id, ".m") && access(held, F_OK) == 0)
        return;
    if (qpath(path, c->q, domain, id, ".m") && qpath(env, c->q, domain, id, ".e") &&
        access(env, F_OK) != 0 && errno == ENOENT && stale(path, id, c->limit))
        unlink(path);
}

/* A newer envelope without its queue file is what a crash during a
 * removal leaves: garbage at once, since a .n is only ever written for a
 * committed queue file.  next is the name sorted after name ("<id>.n"
 * sorts right before "<id>.q"). */
static void clean_newer(struct clean_ctx *c, const char *domain,
                        const char *name, const char *next)
{
    char id[QID_MAX], qid[QID_MAX], path[PATH_MAX], qf[PATH_MAX];
    if (!id_with_suffix(name, ".n", id) ||
        (next && id_with_suffix(next, ".q", qid) && !strcmp(id, qid)))
        return;
    if (qpath(path, c->q, domain, id, ".n") && qpath(qf, c->q, domain, id, ".q") &&
        access(qf, F_OK) != 0 && errno == ENOENT)
        unlink(path);
}

static int clean_domain(void *ctx, const char *domain)
{
    struct clean_ctx *c = ctx;
    char dir[PATH_MAX];
    size_t n;
    if (!qpath(dir, c->q, domain, NULL, ""))
        return 0;
    /* every name: the envelopes listed need not be looked for */
    char **names = list_dir(dir, false, &n);
    for (size_t i = 0; names && i < n; i++) {
        clean_leftover(c, domain, i ? names[i - 1] : NULL, names[i]);
        clean_newer(c, domain, names[i], i + 1 < n ? names[i + 1] : NULL);
    }
    free_list(names, n);
    return 0;
}

void queue_cleanup(struct queue *q, long max_age)
{
    struct clean_ctx c = {q, time(NULL) - max_age};
    clean_tmp(q, c.limit);
    queue_domains(q, clean_domain, &c);
}

/* ---------------------------------------------------------- quarantine */

static bool hpath(char *buf, const struct queue *q, const char *domain,
                  const char *id, const char *suffix)
{
    if (!safe_name(domain) || (id && !safe_name(id)))
        return false;
    if (id)
        return str_fmt(buf, PATH_MAX, "%s/quarantine/%s/%s%s", q->spool, domain,
                       id, suffix);
    return str_fmt(buf, PATH_MAX, "%s/quarantine/%s%s", q->spool, domain, suffix);
}

/* mkdir that is durable, or a check that what is there is a directory. */
static int make_durable_dir(const char *dir, const char *parent)
{
    if (mkdir(dir, 0700) == 0)
        return fsync_dir(parent) ? 0 : errno;
    return errno == EEXIST ? real_dir(dir) : errno;
}

static int ensure_held_dir(struct queue *q, const char *domain)
{
    char top[PATH_MAX], dir[PATH_MAX];
    if (!str_fmt(top, sizeof top, "%s/quarantine", q->spool) ||
        !hpath(dir, q, domain, NULL, ""))
        return EINVAL;
    int err = make_durable_dir(top, q->spool);
    return err ? err : make_durable_dir(dir, top);
}

/* The reason on one line, control characters as '?'. */
static int write_reason(const char *path, const char *reason)
{
    char line[1024];
    str_copy(line, reason, sizeof line - 1);
    for (char *p = line; *p; p++)
        if ((unsigned char)*p < 32 || *p == 127)
            *p = '?';
    strcat(line, "\n");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return errno;
    int err = write_all(fd, line, strlen(line)) && fsync(fd) == 0 ? 0 : errno;
    close(fd);
    return err;
}

static int hold_domain(struct queue *q, struct queue_in *in,
                       const struct envelope *e, const char *reason)
{
    char data[PATH_MAX], env[PATH_MAX], why[PATH_MAX], dir[PATH_MAX], tmp[PATH_MAX];
    int err = ensure_held_dir(q, e->domain);
    if (err)
        return err;
    if (!hpath(data, q, e->domain, in->id, ".m") ||
        !hpath(env, q, e->domain, in->id, ".e") ||
        !hpath(why, q, e->domain, in->id, ".why") ||
        !hpath(dir, q, e->domain, NULL, "") ||
        !str_fmt(tmp, sizeof tmp, "%s/tmp/%s.e", q->spool, in->id))
        return ENAMETOOLONG;
    if (link(in->tmp_path, data) != 0)
        return errno;
    err = write_reason(why, reason);
    if (!err)
        err = write_envelope_file(tmp, env, e);
    if (!err && !fsync_dir(dir))
        err = errno;
    if (err) {
        unlink(env);
        unlink(why);
        unlink(data);
    }
    return err;
}

int queue_in_commit_held(struct queue *q, struct queue_in *in,
                         struct envelope **envs, size_t nenv,
                         const char *reason)
{
    int err = in_finish(in);
    time_t now = time(NULL);
    size_t done = 0;
    for (; !err && done < nenv; done++) {
        stamp_envelope(envs[done], in, now);
        err = hold_domain(q, in, envs[done], reason);
    }
    if (err)
        for (size_t i = 0; i + 1 < done; i++)
            queue_held_remove(q, envs[i]->domain, in->id);
    /* Not queued anywhere: the name it was written under goes. */
    unlink(in->tmp_path);
    in->tmp_path[0] = '\0';
    in_release_dir(in);
    return err;
}

int queue_held_domains(struct queue *q,
                       int (*fn)(void *ctx, const char *domain), void *ctx)
{
    char dir[PATH_MAX];
    str_fmt(dir, sizeof dir, "%s/quarantine", q->spool);
    return each_name(dir, false, true, fn, ctx, NULL);
}

int queue_held_ids(struct queue *q, const char *domain,
                   int (*fn)(void *ctx, const char *id), void *ctx)
{
    char dir[PATH_MAX];
    return ids_in(hpath(dir, q, domain, NULL, ""), dir, fn, ctx);
}

static void read_reason(const char *path, char *reason, size_t rn)
{
    reason[0] = '\0';
    int fd = open_spool_file(path);
    if (fd < 0 || rn == 0) {
        if (fd >= 0)
            close(fd);
        return;
    }
    ssize_t got = read(fd, reason, rn - 1);
    close(fd);
    reason[got > 0 ? got : 0] = '\0';
    reason[strcspn(reason, "\n")] = '\0';
}

bool queue_held_load(struct queue *q, const char *domain, const char *id,
                     struct envelope *e, char *reason, size_t rn, char *err,
                     size_t n)
{
    char path[PATH_MAX], why[PATH_MAX];
    if (!hpath(path, q, domain, id, ".e") || !hpath(why, q, domain, id, ".why")) {
        snprintf(err, n, "bad queue id or domain");
        errno = EINVAL;
        return false;
    }
    if (!read_envelope_file(path, e, err, n))
        return false;
    if (strcmp(e->id, id) || strcmp(e->domain, domain)) {
        snprintf(err, n, "%s: the envelope names %s in %s", path, e->id, e->domain);
        envelope_free(e);
        errno = EINVAL;
        return false;
    }
    read_reason(why, reason, rn);
    return true;
}

int queue_held_find(struct queue *q, const char *id,
                    int (*fn)(void *ctx, const char *domain), void *ctx)
{
    return find_id(q, id, hpath, queue_held_domains, fn, ctx);
}

bool queue_release(struct queue *q, const char *domain, const char *id)
{
    char hdata[PATH_MAX], henv[PATH_MAX], hwhy[PATH_MAX], hdir[PATH_MAX];
    char data[PATH_MAX], env[PATH_MAX], dir[PATH_MAX];
    struct stat st;
    if (!hpath(hdata, q, domain, id, ".m") || !hpath(henv, q, domain, id, ".e") ||
        !hpath(hwhy, q, domain, id, ".why") || !hpath(hdir, q, domain, NULL, "") ||
        !qpath(data, q, domain, id, ".m") || !qpath(env, q, domain, id, ".e") ||
        !qpath(dir, q, domain, NULL, "")) {
        errno = EINVAL;
        return false;
    }
    if (lstat(henv, &st) != 0 || lstat(hdata, &st) != 0)
        return false;
    int err = ensure_domain_dir(q, domain);
    if (err) {
        errno = err;
        return false;
    }
    /* EEXIST: an earlier release stopped after its link (same inode). */
    if (link(hdata, data) != 0 && errno != EEXIST)
        return false;
    if (rename(henv, env) != 0)
        return false;
    /* Released from here on.  The cleanup spares a .m that still has a
     * held copy (clean_leftover); should the data be gone all the same,
     * it is linked again, and the held copy goes only once the queued
     * one is there and synced. */
    if (lstat(data, &st) != 0 && errno == ENOENT && link(hdata, data) != 0)
        log_err("%s: released, but its data could not be linked again: %s "
                "(a copy stays in the quarantine)", id, strerror(errno));
    else if (fsync_dir(dir) && lstat(hdata, &st) == 0) {
        unlink(hdata);
        fsync_dir(hdir);
    }
    usage_adjust(q, domain, +1, (uint64_t)st.st_size);
    unlink(hwhy);
    return true;
}

bool queue_held_remove(struct queue *q, const char *domain, const char *id)
{
    char env[PATH_MAX], data[PATH_MAX], why[PATH_MAX], dir[PATH_MAX];
    if (!hpath(env, q, domain, id, ".e") || !hpath(data, q, domain, id, ".m") ||
        !hpath(why, q, domain, id, ".why") || !hpath(dir, q, domain, NULL, "")) {
        errno = EINVAL;
        return false;
    }
    if (unlink(env) != 0)
        return false;
    unlink(data);
    unlink(why);
    fsync_dir(dir);
    return true;
}
