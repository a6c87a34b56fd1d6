/* ownership.c - see ownership.h for what is guaranteed. */
#define _GNU_SOURCE   /* O_PATH, AT_EMPTY_PATH */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../common/util.h"
#include "ownership.h"

/* spool/q/<domain>/<file> (and corrupt/<domain>/<file>): no entry of the
 * layout is further below spool_dir, so a directory at this depth is not
 * odmrd's and is not given away unseen. */
#define OWN_MAX_DEPTH 3
/* Entries with a mode problem named one by one; the rest are counted in
 * one line, so a spool of a million bad files does not flood the log. */
#define OWN_MAX_LISTED 5
#define MSG_MAX (2 * PATH_MAX + 512)

struct report {
    own_report_fn fn;
    void *ctx;
    int problems;
};

static void say(struct report *r, enum own_level level, const char *fmt, ...)
    PRINTF_LIKE(3, 4);

/* One line: control characters in file names become '?', so a name can
 * neither break the line nor reach a terminal raw. */
static void say(struct report *r, enum own_level level, const char *fmt, ...)
{
    char msg[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *s = msg; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
    if (level == OWN_PROBLEM)
        r->problems++;
    r->fn(r->ctx, level, msg);
}

/* ------------------------------------------------------------ users */

static void name_of_uid(uid_t uid, char *buf, size_t n)
{
    struct passwd *pw = getpwuid(uid);
    if (!pw || !str_copy(buf, pw->pw_name, n))
        snprintf(buf, n, "%lu", (unsigned long)uid);
}

static void name_of_gid(gid_t gid, char *buf, size_t n)
{
    struct group *gr = getgrgid(gid);
    if (!gr || !str_copy(buf, gr->gr_name, n))
        snprintf(buf, n, "%lu", (unsigned long)gid);
}

bool own_user_by_name(const char *name, struct own_user *u)
{
    struct passwd *pw = getpwnam(name);
    if (!pw)
        return false;
    u->uid = pw->pw_uid;
    u->gid = pw->pw_gid;
    str_copy(u->name, name, sizeof u->name);
    name_of_gid(u->gid, u->group, sizeof u->group);
    return true;
}

void own_user_by_uid(uid_t uid, gid_t gid, struct own_user *u)
{
    struct passwd *pw = getpwuid(uid);
    u->uid = uid;
    u->gid = pw ? pw->pw_gid : gid;
    if (!pw || !str_copy(u->name, pw->pw_name, sizeof u->name))
        snprintf(u->name, sizeof u->name, "uid %lu", (unsigned long)uid);
    name_of_gid(u->gid, u->group, sizeof u->group);
}

bool own_become(const struct own_user *u, char *err, size_t n)
{
    /* Not root: already the user, and no group could be changed anyway. */
    if (u->uid != 0 && geteuid() == u->uid && getuid() == u->uid)
        return true;
    if (setgroups(1, &u->gid) != 0 || setgid(u->gid) != 0 || setuid(u->uid) != 0) {
        snprintf(err, n, "%s", strerror(errno));
        return false;
    }
    if (u->uid != 0 && setuid(0) == 0) {   /* must be impossible now */
        snprintf(err, n, "root privileges could not be given up");
        return false;
    }
    return true;
}

/* "/var/spool/odmr/" names the same as "/var/spool/odmr": its parent
 * is /var/spool. */
static void strip_slashes(char *path)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        path[--len] = '\0';
}

static void parent_of(const char *path, char *dir, size_t n)
{
    str_copy(dir, path, n);
    strip_slashes(dir);
    char *slash = strrchr(dir, '/');
    if (slash)
        *(slash == dir ? slash + 1 : slash) = '\0';
}

/* Is path top or below it (by name)? */
static bool in_tree(const char *path, const char *top)
{
    size_t n = strlen(top);
    while (n > 1 && top[n - 1] == '/')
        n--;
    return !strncmp(path, top, n) && (path[n] == '\0' || path[n] == '/');
}

/* ------------------------------------------------- hard-link accounting */

/* A file with several names can be given away only when all of them are
 * in the spool (a message is one inode linked into each of its domains):
 * a link to a file elsewhere would hand that file to the user. */
struct link_rec {
    dev_t dev;
    ino_t ino;
    nlink_t nlink, seen;
};

