/* odmrd.c - the server daemon: listeners, process management, signals.
 *
 * Process model (docs/architecture.md): the master binds every listener,
 * drops privileges and then hands each accepted connection to a session
 * process of its pool (workers.h), like Postfix's smtpd processes.  A
 * session that crashes or is killed takes nothing else with it, its
 * domain lock (flock) dies with it, and the master stays small: it only
 * accepts, counts connections, answers the failure table and reaps
 * children. */
#define _GNU_SOURCE   /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "../common/io.h"
#include "../common/log.h"
#include "../common/sasl.h"
#include "../common/tls_ticket.h"
#include "../common/util.h"
#include "auxprop.h"
#include "conf.h"
#include "expire.h"
#include "guard.h"
#include "ownership.h"
#include "linger.h"
#include "queue.h"
#include "session.h"
#include "workers.h"

#define EX_OK_ 0
#define EX_USAGE_ 64
#define EX_OSERR_ 71
#define EX_CONFIG_ 78
#define MAX_LISTENERS (3 * LISTEN_MAX * 2)
#define SHUTDOWN_WAIT_S 30      /* bounded wait for running transactions */
#define MAINT_INTERVAL_S 300    /* queue cleanup */
#define STALE_TMP_AGE_S 3600

enum service { SVC_ODMR, SVC_SMTP, SVC_LMTP };

struct listener {
    int fd;
    enum service svc;
};

static struct odmrd_conf conf;
static SSL_CTX *tls_ctx;
static struct listener listeners[MAX_LISTENERS];
static size_t nlisteners;
static int sig_pipe[2] = {-1, -1};
static int watch_fd = -1;        /* epoll: signal pipe, listeners, channels */
static volatile sig_atomic_t got_term, got_hup, got_chld, got_usr1;

static void usage(FILE *f)
{
    fprintf(f, "usage: odmrd [-c FILE] [-f] [-d] [-t]\n"
               "  -c FILE  configuration (default %s)\n"
               "  -f       stay in the foreground, log to stderr too\n"
               "  -d       debug logging (protocol traces)\n"
               "  -t       check the configuration and exit (0 ok, 78 not)\n"
               "  --help, --version\n", ODMRD_CONF_DEFAULT);
}

static void print_problem(void *ctx, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "odmrd: %s\n", msg);
}

static void log_problem(void *ctx, const char *msg)
{
    (void)ctx;
    log_err("%s", msg);
}

/* ------------------------------------------------------------ signals */

static void on_signal(int sig)
{
    int saved = errno;
    if (sig == SIGTERM || sig == SIGINT)
        got_term = 1;
    else if (sig == SIGHUP)
        got_hup = 1;
    else if (sig == SIGCHLD)
        got_chld = 1;
    else if (sig == SIGUSR1)
        got_usr1 = 1;
    char c = (char)sig;
    if (write(sig_pipe[1], &c, 1) < 0) {
        /* pipe full: the flags above are enough */
    }
    errno = saved;
}

static void child_on_term(int sig)
{
    (void)sig;
    /* Between transactions nothing is at stake: leave at once.  Inside one,
     * the session finishes it and then says 421. */
    if (session_idle)
        _exit(0);
    session_stop_requested = 1;
}

static void set_handler(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = sig == SIGCHLD ? SA_NOCLDSTOP : 0;
    sigaction(sig, &sa, NULL);
}

