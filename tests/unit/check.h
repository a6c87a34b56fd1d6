/* check.h - the minimal unit-test harness used by tests/unit/test_*.c.
 * Each CHECK counts as one test; failures print file:line and the
 * expression.  main() ends with CHECK_DONE(), which prints the line
 * "unit-result: <passed> <failed>" that tests/run.py adds to the total
 * and exits non-zero on any failure. */
#ifndef ODMR_CHECK_H
#define ODMR_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_passed, check_failed;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (cond) {                                                        \
            check_passed++;                                                \
        } else {                                                           \
            check_failed++;                                                \
            printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);         \
        }                                                                  \
    } while (0)

#define CHECK_STR(a, b)                                                    \
    do {                                                                   \
        const char *check_a_ = (a), *check_b_ = (b);                       \
        if (check_a_ && check_b_ && strcmp(check_a_, check_b_) == 0) {     \
            check_passed++;                                                \
        } else {                                                           \
            check_failed++;                                                \
            printf("FAIL %s:%d: %s == \"%s\" (got \"%s\")\n", __FILE__,    \
                   __LINE__, #a, check_b_ ? check_b_ : "(null)",           \
                   check_a_ ? check_a_ : "(null)");                        \
        }                                                                  \
    } while (0)

#define CHECK_DONE()                                                       \
    do {                                                                   \
        printf("unit-result: %d %d\n", check_passed, check_failed);        \
        return check_failed ? 1 : 0;                                       \
    } while (0)

#endif
