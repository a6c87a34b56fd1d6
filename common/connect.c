/* connect.c - outgoing TCP and unix-socket connections with a timeout,
 * shared by odmr-fetch (provider, delivery targets) and odmrd (bounce
 * relay). */
#include "connect.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "util.h"

/* Waits for a non-blocking connect() to finish; 0 or an errno value. */
static int connect_wait(int fd, long timeout_s)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
    int64_t deadline = now_ms() + (int64_t)timeout_s * 1000;

    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return ETIMEDOUT;
        int r = poll(&p, 1, (int)(left > 60000 ? 60000 : left));
        if (r > 0)
            break;
        if (r < 0 && errno != EINTR)
            return errno;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
        return errno;
    return soerr;
}

/* One attempt; returns the socket or -1 with errno-like *why. */
static int connect_one(int family, const struct sockaddr *sa, socklen_t len,
                       long timeout_s, int *why)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        *why = errno;
        return -1;
    }
    int r = connect(fd, sa, len);
    *why = r == 0 ? 0 : errno == EINPROGRESS ? connect_wait(fd, timeout_s)
                                             : errno;
    if (*why != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int connect_unix(const char *path, long timeout_s, char *err, size_t n)
{
    struct sockaddr_un sun;
    int why = 0;

    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    if (!str_copy(sun.sun_path, path, sizeof sun.sun_path)) {
        snprintf(err, n, "socket path too long: %s", path);
        return -1;
    }
    int fd = connect_one(AF_UNIX, (struct sockaddr *)&sun, sizeof sun,
                         timeout_s, &why);
    if (fd < 0)
        snprintf(err, n, "cannot connect to %s: %s", path, strerror(why));
    return fd;
}

int net_connect(const char *host, unsigned port, long timeout_s, char *err,
                size_t n)
{
    if (host[0] == '/')
        return connect_unix(host, timeout_s, err, n);

    struct addrinfo hints, *res = NULL;
    char service[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%u", port);
    int gr = getaddrinfo(host, service, &hints, &res);
    if (gr != 0) {
        snprintf(err, n, "cannot resolve %s: %s", host, gai_strerror(gr));
        return -1;
    }
    int fd = -1, why = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next)
        fd = connect_one(a->ai_family, a->ai_addr, a->ai_addrlen, timeout_s,
                         &why);
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, n, "cannot connect to %s port %u: %s", host, port,
                 strerror(why));
    return fd;
}