static bool setup_signals(void)
{
    if (pipe(sig_pipe) != 0)
        return false;
    for (int i = 0; i < 2; i++) {
        fcntl(sig_pipe[i], F_SETFL, O_NONBLOCK);
        fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    set_handler(SIGTERM, on_signal);
    set_handler(SIGINT, on_signal);
    set_handler(SIGHUP, on_signal);
    set_handler(SIGCHLD, on_signal);
    set_handler(SIGUSR1, on_signal);   /* run queue maintenance now */
    signal(SIGPIPE, SIG_IGN);   /* TLS writes to a closed peer */
    return true;
}

/* ---------------------------------------------------------- listeners */

static int bind_unix(const char *path, char *err, size_t n)
{
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    if (!str_copy(sun.sun_path, path, sizeof sun.sun_path)) {
        snprintf(err, n, "%s: path too long", path);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, n, "socket: %s", strerror(errno));
        return -1;
    }
    unlink(path);   /* a socket left by an earlier run */
    if (bind(fd, (struct sockaddr *)&sun, sizeof sun) != 0 || listen(fd, 128) != 0) {
        snprintf(err, n, "unix:%s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    chmod(path, 0666);   /* the local MTA runs as another user */
    return fd;
}

static int bind_inet(const struct listen_addr *a, char *err, size_t n)
{
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(a->host, a->port, &hints, &res);
    if (rc != 0) {
        snprintf(err, n, "%s:%s: %s", a->host, a->port, gai_strerror(rc));
        errno = EINVAL;
        return -1;
    }
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0) {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (res->ai_family == AF_INET6)   /* "0.0.0.0" and "::" both bind */
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    }
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 ||
        listen(fd, 128) != 0) {
        int saved = errno;   /* -t tells "in use" from other failures */
        snprintf(err, n, "%s:%s: %s", a->host, a->port, strerror(saved));
        if (fd >= 0)
            close(fd);
        fd = -1;
        errno = saved;
    }
    freeaddrinfo(res);
    if (fd < 0)
        errno = errno ? errno : EINVAL;
    return fd;
}

static bool open_listeners(const struct listen_addr *list, size_t count,
                           enum service svc)
{
    char err[512];
    for (size_t i = 0; i < count; i++) {
        int fd = list[i].is_unix ? bind_unix(list[i].host, err, sizeof err)
                                 : bind_inet(&list[i], err, sizeof err);
        if (fd < 0) {
            log_err("cannot listen on %s", err);
            return false;
        }
        fcntl(fd, F_SETFL, O_NONBLOCK);
        listeners[nlisteners].fd = fd;
        listeners[nlisteners].svc = svc;
        nlisteners++;
    }
    return true;
}

static void close_listeners(void)
{
    for (size_t i = 0; i < nlisteners; i++)
        close(listeners[i].fd);
    nlisteners = 0;
}

/* ---------------------------------------------------------- privileges */

static struct own_user daemon_user;   /* whom start-up switches to */
static bool switch_user;

static struct own_paths own_paths(void)
{
    return (struct own_paths){conf.spool_dir, conf.accounts_db, conf.pid_file};
}

static void log_finding(void *ctx, enum own_level level, const char *msg)
{
    (void)ctx;
    if (level == OWN_NOTE)
        log_info("%s", msg);
    else
        log_err("%s", msg);
}

/* Before anything is bound: the identity the daemon will run as must be
 * able to use the spool, the database and the pid file's directory, all
 * of them.  Started as root with "user", odmrd first gives the spool tree
 * and the database to that user (ownership.h: completely or not at all);
 * a problem found here is one odmrd cannot fix, so it does not start. */
static bool prepare_identity(void)
{
    struct own_paths p = own_paths();
    if (!conf.user[0]) {
        if (geteuid() == 0) {   /* root can use everything */
            log_warn("running as root: set \"user\" in %s", conf.path);
            return true;
        }
        own_user_by_uid(geteuid(), getegid(), &daemon_user);
        return own_check(&p, &daemon_user, OWN_SELF, log_finding, NULL) == 0;
    }
    if (!own_user_by_name(conf.user, &daemon_user)) {
        log_err("user %s: no such user", conf.user);
        return false;
    }
    if (geteuid() == daemon_user.uid)
        return own_check(&p, &daemon_user, OWN_SELF, log_finding, NULL) == 0;
    if (geteuid() != 0) {
        log_err("cannot switch to user %s: odmrd must be started as root "
                "(or as %s)", conf.user, conf.user);
        return false;
    }
    switch_user = true;
    int problems = own_check(&p, &daemon_user, OWN_TAKE, log_finding, NULL);
    if (problems)
        log_err("not started: %d problem%s with what user %s must use (see "
                "above)", problems, problems == 1 ? "" : "s", conf.user);
    return problems == 0;
}

/* After binding: become the user for good. */
static bool drop_privileges(void)
{
    char err[256];
    if (!switch_user)
        return true;
    if (!own_become(&daemon_user, err, sizeof err)) {
        log_err("cannot switch to user %s: %s", conf.user, err);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------ children */

/* The maintenance child running, or 0: one at a time.  A pass that is
 * slow (a bounce relay that drops packets costs a timeout per bounce)
 * must not have the next ones pile up behind it, each holding locks. */
static pid_t maintenance_pid;

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == maintenance_pid)
            maintenance_pid = 0;
        else
            pool_reaped(pid, status);
    }
}

