/* guard.c - both ends of authentication throttling (guard.h). */
#include "guard.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "../common/log.h"
#include "../common/util.h"
#include "throttle.h"

enum guard_kind {
    GUARD_ACCOUNT_TURN = 1,
    GUARD_FAILED,
    GUARD_SUCCEEDED,
};

static long window_s = 600;

void guard_configure(const struct odmrd_conf *conf)
{
    struct throttle_conf t = {conf->auth_failure_limit,
                              (int64_t)conf->auth_failure_window * 1000};
    throttle_configure(&t);
    window_s = conf->auth_failure_window;
}

/* ---------------------------------------------------------- the master */

static void answer_turn(const char *addr, struct worker_msg *msg)
{
    int64_t wait;
    enum throttle_verdict v = throttle_account_turn(addr, msg->account, now_ms(),
                                                    &wait);
    msg->verdict = v != THROTTLE_REFUSE;
    msg->value = wait;
    if (v == THROTTLE_REFUSE)
        log_info("throttle: %s: AUTH for account %s refused: the account is under "
                 "attack, too many password checks queued", addr, msg->account);
    else if (v == THROTTLE_WAIT)
        log_debug("throttle: %s: AUTH for account %s waits %lldms", addr,
                  msg->account, (long long)wait);
}

static void answer_failed(const char *addr, struct worker_msg *msg)
{
    struct throttle_failure f = throttle_failed(addr, msg->account, now_ms());
    msg->value = f.delay_ms;
    msg->verdict = f.blocked;
    if (f.now_blocked)
        log_warn("throttle: %s: AUTH blocked for %lds after %lu authentication "
                 "failures (account %s)", addr, window_s, f.addr_failures,
                 msg->account[0] ? msg->account : "-");
    if (f.account_attacked)
        log_warn("throttle: account %s: %lu authentication failures from other "
                 "addresses in %lds: its password checks are spaced %dms apart "
                 "(addresses it logged in from are not slowed); last from %s",
                 msg->account, f.account_failures, window_s,
                 THROTTLE_SPACING_MS, addr);
}

void guard_job(struct worker_job *job)
{
    int64_t now = now_ms();
    struct throttle_begin b = throttle_auth_begins(job->addr, now);
    job->auth_blocked = !b.allowed;
    job->auth_failures = b.attempts;
    job->attack_seen = throttle_any_attack(now);
}

void guard_handle(const struct worker_job *job, struct worker_msg *msg)
{
    switch (msg->kind) {
    case GUARD_ACCOUNT_TURN: answer_turn(job->addr, msg); break;
    case GUARD_FAILED: answer_failed(job->addr, msg); break;
    case GUARD_SUCCEEDED: throttle_succeeded(job->addr, msg->account, now_ms()); break;
    default: break;
    }
}

/* --------------------------------------------------------- a session */

static char granted[sizeof ((struct worker_msg *)0)->account];
static int64_t granted_at;
/* This session's view of the table: what the master said at dispatch,
 * updated by its answers to this session's failures.  Without an attack
 * on some account, password lookups need not ask for a turn; a login
 * then costs one note to the master (its success) and no question. */
static struct {
    char addr[64];
    bool blocked, attack_seen;
    unsigned long failures;
} session = {"", false, true, 0};

void guard_session(const struct worker_job *job)
{
    str_copy(session.addr, job->addr, sizeof session.addr);
    session.blocked = job->auth_blocked;
    session.attack_seen = job->attack_seen;
    session.failures = job->auth_failures;
    granted[0] = '\0';
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (ms > 0 && nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static bool ask(int kind, const char *account, struct worker_msg *msg)
{
    memset(msg, 0, sizeof *msg);
    msg->kind = kind;
    str_copy(msg->account, account ? account : "", sizeof msg->account);
    return worker_ask(msg, GUARD_ANSWER_MS);
}

bool guard_may_auth(void)
{
    granted[0] = '\0';
    if (session.blocked)
        log_info("throttle: %s: AUTH refused: blocked after %lu authentication "
                 "failures in %lds", session.addr, session.failures, window_s);
    return !session.blocked;
}

bool guard_account_turn(const char *account)
{
    /* Cyrus may look the password up more than once in one exchange: one
     * turn covers them all (guard_may_auth starts each exchange afresh) */
    if (!session.attack_seen || (granted[0] && !strcmp(granted, account) &&
                         now_ms() - granted_at < GUARD_TURN_MS))
        return true;
    struct worker_msg m;
    if (ask(GUARD_ACCOUNT_TURN, account, &m)) {
        if (!m.verdict)
            return false;
        if (m.value > 0)
            sleep_ms(m.value);
    }
    str_copy(granted, account, sizeof granted);
    granted_at = now_ms();
    return true;
}

void guard_failed(const char *account)
{
    struct worker_msg m;
    bool answered = ask(GUARD_FAILED, account, &m);
    session.failures++;
    session.attack_seen = true;   /* this session's failures may start one */
    if (answered)
        session.blocked = m.verdict;
    sleep_ms(answered ? m.value : GUARD_FALLBACK_DELAY_MS);
}

void guard_succeeded(const char *account)
{
    struct worker_msg m = {.kind = GUARD_SUCCEEDED};
    str_copy(m.account, account ? account : "", sizeof m.account);
    worker_tell(&m);
}
