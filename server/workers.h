/* workers.h - odmrd's pool of session processes.
 *
 * The master accepts every connection itself (so it can count sessions per
 * client address exactly) and hands the socket to an idle worker process
 * over a private socketpair (SCM_RIGHTS).  A worker serves one session at
 * a time, reports back, and is reused for up to WORKER_MAX_USE sessions,
 * like Postfix's max_use: forking per connection cost more than the whole
 * SMTP transaction on small machines.  Workers are forked on demand up to
 * max_connections.  Idle ones beyond WORKER_MAX_IDLE are retired once
 * they have been idle for WORKER_IDLE_EXPIRE_S (Postfix's max_idle), not
 * the moment a session ends: under a steady stream of polls the number
 * of idle workers swings by dozens within milliseconds, and retiring at
 * each swing forked a new process, which then paid its first-session
 * set-up (OpenSSL's lazy initialisation: ~1 ms), for 3-8% of the polls
 * of a storm of 50 TLS customers.
 *
 * Each service has its own budget of sessions inside max_connections, and
 * the per-address limit counts per service, so a flood of one service
 * cannot refuse another.  A service above 80% of its budget is "under
 * stress": its new sessions are told so (shorter idle timeouts).
 *
 * The channel is a SOCK_SEQPACKET pair, so messages keep their bounds:
 * the master sends jobs (with the socket), the worker sends struct
 * worker_msg - requests the master answers at once (the authentication
 * failure table lives in the master, shared by all sessions) and, last,
 * "done". */
#ifndef ODMR_WORKERS_H
#define ODMR_WORKERS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define WORKER_MAX_USE 200
#define WORKER_MAX_IDLE 32
#define WORKER_IDLE_EXPIRE_S 60

#define POOL_SERVICES 3

struct worker_job {
    int service;                 /* which listener kind (odmrd's enum), < POOL_SERVICES */
    bool stress;                 /* the service is above 80% of its budget */
    /* What the authentication failure table said at dispatch (guard.h),
     * so that a login costs no question to the master: */
    bool auth_blocked;           /* this address may not AUTH now */
    bool attack_seen;            /* some account is under attack */
    unsigned long auth_failures; /* the address's failures in the window */
    char addr[64];               /* client address, printable */
};

enum worker_msg_type {
    WMSG_DONE = 1,               /* session over: worker is idle */
    WMSG_REQUEST,                /* answered with WMSG_ANSWER */
    WMSG_NOTE,                   /* not answered */
    WMSG_ANSWER,
};

/* A message between a worker and the master.  kind and the fields are
 * the business of the request handler (odmrd.c); the pool only carries
 * them, and fills in nothing the worker could fake: the client address
 * is the one the master gave the worker with the job. */
struct worker_msg {
    int type;                    /* enum worker_msg_type */
    unsigned seq;                /* an answer carries its request's */
    int kind;                    /* what is asked or told */
    long long value;             /* an answer's number, e.g. a delay */
    int verdict;
    char account[256];
};

/* Runs in the worker process for each session; fd belongs to it. */
typedef void (*worker_session_fn)(int fd, const struct worker_job *job);
/* Runs once in each new worker process right after fork. */
typedef void (*worker_setup_fn)(void);
/* Runs in the master for a worker's request or note: job is the session
 * the worker serves; for a request, msg is turned into the answer. */
typedef void (*worker_request_fn)(const struct worker_job *job,
                                  struct worker_msg *msg);

bool pool_init(size_t max_workers, worker_session_fn session,
               worker_setup_fn setup, worker_request_fn request);

/* Session budgets per service (index = worker_job.service) and sessions
 * allowed from one address in one service (0 = no limit). */
void pool_set_limits(const size_t budget[POOL_SERVICES], size_t per_ip_max);

enum pool_result { POOL_OK, POOL_FULL, POOL_SERVICE_FULL, POOL_PER_IP, POOL_ERROR };

/* Hands fd to a worker (the master's copy is closed in every case unless
 * the result is not POOL_OK: then the caller refuses and closes it).
 * Sets job->stress. */
enum pool_result pool_dispatch(int fd, struct worker_job *job);
/* Sessions running for a service. */
size_t pool_service_busy(int service);

/* In a worker, during a session: asks the master and waits at most
 * timeout_ms for its answer (msg becomes the answer); false without one. */
bool worker_ask(struct worker_msg *msg, int timeout_ms);
/* In a worker: tells the master something that needs no answer. */
void worker_tell(const struct worker_msg *msg);

/* The master's epoll set: from now on every worker's channel is in it
 * while the channel is open (event data: the channel's descriptor), so
 * one wake-up costs the same whatever the size of the pool. */
void pool_watch(int epoll_fd);
/* If fd is a worker's channel, processes what the worker sent (or its
 * end); any other descriptor is ignored.  For the master's events loop. */
void pool_handle(int fd);
/* In a child forked by the master for something else (maintenance):
 * closes its copies of the channels, so that a retired worker still
 * sees the end of its channel while that child runs. */
void pool_close_channels(void);
/* Retires idle workers beyond WORKER_MAX_IDLE that have been idle for
 * WORKER_IDLE_EXPIRE_S; the master calls it at least once a second. */
void pool_expire_idle(void);
/* A child exited (from waitpid); true if it was a worker. */
bool pool_reaped(pid_t pid, int status);
/* After a reload: workers finish their session and then exit, so new
 * sessions run with the new configuration. */
void pool_retire_all(void);
/* Idle workers exit now, busy ones when their session ends (a lingering
 * one is left to end on its own): the next sessions run in processes
 * forked from the master as it is now.  At each ticket period, so that
 * no worker keeps an old period's ticket secret (tls_ticket.h). */
void pool_renew(void);
/* SIGTERM to all workers, wait up to wait_s for them, then SIGKILL. */
void pool_shutdown(int wait_s);
size_t pool_busy(void);
size_t pool_size(void);

#endif
