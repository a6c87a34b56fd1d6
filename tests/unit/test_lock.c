/* test_lock.c - odmr-fetch's run lock (client/lock.c): where the default
 * lock file goes (never a directory others can write into when a private
 * one exists), and that lock_take refuses a file someone else planted. */
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

static void test_default_path(void)
{
    char want[PATH_MAX + 32];
    uid_t me = geteuid();

    make_dir(run_dir, "run-odmr-fetch", 0755);
    make_dir(run, "run", 0755);
    make_dir(home, "home", 0700);
    make_dir(tmp, "tmp", 01777);

    /* XDG_RUNTIME_DIR first; a relative one is ignored */
    CHECK_STR(pick("/run/user/1000", run_dir, home, me),
              "/run/user/1000/odmr-fetch.lock");
    snprintf(want, sizeof want, "%s/odmr-fetch.lock", run_dir);
    CHECK_STR(pick("run/user", run_dir, home, me), want);
    CHECK_STR(pick(NULL, run_dir, home, me), want);
    /* the units' directory only when it is ours and only ours */
    CHECK(chmod(run_dir, 0775) == 0);
    snprintf(want, sizeof want, me == 0 ? "%s/odmr-fetch.lock"
                                        : "%s/.odmr-fetch.lock",
             me == 0 ? run : home);
    CHECK_STR(pick(NULL, run_dir, home, me), want);
    CHECK(chmod(run_dir, 0755) == 0);
    /* root: /run; others: a home of their own, else /tmp with the uid */
    snprintf(want, sizeof want, "%s/odmr-fetch.lock", run);
    CHECK_STR(pick(NULL, NULL, home, 0), want);
    snprintf(want, sizeof want, "%s/.odmr-fetch.lock", home);
    CHECK_STR(pick(NULL, NULL, home, me), me == 0 ? pick(NULL, NULL, home, 0)
                                                  : want);
    /* another user's directories are skipped */
    snprintf(want, sizeof want, "%s/odmr-fetch-%lu.lock", tmp,
             (unsigned long)me + 1);
    CHECK_STR(pick(NULL, run_dir, home, me + 1), want);
    CHECK(chmod(home, 0770) == 0);
    snprintf(want, sizeof want, "%s/odmr-fetch-4242.lock", tmp);
    CHECK_STR(pick(NULL, NULL, home, 4242), want);
    CHECK_STR(pick(NULL, NULL, "relative", 4242), want);
    CHECK_STR(pick(NULL, "/nonexistent", "/nonexistent", 4242), want);
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
