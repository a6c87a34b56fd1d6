/* test_throttle.c - unit tests for server/throttle.c (the master's
 * authentication failure table), with the time passed in. */
#include <stdio.h>

#include "../../server/throttle.h"
#include "check.h"

static void setup(unsigned long limit, int64_t window_ms)
{
    struct throttle_conf c = {limit, window_ms};
    throttle_reset();
    throttle_configure(&c);
}

static void test_addr_key(void)
{
    char k[THROTTLE_KEY_MAX];
    throttle_addr_key("192.0.2.7", k, sizeof k);
    CHECK_STR(k, "192.0.2.7");
    throttle_addr_key("2001:db8:1:2:3:4:5:6", k, sizeof k);
    CHECK_STR(k, "2001:db8:1:2::/64");
    throttle_addr_key("2001:db8:1:2::ffff", k, sizeof k);
    CHECK_STR(k, "2001:db8:1:2::/64");
    throttle_addr_key("unix", k, sizeof k);
    CHECK_STR(k, "unix");
}

/* One attempt that fails; returns its delay. */
static int64_t fail_once(const char *addr, const char *account, int64_t t)
{
    struct throttle_begin b = throttle_auth_begins(addr, t);
    CHECK(b.allowed);
    return throttle_failed(addr, account, t).delay_ms;
}

static void test_address_limit(void)
{
    setup(10, 600000);
    int64_t t = 1000, last_delay = 0;
    for (int i = 1; i <= 10; i++) {
        CHECK(throttle_auth_begins("192.0.2.1", t).allowed);
        struct throttle_failure f = throttle_failed("192.0.2.1", "alice", t);
        CHECK(f.addr_failures == (unsigned long)i);
        CHECK(f.now_blocked == (i == 10));
        CHECK(f.delay_ms >= last_delay && f.delay_ms <= THROTTLE_DELAY_MAX_MS);
        last_delay = f.delay_ms;
        t += 100;
    }
    CHECK(last_delay == THROTTLE_DELAY_MAX_MS);
    struct throttle_begin b = throttle_auth_begins("192.0.2.1", t);
    CHECK(!b.allowed && b.attempts == 10);
    CHECK(throttle_auth_begins("192.0.2.2", t).allowed);   /* others are not blocked */
    CHECK(!throttle_auth_begins("192.0.2.1", t + 599000).allowed);
    b = throttle_auth_begins("192.0.2.1", t + 601000);     /* window passed */
    CHECK(b.allowed && b.attempts == 0);
    /* IPv6 counts by /64: ten hosts of one /64 are one address */
    for (int i = 0; i < 10; i++) {
        char a[64];
        snprintf(a, sizeof a, "2001:db8::%x", i + 1);
        fail_once(a, "bob", t);
    }
    CHECK(!throttle_auth_begins("2001:db8::ffff", t).allowed);
    CHECK(throttle_auth_begins("2001:db8:0:1::1", t).allowed);
}

/* Many customers behind one address log in at the same moment: beginning
 * an AUTH costs nothing, only failures count. */
static void test_parallel_logins(void)
{
    setup(10, 600000);
    CHECK(!throttle_any_attack(5));
    int allowed = 0;
    for (int i = 0; i < 50; i++)
        allowed += throttle_auth_begins("192.0.2.9", 5).allowed;
    CHECK(allowed == 50);
}

static void test_success_resets(void)
{
    setup(3, 600000);
    fail_once("192.0.2.1", "alice", 0);
    fail_once("192.0.2.1", "alice", 1);
    throttle_succeeded("192.0.2.1", "alice", 2);
    struct throttle_failure f = throttle_failed("192.0.2.1", "alice", 3);
    CHECK(f.addr_failures == 1 && !f.now_blocked);
    /* a second success in the same window forgives nothing */
    fail_once("192.0.2.1", "alice", 4);
    throttle_succeeded("192.0.2.1", "alice", 5);
    f = throttle_failed("192.0.2.1", "alice", 6);
    CHECK(f.addr_failures == 3 && f.now_blocked);
    /* once the window has passed, a success forgives again */
    fail_once("192.0.2.1", "alice", 700000);
    throttle_succeeded("192.0.2.1", "alice", 700001);
    f = throttle_failed("192.0.2.1", "alice", 700002);
    CHECK(f.addr_failures == 1 && !f.now_blocked);
}