static void peer_name(const struct sockaddr_storage *ss, char *buf, size_t n)
{
    if (ss->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, buf,
                  (socklen_t)n);
    else if (ss->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, buf,
                  (socklen_t)n);
    else
        str_copy(buf, "unix", n);
}

/* Refuses a connection in the master without blocking: the reply fits in
 * the socket buffer of a fresh connection. */
static void refuse(int fd, const char *why)
{
    char line[320];
    int len = snprintf(line, sizeof line, "421 4.7.0 %s %s\r\n", conf.hostname, why);
    if (send(fd, line, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* nothing more to do: the client goes away either way */
    }
    close(fd);
}

static void child_on_reload(int sig)
{
    (void)sig;
    linger_stop_requested = 1;
}

/* In each new session process: its own signal handling, no master fds.
 * SIGUSR1 comes from the master at a reload (pool_retire_all): only a
 * lingering session acts on it, so system calls are restarted. */
static void worker_setup(void)
{
    set_handler(SIGTERM, child_on_term);
    set_handler(SIGINT, child_on_term);
    set_handler(SIGHUP, SIG_IGN);
    set_handler(SIGCHLD, SIG_DFL);
    struct sigaction sa = {.sa_handler = child_on_reload, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    close(sig_pipe[0]);
    close(sig_pipe[1]);
    close_listeners();
    auxprop_set_guard(guard_account_turn);   /* per-account pacing (guard.h) */
}

static void worker_session(int fd, const struct worker_job *job)
{
    struct session_peer peer = {.fd = fd};
    str_copy(peer.addr, job->addr, sizeof peer.addr);
    peer.stress = job->stress;
    guard_session(job);
    session_stop_requested = 0;
    if (job->service == SVC_ODMR)
        odmr_session_run(&conf, tls_ctx, &peer);
    else
        smtp_session_run(&conf, tls_ctx, &peer, job->service == SVC_LMTP);
    session_idle = 1;   /* between sessions a stop request ends us at once */
    if (session_stop_requested)
        _exit(0);
}

static const char *service_name(enum service svc)
{
    return svc == SVC_ODMR ? "odmr" : svc == SVC_SMTP ? "smtp" : "lmtp";
}

static size_t service_budget(enum service svc)
{
    return svc == SVC_ODMR ? conf.odmr_max_connections
           : svc == SVC_SMTP ? conf.smtp_max_connections
                             : conf.lmtp_max_connections;
}

/* The pool's budgets and the failure table's settings, at start and at
 * every reload (the table itself is kept: throttle.h). */
static void apply_limits(void)
{
    size_t budgets[POOL_SERVICES];
    for (int svc = 0; svc < POOL_SERVICES; svc++)
        budgets[svc] = service_budget((enum service)svc);
    pool_set_limits(budgets, conf.max_connections_per_ip);
    guard_configure(&conf);
}

/* accept4 failing for want of descriptors or memory leaves the connection
 * waiting, so its listener stays readable and the level-triggered epoll
 * would spin the master at full CPU.  The listeners leave the set for a
 * second instead (the connections wait in the backlog meanwhile). */
#define ACCEPT_PAUSE_MS 1000
static int64_t accept_paused_until;   /* now_ms() time, 0: accepting */

static void watch_listeners(bool on)
{
    for (size_t i = 0; i < nlisteners; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = listeners[i].fd};
        (void)epoll_ctl(watch_fd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL,
                        listeners[i].fd, &ev);
    }
}

static void pause_accepting(int err)
{
    static int64_t last_log;
    int64_t now = now_ms();
    if (!last_log || now - last_log >= 60000) {
        log_err("cannot accept connections: %s; pausing for %d ms (raise "
                "LimitNOFILE or lower max_connections)", strerror(err),
                ACCEPT_PAUSE_MS);
        last_log = now;
    }
    watch_listeners(false);
    accept_paused_until = now + ACCEPT_PAUSE_MS;
}

static void resume_accepting_when_due(void)
{
    if (accept_paused_until && now_ms() >= accept_paused_until) {
        accept_paused_until = 0;
        watch_listeners(true);
    }
}

static void accept_one(const struct listener *l)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    struct worker_job job = {.service = (int)l->svc};
    if (accept_paused_until)
        return;   /* another listener of the same wake-up failed */
    int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
        /* EAGAIN, ECONNABORTED: nothing to do until the next wake-up */
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
            errno == ENOMEM)
            pause_accepting(errno);
        return;
    }
    peer_name(&ss, job.addr, sizeof job.addr);
    if (l->svc == SVC_ODMR)
        guard_job(&job);   /* the table's word travels with the job */
    switch (pool_dispatch(fd, &job)) {
    case POOL_OK:
        return;
    case POOL_FULL:
        log_warn("connection from %s refused: max_connections (%lu) reached",
                 job.addr, conf.max_connections);
        refuse(fd, "Too many connections, try again later");
        return;
    case POOL_SERVICE_FULL:
        log_warn("connection from %s refused: %s_max_connections (%zu) reached",
                 job.addr, service_name(l->svc), service_budget(l->svc));
        refuse(fd, "Too many connections, try again later");
        return;
    case POOL_PER_IP:
        log_warn("connection from %s refused: max_connections_per_ip (%lu) for %s",
                 job.addr, conf.max_connections_per_ip, service_name(l->svc));
        refuse(fd, "Too many connections from your address");
        return;
    default:
        refuse(fd, "Service temporarily unavailable");
        return;
    }
}

