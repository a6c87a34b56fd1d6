/* guard.h - authentication throttling across sessions (password
 * guessing).  The table is in the master (throttle.h): it gives each new
 * ODMR session the table's word on its address with the job, and sessions
 * report to it through their worker channel (workers.h).
 *
 * Guarantee: every failed AUTH of every session is reported to the one
 * table and waits as long as it says, and every session starts with the
 * table's verdict on its address, so the limits hold across connections
 * and session processes.  A plain login asks the master nothing (it
 * sends one note of its success).  If the master does not answer within
 * GUARD_ANSWER_MS (it never blocks, so only when it is gone), a session
 * goes on: a failure waits GUARD_FALLBACK_DELAY_MS and the account's turn
 * is granted - failing open keeps customers served, and the per-session
 * limit of three failures still holds. */
#ifndef ODMR_GUARD_H
#define ODMR_GUARD_H

#include <stdbool.h>
#include <stdint.h>

#include "conf.h"
#include "workers.h"

#define GUARD_ANSWER_MS 2000
#define GUARD_FALLBACK_DELAY_MS 1000
#define GUARD_TURN_MS 5000          /* one turn covers an exchange's lookups */

/* --- in the master --- */
void guard_configure(const struct odmrd_conf *conf);
/* Fills the job's auth_blocked and attack_seen for a new session. */
void guard_job(struct worker_job *job);
/* The pool's request handler (workers.h): answers the requests below. */
void guard_handle(const struct worker_job *job, struct worker_msg *msg);

/* --- in a session --- */
/* A session begins with what the master said at dispatch. */
void guard_session(const struct worker_job *job);
/* An AUTH begins: may this client try now?  false: refuse with 454 and
 * end.  Answered from the session's own knowledge (the master's word at
 * dispatch, and its answers to this session's failures), without asking:
 * a block that starts meanwhile because of other sessions of the same
 * address holds from their next connection on - bounded like the
 * overshoot throttle.h describes. */
bool guard_may_auth(void);
/* Before checking a password of account: false = refuse (454); true
 * after waiting for the account's turn when it is under attack. */
bool guard_account_turn(const char *account);
/* After a failed AUTH: reports it and waits as long as the table says
 * (this session only) before the caller replies 535. */
void guard_failed(const char *account);
/* After a successful AUTH. */
void guard_succeeded(const char *account);

#endif