struct links {
    struct link_rec *v;
    size_t n, cap;
    bool no_memory;
};

static void links_add(struct links *l, const struct stat *st)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        struct link_rec *v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            l->no_memory = true;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (struct link_rec){st->st_dev, st->st_ino, st->st_nlink, 1};
}

static int link_cmp(const void *a, const void *b)
{
    const struct link_rec *x = a, *y = b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    return x->ino < y->ino ? -1 : x->ino > y->ino;
}

/* Sorts and folds the names of one inode into one record. */
static void links_merge(struct links *l)
{
    if (l->n == 0)
        return;
    qsort(l->v, l->n, sizeof *l->v, link_cmp);
    size_t out = 0;
    for (size_t i = 1; i < l->n; i++) {
        if (link_cmp(&l->v[out], &l->v[i]) == 0)
            l->v[out].seen++;
        else
            l->v[++out] = l->v[i];
    }
    l->n = out + 1;
}

static bool links_known(const struct links *l, const struct stat *st)
{
    struct link_rec key = {st->st_dev, st->st_ino, 0, 0};
    const struct link_rec *r = bsearch(&key, l->v, l->n, sizeof *l->v, link_cmp);
    return r && r->seen == r->nlink && st->st_nlink == r->nlink;
}

/* ------------------------------------------------------ the tree walk */

struct walk {
    struct report *r;
    const struct own_user *u;
    enum own_mode mode;
    const char *top;           /* spool_dir, for messages */
    bool changing;             /* second pass of OWN_TAKE: give away */
    bool stop;                 /* that pass failed: change nothing more */
    unsigned long others;      /* entries not owned by user:group */
    char example[PATH_MAX];    /* the first of them, for the note */
    uid_t example_uid;
    gid_t example_gid;
    unsigned long changed;
    unsigned long listed, unlisted;
    bool unlisted_foreign;     /* an unlisted one belongs to someone else */
    struct links links;
};

static bool owned(const struct walk *w, const struct stat *st)
{
    return st->st_uid == w->u->uid && st->st_gid == w->u->gid;
}

/* An entry the user cannot read and write: foreign when it belongs to
 * somebody else (only a non-root check sees that: root gives it away). */
static void access_problem(struct walk *w, const char *path,
                           const struct stat *st, bool foreign)
{
    const struct own_user *u = w->u;
    bool dir = S_ISDIR(st->st_mode);
    if (w->listed >= OWN_MAX_LISTED) {
        w->unlisted++;
        w->unlisted_foreign |= foreign;
        return;
    }
    w->listed++;
    char owner[64];
    name_of_uid(st->st_uid, owner, sizeof owner);
    if (foreign)
        say(w->r, OWN_PROBLEM, "%s: belongs to %s, and user %s cannot read "
            "and write it; fix: chown %s:%s %s", path, owner, u->name,
            u->name, u->group, path);
    else
        say(w->r, OWN_PROBLEM, "%s: mode %04o, user %s needs to read and "
            "write this %s; fix: chmod %s %s", path,
            (unsigned)(st->st_mode & 07777), u->name,
            dir ? "directory" : "file", dir ? "u+rwx" : "u+rw", path);
}

static void finish_listing(struct walk *w)
{
    if (!w->unlisted)
        return;
    const struct own_user *u = w->u;
    char chown_cmd[PATH_MAX + 200] = "";
    if (w->unlisted_foreign)
        snprintf(chown_cmd, sizeof chown_cmd, "chown -R %s:%s %s && ",
                 u->name, u->group, w->top);
    say(w->r, OWN_PROBLEM, "%s: %lu more entries like these; fix: %s"
        "chmod -R u+rwX %s", w->top, w->unlisted, chown_cmd, w->top);
}

/* First pass, as root: what the second will change, and whether the
 * user, once owner, has the owner's permissions it needs. */
static void plan_entry(struct walk *w, const char *path, const struct stat *st)
{
    if (!owned(w, st)) {
        if (w->others++ == 0) {
            str_copy(w->example, path, sizeof w->example);
            w->example_uid = st->st_uid;
            w->example_gid = st->st_gid;
        }
        if (S_ISREG(st->st_mode) && st->st_nlink > 1)
            links_add(&w->links, st);
    }
    mode_t need = S_ISDIR(st->st_mode) ? S_IRWXU
                : S_ISREG(st->st_mode) ? (S_IRUSR | S_IWUSR) : 0;
    if ((st->st_mode & need) != need)
        access_problem(w, path, st, false);
}

