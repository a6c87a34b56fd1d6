/* queue.h - the durable per-domain filesystem queue.
 *
 * Layout under spool_dir:
 *   tmp/                    files being written, named by queue id only
 *                           (<id>.m, <id>.e, <id>.r, <id>.<pid>.u); never
 *                           part of the queue
 * A message is queued for a domain in one of two layouts, and every reader
 * takes both:
 *   q/<domain>/<id>.q       a queue file: the data, then the envelope and a
 *                           trailer (qfile.h).  A message for one domain,
 *                           which is nearly all mail, is committed this way:
 *                           one inode, one data sync, one rename.  Its
 *                           presence is what makes the message queued.
 *   q/<domain>/<id>.n       a newer envelope for the queue file (written by
 *                           queue_update; the queue file is never rewritten)
 *   q/<domain>/<id>.m       message data (RFC 5322 text, CRLF lines, no
 *                           dot-stuffing) of a message for several domains:
 *                           one inode hard-linked into each of them.  Also
 *                           the name a message's data is written under in
 *                           its first domain until its commit.
 *   q/<domain>/<id>.e       the envelope (envelope.h) beside that .m; its
 *                           presence is what makes the message queued there
 *                           (also spools written before queue files, and
 *                           messages released from the quarantine)
 *   q/<domain>/.lock        flock()ed by the session dequeuing the domain;
 *                           the kernel drops the lock when that process dies
 *   q/<domain>/.usage       the domain's usage counter (queue_usage)
 *   corrupt/<domain>/<id>.* messages whose envelope could not be read
 *   quarantine/<domain>/...  messages milters held (see below)
 * Readers of the data stop at the envelope's size (Z): a queue file holds
 * its envelope after the data.
 *
 * <domain> is the domain's key (common/idna.h): lower-case ASCII with
 * A-labels, at most 255 octets, so every domain that can be hosted fits in
 * one file name, and both spellings of an IDN domain are one queue.
 *
 * The queue never follows a symbolic link: domain directories, data and
 * envelope files are opened with O_NOFOLLOW (or checked with lstat), so a
 * link planted in the spool is refused and logged, never delivered.
 *
 * Commit order, one domain: data written to an unnamed file (O_TMPFILE)
 * in q/<domain>/ (where the file system has none: to <id>.m there, or to
 * tmp/), envelope and trailer appended, fsynced, linked (or renamed) as
 * <id>.q, the domain directory fsynced.  Several domains: data fsynced, linked into each
 * domain, each envelope written to tmp/, fsynced, renamed to
 * q/<domain>/<id>.e, the domain directory fsynced.  Only then is 250 said.
 * A crash at any point leaves either a committed message or invisible
 * leftovers (tmp files, .m without .e) that queue_cleanup() removes.
 * Removal deletes what makes the message queued first (.q, or .e), then
 * the rest (.n, or .m); a .n left without its .q is removed by
 * queue_cleanup(); the directory sync is batched (queue_sync_removals).
 *
 * Looking at one domain touches only that domain's directory, so the cost
 * of an ATRN does not depend on how much other mail is queued. */
#ifndef ODMR_QUEUE_H
#define ODMR_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>

#include "envelope.h"

struct queue {
    char spool[PATH_MAX];
};

/* Creates tmp/ and q/ when missing (mode 0700). false + err on failure. */
bool queue_open(struct queue *q, const char *spool_dir, char *err, size_t n);

/* A new, unique, sortable queue id (uppercase hex: time, usec, pid). */
void queue_new_id(char *id, size_t n);

/* --- incoming messages --- */
struct queue_in {
    char id[QID_MAX];
    char tmp_path[PATH_MAX];
    int fd;
    int dirfd;                 /* q/<home>/ while written in place, or -1:
                                  the file is made and the directory synced
                                  through it */
    uint64_t size;
    int error;                 /* first errno seen while writing, 0 if none */
    char home[ADDR_DOMAIN_MAX + 1];   /* data written in place there, or "" */
    bool unnamed;              /* an O_TMPFILE in home: tmp_path is only the
                                  name it gets if a step needs one */
    size_t blen;
    char buf[65536];
};

/* Starts a new message in tmp/.  false + errno on failure. */
bool queue_in_begin(struct queue *q, struct queue_in *in);
/* The same, but the data is written straight into q/<domain>/<id>.m,
 * where it stays invisible until its envelope is committed: for the
 * message's first recipient domain this saves a link and an unlink per
 * message, which is most of the message for small mail. */
bool queue_in_begin_at(struct queue *q, struct queue_in *in, const char *domain);
/* Buffered write; remembers the first error instead of failing loudly so a
 * DATA phase can read to its end and then reply 452. */
void queue_in_write(struct queue_in *in, const void *data, size_t len);
/* Commits one envelope per domain (each env->domain, already set; their id,
 * size and arrival are filled in here).  Returns 0 or an errno value; on
 * failure nothing of the message stays queued. */
int queue_in_commit(struct queue *q, struct queue_in *in,
                    struct envelope **envs, size_t nenv);
