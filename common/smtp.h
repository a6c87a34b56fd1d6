/* smtp.h - SMTP command and reply parsing shared by server and client.
 * Pure functions over NUL-terminated lines (CRLF already removed). */
#ifndef ODMR_SMTP_H
#define ODMR_SMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "addr.h"

/* RFC 5321 4.5.3.1.4: 512 octets per command line incl. CRLF; MAIL and RCPT
 * get room for ESMTP parameters (RFC 1869 adds to the limit per extension). */
#define SMTP_LINE_MAX 512
#define SMTP_MAILRCPT_LINE_MAX 2048
#define SMTP_REPLY_LINE_MAX 512
#define SMTP_ENVID_MAX 100       /* RFC 3461 4.4 */
#define SMTP_ORCPT_MAX 500       /* RFC 3461 4.2: xtext-encoded */
#define SMTP_MAX_PARAMS 16

enum smtp_verb {
    SMTP_UNKNOWN = 0,
    SMTP_HELO, SMTP_EHLO, SMTP_LHLO,
    SMTP_MAIL, SMTP_RCPT, SMTP_DATA, SMTP_BDAT,
    SMTP_RSET, SMTP_NOOP, SMTP_QUIT, SMTP_HELP, SMTP_VRFY, SMTP_EXPN,
    SMTP_STARTTLS, SMTP_AUTH, SMTP_ATRN, SMTP_ETRN, SMTP_TURN,
};

struct smtp_cmd {
    enum smtp_verb verb;
    const char *arg;    /* text after the verb and separating spaces; "" if none */
};

/* Recognises the verb (case-insensitive).  For MAIL and RCPT the verb is
 * "MAIL FROM:" / "RCPT TO:" and arg starts right after the colon (leading
 * spaces skipped, as many clients send one).  "MAIL" without "FROM:" is
 * SMTP_MAIL with arg NULL (a syntax error for the caller to report). */
void smtp_cmd_parse(const char *line, struct smtp_cmd *cmd);
const char *smtp_verb_name(enum smtp_verb v);

/* DSN (RFC 3461) */
#define DSN_NOTIFY_NEVER   0x01
#define DSN_NOTIFY_SUCCESS 0x02
#define DSN_NOTIFY_FAILURE 0x04
#define DSN_NOTIFY_DELAY   0x08

enum smtp_body { BODY_UNSPEC = 0, BODY_7BIT, BODY_8BITMIME };
enum smtp_ret { RET_UNSPEC = 0, RET_FULL, RET_HDRS };

struct mail_args {
    struct mailbox from;
    uint64_t size;           /* 0 = not given */
    enum smtp_body body;
    enum smtp_ret ret;
    bool smtputf8;
    char envid[SMTP_ENVID_MAX + 1];   /* xtext as received, "" if none */
};

struct rcpt_args {
    struct mailbox to;
    unsigned notify;                  /* DSN_NOTIFY_* bits, 0 = not given */
    char orcpt[SMTP_ORCPT_MAX + 1];   /* "rfc822;xtext" as received, "" if none */
};

/* Result of MAIL/RCPT argument parsing: on failure code is the SMTP reply
 * code and reply the full reply text ("501 5.5.4 ...") to send. */
struct smtp_err {
    int code;
    char reply[160];
};

/* arg is smtp_cmd.arg of a MAIL/RCPT command.  utf8_ok: SMTPUTF8 advertised. */
bool smtp_parse_mail(const char *arg, struct mail_args *out, bool utf8_ok,
                     struct smtp_err *err);
bool smtp_parse_rcpt(const char *arg, struct rcpt_args *out, bool utf8_ok,
                     struct smtp_err *err);

/* xtext (RFC 3461 4): validation, decoding (to at most n-1 bytes), encoding. */
bool xtext_valid(const char *s);
bool xtext_decode(const char *s, char *out, size_t n);
bool xtext_encode(const char *s, char *out, size_t n);

/* Replies.  A reply is one or more lines "NNN-text" ... "NNN text". */
struct smtp_reply {
    int code;                  /* 0 until the first line is seen */
    char enhanced[16];         /* "2.1.0" when present on the first line */
    char text[2048];           /* all lines' texts joined by '\n', truncated */
    size_t nlines;
    bool done;
};

void smtp_reply_init(struct smtp_reply *r);
/* Feeds one line; returns 1 when the reply is complete, 0 if more lines are
 * expected, -1 if the line is malformed (wrong code, bad separator). */
int smtp_reply_feed(struct smtp_reply *r, const char *line);
/* Finds an EHLO keyword (case-insensitive) in a complete EHLO reply (lines
 * after the first); copies its parameters ("" if none) into params when not
 * NULL.  Returns false when the keyword is absent. */
bool smtp_ehlo_has(const struct smtp_reply *r, const char *keyword,
                   char *params, size_t n);

#endif