static void walk_error(struct walk *w, const char *path);
static void change_opened(struct walk *w, int fd, const char *path,
                          const struct stat *st);

/* Second pass, as root.  The entry is looked at again by its directory's
 * descriptor, so a name swapped since the first pass gains nothing: a
 * file with several names must still be the one whose names were all
 * seen in the spool. */
static void change_entry(struct walk *w, int dfd, const char *name,
                         const char *path, const struct stat *seen)
{
    if (owned(w, seen))
        return;
    /* The change goes through a descriptor of the entry, checked after it
     * was opened: by name, the entry could be swapped between the check
     * and the chown (for a hard link to a file outside the spool). */
    int fd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno != ENOENT)   /* removed meanwhile: nothing to give */
            walk_error(w, path);
        return;
    }
    struct stat now;
    if (fstat(fd, &now) != 0 || now.st_dev != seen->st_dev ||
        now.st_ino != seen->st_ino) {
        close(fd);
        say(w->r, OWN_PROBLEM, "%s: replaced while odmrd was giving the "
            "spool to user %s; fix: start odmrd again", path, w->u->name);
        w->stop = true;
        return;
    }
    change_opened(w, fd, path, &now);
    close(fd);
}

static void change_opened(struct walk *w, int fd, const char *path,
                          const struct stat *st)
{
    if (S_ISREG(st->st_mode) && st->st_nlink > 1 && !links_known(&w->links, st)) {
        say(w->r, OWN_PROBLEM, "%s: its hard links changed while odmrd was "
            "giving the spool to user %s; fix: start odmrd again", path,
            w->u->name);
        w->stop = true;
        return;
    }
    if (fchownat(fd, "", w->u->uid, w->u->gid, AT_EMPTY_PATH) != 0) {
        say(w->r, OWN_PROBLEM, "cannot give %s to %s:%s: %s; odmrd does not "
            "run on a spool it owns only in part: fix that, then start it "
            "again", path, w->u->name, w->u->group, strerror(errno));
        w->stop = true;
        return;
    }
    w->changed++;
}

/* OWN_SELF: the kernel's answer for this very process.  Only what it can
 * use is descended into. */
static bool self_entry(struct walk *w, int dfd, const char *name,
                       const char *path, const struct stat *st)
{
    int need = S_ISDIR(st->st_mode) ? (R_OK | W_OK | X_OK)
             : S_ISREG(st->st_mode) ? (R_OK | W_OK) : 0;
    if (!need || faccessat(dfd, name, need, 0) == 0)
        return true;
    access_problem(w, path, st, st->st_uid != w->u->uid);
    return false;
}

/* Returns whether a directory may be descended into. */
static bool visit(struct walk *w, int dfd, const char *name, const char *path,
                  const struct stat *st)
{
    if (w->mode == OWN_SELF)
        return self_entry(w, dfd, name, path, st);
    if (w->changing)
        change_entry(w, dfd, name, path, st);
    else
        plan_entry(w, path, st);
    return !w->stop;
}

static void walk_error(struct walk *w, const char *path)
{
    say(w->r, OWN_PROBLEM, "cannot read %s: %s", path, strerror(errno));
    if (w->changing)
        w->stop = true;
}

static void too_deep(struct walk *w, const char *path)
{
    if (w->mode == OWN_SELF)
        return;   /* the queue never looks there: nothing to check */
    say(w->r, OWN_PROBLEM, "%s: a directory deeper than the queue layout "
        "(spool/q/DOMAIN/FILE), not odmrd's; odmrd gives nothing it does "
        "not know to user %s; fix: move it out of %s", path, w->u->name,
        w->top);
    if (w->changing)
        w->stop = true;
}

static void walk_dir(struct walk *w, int fd, char *path, int depth);

