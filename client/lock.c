/* lock.c - one odmr-fetch run at a time.
 *
 * flock() on a lock file: the kernel drops the lock when the process
 * ends however it ends, so a crashed run never blocks the next one and
 * there is no stale-lock guessing.  The lock is taken before connecting,
 * so the second of two overlapping cron runs exits 75 without bothering
 * the provider (which would refuse its ATRN with 451 anyway). */
#include "fetch.h"

#include <errno.h>
#include <pwd.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* A directory only uid can write into (nobody else can plant or remove
 * a lock file there), and that this process can write into now (a home
 * of mode 0500, a read-only file system, ProtectHome=read-only: the next
 * place, not exit 78 every run). */
static bool private_dir(const char *dir, uid_t uid)
{
    struct stat st;
    return dir && dir[0] == '/' && stat(dir, &st) == 0 &&
           S_ISDIR(st.st_mode) && st.st_uid == uid &&
           !(st.st_mode & (S_IWGRP | S_IWOTH)) &&
           (uid != geteuid() ||
            faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS) == 0);
}

void lock_pick_path(char *buf, size_t n, const struct lock_places *p)
{
    /* The units' RuntimeDirectory first: a manual run by their user, from
     * a login session too (which has an XDG_RUNTIME_DIR of its own),
     * then shares their lock. */
    if (private_dir(p->run_dir, p->uid) &&
        str_fmt(buf, n, "%s/odmr-fetch.lock", p->run_dir))
        return;
    /* The runtime directory is private to the user by definition. */
    if (p->runtime && p->runtime[0] == '/' &&
        str_fmt(buf, n, "%s/odmr-fetch.lock", p->runtime))
        return;
    if (p->uid == 0 && private_dir(p->run, 0) &&
        str_fmt(buf, n, "%s/odmr-fetch.lock", p->run))
        return;
    if (private_dir(p->home, p->uid) &&
        str_fmt(buf, n, "%s/.odmr-fetch.lock", p->home))
        return;
    /* /tmp is shared: the name carries the uid and lock_take checks the
     * file it opens (a file planted there stops the runs, said clearly). */
    snprintf(buf, n, "%s/odmr-fetch-%lu.lock", p->tmp, (unsigned long)p->uid);
}

void lock_default_path(char *buf, size_t n)
{
    uid_t uid = geteuid();
    const struct passwd *pw = getpwuid(uid);
    struct lock_places p = {
        .runtime = getenv("XDG_RUNTIME_DIR"),
        .run_dir = "/run/odmr-fetch",
        .run = "/run",
        .home = pw ? pw->pw_dir : NULL,
        .tmp = "/tmp",
        .uid = uid,
    };
    lock_pick_path(buf, n, &p);
}

int lock_take(const char *path, char *err, size_t n)
{
    /* O_NOFOLLOW: in a shared directory someone else could plant a
     * symbolic link to a file of ours. */
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        snprintf(err, n, "cannot open lock file %s: %s", path,
                 strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
        st.st_uid != geteuid()) {
        snprintf(err, n, "lock file %s is not a regular file of ours", path);
        close(fd);
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) == 0)
        return fd;
    int e = errno;
    close(fd);
    if (e == EWOULDBLOCK)
        return -2;
    snprintf(err, n, "cannot lock %s: %s", path, strerror(e));
    return -1;
}
