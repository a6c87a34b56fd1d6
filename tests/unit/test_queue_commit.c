/* test_queue_commit.c - receiving into the queue (server/queue.c): what a
 * commit leaves in the spool (one queue file for one domain, a data file
 * linked into each domain with an envelope each for several, no
 * temporary file anywhere), that both layouts read, update and remove
 * alike, that a failed or aborted message leaves nothing, that a link
 * planted for a domain directory is refused, that a damaged queue file
 * is refused and moved aside, and that the maintenance pass removes what
 * a crash leaves (a data file without envelope, a newer envelope without
 * its queue file) and nothing else. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../server/qfile.h"
#include "../../server/queue.h"
#include "check.h"

static char dir[] = "/tmp/odmr-test-queue-commit-XXXXXX";
static char spool[300];

/* Whether spool/q/<domain>/<id><suffix> exists. */
static bool exists(const char *domain, const char *id, const char *suffix)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/q/%s/%s%s", spool, domain, id, suffix);
    return lstat(path, &st) == 0;
}

/* Number of entries of spool/sub other than "." and "..". */
static int entries(const char *sub)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", spool, sub);
    DIR *d = opendir(path);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL)
        n += strcmp(de->d_name, ".") && strcmp(de->d_name, "..");
    if (d)
        closedir(d);
    return d ? n : -1;
}

static void envelope_for(struct envelope *e, const char *domain)
{
    envelope_init(e);
    snprintf(e->domain, sizeof e->domain, "%s", domain);
    snprintf(e->sender, sizeof e->sender, "a@src.test");
    envelope_add_rcpt(e, "u@example.org", 0, "", SIZE_MAX);
}

/* Receives "hello\r\n" for the domains; the queue id into id. */
static int receive(struct queue *q, const char *const *domains, size_t n,
                   char *id)
{
    static struct queue_in in;
    struct envelope envs[4], *list[4];
    if (!queue_in_begin_at(q, &in, domains[0]))
        return errno;
    queue_in_write(&in, "hello\r\n", 7);
    for (size_t i = 0; i < n; i++) {
        envelope_for(&envs[i], domains[i]);
        list[i] = &envs[i];
    }
    snprintf(id, QID_MAX, "%s", in.id);
    int err = queue_in_commit(q, &in, list, n);
    if (err)
        queue_in_abort(&in);
    for (size_t i = 0; i < n; i++)
        envelope_free(&envs[i]);
    return err;
}

static void test_commit_leaves_envelope_and_data(struct queue *q)
{
    char id[QID_MAX], err[256];
    const char *one[] = {"example.org"};
    CHECK(receive(q, one, 1, id) == 0);
    /* one domain: one file, data then envelope (qfile.h) */
    CHECK(exists("example.org", id, ".q"));
    CHECK(!exists("example.org", id, ".e"));
    CHECK(!exists("example.org", id, ".m"));
    CHECK(entries("tmp") == 0);
    struct envelope e;
    CHECK(queue_load(q, "example.org", id, &e, err, sizeof err));
    CHECK(e.size == 7 && e.nrcpt == 1);
    envelope_free(&e);
    char data[64] = "";
    int fd = queue_open_data(q, "example.org", id);
    CHECK(fd >= 0 && pread(fd, data, sizeof data, 0) > 7);
    CHECK(!memcmp(data, "hello\r\nV 1\n", 11));   /* the envelope follows */
    if (fd >= 0)
        close(fd);
    /* two domains: one data inode linked into both, an envelope each */
    const char *two[] = {"example.org", "example.net"};
    CHECK(receive(q, two, 2, id) == 0);
    CHECK(exists("example.net", id, ".e"));
    CHECK(exists("example.net", id, ".m"));
    CHECK(!exists("example.net", id, ".q"));
    CHECK(entries("tmp") == 0);
}

static int count_id(void *ctx, const char *id)
{
    (void)id;
    ++*(int *)ctx;
    return 0;
}

/* An update of a queue file's envelope goes beside it as <id>.n and
 * wins; removal takes both, the queue file first. */