/* One entry at depth (0 = spool_dir itself).  path has PATH_MAX bytes. */
static void walk_entry(struct walk *w, int dfd, const char *name, char *path,
                       int depth)
{
    /* Only a non-root check follows a link that spool_dir itself is:
     * root found it is none before it started. */
    bool follow = depth == 0 && w->mode == OWN_SELF;
    struct stat st;
    if (fstatat(dfd, name, &st, follow ? 0 : AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno != ENOENT)   /* gone: a session just removed it */
            walk_error(w, path);
        return;
    }
    if (!visit(w, dfd, name, path, &st) || !S_ISDIR(st.st_mode))
        return;
    if (depth >= OWN_MAX_DEPTH) {
        too_deep(w, path);
        return;
    }
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC |
                               (follow ? 0 : O_NOFOLLOW));
    if (fd < 0) {
        if (errno != ENOENT)
            walk_error(w, path);
        return;
    }
    walk_dir(w, fd, path, depth);
}

static void walk_dir(struct walk *w, int fd, char *path, int depth)
{
    DIR *d = fdopendir(fd);
    if (!d) {
        walk_error(w, path);
        close(fd);
        return;
    }
    size_t len = strlen(path);
    while (!w->stop) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno)
                walk_error(w, path);
            break;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (!str_fmt(path + len, PATH_MAX - len, "/%s", de->d_name)) {
            path[len] = '\0';
            say(w->r, OWN_PROBLEM, "%s: a name in it is too long", path);
            continue;
        }
        walk_entry(w, dirfd(d), de->d_name, path, depth + 1);
        path[len] = '\0';
    }
    closedir(d);
}

static void walk_tree(struct walk *w, const char *top)
{
    char path[PATH_MAX];
    if (str_copy(path, top, sizeof path))
        walk_entry(w, AT_FDCWD, top, path, 0);
}

/* -------------------------------------------------- as root: give away */

/* spool_dir or accounts_db as root: it must be what it says, not a link
 * (the user may own its parent and could point a link anywhere).  false
 * when there is nothing to walk. */
static bool root_top(struct walk *w, const char *key, const char *path, bool dir)
{
    struct stat st;
    char parent[PATH_MAX];
    parent_of(path, parent, sizeof parent);
    if (lstat(path, &st) != 0) {
        /* A missing parent is the check as the user's to report. */
        if (errno == ENOENT && dir && w->mode == OWN_PREDICT &&
            access(parent, F_OK) == 0)
            say(w->r, OWN_NOTE, "spool_dir %s does not exist yet: odmrd "
                "creates it at start, owned by %s:%s", path, w->u->name,
                w->u->group);
        else if (errno != ENOENT)
            say(w->r, OWN_PROBLEM, "%s %s: %s", key, path, strerror(errno));
        return false;
    }
    if (S_ISLNK(st.st_mode)) {
        say(w->r, OWN_PROBLEM, "%s %s is a symbolic link: odmrd gives it to "
            "user %s only by its real path; fix: set %s to the path that "
            "readlink -f %s prints", key, path, w->u->name, key, path);
        return false;
    }
    if (dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
        say(w->r, OWN_PROBLEM, "%s %s is not a %s", key, path,
            dir ? "directory" : "regular file");
        return false;
    }
    if (!dir && !owned(w, &st) && st.st_nlink > 1) {
        say(w->r, OWN_PROBLEM, "accounts_db %s has %lu hard links: odmrd "
            "does not give a file with other names to user %s; fix: cp -p "
            "%s %s.new && mv %s.new %s", path, (unsigned long)st.st_nlink,
            w->u->name, path, path, path, path);
        return false;
    }
    return true;
}

/* After the first pass: every file with several names must have shown
 * all of them. */
static void links_verify(struct walk *w)
{
    if (w->links.no_memory) {
        say(w->r, OWN_PROBLEM, "%s: out of memory counting hard links", w->top);
        return;
    }
    links_merge(&w->links);
    for (size_t i = 0; i < w->links.n; i++) {
        const struct link_rec *l = &w->links.v[i];
        if (l->seen != l->nlink)
            say(w->r, OWN_PROBLEM, "%s: a file in it (inode %lu) has %lu hard "
                "link%s outside the spool, so giving it to user %s would give "
                "away a file elsewhere; fix: find / -xdev -inum %lu, and "
                "remove the links that are not odmrd's", w->top,
                (unsigned long)l->ino, (unsigned long)(l->nlink - l->seen),
                l->nlink - l->seen == 1 ? "" : "s", w->u->name,
                (unsigned long)l->ino);
    }
}

