/* ownership.h - the daemon user can use everything odmrd needs, or odmrd
 * says exactly what to fix.
 *
 * Guarantee: when own_check() reports no problem, a process that
 * own_become() turned into the daemon user can search every directory
 * above spool_dir, accounts_db and pid_file; can read and write spool_dir,
 * tmp/, q/, every q/<domain>/ and every file in them (corrupt/ too); can
 * read and write accounts_db, or create it when it is missing (odmrctl
 * does that as the same user); and can create and remove pid_file.
 * Every problem is one line that names the path and the command that
 * fixes it.
 *
 * Taking ownership (OWN_TAKE: odmrd started as root) is all or nothing.
 * A first pass over the spool tree and the database changes nothing; it
 * finds what would make the result incomplete or unsafe: a directory
 * nested deeper than the queue layout, a file with hard links outside
 * the spool (giving it away would give away a file elsewhere), spool_dir
 * or accounts_db being a symbolic link, a directory that cannot be read.
 * Only when neither it nor the check as the user found a problem does a
 * second pass give every entry not owned by user:group to it.  Should a system error stop that pass (read-only
 * file system), odmrd does not start, so it never runs on a half-owned
 * spool; the next start completes the work.  Symbolic links are never
 * followed: a link in the spool is itself given to the user, its target
 * never.  Modes are not changed: an entry the user could not read or
 * write even as its owner is a problem, with the chmod that fixes it.
 *
 * The checks of what lies outside the spool tree run in a child process
 * that has become the user (the same own_become() the daemon uses): only
 * that sees what the kernel will allow, ancestors' search permission and
 * ACLs included.  Its findings come back over a pipe. */
#ifndef ODMR_OWNERSHIP_H
#define ODMR_OWNERSHIP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct own_user {
    uid_t uid;
    gid_t gid;              /* the primary group: the only group it keeps */
    char name[64];          /* user name, or "uid N" without one */
    char group[64];         /* group name, or the number */
};

struct own_paths {
    const char *spool_dir;
    const char *accounts_db;
    const char *pid_file;   /* "" or NULL: none */
};

enum own_mode {
    OWN_PREDICT,   /* run by root for odmrd -t: report what start-up changes */
    OWN_TAKE,      /* run by root at start-up: change it, then check */
    OWN_SELF,      /* run by the daemon's own identity: check as itself */
};

enum own_level {
    OWN_NOTE,      /* information: what start-up changes or changed */
    OWN_PROBLEM,   /* the daemon would fail: the path and the fix */
};

typedef void (*own_report_fn)(void *ctx, enum own_level level, const char *msg);

/* The user by name; false when there is no such user. */
bool own_user_by_name(const char *name, struct own_user *u);
/* The user by uid; its primary group, or gid when the uid has no entry. */
void own_user_by_uid(uid_t uid, gid_t gid, struct own_user *u);

/* Checks (and with OWN_TAKE first does) what the guarantee above says;
 * reports each finding and returns the number of problems. */
int own_check(const struct own_paths *p, const struct own_user *u,
              enum own_mode mode, own_report_fn report, void *ctx);

/* Becomes u for good: supplementary groups = its primary group, gid, uid.
 * A no-op when the process already is u.  false + err on failure. */
bool own_become(const struct own_user *u, char *err, size_t n);

#endif