static void test_queue_file_update_and_remove(struct queue *q)
{
    char id[QID_MAX], err[256];
    const char *one[] = {"update.test"};
    CHECK(receive(q, one, 1, id) == 0);
    int listed = 0;
    CHECK(queue_ids(q, "update.test", count_id, &listed) == 1 && listed == 1);
    CHECK(queue_has_mail(q, "update.test"));
    uint64_t bytes = 0;
    unsigned long count = 0;
    CHECK(queue_usage_exact(q, "update.test", &bytes, &count));
    CHECK(bytes == 7 && count == 1);   /* the data, not the envelope */
    struct envelope e;
    CHECK(queue_load(q, "update.test", id, &e, err, sizeof err));
    e.attempts = 3;
    CHECK(queue_update(q, &e));
    envelope_free(&e);
    CHECK(exists("update.test", id, ".n") && exists("update.test", id, ".q"));
    CHECK(queue_load(q, "update.test", id, &e, err, sizeof err));
    CHECK(e.attempts == 3 && e.size == 7);
    envelope_free(&e);
    listed = 0;
    CHECK(queue_ids(q, "update.test", count_id, &listed) == 1);
    queue_cleanup(q, 0);   /* a .n beside its queue file stays */
    CHECK(exists("update.test", id, ".n"));
    CHECK(queue_remove(q, "update.test", id));
    CHECK(!exists("update.test", id, ".n") && !exists("update.test", id, ".q"));
    CHECK(!queue_has_mail(q, "update.test"));
    CHECK(!queue_load(q, "update.test", id, &e, err, sizeof err) && errno == ENOENT);
    CHECK(!queue_remove(q, "update.test", id));
}

/* Cuts the last n octets off spool/q/<domain>/<id>.q. */
static void truncate_queue_file(const char *domain, const char *id, off_t n)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/q/%s/%s.q", spool, domain, id);
    CHECK(stat(path, &st) == 0 && truncate(path, st.st_size - n) == 0);
}

/* A queue file whose trailer does not add up is refused, with the reason,
 * and moved aside whole into corrupt/. */
static void test_damaged_queue_file(struct queue *q)
{
    char id[QID_MAX], err[256], where[PATH_MAX], moved[PATH_MAX + QID_MAX + 4];
    const char *one[] = {"damaged.test"};
    CHECK(receive(q, one, 1, id) == 0);
    truncate_queue_file("damaged.test", id, 1);
    struct envelope e;
    CHECK(!queue_load(q, "damaged.test", id, &e, err, sizeof err));
    CHECK(errno == EINVAL && strstr(err, "trailer"));
    CHECK(queue_quarantine(q, "damaged.test", id, where, sizeof where));
    CHECK(!exists("damaged.test", id, ".q"));
    snprintf(moved, sizeof moved, "%s/%s.q", where, id);
    CHECK(access(moved, F_OK) == 0);
}

static void test_abort_leaves_nothing(struct queue *q)
{
    static struct queue_in in;
    int before = entries("q/example.org");
    CHECK(queue_in_begin_at(q, &in, "example.org"));
    CHECK(in.dirfd >= 0);
    /* written unnamed (O_TMPFILE): nothing to see, and nothing a crash
     * could leave; on a file system without it, the named <id>.m */
    if (!in.unnamed)
        printf("info: no O_TMPFILE under %s: the named data file is used\n", dir);
    CHECK(entries("q/example.org") == before + (in.unnamed ? 0 : 1));
    queue_in_write(&in, "x", 1);
    queue_in_abort(&in);
    CHECK(in.dirfd == -1);
    CHECK(entries("q/example.org") == before);
}

static void test_link_for_a_domain_refused(struct queue *q)
{
    char link[PATH_MAX], id[QID_MAX];
    snprintf(link, sizeof link, "%s/q/linked.test", spool);
    CHECK(symlink("/tmp", link) == 0);
    const char *linked[] = {"linked.test"};
    CHECK(receive(q, linked, 1, id) == ELOOP);
    /* and not as the second domain of a message either */
    const char *two[] = {"example.org", "linked.test"};
    int before = entries("q/example.org");
    CHECK(receive(q, two, 2, id) == ELOOP);
    CHECK(entries("q/example.org") == before);   /* all or nothing */
    unlink(link);
}

/* A pid that no longer runs: the child's own. */
static long dead_pid(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    waitpid(pid, NULL, 0);
    return (long)pid;
}

static void put(const char *domain, const char *name)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/q/%s/%s", spool, domain, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f)
        fclose(f);
}

