/* addr.h - RFC 5321 mailbox and domain parsing (with RFC 6531 SMTPUTF8).
 *
 * Limits: local part <= ADDR_LOCAL_MAX octets, domain <= ADDR_DOMAIN_MAX,
 * whole mailbox <= ADDR_MAX.  RFC 5321 says 64 for the local part but real
 * mail (VERP, SRS) exceeds it, so we are as lenient as Postfix and only
 * bound what we store. */
#ifndef ODMR_ADDR_H
#define ODMR_ADDR_H

#include <stdbool.h>
#include <stddef.h>

#define ADDR_LOCAL_MAX 256
#define ADDR_DOMAIN_MAX 255
#define ADDR_MAX (ADDR_LOCAL_MAX + 1 + ADDR_DOMAIN_MAX)

/* flags for addr_parse_path */
#define ADDR_ALLOW_NULL 0x01   /* "<>" is accepted (reverse-path) */
#define ADDR_ALLOW_UTF8 0x02   /* non-ASCII UTF-8 allowed (SMTPUTF8 given) */
#define ADDR_ALLOW_BARE 0x04   /* accept a path without angle brackets */

enum addr_result {
    ADDR_OK = 0,
    ADDR_SYNTAX,     /* not a valid path */
    ADDR_TOOLONG,    /* exceeds one of the limits above */
    ADDR_NEEDUTF8,   /* valid only with SMTPUTF8 */
};

struct mailbox {
    bool null;                        /* "<>" */
    bool literal;                     /* domain is an address literal */
    char local[ADDR_LOCAL_MAX + 1];   /* as written, quotes kept */
    char domain[ADDR_DOMAIN_MAX + 1]; /* as written, e.g. "Example.COM" or "[192.0.2.1]" */
};

/* Parses a Reverse-path/Forward-path starting at s: "<" [A-d-l ":"] Mailbox ">"
 * (source routes are accepted and discarded, RFC 5321 section 4.1.2).
 * On success *end points just past the closing '>'. */
enum addr_result addr_parse_path(const char *s, const char **end,
                                 struct mailbox *mb, int flags);

/* Validates a domain name (dot-separated LDH labels, each 1..63, total <=255;
 * U-labels allowed when utf8).  Address literals are not domains here. */
bool addr_valid_domain(const char *d, bool utf8);

/* Validates an address literal "[...]" (IPv4 dotted quad, "IPv6:" form or
 * General-address-literal). */
bool addr_valid_literal(const char *s);

/* "local@domain" (or "" for the null path) into buf. */
bool addr_format(const struct mailbox *mb, char *buf, size_t n);

/* "\"john\"" and "john" are one mailbox (RFC 5321 4.1.2): a quoted
 * local part (local, len bytes) whose content is an ASCII dot-atom is
 * narrowed to that content; any other is left as it is.  odmrd's
 * recipient lists and odmr-fetch's maildir %u both use it, so a quoted
 * spelling finds the mailbox at the site exactly when it finds the entry
 * at the provider. */
void addr_local_unquote(const char **local, size_t *len);
/* The same into out (n bytes); false when out is too small. */
bool addr_local_plain(const char *local, char *out, size_t n);

/* Lower-cased copy of a domain, for lookups and queue names. */
void addr_domain_key(const char *domain, char *buf, size_t n);

/* Domain part of a formatted address "local@domain" (after the '@' that
 * ends the local part, quoted or not), or NULL. */
const char *addr_domain_of(const char *address);

#endif