static void note_owners(struct walk *w, const char *what, unsigned long count)
{
    char uname[64], gname[64];
    name_of_uid(w->example_uid, uname, sizeof uname);
    name_of_gid(w->example_gid, gname, sizeof gname);
    if (w->mode == OWN_PREDICT)
        say(w->r, OWN_NOTE, "at start odmrd gives %lu %s to %s:%s (now "
            "owned by others, e.g. %s by %s:%s)", count, what, w->u->name,
            w->u->group, w->example, uname, gname);
    else
        say(w->r, OWN_NOTE, "gave %lu %s to %s:%s (e.g. %s, owned by %s:%s)",
            count, what, w->u->name, w->u->group, w->example, uname, gname);
}

/* The spool tree and the database: planned, and with OWN_TAKE given away
 * when the plan found no problem. */
static void give_away(struct report *r, const struct own_paths *p,
                      const struct own_user *u, enum own_mode mode)
{
    struct walk w = {.r = r, .u = u, .mode = mode, .top = p->spool_dir};
    bool spool = root_top(&w, "spool_dir", p->spool_dir, true);
    /* A database inside the spool is one of the spool's entries. */
    bool db = !in_tree(p->accounts_db, p->spool_dir) &&
              root_top(&w, "accounts_db", p->accounts_db, false);
    if (spool)
        walk_tree(&w, p->spool_dir);
    unsigned long in_spool = w.others;
    if (db)
        walk_tree(&w, p->accounts_db);   /* a file: just that entry */
    links_verify(&w);
    finish_listing(&w);
    if (mode == OWN_TAKE && r->problems == 0) {   /* all or nothing */
        w.changing = true;
        if (spool)
            walk_tree(&w, p->spool_dir);
        if (db && !w.stop)
            walk_tree(&w, p->accounts_db);
    }
    char what[2 * PATH_MAX + 64];
    if (!in_spool)
        snprintf(what, sizeof what, "entry (accounts_db %s)", p->accounts_db);
    else
        snprintf(what, sizeof what, "%s of %s%s", in_spool == 1 &&
                 w.others == 1 ? "entry" : "entries", p->spool_dir,
                 w.others > in_spool ? " and accounts_db" : "");
    if (w.others && (mode == OWN_PREDICT || w.changed))
        note_owners(&w, what, mode == OWN_PREDICT ? w.others : w.changed);
    free(w.links.v);
}

/* ---------------------------------------- as the user, in a child process */

struct child {
    struct report *r;
    const struct own_user *u;
    const char *given;          /* spool_dir when root gives it away, or NULL */
    char closed[3][PATH_MAX];   /* directories reported, each only once */
    size_t nclosed;
};

/* The chmod that lets u search dir: the owner's, group's or others' bit,
 * whichever the kernel will look at for u. */
static const char *search_bit(const struct own_user *u, const char *dir)
{
    struct stat st;
    if (stat(dir, &st) != 0)
        return "o+x";
    if (st.st_uid == u->uid)
        return "u+x";
    return st.st_gid == u->gid ? "g+x" : "o+x";
}

static bool reported_closed(struct child *c, const char *dir)
{
    for (size_t i = 0; i < c->nclosed; i++)
        if (!strcmp(c->closed[i], dir))
            return true;
    if (c->nclosed < sizeof c->closed / sizeof c->closed[0])
        str_copy(c->closed[c->nclosed++], dir, PATH_MAX);
    return false;
}

/* Can the user search dir, on the way to key's path?  fix_dir is what
 * "install -d" must create when dir is missing. */
static bool searchable(struct child *c, const char *key, const char *path,
                       const char *dir, const char *fix_dir)
{
    if (access(dir, X_OK) == 0)
        return true;
    const struct own_user *u = c->u;
    if (errno == ENOENT)
        say(c->r, OWN_PROBLEM, "%s %s: directory %s does not exist; fix: "
            "install -d -m 0700 -o %s -g %s %s", key, path, dir, u->name,
            u->group, fix_dir);
    else if (errno == EACCES && !reported_closed(c, dir))
        say(c->r, OWN_PROBLEM, "%s: user %s cannot search this directory, "
            "and needs to reach %s %s below it; fix: chmod %s %s", dir,
            u->name, key, path, search_bit(u, dir), dir);
    else if (errno != EACCES)
        say(c->r, OWN_PROBLEM, "%s %s: directory %s: %s", key, path, dir,
            strerror(errno));
    return false;
}

