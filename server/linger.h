/* linger.h - push delivery: the reversed session stays open for a customer
 * that advertises XLINGER (a private ESMTP extension, docs/rfc-conformance.md)
 * and new mail is delivered as soon as it is committed.
 *
 * Guarantees:
 *  - A lingering session holds its domains' .linger lock for its whole
 *    life, so a second ATRN for them gets 451, as while it delivers.  While
 *    it waits it holds no delivery lock (.lock): expiry, odmrctl queue
 *    bounce|delete and the maintenance pass work on its domains as on any
 *    other, so lingering never makes mail immortal.  Every ATRN session
 *    takes both locks, .lock first, neither waiting: no deadlock.
 *  - New mail is noticed by inotify on the domains' queue directories (an
 *    envelope renamed into place is a commit), not by polling.
 *  - At most odmr_max_lingering sessions linger at once.  A slot is a
 *    lock on one byte of spool_dir/linger.slots (open file description
 *    locks), so the kernel frees it when its process dies, even by kill -9.
 *  - Every wait also wakes for the customer (data or close), a stop request
 *    (SIGTERM, or SIGUSR1 sent at a reload) and the caller's timer: it
 *    never sleeps past what the session must do next. */
#ifndef ODMR_LINGER_H
#define ODMR_LINGER_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/io.h"
#include "conf.h"
#include "queue.h"

#define LINGER_DOMAINS_MAX 100   /* = MAX_ATRN_DOMAINS */

/* Set by SIGUSR1 in a session process: the master reloaded, so a lingering
 * session ends (after the message in hand) and the customer reconnects to
 * a process with the new configuration. */
extern volatile sig_atomic_t linger_stop_requested;

/* Takes the .linger lock of a domain without waiting: the fd, -2 when
 * another session holds it, -1 with errno on error. */
int linger_lock_domain(const struct queue *q, const char *domain);

/* Takes one of the odmr_max_lingering slots: an fd that holds it until
 * closed, -2 when all are taken, -1 on error (logged).  Taken when the
 * customer asks (the XLINGER command, before ATRN), so a customer that
 * finds no room is told so before the reversal and simply polls. */
int linger_take_slot(const struct odmrd_conf *conf);

/* Closes the inotify instance reserved with a slot that no linger_begin
 * took: at the end of every ODMR session. */
void linger_drop_reserve(void);

struct linger_watch {
    int slots_fd;                 /* the slot (linger_take_slot) */
    int notify_fd;                /* inotify */
    int wd[LINGER_DOMAINS_MAX];   /* watch per domain */
    size_t n;
};

/* Watches the domains' queue directories; takes ownership of slot_fd.
 * false (logged, the slot freed) when the watch cannot be set up: the
 * caller then ends the session as without XLINGER. */
bool linger_begin(struct linger_watch *lg, int slot_fd, const struct queue *q,
                  char *const *domains, size_t n);

enum linger_wake {
    LINGER_TIMER,   /* until_ms came */
    LINGER_MAIL,    /* mail[i] set for the domains with a new envelope */
    LINGER_PEER,    /* the customer sent something or closed */
    LINGER_STOP,    /* SIGTERM or a reload */
    LINGER_GONE,    /* a domain's queue directory was removed */
    LINGER_FAIL,    /* the wait itself failed (logged) */
};

/* Waits until one of the above; `until_ms` is an io_clock_ms() time.
 * mail[] has lg->n entries; only set entries are written. */
enum linger_wake linger_wait(struct linger_watch *lg, const struct io *io,
                             int64_t until_ms, bool *mail);

/* Frees the slot and the watches. */
void linger_end(struct linger_watch *lg);

#endif