/* ---------------------------------------------------------- maintenance */

static void run_maintenance(void)
{
    if (maintenance_pid) {
        log_info("maintenance: the previous pass (pid %ld) is still running; "
                 "skipping this one", (long)maintenance_pid);
        return;
    }
    pid_t pid = fork();
    if (pid != 0) {
        if (pid > 0)
            maintenance_pid = pid;   /* the master does not wait: SIGCHLD */
        return;
    }
    /* on_signal would write to the signal pipe's number, closed below and
     * maybe reused for a queue file or the relay's socket */
    set_handler(SIGTERM, SIG_DFL);
    set_handler(SIGINT, SIG_DFL);
    set_handler(SIGCHLD, SIG_DFL);
    set_handler(SIGHUP, SIG_DFL);
    set_handler(SIGUSR1, SIG_IGN);
    close(sig_pipe[0]);
    close(sig_pipe[1]);
    close_listeners();
    pool_close_channels();   /* and the epoll set: see workers.h */
    struct queue q;
    char err[256];
    if (queue_open(&q, conf.spool_dir, err, sizeof err)) {
        queue_cleanup(&q, STALE_TMP_AGE_S);
        queue_expire(&conf, &q);
        if (conf.domain_quota)   /* counters exist only for the quota */
            queue_usage_refresh(&q);   /* undo any skew a crash left */
    }
    _exit(0);
}

/* ------------------------------------------------------------- reload */

static void reload(void)
{
    static struct odmrd_conf fresh;
    char err[256];
    if (conf_load(&fresh, conf.path, log_problem, NULL) != 0) {
        log_err("reload: %s has errors, keeping the running configuration",
                conf.path);
        return;
    }
    SSL_CTX *ctx = NULL;
    if (fresh.tls_cert_file[0]) {
        ctx = tls_server_ctx(fresh.tls_cert_file, fresh.tls_key_file, err, sizeof err);
        if (!ctx) {
            log_err("reload: TLS: %s, keeping the running configuration", err);
            return;
        }
    }
    /* Listeners stay as they are: changing them needs a restart. */
    memcpy(fresh.odmr_listen, conf.odmr_listen, sizeof conf.odmr_listen);
    memcpy(fresh.smtp_listen, conf.smtp_listen, sizeof conf.smtp_listen);
    memcpy(fresh.lmtp_listen, conf.lmtp_listen, sizeof conf.lmtp_listen);
    fresh.n_odmr_listen = conf.n_odmr_listen;
    fresh.n_smtp_listen = conf.n_smtp_listen;
    fresh.n_lmtp_listen = conf.n_lmtp_listen;
    if (fresh.max_connections > conf.max_connections)
        fresh.max_connections = conf.max_connections;  /* table size is fixed */
    if (tls_ctx)
        SSL_CTX_free(tls_ctx);
    tls_ctx = ctx;
    conf = fresh;
    auxprop_set_db(conf.accounts_db);
    apply_limits();
    pool_retire_all();   /* sessions from now on use the new settings */
    log_info("configuration reloaded from %s", conf.path);
}