/* Is dir spool_dir or below it, while root gives that tree away?  Then
 * root's pass judges it (as it will be), not the user's view of now. */
static bool given_by_root(const struct child *c, const char *dir)
{
    return c->given && in_tree(dir, c->given);
}

/* Every directory above path, from "/" down; stops at the first the user
 * cannot search. */
static bool reach(struct child *c, const char *key, const char *path,
                  const char *fix_dir)
{
    char dir[PATH_MAX];
    if (!str_copy(dir, path, sizeof dir))
        return false;
    strip_slashes(dir);
    char *last = strrchr(dir, '/');
    if (!last)
        return true;
    for (char *s = dir; s && s <= last; s = strchr(s + 1, '/')) {
        char saved = s[s == dir];
        s[s == dir] = '\0';   /* "/" itself, then "/a", "/a/b", ... */
        bool ok = given_by_root(c, dir) || searchable(c, key, path, dir, fix_dir);
        s[s == dir] = saved;
        if (!ok)
            return false;
    }
    return true;
}

/* A file the user must be able to create (and remove) in its directory. */
/* Does dir hold nothing but (perhaps) path?  Only such a directory may be
 * given to the user: handing it /run or /var/lib would be a fix worse
 * than the problem. */
static bool only_holds(const char *dir, const char *path)
{
    DIR *d = opendir(dir);
    if (!d)
        return false;
    const char *base = strrchr(path, '/') + 1;
    bool alone = true;
    struct dirent *de;
    while (alone && (de = readdir(d)) != NULL)
        alone = !strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
                !strcmp(de->d_name, base);
    closedir(d);
    return alone;
}

static void creatable(struct child *c, const char *key, const char *path,
                      const char *verb, const char *why)
{
    char dir[PATH_MAX], fix[2 * PATH_MAX + 300];
    parent_of(path, dir, sizeof dir);
    if (given_by_root(c, dir) || access(dir, W_OK | X_OK) == 0)
        return;
    int err = errno;
    const char *u = c->u->name, *g = c->u->group;
    if (only_holds(dir, path))
        snprintf(fix, sizeof fix, "chown %s:%s %s", u, g, dir);
    else
        snprintf(fix, sizeof fix, "install -d -m %s -o %s -g %s %s/odmr and "
                 "set %s = %s/odmr%s", strcmp(key, "pid_file") ? "0700" : "0755",
                 u, g, strcmp(dir, "/") ? dir : "", key,
                 strcmp(dir, "/") ? dir : "", strrchr(path, '/'));
    say(c->r, OWN_PROBLEM, "%s %s: user %s cannot %s in %s (%s; %s %s); "
        "fix: %s", key, path, u, verb, dir, strerror(err), why, u, fix);
}

/* An existing file the user must read (and write). */
static void usable_file(struct child *c, const char *key, const char *path,
                        int need)
{
    if (access(path, need) == 0 || errno == ENOENT)
        return;
    struct stat st;
    char how[200];
    if (stat(path, &st) == 0 && st.st_uid != c->u->uid)
        snprintf(how, sizeof how, "chown %s:%s", c->u->name, c->u->group);
    else
        str_copy(how, "chmod u+rw", sizeof how);
    say(c->r, OWN_PROBLEM, "%s %s: user %s cannot %s it (%s); fix: %s %s",
        key, path, c->u->name, need & W_OK ? "write" : "read",
        strerror(errno), how, path);
}

static void check_db(struct child *c, const char *db, enum own_mode mode)
{
    char dir[PATH_MAX];
    parent_of(db, dir, sizeof dir);
    if (!reach(c, "accounts_db", db, dir))
        return;
    if (access(db, F_OK) != 0 && errno == ENOENT)
        creatable(c, "accounts_db", db, "create it",
                  "odmrctl creates it as");
    else if (mode == OWN_SELF)   /* else root's pass judged the file */
        usable_file(c, "accounts_db", db, R_OK | W_OK);
}

