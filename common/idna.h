/* idna.h - one key per domain, whatever its spelling (RFC 5890/5891).
 *
 * Guarantee: every spelling of a domain - any ASCII case, U-labels, their
 * "xn--" A-labels, a mix of both, one trailing root dot - maps to the same
 * key, and a spelling that is not a valid domain has no key.  A key is
 * lower-case ASCII (letters, digits, '-' and '.'), 1..ADDR_DOMAIN_MAX
 * octets, never begins with '.', so it is safe as a file name and as a
 * database key.  Keys of plain ASCII domains are simply lower-cased, so
 * spools and databases written before IDNA support keep their names.
 *
 * U-labels are converted with libidn2 (IDNA2008 with UTS #46
 * non-transitional mapping, as mail software commonly does: "ß" stays,
 * upper case is folded); an A-label must decode and encode back to itself.
 * ASCII labels that are not A-labels are taken as LDH host names, without
 * the IDNA2008 rules for hyphens in positions 3-4, because such names
 * exist in the DNS and mail for them must not be refused. */
#ifndef ODMR_IDNA_H
#define ODMR_IDNA_H

#include <stddef.h>

#include "addr.h"

#define IDNA_KEY_MAX ADDR_DOMAIN_MAX

enum idna_result {
    IDNA_OK = 0,
    IDNA_INVALID,    /* not a valid domain / not valid IDNA */
    IDNA_TOOLONG,    /* a label over 63 octets or a key over IDNA_KEY_MAX */
};

/* The key of domain (UTF-8 or ASCII) into key (at least IDNA_KEY_MAX + 1
 * bytes).  why, when not NULL, receives a short reason on failure. */
enum idna_result idna_domain_key(const char *domain, char *key, size_t n,
                                 const char **why);

/* The readable form of a key: its A-labels as Unicode (UTF-8).  Falls back
 * to the key itself when it has none or they do not decode. */
void idna_display(const char *key, char *buf, size_t n);

#endif
