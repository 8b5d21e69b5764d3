/* clockshift: an LD_PRELOAD library that moves one process's wall clock, and nothing else.

   A worker whose clock jumped (the soak's fault, and tests/faults/). libfaketime (Debian 0.9.10) also moves the waits
   Python makes on the monotonic clock: time.sleep fails with EINVAL and Event.wait hangs once the
   offset changes, which is a broken libc, not a jumped clock. A real NTP step or a resumed VM moves
   CLOCK_REALTIME only, so only that is shifted here: clock_gettime(CLOCK_REALTIME*), gettimeofday
   and time() return the real time plus the number of seconds in $CLOCKSHIFT_FILE, re-read at most
   once a second (a missing or unreadable file means no shift). Children that keep LD_PRELOAD are
   shifted too; Fleet's agents get a clean environment, so they keep the real clock.

   cc -shared -fPIC -O2 -o clockshift.so clockshift.c -ldl
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static volatile long long shift_ns;
static volatile time_t read_at = -1;

static void refresh(void) {
    struct timespec now;
    if (real_clock_gettime(CLOCK_MONOTONIC_COARSE, &now) != 0 || now.tv_sec == read_at) {
        return;
    }
    read_at = now.tv_sec;
    const char *path = getenv("CLOCKSHIFT_FILE");
    double seconds = 0;
    FILE *file = path ? fopen(path, "r") : NULL;
    if (file != NULL) {
        if (fscanf(file, "%lf", &seconds) != 1) {
            seconds = 0;
        }
        fclose(file);
    }
    shift_ns = (long long)(seconds * 1e9);
}

static void shift(struct timespec *ts) {
    refresh();
    long long total = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_ns;
    ts->tv_sec = (time_t)(total / 1000000000LL);
    ts->tv_nsec = (long)(total % 1000000000LL);
}

static void init(void) {
    if (real_clock_gettime == NULL) {
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    init();
    int result = real_clock_gettime(id, ts);
    if (result == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        shift(ts);
    }
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return -1;
    }
    if (tv != NULL) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL) {
        *out = ts.tv_sec;
    }
    return ts.tv_sec;
}
