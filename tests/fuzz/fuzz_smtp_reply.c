/* fuzz_smtp_reply.c - libFuzzer harness for common/smtp.c's reply parser
 * (make fuzz): what a peer answers, the provider to odmr-fetch and, after
 * the reversal, a customer to odmrd's delivery.  The input is split at
 * '\n' into lines of at most SMTP_REPLY_LINE_MAX octets, fed to one reply
 * after another; the first line's first word is also looked up as an
 * EHLO keyword in every completed reply.
 *
 * Properties checked on every input: no crash or sanitizer report; a
 * reply's code stays 200..599 and the same on every line; a complete
 * reply takes no more lines; the joined text is terminated within its
 * buffer, has no control character but its '\n' separators, and has one
 * more line than separators while it is not truncated; an enhanced code
 * starts with the reply's class; EHLO parameters fit their buffer. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/smtp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void must(bool property)
{
    if (!property)
        abort();
}

static void check_text(const struct smtp_reply *r)
{
    size_t len = strnlen(r->text, sizeof r->text), seps = 0;
    must(len < sizeof r->text);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)r->text[i];
        must(c == '\n' || (c >= 32 && c != 127));
        seps += c == '\n';
    }
    if (len + 1 < sizeof r->text - SMTP_REPLY_LINE_MAX)
        must(seps + 1 == r->nlines);
    if (r->enhanced[0])
        must(r->enhanced[0] == (char)('0' + r->code / 100) &&
             strnlen(r->enhanced, sizeof r->enhanced) <= 11);
}

static void check_complete(struct smtp_reply *r, const char *keyword)
{
    char params[64];
    must(smtp_reply_feed(r, "250 more") == -1);
    if (smtp_ehlo_has(r, keyword, params, sizeof params))
        must(strnlen(params, sizeof params) < sizeof params);
    else
        must(params[0] == '\0');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char line[SMTP_REPLY_LINE_MAX + 1], keyword[32] = "";
    struct smtp_reply r;
    size_t start = 0;
    smtp_reply_init(&r);
    while (start < size) {
        const uint8_t *nl = memchr(data + start, '\n', size - start);
        size_t len = (nl ? (size_t)(nl - data) : size) - start;
        size_t take = len < SMTP_REPLY_LINE_MAX ? len : SMTP_REPLY_LINE_MAX;
        memcpy(line, data + start, take);
        line[take] = '\0';
        if (start == 0 && take > 4)
            snprintf(keyword, sizeof keyword, "%.*s", (int)strcspn(line + 4, " "),
                     line + 4);
        int code = r.code, got = smtp_reply_feed(&r, line);
        must(got >= -1 && got <= 1);
        if (got >= 0) {
            must(r.code >= 200 && r.code <= 599 && (!code || code == r.code));
            check_text(&r);
        }
        if (got == 1)
            check_complete(&r, keyword);
        if (got != 0)
            smtp_reply_init(&r);   /* the next reply, as a caller would */
        start += len + 1;
    }
    return 0;
}