/* ------------------------------------------------------------ shutdown */

static void shutdown_children(void)
{
    close_listeners();
    pool_shutdown(SHUTDOWN_WAIT_S);
}

static void drain_signal_pipe(void)
{
    char drain[64];
    while (read(sig_pipe[0], drain, sizeof drain) > 0)
        ;
}

/* One epoll set for the signal pipe, the listeners and (workers.c) every
 * worker's channel: a storm of polls wakes the master three times per
 * poll (the connection, the AUTH note, the end), and poll() walked every
 * channel of the pool at each wake-up. */
static bool open_watch(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        return false;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = sig_pipe[0]};
    bool ok = epoll_ctl(ep, EPOLL_CTL_ADD, sig_pipe[0], &ev) == 0;
    for (size_t i = 0; ok && i < nlisteners; i++) {
        ev.data.fd = listeners[i].fd;
        ok = epoll_ctl(ep, EPOLL_CTL_ADD, listeners[i].fd, &ev) == 0;
    }
    if (!ok) {
        close(ep);
        return false;
    }
    watch_fd = ep;
    pool_watch(ep);
    return true;
}

static const struct listener *listener_of(int fd)
{
    for (size_t i = 0; i < nlisteners; i++)
        if (listeners[i].fd == fd)
            return &listeners[i];
    return NULL;
}

static void handle_events(const struct epoll_event *ev, int n)
{
    /* finished sessions first, so their workers can take new ones */
    for (int i = 0; i < n; i++)
        if (ev[i].data.fd != sig_pipe[0])
            pool_handle(ev[i].data.fd);
    for (int i = 0; i < n && !got_term; i++) {
        const struct listener *l = listener_of(ev[i].data.fd);
        if (l)
            accept_one(l);
    }
}

static void main_loop(void)
{
    struct epoll_event ev[64];
    int64_t next_maint = now_ms();   /* once at start-up, then periodically */
    while (!got_term) {
        int rc = epoll_wait(watch_fd, ev, (int)(sizeof ev / sizeof ev[0]), 1000);
        for (int i = 0; i < rc; i++)
            if (ev[i].data.fd == sig_pipe[0])
                drain_signal_pipe();
        if (got_chld) {
            got_chld = 0;
            reap_children();
        }
        if (got_hup) {
            got_hup = 0;
            reload();
        }
        if (rc > 0)
            handle_events(ev, rc);
        resume_accepting_when_due();
        pool_expire_idle();
        if (tls_ticket_tick())   /* a new ticket period: no old secret */
            pool_renew();        /* left in an idle worker either */
        if (got_usr1 || now_ms() >= next_maint) {
            got_usr1 = 0;
            run_maintenance();
            next_maint = now_ms() + MAINT_INTERVAL_S * 1000;
        }
    }
}

/* ------------------------------------------------------------ startup */

/* "127.0.0.1:25 (smtp), [::1]:366 (odmr), unix:/run/odmr/lmtp (lmtp)":
 * what an operator compares with ss -ltnp and the MTA's configuration. */
static void describe_listeners(char *buf, size_t n)
{
    const struct { const char *name; const struct listen_addr *list; size_t count; }
        kinds[] = {{"smtp", conf.smtp_listen, conf.n_smtp_listen},
                   {"odmr", conf.odmr_listen, conf.n_odmr_listen},
                   {"lmtp", conf.lmtp_listen, conf.n_lmtp_listen}};
    size_t len = 0;
    str_copy(buf, "nothing", n);
    for (size_t k = 0; k < 3; k++)
        for (size_t i = 0; i < kinds[k].count && len < n; i++) {
            const struct listen_addr *a = &kinds[k].list[i];
            const char *sep = len ? ", " : "";
            int w = a->is_unix ? snprintf(buf + len, n - len, "%sunix:%s (%s)",
                                          sep, a->host, kinds[k].name)
                  : strchr(a->host, ':')
                      ? snprintf(buf + len, n - len, "%s[%s]:%s (%s)", sep,
                                 a->host, a->port, kinds[k].name)
                      : snprintf(buf + len, n - len, "%s%s:%s (%s)", sep,
                                 a->host, a->port, kinds[k].name);
            len = w < 0 ? n : len + (size_t)w;
        }
}

