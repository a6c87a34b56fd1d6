/* guard.c - both ends of authentication throttling (guard.h). */
#include "guard.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "../common/log.h"
#include "../common/util.h"
#include "throttle.h"

enum guard_kind {
    GUARD_MAY_AUTH = 1,
    GUARD_ACCOUNT_TURN,
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

static void answer_may_auth(const char *addr, struct worker_msg *msg)
{
    struct throttle_begin b = throttle_auth_begins(addr, now_ms());
    msg->verdict = b.allowed;
    msg->value = throttle_any_attack(now_ms());
    if (!b.allowed)
        log_info("throttle: %s: AUTH refused: blocked after %lu authentication "
                 "failures in %lds", addr, b.attempts, window_s);
}

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

void guard_handle(const struct worker_job *job, struct worker_msg *msg)
{
    switch (msg->kind) {
    case GUARD_MAY_AUTH: answer_may_auth(job->addr, msg); break;
    case GUARD_ACCOUNT_TURN: answer_turn(job->addr, msg); break;
    case GUARD_FAILED: answer_failed(job->addr, msg); break;
    case GUARD_SUCCEEDED: throttle_succeeded(job->addr, msg->account, now_ms()); break;
    default: break;
    }
}

/* --------------------------------------------------------- a session */

static char granted[sizeof ((struct worker_msg *)0)->account];
static int64_t granted_at;
/* From the last guard_may_auth: whether any account is under attack.  If
 * none is, this exchange's password lookups need not ask for a turn - one
 * round trip to the master less per login in the common case; an attack
 * that starts during the exchange is seen from the next AUTH on. */
static bool attack_seen = true;

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
    struct worker_msg m;
    granted[0] = '\0';
    if (!ask(GUARD_MAY_AUTH, NULL, &m)) {
        attack_seen = true;   /* no answer: ask again at the lookup */
        return true;
    }
    attack_seen = m.value != 0;
    return m.verdict;
}

bool guard_account_turn(const char *account)
{
    /* Cyrus may look the password up more than once in one exchange: one
     * turn covers them all (guard_may_auth starts each exchange afresh) */
    if (!attack_seen || (granted[0] && !strcmp(granted, account) &&
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
    sleep_ms(ask(GUARD_FAILED, account, &m) ? m.value : GUARD_FALLBACK_DELAY_MS);
}

void guard_succeeded(const char *account)
{
    struct worker_msg m = {.kind = GUARD_SUCCEEDED};
    str_copy(m.account, account ? account : "", sizeof m.account);
    worker_tell(&m);
}
