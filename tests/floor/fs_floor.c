/* fs_floor.c - what the spool's file system allows, without any SMTP.
 *
 * make bench compares odmrd's inbound rate with Postfix's.  Both are
 * bounded by the file system under the spool: a durable commit waits for
 * the disk.  This program measures that bound on the same file system, in
 * the same run: WRITERS threads (one per smtp-source session) each commit
 * FILES/WRITERS files of SIZE bytes, the way the named mode says:
 *
 *   two   unnamed file, write, fsync, link, fsync of the directory
 *         (odmrd's commit of a one-domain message)
 *   one   unnamed file, write, link, fsync (one sync per message, as
 *         Postfix's queue file has; on ext4 and xfs the file's sync also
 *         makes its new name durable)
 *   none  unnamed file, write, link: no sync at all (the CPU-bound rate of
 *         the inode and directory work alone)
 *
 * Where the file system has no O_TMPFILE, a named file is created instead.
 * Prints "files/s N".  usage: fs_floor DIR WRITERS FILES SIZE MODE */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum mode { TWO, ONE, NONE };

struct job {
    int dirfd;
    enum mode mode;
    long writer, files;
    const char *data;
    size_t size;
    int error;              /* errno of the first failure, 0 if none */
};

/* The file, written and still open, and whether it has no name yet. */
static int make_file(const struct job *j, const char *name, int *unnamed)
{
    int fd = openat(j->dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    *unnamed = fd >= 0;
    if (fd < 0)
        fd = openat(j->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                    0600);
    if (fd >= 0 && write(fd, j->data, j->size) != (ssize_t)j->size) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static int give_name(const struct job *j, int fd, const char *name)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return linkat(AT_FDCWD, path, j->dirfd, name, AT_SYMLINK_FOLLOW);
}

static int commit(const struct job *j, long i)
{
    char name[64];
    int unnamed;
    snprintf(name, sizeof name, "%ld-%ld.q", j->writer, i);
    int fd = make_file(j, name, &unnamed);
    if (fd < 0)
        return -1;
    int rc = 0;
    if (j->mode == TWO)
        rc = fsync(fd);
    if (rc == 0 && unnamed)
        rc = give_name(j, fd, name);
    if (rc == 0 && j->mode == TWO)
        rc = fsync(j->dirfd);
    if (rc == 0 && j->mode == ONE)
        rc = fsync(fd);
    int err = errno;
    close(fd);
    errno = err;
    return rc;
}

static void *writer(void *arg)
{
    struct job *j = arg;
    for (long i = 0; i < j->files && !j->error; i++)
        if (commit(j, i) != 0)
            j->error = errno ? errno : EIO;
    return NULL;
}

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int parse_mode(const char *s, enum mode *m)
{
    static const char *names[] = {"two", "one", "none"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, names[i])) {
            *m = (enum mode)i;
            return 0;
        }
    return -1;
}

/* A decimal number, or -1 for anything else. */
static long number(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    return errno || end == s || *end ? -1 : v;
}

int main(int argc, char **argv)
{
    enum mode mode;
    if (argc != 6 || parse_mode(argv[5], &mode) != 0) {
        fprintf(stderr, "usage: fs_floor DIR WRITERS FILES SIZE two|one|none\n");
        return 2;
    }
    long writers = number(argv[2]), files = number(argv[3]);
    long size = number(argv[4]);
    if (writers < 1 || writers > 256 || files < writers || size < 1 ||
        size > 1 << 24) {
        fprintf(stderr, "fs_floor: WRITERS 1-256, FILES >= WRITERS, SIZE 1-16M\n");
        return 2;
    }
    int dirfd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        fprintf(stderr, "fs_floor: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    char *data = malloc((size_t)size);
    struct job *jobs = calloc((size_t)writers, sizeof *jobs);
    pthread_t *th = calloc((size_t)writers, sizeof *th);
    if (!data || !jobs || !th) {
        fprintf(stderr, "fs_floor: out of memory\n");
        return 1;
    }
    memset(data, 'x', (size_t)size);
    double t0 = seconds();
    for (long w = 0; w < writers; w++) {
        jobs[w] = (struct job){dirfd, mode, w, files / writers, data,
                               (size_t)size, 0};
        if (pthread_create(&th[w], NULL, writer, &jobs[w]) != 0) {
            fprintf(stderr, "fs_floor: cannot start a thread\n");
            return 1;
        }
    }
    for (long w = 0; w < writers; w++)
        pthread_join(th[w], NULL);
    double wall = seconds() - t0;
    for (long w = 0; w < writers; w++)
        if (jobs[w].error) {
            fprintf(stderr, "fs_floor: %s\n", strerror(jobs[w].error));
            return 1;
        }
    printf("files/s %.1f\n", (double)(files / writers * writers) / wall);
    return 0;
}
