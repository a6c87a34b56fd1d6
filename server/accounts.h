/* accounts.h - the GDBM account and domain database (SPEC 3.2).
 *
 * Keys and values (all NUL-free text):
 *   "u:<name>"   -> "v1\n<password>\n"     account (password as SASL needs it)
 *   "d:<domain>" -> "<name>"              domain binding (the domain's key,
 *                                          common/idna.h: A-labels, lower case)
 * The file is opened for every lookup and closed at once: GDBM keeps a lock
 * while a handle is open, and re-opening is how a running daemon sees what
 * odmrctl changed, without a restart. */
#ifndef ODMR_ACCOUNTS_H
#define ODMR_ACCOUNTS_H

#include <stdbool.h>
#include <stddef.h>

#define ACCOUNT_NAME_MAX 255
#define PASSWORD_MAX 1024

enum acct_result {
    ACCT_OK = 0,
    ACCT_NOTFOUND = 1,
    ACCT_EXISTS = 2,       /* add of something that exists / bound elsewhere */
    ACCT_TEMPFAIL = -1,    /* locked by a writer for too long, I/O error */
    ACCT_NODB = -2,        /* the database file does not exist */
    ACCT_PERM = -3,        /* permission denied */
};

/* A user name is 1..255 printable non-space ASCII characters without ':'. */
bool account_name_valid(const char *name);

/* Which account a domain (any case) is bound to. */
enum acct_result accounts_domain_owner(const char *db, const char *domain,
                                       char *account, size_t n);
/* For odmrctl: an accounts file of 0 bytes is a database without entries
 * (its first write starts a new one), not the temporary failure sessions
 * see once it has stayed empty a while (a truncated file must not read as
 * "no accounts" to them: every AUTH would be 535). */
void accounts_empty_means_none(void);

enum acct_result accounts_password(const char *db, const char *name,
                                   char *password, size_t n);

/* Writers (odmrctl).  The file is created mode 0600 when missing. */
enum acct_result accounts_user_add(const char *db, const char *name,
                                   const char *password);
enum acct_result accounts_user_passwd(const char *db, const char *name,
                                      const char *password);
/* Deletes the account and all its domain bindings. */
enum acct_result accounts_user_del(const char *db, const char *name);
enum acct_result accounts_domain_add(const char *db, const char *domain,
                                     const char *name);
enum acct_result accounts_domain_del(const char *db, const char *domain);

/* Listing: fn(ctx, name) for each account, sorted; fn(ctx, domain, name)
 * for each binding, sorted by domain. */
enum acct_result accounts_users(const char *db,
                                void (*fn)(void *ctx, const char *name),
                                void *ctx);
enum acct_result accounts_domains(const char *db,
                                  void (*fn)(void *ctx, const char *domain,
                                             const char *name),
                                  void *ctx);

const char *acct_strerror(enum acct_result r);

#endif
