/* accounts_db.h - the account database's primitives, for the modules that
 * keep their own records in it (recipients.c).  Not for anything else:
 * everyone else goes through accounts.h or recipients.h.
 *
 * Every function keeps accounts.c's rules: opens retry a writer's lock for
 * a bounded time, writers sync before they close, keys are NUL-free text. */
#ifndef ODMR_ACCOUNTS_DB_H
#define ODMR_ACCOUNTS_DB_H

#include <gdbm.h>
#include <stdbool.h>
#include <stddef.h>

#include "accounts.h"

enum db_mode {
    DB_READ,     /* lookups and listings */
    DB_WRITE,    /* changes to an existing database */
    DB_CREATE,   /* changes that may create the database (user add) */
};

/* For DB_READ, *dbf may be NULL with ACCT_OK: an empty file, no entries. */
enum acct_result acctdb_open(const char *db, enum db_mode mode, GDBM_FILE *dbf);
void acctdb_close_reader(GDBM_FILE dbf);
/* Syncs and closes; a failure turns an ACCT_OK r into ACCT_TEMPFAIL. */
enum acct_result acctdb_close_writer(const char *db, GDBM_FILE dbf,
                                     enum acct_result r);
/* The value of key as a heap string, or NULL with *r telling why. */
char *acctdb_fetch(const char *db, GDBM_FILE dbf, const char *key, size_t *len,
                   enum acct_result *r);
bool acctdb_exists(GDBM_FILE dbf, const char *key);
/* how: GDBM_INSERT (ACCT_EXISTS when there) or GDBM_REPLACE. */
enum acct_result acctdb_store(const char *db, GDBM_FILE dbf, const char *key,
                              const char *value, size_t len, int how);
enum acct_result acctdb_delete(const char *db, GDBM_FILE dbf, const char *key);
/* "d:<IDNA key of domain>" into key (ACCOUNTS_KEY_MAX + 1 bytes); false
 * when the domain has no key. */
bool acctdb_domain_key(char *key, const char *domain);

#define ACCOUNTS_KEY_MAX (2 + (ACCOUNT_NAME_MAX > 255 ? ACCOUNT_NAME_MAX : 255))

#endif
