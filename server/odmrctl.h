/* odmrctl.h - what the parts of odmrctl share (internal to odmrctl; odmrd
 * links none of them).
 *
 *   odmrctl.c             main, options, dispatch, configuration and
 *                         privileges, error reporting, shared helpers
 *   odmrctl_accounts.c    user and domain commands
 *   odmrctl_queue.c       queue listing, summary, delete, bounce
 *   odmrctl_enqueue.c     enqueue (the pipe transport)
 *   odmrctl_recipients.c  recipient lists (server/recipients.h)
 *
 * A command is int cmd_X(struct ctl *, argc, argv) returning a sysexits
 * code; errors are reported with fail(), one line each. */
#ifndef ODMR_ODMRCTL_H
#define ODMR_ODMRCTL_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "../common/util.h"
#include "accounts.h"
#include "conf.h"
#include "queue.h"

struct ctl {
    const char *conf_path;
    bool ready;                /* configuration loaded, privileges dropped */
    uid_t caller;              /* real uid of the invoking user */
    struct odmrd_conf conf;
    struct queue q;
};

/* ---------------------------------------------------------------- errors */

/* Prints "odmrctl: <message>" on stderr and returns code. */
int fail(int code, const char *fmt, ...) PRINTF_LIKE(2, 3);
int usage_error(const char *usage);
/* Exit status for a system error while queueing or removing mail. */
int errno_status(int err);
/* The same for reading or changing what exists (no "cannot create"). */
int access_status(int err);
/* Errors every account command reports the same way. */
int acct_status(const struct ctl *c, enum acct_result r);
/* A failure to list the queue (domain NULL) or one domain's part of it. */
int queue_read_error(const struct ctl *c, const char *domain);

/* ----------------------------------------------------------------- setup */

/* Loads the configuration and drops privileges, once. */
int ctl_prepare(struct ctl *c);

/* --------------------------------------------------------------- strings */

/* s with control characters as '?', into buf. */
const char *printable(const char *s, char *buf, size_t n);
/* EX_OK, or 65 after reporting a domain that is not valid (or not IDNA). */
int check_domain(const char *domain);
/* A domain key as people read it (U-labels), printable. */
const char *readable_domain(const char *key, char *buf, size_t n);

struct strlist {
    char **v;
    size_t n, cap;
    bool failed;    /* an allocation failed: the list is incomplete */
};

void strlist_add(struct strlist *l, const char *s);
void strlist_free(struct strlist *l);
/* Callbacks adding to a struct strlist. */
void collect_name(void *ctx, const char *name);
int collect_string(void *ctx, const char *s);

/* Domain bindings as parallel lists. */
struct bindings {
    struct strlist domains, names;
};

void collect_binding(void *ctx, const char *domain, const char *name);

/* -------------------------------------------------------------- commands */

int cmd_user(struct ctl *c, int argc, char **argv);
int cmd_domain(struct ctl *c, int argc, char **argv);
int cmd_queue(struct ctl *c, int argc, char **argv);
int cmd_enqueue(struct ctl *c, int argc, char **argv);
int cmd_recipient(struct ctl *c, int argc, char **argv);

/* Removes domain's recipient list (domain del, user del), so that binding
 * the domain again does not bring an old list back.  EX_OK when it had
 * none. */
int drop_recipient_list(struct ctl *c, const char *domain);

#endif
