/* LD_PRELOAD helper: on SIGSEGV print the native backtrace to stderr, then die as before.
   For machines without gdb (notes/aoti_probe.py builds it with cc when a load crashes):
     cc -shared -fPIC -o /tmp/segv.so notes/segv_backtrace.c && LD_PRELOAD=/tmp/segv.so python ... */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_segv(int sig) {
    void *frames[64];
    int n = backtrace(frames, 64);
    const char msg[] = "\n=== native backtrace (segv_backtrace.c) ===\n";
    write(2, msg, sizeof msg - 1);
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    void *warm[1];
    backtrace(warm, 1); /* load libgcc's unwinder now, not inside the handler */
    signal(SIGSEGV, on_segv);
}
