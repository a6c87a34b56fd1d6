/* test_lock.c - odmr-fetch's run lock (client/lock.c): where the default
 * lock file goes (never a directory others can write into when a private
 * one exists), and that lock_take refuses what someone else planted (a
 * link; a file of theirs, checked when the tests run as root, as CI
 * does). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../client/fetch.h"
#include "check.h"

static char base[] = "/tmp/odmr-test-lock-XXXXXX";
static char run_dir[PATH_MAX], run[PATH_MAX], home[PATH_MAX], tmp[PATH_MAX];

static const char *pick(const char *runtime, const char *rdir,
                        const char *h, uid_t uid)
{
    static char buf[PATH_MAX];
    struct lock_places p = {runtime, rdir, run, h, tmp, uid};
    lock_pick_path(buf, sizeof buf, &p);
    return buf;
}

static void make_dir(char *path, const char *name, mode_t mode)
{
    snprintf(path, PATH_MAX, "%s/%s", base, name);
    CHECK(mkdir(path, mode) == 0);
    CHECK(chmod(path, mode) == 0);   /* past the umask */
}

static void expect_pick(const char *runtime, const char *rdir, const char *h,
                        uid_t uid, const char *want)
{
    CHECK_STR(pick(runtime, rdir, h, uid), want);
}

/* dir/name, in one of four buffers (so that a call may use two) */
static const char *in(const char *dir, const char *name)
{
    static char b[4][PATH_MAX + 64];
    static int i;
    i = (i + 1) % 4;
    snprintf(b[i], sizeof b[i], "%s/%s", dir, name);
    return b[i];
}

static const char *tmp_lock(uid_t uid)
{
    char name[64];
    snprintf(name, sizeof name, "odmr-fetch-%lu.lock", (unsigned long)uid);
    return in(tmp, name);
}

static void test_default_path(void)
{
    uid_t me = geteuid();
    const char *xdg = "/run/user/1000/odmr-fetch.lock";

    make_dir(run_dir, "run-odmr-fetch", 0755);
    make_dir(run, "run", 0755);
    make_dir(home, "home", 0700);
    make_dir(tmp, "tmp", 01777);

    /* the units' directory first, even in a login session */
    expect_pick("/run/user/1000", run_dir, home, me, in(run_dir, "odmr-fetch.lock"));
    expect_pick(NULL, run_dir, home, me, in(run_dir, "odmr-fetch.lock"));
    /* ... only when it is ours and only ours: else XDG_RUNTIME_DIR */
    CHECK(chmod(run_dir, 0775) == 0);
    expect_pick("/run/user/1000", run_dir, home, me, xdg);
    CHECK(chmod(run_dir, 0757) == 0);
    expect_pick("/run/user/1000", run_dir, home, me, xdg);
    CHECK(chmod(run_dir, 0755) == 0);
    expect_pick("/run/user/1000", run_dir, home, me + 1, xdg);
    /* a relative XDG_RUNTIME_DIR is ignored: root gets /run, others a
     * home of their own */
    expect_pick("run/user", NULL, home, me,
                me == 0 ? in(run, "odmr-fetch.lock") : in(home, ".odmr-fetch.lock"));
    /* root's /run only when it is root's and only root's to write (the
     * stand-in directory is root's when the tests run as root) */
    if (me == 0) {
        CHECK(chmod(run, 0775) == 0);
        expect_pick(NULL, NULL, home, 0, in(home, ".odmr-fetch.lock"));
    } else {
        expect_pick(NULL, NULL, "/nonexistent", 0, tmp_lock(0));
    }
    /* another user's directories are skipped */
    expect_pick(NULL, run_dir, home, me + 1, tmp_lock(me + 1));
    /* so is a home others may write into (and /run, for root, as above) */
    CHECK(chmod(home, 0770) == 0);
    expect_pick(NULL, NULL, home, me, tmp_lock(me));
    CHECK(chmod(home, 0702) == 0);
    expect_pick(NULL, NULL, home, me, tmp_lock(me));
    /* a home this process cannot write into (root can, always) */
    char ro_home[PATH_MAX];
    make_dir(ro_home, "ro-home", 0500);
    expect_pick(NULL, NULL, ro_home, me,
                me == 0 ? in(ro_home, ".odmr-fetch.lock") : tmp_lock(me));
    expect_pick(NULL, NULL, "relative", 4242, tmp_lock(4242));
    expect_pick(NULL, "/nonexistent", "/nonexistent", 4242, tmp_lock(4242));
}

static void test_take(void)
{
    char path[PATH_MAX + 32], err[256];
    snprintf(path, sizeof path, "%s/taken.lock", tmp);
    int fd = lock_take(path, err, sizeof err);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(lock_take(path, err, sizeof err) == -2);
    close(fd);
    fd = lock_take(path, err, sizeof err);
    CHECK(fd >= 0);
    close(fd);
    /* a symbolic link planted in a shared directory is not followed */
    char link[PATH_MAX + 32];
    snprintf(link, sizeof link, "%s/link.lock", tmp);
    CHECK(symlink(path, link) == 0);
    CHECK(lock_take(link, err, sizeof err) == -1);
    CHECK(strstr(err, "cannot open lock file") != NULL);
    /* a file of somebody else's (only root can make one here) */
    if (geteuid() == 0) {
        char planted[PATH_MAX + 32];
        snprintf(planted, sizeof planted, "%s/planted.lock", tmp);
        int pf = open(planted, O_CREAT | O_WRONLY, 0666);
        CHECK(pf >= 0 && fchown(pf, 4242, 4242) == 0);
        if (pf >= 0)
            close(pf);
        CHECK(lock_take(planted, err, sizeof err) == -1);
        CHECK(strstr(err, "is not a regular file of ours") != NULL);
    }
    /* a directory is not a lock file */
    CHECK(lock_take(tmp, err, sizeof err) == -1);
}

int main(void)
{
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        return 1;
    }
    test_default_path();
    test_take();
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf %s", base);
    CHECK(system(cmd) == 0);
    CHECK_DONE();
}