static void test_cleanup_of_crash_leftovers(struct queue *q)
{
    char dead[QID_MAX], live[QID_MAX], name[QID_MAX + 4], id[QID_MAX];
    const char *one[] = {"example.org"};
    CHECK(receive(q, one, 1, id) == 0);   /* a committed message stays */
    long pid = dead_pid();
    snprintf(dead, sizeof dead, "0000000100000%lX", (unsigned long)pid);
    snprintf(live, sizeof live, "0000000100000%lX", (unsigned long)getpid());
    snprintf(name, sizeof name, "%s.m", dead);
    put("example.org", name);
    snprintf(name, sizeof name, "%s.m", live);
    put("example.org", name);
    /* a leftover whose id is a prefix of a committed message's id: the
     * listing is "<dead>.m", "<dead>0.e", "<dead>0.m" ('.' sorts first) */
    char longer[QID_MAX + 1];
    snprintf(longer, sizeof longer, "%.30s0", dead);
    snprintf(name, sizeof name, "%s.e", longer);
    put("example.org", name);
    snprintf(name, sizeof name, "%s.m", longer);
    put("example.org", name);
    queue_cleanup(q, 3600);
    CHECK(!exists("example.org", dead, ".m"));
    CHECK(exists("example.org", live, ".m"));     /* its writer is alive */
    CHECK(exists("example.org", longer, ".m"));   /* it has its envelope */
    CHECK(exists("example.org", id, ".q"));
    /* a newer envelope whose queue file is gone (a crash in a removal)
     * goes at once, whoever wrote it */
    snprintf(name, sizeof name, "%s.n", live);
    put("example.org", name);
    queue_cleanup(q, 3600);
    CHECK(!exists("example.org", live, ".n"));
    CHECK(exists("example.org", id, ".q"));
}

static bool tmp_exists(const char *name)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/tmp/%s", spool, name);
    return lstat(path, &st) == 0;
}

static void put_tmp(const char *name)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/tmp/%s", spool, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f)
        fclose(f);
}

/* An envelope update being written, tmp/<id>.<pid>.u, belongs to the
 * process <pid>, not to the long-gone receiver named in the id: the
 * cleanup must leave it while that process lives (removing it made the
 * update fail, and delivered recipients were delivered again). */
static void test_cleanup_keeps_updates_in_progress(struct queue *q)
{
    char id[QID_MAX], mine[QID_MAX + 32], orphan[QID_MAX + 32];
    snprintf(id, sizeof id, "0000000100000%lX", (unsigned long)dead_pid());
    snprintf(mine, sizeof mine, "%s.%ld.u", id, (long)getpid());
    snprintf(orphan, sizeof orphan, "%s.%ld.u", id, dead_pid());
    put_tmp(mine);
    put_tmp(orphan);
    queue_cleanup(q, 3600);
    CHECK(tmp_exists(mine));
    CHECK(!tmp_exists(orphan));
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/tmp/%s", spool, mine);
    unlink(path);
}

/* A newer envelope (.n) bigger than any envelope can be is damage: it is
 * refused without being parsed, which would expand it into gigabytes. */
static void test_oversized_newer_envelope(struct queue *q)
{
    char id[QID_MAX], path[PATH_MAX], err[256];
    const char *one[] = {"example.org"};
    CHECK(receive(q, one, 1, id) == 0);
    snprintf(path, sizeof path, "%s/q/example.org/%s.n", spool, id);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f)
        return;
    CHECK(ftruncate(fileno(f), (off_t)QFILE_ENVELOPE_MAX + 1) == 0);
    fclose(f);
    struct envelope e;
    envelope_init(&e);
    errno = 0;
    CHECK(!queue_load(q, "example.org", id, &e, err, sizeof err));
    CHECK(errno == EINVAL);
    CHECK(strstr(err, "an envelope of") != NULL);
    envelope_free(&e);
    unlink(path);
}

int main(void)
{
    char err[256];
    struct queue q;
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(spool, sizeof spool, "%s/spool", dir);
    CHECK(queue_open(&q, spool, err, sizeof err));
    test_commit_leaves_envelope_and_data(&q);
    test_abort_leaves_nothing(&q);
    test_link_for_a_domain_refused(&q);
    test_cleanup_of_crash_leftovers(&q);
    test_cleanup_keeps_updates_in_progress(&q);
    test_oversized_newer_envelope(&q);
    test_queue_file_update_and_remove(&q);
    test_damaged_queue_file(&q);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    CHECK_DONE();
}
