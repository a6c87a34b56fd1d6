/* fuzz_smtp_cmd.c - libFuzzer harness for common/smtp.c and common/addr.c
 * on the server's side (make fuzz): the command lines a client on port 25
 * or 366 sends.  The input is split at '\n' into lines of at most
 * SMTP_MAILRCPT_LINE_MAX octets, as the I/O layer bounds them; each line
 * is parsed as a command and, for MAIL and RCPT, its path and parameters
 * are parsed with and without SMTPUTF8 advertised.
 *
 * Properties checked on every line: no crash or sanitizer report; the
 * argument lies inside the line ("" for an unknown verb); a refusal carries a 4xx or 5xx code that
 * begins its reply text; an accepted address is within the limits of
 * addr.h, has only ASCII unless UTF-8 was allowed, has a valid domain
 * (or literal) and formats into ADDR_MAX octets; accepted ENVID and ORCPT
 * values are valid xtext within their limits; xtext decoding and encoding
 * of the raw argument agree with each other. */
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

static bool ascii_only(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return false;
    return true;
}

/* A refusal's code and reply agree: "501 5.5.4 ..." for code 501. */
static void check_refusal(const struct smtp_err *err)
{
    char code[4];
    must(err->code >= 400 && err->code <= 599);
    must(memchr(err->reply, '\0', sizeof err->reply) != NULL);
    snprintf(code, sizeof code, "%d", err->code);
    must(!strncmp(err->reply, code, 3) && err->reply[3] == ' ');
}

static void check_mailbox(const struct mailbox *mb, bool utf8_allowed)
{
    char formatted[ADDR_MAX + 1];
    size_t llen = strnlen(mb->local, sizeof mb->local);
    size_t dlen = strnlen(mb->domain, sizeof mb->domain);
    must(llen <= ADDR_LOCAL_MAX && dlen <= ADDR_DOMAIN_MAX);
    must(addr_format(mb, formatted, sizeof formatted));
    if (mb->null) {
        must(formatted[0] == '\0');
        return;
    }
    must(llen > 0 && dlen > 0);
    if (!utf8_allowed)
        must(ascii_only(mb->local) && ascii_only(mb->domain));
    must(mb->literal ? addr_valid_literal(mb->domain)
                     : addr_valid_domain(mb->domain, utf8_allowed));
    const char *domain = addr_domain_of(formatted);
    must(domain != NULL && !strcmp(domain, mb->domain));
    char plain[ADDR_LOCAL_MAX + 1];
    must(addr_local_plain(mb->local, plain, sizeof plain));
    must(strlen(plain) <= llen && plain[0] != '\0');
}

static void check_mail(const char *arg, bool utf8_ok)
{
    struct mail_args m;
    struct smtp_err err;
    if (!smtp_parse_mail(arg, &m, utf8_ok, &err)) {
        check_refusal(&err);
        return;
    }
    check_mailbox(&m.from, utf8_ok && m.smtputf8);
    must(!m.smtputf8 || utf8_ok);
    must(strnlen(m.envid, sizeof m.envid) <= SMTP_ENVID_MAX);
    must(!m.envid[0] || xtext_valid(m.envid));
}

static void check_rcpt(const char *arg, bool utf8_ok)
{
    struct rcpt_args r;
    struct smtp_err err;
    if (!smtp_parse_rcpt(arg, &r, utf8_ok, &err)) {
        check_refusal(&err);
        return;
    }
    must(!r.to.null);
    check_mailbox(&r.to, utf8_ok);
    must(strnlen(r.orcpt, sizeof r.orcpt) <= SMTP_ORCPT_MAX);
    const char *semi = strchr(r.orcpt, ';');
    must(!r.orcpt[0] || (semi != NULL && xtext_valid(semi + 1)));
    must(!(r.notify & DSN_NOTIFY_NEVER) || r.notify == DSN_NOTIFY_NEVER);
}

/* What xtext_decode accepts, xtext_encode gives back as valid xtext that
 * decodes to the same octets. */
static void check_xtext(const char *s)
{
    char plain[SMTP_LINE_MAX + 1], encoded[3 * SMTP_LINE_MAX + 1];
    char again[SMTP_LINE_MAX + 1];
    if (!xtext_decode(s, plain, sizeof plain))
        return;
    must(xtext_encode(plain, encoded, sizeof encoded));
    must(xtext_valid(encoded));
    must(xtext_decode(encoded, again, sizeof again) && !strcmp(again, plain));
}

static void check_line(const char *line, size_t len)
{
    struct smtp_cmd cmd;
    smtp_cmd_parse(line, &cmd);
    must(cmd.arg != NULL || cmd.verb == SMTP_MAIL || cmd.verb == SMTP_RCPT);
    if (cmd.verb == SMTP_UNKNOWN)
        must(cmd.arg != NULL && cmd.arg[0] == '\0');
    else if (cmd.arg)
        must(cmd.arg >= line && cmd.arg <= line + len);
    must(smtp_verb_name(cmd.verb) != NULL);
    if (cmd.verb == SMTP_MAIL) {
        check_mail(cmd.arg, false);
        check_mail(cmd.arg, true);
    } else if (cmd.verb == SMTP_RCPT) {
        check_rcpt(cmd.arg, false);
        check_rcpt(cmd.arg, true);
    }
    if (len <= SMTP_LINE_MAX)
        check_xtext(line);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char line[SMTP_MAILRCPT_LINE_MAX + 1];
    size_t start = 0;
    while (start < size) {
        const uint8_t *nl = memchr(data + start, '\n', size - start);
        size_t len = (nl ? (size_t)(nl - data) : size) - start;
        size_t take = len < SMTP_MAILRCPT_LINE_MAX ? len : SMTP_MAILRCPT_LINE_MAX;
        memcpy(line, data + start, take);
        line[take] = '\0';
        check_line(line, strlen(line));   /* a NUL ends the line early */
        start += len + 1;
    }
    return 0;
}