static bool daemonize(void)
{
    pid_t pid = fork();
    if (pid < 0)
        return false;
    if (pid > 0)
        _exit(0);
    setsid();
    pid = fork();
    if (pid < 0)
        return false;
    if (pid > 0)
        _exit(0);
    if (chdir("/") != 0)
        return false;
    int fd = open("/dev/null", O_RDWR);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2)
            close(fd);
    }
    return true;
}

static void write_pid_file(void)
{
    if (!conf.pid_file[0])
        return;
    FILE *f = fopen(conf.pid_file, "w");
    if (!f) {
        log_warn("pid_file %s: %s", conf.pid_file, strerror(errno));
        return;
    }
    fprintf(f, "%ld\n", (long)getpid());
    fclose(f);
}

/* -t: can this listener be bound?  A test bind, closed at once.  "In
 * use" is not a problem: it is most likely the running daemon; "permission
 * denied" only a warning, as -t may be run by a user other than the one
 * that starts odmrd. */
static int check_listener(const char *key, const struct listen_addr *a)
{
    char err[512], dir[sizeof ((struct sockaddr_un *)0)->sun_path];
    if (a->is_unix) {
        str_copy(dir, a->host, sizeof dir);
        char *slash = strrchr(dir, '/');
        if (slash)
            *(slash == dir ? slash + 1 : slash) = '\0';
        if (slash && access(dir, F_OK) != 0) {
            fprintf(stderr, "odmrd: %s: %s unix:%s: directory %s: %s\n",
                    conf.path, key, a->host, dir, strerror(errno));
            return 1;
        }
        return 0;
    }
    int fd = bind_inet(a, err, sizeof err);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    if (errno == EADDRINUSE)
        return 0;
    if (errno == EACCES) {
        fprintf(stderr, "odmrd: %s: warning: %s %s (ports below 1024 need "
                "root)\n", conf.path, key, err);
        return 0;
    }
    fprintf(stderr, "odmrd: %s: %s %s\n", conf.path, key, err);
    return 1;
}

static int check_listeners(const char *key, const struct listen_addr *list,
                           size_t count)
{
    int problems = 0;
    for (size_t i = 0; i < count; i++)
        problems += check_listener(key, &list[i]);
    return problems;
}

/* -t: the same address in two listeners (or twice in one) fails at start
 * with "Address already in use", which a test bind cannot tell from the
 * running daemon. */
static int check_duplicate_listeners(void)
{
    struct { const char *key; const struct listen_addr *a; } all[3 * LISTEN_MAX];
    const struct { const char *key; const struct listen_addr *list; size_t n; } kinds[] = {
        {"odmr_listen", conf.odmr_listen, conf.n_odmr_listen},
        {"smtp_listen", conf.smtp_listen, conf.n_smtp_listen},
        {"lmtp_listen", conf.lmtp_listen, conf.n_lmtp_listen}};
    size_t n = 0;
    int problems = 0;
    for (size_t k = 0; k < 3; k++)
        for (size_t i = 0; i < kinds[k].n && n < 3 * LISTEN_MAX; i++, n++) {
            all[n].key = kinds[k].key;
            all[n].a = &kinds[k].list[i];
            for (size_t j = 0; j < n; j++) {
                const struct listen_addr *x = all[j].a, *y = all[n].a;
                if (x->is_unix == y->is_unix && !strcmp(x->host, y->host) &&
                    !strcmp(x->port, y->port)) {
                    fprintf(stderr, "odmrd: %s: %s and %s both listen on %s%s%s\n",
                            conf.path, all[j].key, all[n].key,
                            y->is_unix ? "unix:" : y->host, y->is_unix ? y->host : ":",
                            y->is_unix ? "" : y->port);
                    problems++;
                }
            }
        }
    return problems;
}

/* -t: which of sasl_mechanisms the installed Cyrus plugins provide (on a
 * TLS session, where PLAIN and LOGIN count too).  None is a problem: the
 * ODMR service could never authenticate anyone. */
