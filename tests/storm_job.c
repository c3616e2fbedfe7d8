/* A lightweight fake GPU job for the kill-storm and soak tests (tests/test_storm.py): the same claim protocol as
 * tests/fakenvml/fake_gpu_job.py (flock STATE/lock; claims STATE/claims/<gpu>.<pid>.<starttime> that count only
 * while their holder runs with that start time; foreign + live claims + mine <= total, else a CUDA OOM), in C so
 * that thousands of jobs cost milliseconds each, not a Python start-up each.
 *
 *   storm_job VRAM_MB MILLISECONDS LOG [INPUT...]    env: FAKE_NVML_STATE, CUDA_VISIBLE_DEVICES (index; "" = CPU)
 *
 * Appends one line to LOG per outcome ("oom PID MB FREE" or "done PID MB"); exit 0, or 1 on OOM. With STORM_EXIT=N
 * in the environment it exits N after its "done" line (a job that fails with its own code: tests/systemd's storm).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static long long start_time(long pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ') return -1;
    p += 2;
    if (*p == 'Z' || *p == 'X' || *p == 'x') return -1;
    for (int field = 3; field < 22; field++) {  /* p points at field 3 (state) */
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    return atoll(p);
}

static long read_long(const char *path, int line) {
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    char buf[256];
    long v = 0;
    for (int i = 0; i <= line && fgets(buf, sizeof buf, f); i++) v = atol(buf);
    fclose(f);
    return v;
}

static void log_line(const char *log, const char *text) {
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, text, strlen(text)) < 0) { /* nothing to do */ }
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: storm_job VRAM_MB MILLISECONDS LOG [INPUT...]\n"); return 2; }
    long mb = atol(argv[1]), ms = atol(argv[2]);
    const char *log = argv[3], *state = getenv("FAKE_NVML_STATE"), *visible = getenv("CUDA_VISIBLE_DEVICES");
    char path[4096], line[256], claim[4096] = "";
    long pid = (long)getpid();
    if (state && visible && *visible && mb > 0) {
        int gpu = atoi(visible);
        snprintf(path, sizeof path, "%s/lock", state);
        int lock = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (lock < 0 || flock(lock, LOCK_EX) < 0) { perror("storm_job: lock"); return 2; }
        snprintf(path, sizeof path, "%s/gpu%d/info", state, gpu);
        long total = read_long(path, 0);
        snprintf(path, sizeof path, "%s/gpu%d/foreign_mb", state, gpu);
        long used = read_long(path, 0);
        snprintf(path, sizeof path, "%s/claims", state);
        DIR *d = opendir(path);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            int g; long p; long long st; char extra;
            if (sscanf(e->d_name, "%d.%ld.%lld%c", &g, &p, &st, &extra) != 3) continue;
            char cpath[4096];
            snprintf(cpath, sizeof cpath, "%s/claims/%s", state, e->d_name);
            if (start_time(p) != st) { unlink(cpath); continue; }
            if (g == gpu) used += read_long(cpath, 0);
        }
        if (d) closedir(d);
        if (used + mb > total) {
            fprintf(stderr, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate %ld MiB\n", mb);
            snprintf(line, sizeof line, "oom %ld %ld %ld\n", pid, mb, total - used);
            log_line(log, line);
            return 1;
        }
        char tmp[4096];
        snprintf(claim, sizeof claim, "%s/claims/%d.%ld.%lld", state, gpu, pid, start_time(pid));
        snprintf(tmp, sizeof tmp, "%s.tmp", claim);
        FILE *f = fopen(tmp, "we");
        if (!f) { perror("storm_job: claim"); return 2; }
        fprintf(f, "%ld\n", mb);
        fclose(f);
        rename(tmp, claim);
        close(lock);
    }
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
    if (*claim) unlink(claim);
    snprintf(line, sizeof line, "done %ld %ld\n", pid, *claim ? mb : 0);
    log_line(log, line);
    const char *code = getenv("STORM_EXIT");
    return code && *code ? atoi(code) : 0;
}