static void check_pid_file(struct child *c, const char *pid_file)
{
    char dir[PATH_MAX];
    parent_of(pid_file, dir, sizeof dir);
    if (!reach(c, "pid_file", pid_file, dir))
        return;
    creatable(c, "pid_file", pid_file, "create and remove it",
              "it is written after the switch to");
    if (!given_by_root(c, pid_file))
        usable_file(c, "pid_file", pid_file, W_OK);
}

/* Without root, spool_dir must exist or be creatable by the process. */
static void check_spool_self(struct child *c, const struct own_paths *p,
                             const struct own_user *u)
{
    struct stat st;
    if (stat(p->spool_dir, &st) != 0 && errno == ENOENT) {
        char dir[PATH_MAX];
        parent_of(p->spool_dir, dir, sizeof dir);
        if (access(dir, W_OK | X_OK) != 0)
            say(c->r, OWN_PROBLEM, "spool_dir %s does not exist, and %s "
                "cannot create it in %s; fix: install -d -m 0700 -o %s -g %s %s",
                p->spool_dir, u->name, dir, u->name, u->group, p->spool_dir);
        return;
    }
    struct walk w = {.r = c->r, .u = u, .mode = OWN_SELF, .top = p->spool_dir};
    walk_tree(&w, p->spool_dir);
    finish_listing(&w);
}

static void pipe_report(void *ctx, enum own_level level, const char *msg)
{
    int fd = *(int *)ctx;
    char line[MSG_MAX + 4];   /* say() made msg shorter than MSG_MAX */
    int len = snprintf(line, sizeof line, "%c%s\n",
                       level == OWN_PROBLEM ? 'P' : 'N', msg);
    if (len > 0 && (size_t)len < sizeof line)
        write_all(fd, line, (size_t)len);
}

static void child_main(const struct own_paths *p, const struct own_user *u,
                       enum own_mode mode, int fd)
{
    struct report r = {pipe_report, &fd, 0};
    struct child c = {.r = &r, .u = u,
                      .given = mode == OWN_SELF ? NULL : p->spool_dir};
    char err[256];
    if (!own_become(u, err, sizeof err)) {
        say(&r, OWN_PROBLEM, "cannot become user %s to check its access: %s",
            u->name, err);
        return;
    }
    if (reach(&c, "spool_dir", p->spool_dir, p->spool_dir) && mode == OWN_SELF)
        check_spool_self(&c, p, u);
    check_db(&c, p->accounts_db, mode);
    if (p->pid_file && p->pid_file[0])
        check_pid_file(&c, p->pid_file);
}

/* Relays the child's lines to the real report. */
static void relay(int fd, struct report *r)
{
    FILE *f = fdopen(fd, "r");
    if (!f) {
        close(fd);
        return;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] == '\n')
            line[len - 1] = '\0';
        say(r, line[0] == 'P' ? OWN_PROBLEM : OWN_NOTE, "%s", line + 1);
    }
    free(line);
    fclose(f);
}

static void check_as_user(struct report *r, const struct own_paths *p,
                          const struct own_user *u, enum own_mode mode)
{
    int fds[2];
    if (pipe(fds) != 0) {
        say(r, OWN_PROBLEM, "cannot check as user %s: pipe: %s", u->name,
            strerror(errno));
        return;
    }
    fflush(NULL);   /* nothing buffered may come out twice */
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        child_main(p, u, mode, fds[1]);
        _exit(0);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        say(r, OWN_PROBLEM, "cannot check as user %s: fork: %s", u->name,
            strerror(errno));
        return;
    }
    relay(fds[0], r);
    int status = 0;
    pid_t got;
    while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
        ;
    if (got != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        say(r, OWN_PROBLEM, "the check as user %s did not finish", u->name);
}

int own_check(const struct own_paths *p, const struct own_user *u,
              enum own_mode mode, own_report_fn fn, void *ctx)
{
    struct report r = {fn, ctx, 0};
    /* The user's view first: a start refused for a directory above the
     * spool must not have changed the spool either. */
    check_as_user(&r, p, u, mode);
    if (mode != OWN_SELF)
        give_away(&r, p, u, mode);
    return r.problems;
}
