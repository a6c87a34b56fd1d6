/* fuzz_downgrade.c - libFuzzer harness for server/downgrade.c, the MIME
 * walk that makes a queued message 7-bit for a customer without 8BITMIME
 * (make fuzz).  The input is the message as it sits in the queue, which
 * is whatever a sender on port 25 wrote.
 *
 * Properties checked on every input: no crash or sanitizer report; the
 * plan is made; the output is exactly as long as the plan said; a plan
 * that changes nothing gives back the input octet for octet; a plan with
 * no 8-bit octets left gives output without one, and planning that output
 * again finds no 8-bit octet at all. */
#define _GNU_SOURCE   /* memfd_create */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* downgrade.c belongs to odmrd, not to the common sources the fuzz rule
 * links: compiled in here. */
#include "../../server/downgrade.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct out {
    char *buf;
    size_t len, cap;
};

static bool collect(void *ctx, const char *p, size_t len)
{
    struct out *o = ctx;
    if (o->len + len > o->cap) {
        size_t cap = (o->len + len) * 2;
        char *b = realloc(o->buf, cap);
        if (!b)
            abort();
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, p, len);
    o->len += len;
    return true;
}

static void must(bool property)
{
    if (!property)
        abort();
}

/* A memory file holding len octets of p, at offset 0. */
static int memory_file(const void *p, size_t len)
{
    int fd = memfd_create("fuzz_downgrade", MFD_CLOEXEC);
    if (fd < 0 || write(fd, p, len) != (ssize_t)len || lseek(fd, 0, SEEK_SET) != 0)
        abort();
    return fd;
}

static bool has_8bit_octet(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)p[i] >= 0x80)
            return true;
    return false;
}

static void check_output_is_7bit(const struct out *o)
{
    must(!has_8bit_octet(o->buf, o->len));
    int fd = memory_file(o->buf, o->len);
    struct dg_plan again;
    must(downgrade_plan(fd, o->len, &again));
    must(!again.has_8bit && !again.residual_8bit);
    downgrade_free(&again);
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memory_file(data, size);
    struct dg_plan plan;
    must(downgrade_plan(fd, size, &plan));
    must(plan.has_8bit == has_8bit_octet((const char *)data, size));
    struct out o = {0};
    must(lseek(fd, 0, SEEK_SET) == 0 && downgrade_write(fd, &plan, collect, &o));
    must(o.len == plan.size);
    if (!plan.convert)
        must(o.len == size && (!size || !memcmp(o.buf, data, size)));
    if (plan.has_8bit && !plan.residual_8bit)
        check_output_is_7bit(&o);
    free(o.buf);
    downgrade_free(&plan);
    close(fd);
    return 0;
}
