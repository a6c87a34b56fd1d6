/* lock.c - one odmr-fetch run at a time.
 *
 * flock() on a lock file: the kernel drops the lock when the process
 * ends however it ends, so a crashed run never blocks the next one and
 * there is no stale-lock guessing.  The lock is taken before connecting,
 * so the second of two overlapping cron runs exits 75 without bothering
 * the provider (which would refuse its ATRN with 451 anyway). */
#include "fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

void lock_default_path(char *buf, size_t n)
{
    const char *rt = getenv("XDG_RUNTIME_DIR");

    /* The runtime directory is private to the user; /tmp is shared, so
     * the name there carries the uid and the file is checked on open. */
    if (rt && rt[0] == '/' &&
        str_fmt(buf, n, "%s/odmr-fetch.lock", rt))
        return;
    snprintf(buf, n, "/tmp/odmr-fetch-%lu.lock", (unsigned long)getuid());
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
