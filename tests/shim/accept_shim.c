/* accept_shim.c - LD_PRELOAD for tests: odmrd's accept4() as the kernel
 * gives it on a busy internet host, which loopback does not.
 *
 * ODMR_TEST_SNDBUF=N: every socket odmrd accepts gets SO_SNDBUF = N bytes.
 *   On loopback the kernel autotunes a send buffer up to megabytes, so a
 *   customer that reads slowly after the reversal never makes odmrd's
 *   writes wait, and a test could not tell whether odmrd bounds the time
 *   a message may take to go out.  A small fixed buffer makes every write
 *   wait for the customer, as a slow link on the internet does.
 * ODMR_TEST_EMFILE=PATH: while PATH exists, accept4() fails with EMFILE
 *   and leaves the connection waiting, as when the process is out of file
 *   descriptors.
 * Nothing else in odmrd changes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static accept4_fn next;
    if (!next)
        next = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
    if (!next)
        return -1;
    const char *flag = getenv("ODMR_TEST_EMFILE");
    if (flag && access(flag, F_OK) == 0) {
        errno = EMFILE;
        return -1;
    }
    int s = next(fd, addr, len, flags);
    const char *v = getenv("ODMR_TEST_SNDBUF");
    int size = v ? atoi(v) : 0;
    if (s >= 0 && size > 0)
        (void)setsockopt(s, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    return s;
}
