/* workers.h - odmrd's pool of session processes.
 *
 * The master accepts every connection itself (so it can count sessions per
 * client address exactly) and hands the socket to an idle worker process
 * over a private socketpair (SCM_RIGHTS).  A worker serves one session at
 * a time, reports back, and is reused for up to WORKER_MAX_USE sessions,
 * like Postfix's max_use: forking per connection cost more than the whole
 * SMTP transaction on small machines.  Workers are forked on demand up to
 * max_connections, and idle ones beyond WORKER_MAX_IDLE are retired. */
#ifndef ODMR_WORKERS_H
#define ODMR_WORKERS_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define WORKER_MAX_USE 200
#define WORKER_MAX_IDLE 32

struct worker_job {
    int service;                 /* which listener kind (odmrd's enum) */
    char addr[64];               /* client address, printable */
};

/* Runs in the worker process for each session; fd belongs to it. */
typedef void (*worker_session_fn)(int fd, const struct worker_job *job);
/* Runs once in each new worker process right after fork. */
typedef void (*worker_setup_fn)(void);

bool pool_init(size_t max_workers, worker_session_fn session,
               worker_setup_fn setup);

enum pool_result { POOL_OK, POOL_FULL, POOL_PER_IP, POOL_ERROR };

/* Hands fd to a worker (the master's copy is closed in every case).
 * per_ip_max: sessions allowed from one address (0 = no limit). */
enum pool_result pool_dispatch(int fd, const struct worker_job *job,
                               size_t per_ip_max);

/* Adds the workers' channels to a poll set; returns how many were added. */
size_t pool_pollfds(struct pollfd *pfd, size_t max);
/* Processes the channels of a poll set filled by pool_pollfds. */
void pool_handle(const struct pollfd *pfd, size_t n);
/* A child exited (from waitpid); true if it was a worker. */
bool pool_reaped(pid_t pid, int status);
/* After a reload: workers finish their session and then exit, so new
 * sessions run with the new configuration. */
void pool_retire_all(void);
/* SIGTERM to all workers, wait up to wait_s for them, then SIGKILL. */
void pool_shutdown(int wait_s);
size_t pool_busy(void);
size_t pool_size(void);

#endif
