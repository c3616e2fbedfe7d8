/* The VM lane's job: touch MIB MiB of anonymous memory, hold it HOLD seconds, exit with CODE.
 * usage: alloc MIB HOLD CODE [INPUT]   (INPUT only names the job for the wrapper's probe)
 * C, not Python: under qemu's TCG an interpreter's start-up costs more than the job itself, and its own memory
 * would blur the peaks the lane checks. Transparent huge pages are asked for (MADV_HUGEPAGE), so touching
 * 300 MiB takes 150 faults instead of 77,000 under emulation; the cgroup charges the same bytes either way. */
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    size_t size = (size_t)atol(argv[1]) << 20;
    double hold = atof(argv[2]);
    int code = atoi(argv[3]);
    if (size) {
        char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return 3;
        madvise(p, size, MADV_HUGEPAGE);
        for (size_t i = 0; i < size; i += 4096) p[i] = 1;
    }
    struct timespec ts = {(time_t)hold, (long)((hold - (time_t)hold) * 1e9)};
    nanosleep(&ts, NULL);
    return code;
}