static int check_mechanisms(void)
{
    char err[256], have[512];
    if (!sasl_glue_server_init(auxprop_plugin_init, AUXPROP_PLUGIN_NAME, err,
                               sizeof err)) {
        fprintf(stderr, "odmrd: SASL: %s\n", err);
        return 1;
    }
    struct sasl_glue_server *sv = sasl_glue_server_new("smtp", conf.hostname, NULL,
                                                       NULL, true, 256, err, sizeof err);
    bool ok = sv && sasl_glue_server_mechanisms(sv, conf.sasl_mechanisms, have,
                                                sizeof have);
    sasl_glue_server_free(sv);
    sasl_glue_server_done();
    if (!ok || !have[0]) {
        fprintf(stderr, "odmrd: %s: sasl_mechanisms: none of \"%s\" is provided "
                "by the installed Cyrus SASL plugins (libsasl2-modules)\n",
                conf.path, conf.sasl_mechanisms);
        return 1;
    }
    char list[sizeof conf.sasl_mechanisms], *save = NULL;
    str_copy(list, conf.sasl_mechanisms, sizeof list);
    for (char *m = strtok_r(list, " ,", &save); m; m = strtok_r(NULL, " ,", &save)) {
        char word[80];
        snprintf(word, sizeof word, " %s ", m);
        char padded[sizeof have + 2];
        snprintf(padded, sizeof padded, " %s ", have);
        if (!strstr(padded, word))
            fprintf(stderr, "odmrd: %s: warning: sasl_mechanisms: %s is not "
                    "provided by the installed Cyrus SASL plugins; not offered\n",
                    conf.path, m);
    }
    return 0;
}

static void print_finding(void *ctx, enum own_level level, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "odmrd: %s%s\n", level == OWN_NOTE ? "note: " : "", msg);
}

static void ignore_finding(void *ctx, enum own_level level, const char *msg)
{
    (void)ctx;
    (void)level;
    (void)msg;
}

/* -t: can the identity odmrd will run as use the spool, the database and
 * the pid file's directory?  Root checks as "user" (what start-up gives
 * to the user by chown is a note, the rest a problem), the user as
 * itself.  Anybody else can only check as itself, which proves nothing
 * about "user" (and its fixes would name the wrong user): one note says
 * so, with how many problems it saw for itself. */
static int check_daemon_user(void)
{
    struct own_paths p = own_paths();
    struct own_user u, self;
    own_user_by_uid(geteuid(), getegid(), &self);
    if (!conf.user[0])
        return geteuid() == 0 ? 0 : own_check(&p, &self, OWN_SELF, print_finding, NULL);
    if (!own_user_by_name(conf.user, &u))
        return 0;   /* "no such user" is reported by check_usable */
    if (geteuid() == 0)
        return own_check(&p, &u, OWN_PREDICT, print_finding, NULL);
    if (geteuid() == u.uid)
        return own_check(&p, &u, OWN_SELF, print_finding, NULL);
    int seen = own_check(&p, &self, OWN_SELF, ignore_finding, NULL);
    fprintf(stderr, "odmrd: note: run as %s, not as root or %s: whether %s "
            "can use spool_dir, accounts_db and pid_file is not checked (as "
            "%s: %d problem%s); run odmrd -t as root for that\n", self.name,
            u.name, u.name, self.name, seen, seen == 1 ? "" : "s");
    return 0;
}

/* -t: beyond syntax, what start-up would trip over. */
static int check_usable(void)
{
    char err[512];
    int problems = check_listeners("odmr_listen", conf.odmr_listen, conf.n_odmr_listen) +
                   check_listeners("smtp_listen", conf.smtp_listen, conf.n_smtp_listen) +
                   check_listeners("lmtp_listen", conf.lmtp_listen, conf.n_lmtp_listen) +
                   check_duplicate_listeners() + check_mechanisms();
    if (conf.user[0] && !getpwnam(conf.user)) {
        fprintf(stderr, "odmrd: %s: user %s: no such user\n", conf.path, conf.user);
        problems++;
    }
    problems += check_daemon_user();
    if (conf.tls_cert_file[0]) {
        SSL_CTX *ctx = tls_server_ctx(conf.tls_cert_file, conf.tls_key_file, err,
                                      sizeof err);
        if (!ctx) {
            fprintf(stderr, "odmrd: %s: TLS: %s\n", conf.path, err);
            problems++;
        }
        SSL_CTX_free(ctx);
    }
    return problems;
}

