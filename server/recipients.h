/* recipients.h - optional per-domain lists of valid recipients, kept in
 * the account database (no backscatter: mail for a user that does not
 * exist is refused at RCPT instead of bounced later).
 *
 * Guarantees: a domain without a list accepts every recipient, as before;
 * a domain with a list accepts exactly its entries - "user" (ASCII letters
 * compared without case, "user+anything" too, and a quoted "user" that
 * needs no quotes is the same user), "postmaster" always (RFC 5321
 * 4.5.1), or everything when the list has the catch-all "@".  A lookup is two or three GDBM fetches in one
 * open of the database, whatever the length of the lists, and sees every
 * change at once: the answers that do not depend on the local part (a
 * domain without a list, a domain not hosted) are kept by the process
 * and given again only while a stat of the file shows it unchanged
 * (recipients.c explains the rule).
 *
 * Records: "R:<domain key>" -> number of entries (the list exists);
 *          "r:<domain key>:<local part>" -> "".  The local part is stored
 *          as written, ASCII lower-cased; "@" is the catch-all. */
#ifndef ODMR_RECIPIENTS_H
#define ODMR_RECIPIENTS_H

#include <stdbool.h>
#include <stddef.h>

#include "accounts.h"

#define RECIPIENT_CATCHALL "@"

enum rcpt_result {
    RCPT_VALID = 0,        /* domain bound, recipient accepted; owner set */
    RCPT_NO_DOMAIN,        /* the domain is not bound to an account */
    RCPT_UNKNOWN_USER,     /* bound, and its list does not have the user */
    RCPT_TEMPFAIL,         /* database trouble (logged) */
};

/* Sender-specified routing inside a hosted domain - "user%other@hosted",
 * "a!b@hosted", "\"user@other\"@hosted" - asks the customer's MTA to relay
 * on (many still honour the percent hack): refused like relaying, as
 * Postfix does for clients it does not trust. */
bool recipients_routed(const char *local);

/* The RCPT check: which account owns domain and whether local is one of
 * its recipients, in one open of the database.  *has_list (may be NULL)
 * tells whether the domain has a list: without one, the answer is the
 * same for every recipient of the domain. */
enum rcpt_result recipients_check(const char *db, const char *domain,
                                  const char *local, char *owner, size_t n,
                                  bool *has_list);

/* Adds (add) or removes entries of domain's list in one transaction;
 * *changed counts the entries that were not there (added) or were
 * (removed).  Removing the last entry removes the list: the domain is
 * catch-all again.  A local part that cannot be stored is ACCT_NOTFOUND.
 * hold (adding to a domain with no list yet): the entries are stored but
 * the list is not switched on, so that an import in several transactions
 * refuses nobody until its last one, which counts every entry stored. */
enum acct_result recipients_change(const char *db, const char *domain,
                                   const char *const *locals, size_t n,
                                   bool add, bool hold, size_t *changed);

/* fn(ctx, local) for each entry, sorted; ACCT_NOTFOUND when the domain
 * has no list. */
enum acct_result recipients_list(const char *db, const char *domain,
                                 void (*fn)(void *ctx, const char *local),
                                 void *ctx);

/* The number of entries of domain's list (from its record, constant
 * time); ACCT_NOTFOUND when it has none. */
enum acct_result recipients_count(const char *db, const char *domain,
                                  unsigned long *count);

/* Removes a domain's whole list (domain del). */
enum acct_result recipients_drop(const char *db, const char *domain);

#endif
