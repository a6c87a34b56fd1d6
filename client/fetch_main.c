/* fetch_main.c - odmr-fetch: fetch a site's mail from an ODMR provider
 * (RFC 2645) and hand it to the site's mail system (SPEC section 4).
 *
 * main() only sequences the run: settings, the run lock, the session,
 * the -v summary, and the exit status, which is the interface for cron
 * and systemd (0 done, 64 usage, 69 refused, 75 try again later, 76
 * protocol error, 77 authentication or ATRN refused, 78 configuration). */
#include "fetch.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../common/sasl.h"
#include "target.h"

/* A program started by cron may find stdin, stdout or stderr closed; the
 * next open() would then become one of them, and a delivery command or an
 * error message could end up in a socket. */
static void std_fds(void)
{
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
            break;
}

/* SIGTERM, SIGINT, SIGHUP: what odmrd did not get a 250 for stays queued
 * at the provider; a running delivery command must die with us rather
 * than see the end of its input and deliver a cut message. */
static void on_terminate(int sig)
{
    target_mda_kill();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_terminate;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    /* Peers that reset the connection show up as I/O errors (io.h). */
    signal(SIGPIPE, SIG_IGN);
    /* Ignored SIGCHLD is inherited across exec and makes the kernel reap
     * the delivery command itself: its exit status, which decides
     * between 250 and 451, would be lost. */
    signal(SIGCHLD, SIG_DFL);
}

static void summary(const struct fetch_conf *c, const struct fetch_stats *st,
                    int64_t elapsed_ms, int status)
{
    fprintf(stderr, "odmr-fetch: server=%s messages=%lu bytes=%llu "
                    "domains=%s seconds=%.2f deferred=%lu refused=%lu "
                    "status=%d\n", c->server, st->messages, st->bytes,
            c->domains[0] ? c->domains : "(all)", (double)elapsed_ms / 1000.0,
            st->deferred, st->rejected, status);
}

int main(int argc, char **argv)
{
    static struct fetch_conf c;
    struct fetch_stats st;
    char err[PATH_MAX + 128];

    std_fds();
    signals();
    memset(&st, 0, sizeof st);
    int status = conf_load(&c, argc, argv);
    if (status != 0)
        return status < 0 ? EX_OK : status;
    trace_set(c.verbose >= 2);

    int lock = lock_take(c.lock_file, err, sizeof err);
    if (lock < 0) {
        if (lock == -2)
            fprintf(stderr, "odmr-fetch: another odmr-fetch holds %s; not "
                            "fetching now\n", c.lock_file);
        else
            fprintf(stderr, "odmr-fetch: %s\n", err);
        explicit_bzero(c.password, sizeof c.password);
        return lock == -2 ? EX_TEMPFAIL : EX_CONFIG;
    }
    int64_t t0 = now_ms();
    status = fetch_run(&c, &st);
    explicit_bzero(c.password, sizeof c.password);
    sasl_glue_client_done();
    if (c.verbose >= 1)
        summary(&c, &st, now_ms() - t0, status);
    close(lock);
    return status;
}