struct options {
    const char *config;
    bool foreground, debug, test;
};

static int parse_args(int argc, char **argv, struct options *o)
{
    o->config = ODMRD_CONF_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) {
            usage(stdout);
            exit(EX_OK_);
        } else if (!strcmp(a, "--version")) {
            printf("odmrd %s\n", ODMR_VERSION);
            exit(EX_OK_);
        } else if (!strcmp(a, "-c") && i + 1 < argc) {
            o->config = argv[++i];
        } else if (!strcmp(a, "-f")) {
            o->foreground = true;
        } else if (!strcmp(a, "-d")) {
            o->debug = true;
        } else if (!strcmp(a, "-t")) {
            o->test = true;
        } else {
            fprintf(stderr, "odmrd: unknown or incomplete option \"%s\"\n", a);
            usage(stderr);
            return EX_USAGE_;
        }
    }
    return 0;
}

static int start(const struct options *o)
{
    char err[512];
    struct queue q;
    if (conf.tls_cert_file[0]) {
        tls_ctx = tls_server_ctx(conf.tls_cert_file, conf.tls_key_file, err, sizeof err);
        if (!tls_ctx) {
            log_err("TLS: %s", err);
            return EX_CONFIG_;
        }
    }
    /* Cyrus loads its mechanism plugins here: before forking (shared by
     * every session) and before dropping privileges. */
    if (!sasl_glue_server_init(auxprop_plugin_init, AUXPROP_PLUGIN_NAME, err,
                               sizeof err)) {
        log_err("SASL: %s", err);
        return EX_CONFIG_;
    }
    auxprop_set_db(conf.accounts_db);
    if (!queue_open(&q, conf.spool_dir, err, sizeof err)) {
        log_err("spool: %s", err);
        return EX_CONFIG_;
    }
    if (!prepare_identity())
        return EX_CONFIG_;
    if (!open_listeners(conf.odmr_listen, conf.n_odmr_listen, SVC_ODMR) ||
        !open_listeners(conf.smtp_listen, conf.n_smtp_listen, SVC_SMTP) ||
        !open_listeners(conf.lmtp_listen, conf.n_lmtp_listen, SVC_LMTP))
        return EX_OSERR_;
    if (!drop_privileges())
        return EX_CONFIG_;
    if (!pool_init(conf.max_connections, worker_session, worker_setup,
                   guard_handle) ||
        !setup_signals())
        return EX_OSERR_;
    apply_limits();
    if (!o->foreground && !daemonize())
        return EX_OSERR_;
    if (!open_watch()) {
        log_err("cannot set up epoll: %s", strerror(errno));
        return EX_OSERR_;
    }
    write_pid_file();
    /* Leftovers of a crash: tmp files and data without an envelope. Only
     * files older than a minute go now, so a concurrent odmrctl enqueue
     * is never disturbed; the periodic run catches the rest. */
    queue_cleanup(&q, 60);
    char where[1024];
    describe_listeners(where, sizeof where);
    log_info("started: odmrd %s, listening on %s, spool %s", ODMR_VERSION,
             where, conf.spool_dir);
    return 0;
}

int main(int argc, char **argv)
{
    struct options o = {0};
    int rc = parse_args(argc, argv, &o);
    if (rc)
        return rc;
    if (o.test) {
        int problems = conf_load(&conf, o.config, print_problem, NULL);
        if (problems == 0)
            problems = check_usable();
        if (problems == 0)
            printf("odmrd: %s: configuration ok\n", o.config);
        return problems ? EX_CONFIG_ : EX_OK_;
    }
    log_open("odmrd", o.foreground, o.debug);
    if (conf_load(&conf, o.config, o.foreground ? print_problem : log_problem,
                  NULL) != 0) {
        if (!o.foreground)
            fprintf(stderr, "odmrd: %s has errors (see the mail log)\n", o.config);
        return EX_CONFIG_;
    }
    rc = start(&o);
    if (rc)
        return rc;
    main_loop();
    log_info("stopping: waiting for %zu sessions", pool_busy());
    shutdown_children();
    if (conf.pid_file[0])
        unlink(conf.pid_file);
    log_info("stopped");
    return EX_OK_;
}