/* Discards an uncommitted message. */
void queue_in_abort(struct queue_in *in);
/* Milters change headers and body after the data is on disk; the changed
 * message is a copy.  queue_in_reread flushes an uncommitted message and
 * returns a read-only descriptor of its data (-1 + errno).
 * queue_in_begin_copy starts the copy of orig (begun with
 * queue_in_begin_at) under the same queue id, in tmp/<id>.r: abort orig,
 * then commit the copy.  false + errno on failure. */
int queue_in_reread(struct queue_in *in);
bool queue_in_begin_copy(struct queue *q, struct queue_in *in,
                         const struct queue_in *orig);

/* --- inspection and dequeue --- */
/* Calls fn for every domain directory that exists (sorted). */
int queue_domains(struct queue *q,
                  int (*fn)(void *ctx, const char *domain), void *ctx);
/* Calls fn for every committed message id of the domain, oldest first.
 * Returns the number of ids or -1 (errno set). */
int queue_ids(struct queue *q, const char *domain,
              int (*fn)(void *ctx, const char *id), void *ctx);
/* Whether a file of this name in a domain directory is what makes a
 * message queued there (an envelope <id>.e or a queue file <id>.q). */
bool queue_name_commits(const char *name);
/* Is anything queued for the domain?  Stops at the first envelope, so it
 * costs little however much is queued.  True on a read error too (the
 * caller then looks closer and reports it). */
bool queue_has_mail(struct queue *q, const char *domain);
/* Bytes (data sizes) and messages queued for the domain, from the
 * domain's usage counter (constant time; may be off after a crash until
 * the next queue_usage_refresh). */
bool queue_usage(struct queue *q, const char *domain, uint64_t *bytes,
                 unsigned long *count);
/* The same, counted from the files. */
bool queue_usage_exact(struct queue *q, const char *domain, uint64_t *bytes,
                       unsigned long *count);
/* Recounts every domain's usage counter (the maintenance pass). */
void queue_usage_refresh(struct queue *q);
bool queue_load(struct queue *q, const char *domain, const char *id,
                struct envelope *e, char *err, size_t n);
/* Opens the data read-only (the queue file, or the .m): its first
 * envelope-size octets are the message.  -1 on failure. */
int queue_open_data(struct queue *q, const char *domain, const char *id);
/* Replaces the envelope atomically (tmp + rename + fsync): the .e, or for
 * a queue file its .n. */
bool queue_update(struct queue *q, const struct envelope *e);
/* Moves a message whose envelope cannot be read into
 * spool/corrupt/<domain>/ (its .q and .n, or its .e and .m), out of the
 * queue but kept for the administrator; where receives that directory. */
bool queue_quarantine(struct queue *q, const char *domain, const char *id,
                      char *where, size_t n);
/* Removes a message from a domain (.q then .n, or .e then .m).  The
 * directory is synced later, in batches (queue_sync_removals): an unsynced
 * removal can at worst come back after a power loss, as a duplicate. */
bool queue_remove(struct queue *q, const char *domain, const char *id);
/* Syncs the directory of removals not synced yet.  Called by queue_ids
 * (so at the end of every delivery pass), queue_lock_domain, every
 * REMOVAL_SYNC_BATCH removals and at exit. */
void queue_sync_removals(void);
/* Finds which domain(s) hold id; calls fn for each. */
int queue_find(struct queue *q, const char *id,
               int (*fn)(void *ctx, const char *domain), void *ctx);

/* --- the quarantine: messages a milter held (SMFIR_QUARANTINE) ---
 *   quarantine/<domain>/<id>.m, <id>.e   as in q/, but never delivered
 *   quarantine/<domain>/<id>.why         the milter's reason, one line
 * The same commit order as q/ (the .why before the .e); a message is in
 * the quarantine exactly when its .e is there, and release moves the .e
 * into q/ with one rename, so it is never in both nor in neither. */
int queue_in_commit_held(struct queue *q, struct queue_in *in,
                         struct envelope **envs, size_t nenv,
                         const char *reason);
/* Held domains (sorted); held ids of a domain (oldest first, count or -1). */
int queue_held_domains(struct queue *q,
                       int (*fn)(void *ctx, const char *domain), void *ctx);
int queue_held_ids(struct queue *q, const char *domain,
                   int (*fn)(void *ctx, const char *id), void *ctx);
/* The envelope and the reason ("" when unreadable) of a held message. */
bool queue_held_load(struct queue *q, const char *domain, const char *id,
                     struct envelope *e, char *reason, size_t rn, char *err,
                     size_t n);
/* The domains holding id in the quarantine; the count or -1. */
int queue_held_find(struct queue *q, const char *id,
                    int (*fn)(void *ctx, const char *domain), void *ctx);
/* Puts a held message back into the queue; false + errno. */
bool queue_release(struct queue *q, const char *domain, const char *id);
/* Removes a held message (envelope first); false + errno. */
bool queue_held_remove(struct queue *q, const char *domain, const char *id);

/* Exclusive, non-blocking lock of a domain for dequeueing.  Returns the
 * lock fd (>= 0), -2 when another process holds it, -1 on error.
 * Close the fd to release it. */
int queue_lock_domain(struct queue *q, const char *domain);

/* Removes stale tmp/ files and data files without an envelope older than
 * max_age seconds (or whose writer is gone), and newer envelopes (.n)
 * whose queue file is gone. */
void queue_cleanup(struct queue *q, long max_age);

#endif