static void test_account_spacing(void)
{
    int64_t wait;
    setup(10, 600000);
    throttle_succeeded("198.51.100.9", "alice", 0);   /* the customer */
    /* many addresses guess alice's password */
    int64_t t = 1000;
    char a[64];
    for (int i = 0; i < THROTTLE_ATTACK_FAILURES; i++) {
        snprintf(a, sizeof a, "192.0.2.%d", i + 1);
        CHECK(throttle_account_turn(a, "alice", t, &wait) == THROTTLE_GO);
        CHECK(throttle_auth_begins(a, t).allowed);
        struct throttle_failure f = throttle_failed(a, "alice", t);
        CHECK(f.account_attacked == (i + 1 == THROTTLE_ATTACK_FAILURES));
    }
    /* from now on, checks from unknown addresses are spaced */
    int granted = 0, refused = 0;
    for (int i = 0; i < 100; i++) {
        snprintf(a, sizeof a, "203.0.113.%d", i + 1);
        enum throttle_verdict v = throttle_account_turn(a, "alice", t, &wait);
        if (v == THROTTLE_REFUSE)
            refused++;
        else
            granted++;
        CHECK(wait <= THROTTLE_MAX_WAIT_MS);
    }
    CHECK(granted == 1 + THROTTLE_MAX_WAIT_MS / THROTTLE_SPACING_MS);
    CHECK(refused == 100 - granted);
    /* the customer's own address is never slowed */
    CHECK(throttle_account_turn("198.51.100.9", "alice", t, &wait) == THROTTLE_GO);
    CHECK(wait == 0);
    /* other accounts are not affected */
    CHECK(throttle_account_turn("203.0.113.1", "bob", t, &wait) == THROTTLE_GO);
    CHECK(throttle_any_attack(t));
    CHECK(!throttle_any_attack(t + 700000));
    /* the window passes: back to normal */
    CHECK(throttle_account_turn("203.0.113.1", "alice", t + 700000, &wait) == THROTTLE_GO);
}

static void test_bounded_memory(void)
{
    setup(2, 600000);
    fail_once("192.0.2.1", "", 0);
    fail_once("192.0.2.1", "", 0);
    CHECK(!throttle_auth_begins("192.0.2.1", 1).allowed);
    /* a flood of other addresses and names fills the tables ... */
    char a[64], name[64];
    for (int i = 0; i < 3 * THROTTLE_ADDRS; i++) {
        snprintf(a, sizeof a, "10.%d.%d.%d", i >> 16 & 255, i >> 8 & 255, i & 255);
        snprintf(name, sizeof name, "guess%d", i);
        throttle_auth_begins(a, 2 + i);   /* no CHECK: 12,288 of them */
        throttle_failed(a, name, 2 + i);
    }
    /* ... without lifting the block, as long as unblocked entries remain */
    CHECK(!throttle_auth_begins("192.0.2.1", 3).allowed);
    /* and the index still finds what the churn left: the newest entries */
    snprintf(a, sizeof a, "10.%d.%d.%d", (3 * THROTTLE_ADDRS - 1) >> 16 & 255,
             (3 * THROTTLE_ADDRS - 1) >> 8 & 255, (3 * THROTTLE_ADDRS - 1) & 255);
    CHECK(throttle_auth_begins(a, 4).attempts == 1);
    CHECK(throttle_failed(a, "", 4).addr_failures == 2);
    /* forgetting and finding again, many times over (tombstones) */
    for (int i = 0; i < 5 * THROTTLE_ADDRS; i++) {
        snprintf(a, sizeof a, "172.16.%d.%d", i >> 8 & 255, i & 255);
        throttle_failed(a, "", 10);
        throttle_succeeded(a, "", 10);
    }
    CHECK(!throttle_auth_begins("192.0.2.1", 11).allowed);
}

int main(void)
{
    test_addr_key();
    test_address_limit();
    test_parallel_logins();
    test_success_resets();
    test_account_spacing();
    test_bounded_memory();
    CHECK_DONE();
}
