/*
 * A fake libnvidia-ml.so.1 for gpu-router's tests: the unmodified Python binding (nvidia-ml-py / python3-pynvml)
 * loads it by soname, so the agent's real NVML code runs on machines without a GPU.
 *
 * Written from NVML's documented semantics (return codes, the two-call pattern of the process queries, the event-set
 * API); no NVIDIA code. Only what gpu-router and the binding touch is provided; anything else is absent, so the
 * binding raises NVMLError_FunctionNotFound, as it would against an old driver.
 *
 * State lives in the directory named by $FAKE_NVML_STATE and is re-read on every call, so a test changes it live
 * (without the variable, nvmlInit answers DRIVER_NOT_LOADED):
 *
 *   init_error          present: nvmlInit* fail with the NVML code it holds (empty: 9, DRIVER_NOT_LOADED)
 *   hang                seconds (float): every call sleeps that long first (a wedged driver)
 *   driver              driver version string (default 550.54.15)
 *   gpu<N>/info         "total_mb\nuuid\nname\n"; GPUs are gpu0, gpu1, ... up to the first missing info
 *   gpu<N>/foreign_mb   MiB in use by nobody we can see (other containers, driver overhead)
 *   gpu<N>/lost         present: calls on this GPU answer NVML_ERROR_GPU_IS_LOST
 *   gpu<N>/reset        present: calls on this GPU answer NVML_ERROR_RESET_REQUIRED
 *   gpu<N>/hang         seconds (float): calls on this GPU sleep that long first
 *   gpu<N>/xid          Xid codes, one a line, appended; an event set delivers the lines added after it registered
 *   gpu<N>/accounting   "1": per-process accounting mode on; "0" or absent: off (the driver's default)
 *   gpu<N>/accounting_buffer  how many processes the accounting ring keeps (default 4000)
 *   gpu<N>/accounting_denied  present: nvmlDeviceSetAccountingMode answers NO_PERMISSION (as for a non-root
 *                       caller, which always gets it)
 *   gpu<N>/accounting_unsupported  present: every accounting call answers NOT_SUPPORTED (MIG, vGPU, old GPUs)
 *   gpu<N>/accounted/<seq>.<pid>.<starttime>  "max_mb start_us last_us": a process's peak, written by the
 *                       allocating process itself (fake_gpu_job.accounting_note) while the mode is on, kept after
 *                       it exits; the newest seq answers for a PID (the one that terminated last, as NVML says)
 *   claims/<gpu>.<pid>.<starttime>   MiB held by that process; counted only while /proc/<pid>/stat still shows
 *                       that start time (field 22) and the process is not a zombie: a SIGKILLed job's memory
 *                       vanishes, and a recycled PID does not inherit it.
 *
 * used = foreign_mb + live claims; free = total - used (never below 0).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 64
#define EVENT_XID 0x8ULL
#define SUPPORTED_EVENTS 0x1FULL /* single/double-bit ECC, P-state, Xid, clock */
#define MIB (1024ULL * 1024ULL)

typedef struct fake_device {
    unsigned int index;
} fake_device;
typedef fake_device *nvmlDevice_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
} nvmlEventData_v1_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct fake_event_set {
    unsigned long long mask[MAX_GPUS];
    long delivered[MAX_GPUS]; /* Xid lines already seen (or present when registered) */
} *nvmlEventSet_t;

static fake_device devices[MAX_GPUS];
static int init_count;
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---------------------------------------------------------------- state files */

static const char *state_dir(void)
{
    const char *dir = getenv("FAKE_NVML_STATE");
    return (dir && *dir) ? dir : NULL;
}

static int state_path(char *out, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int state_path(char *out, size_t size, const char *fmt, ...)
{
    const char *dir = state_dir();
    if (!dir)
        return -1;
    int n = snprintf(out, size, "%s/", dir);
    if (n < 0 || (size_t)n >= size)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(out + n, size - n, fmt, ap);
    va_end(ap);
    return (m < 0 || (size_t)(n + m) >= size) ? -1 : 0;
}

/* Whole file into buf (NUL-terminated); -1 when absent. */
static long read_file(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, size - 1, f);
    fclose(f);
    buf[n] = 0;
    return (long)n;
}

static int exists(const char *path)
{
    return access(path, F_OK) == 0;
}

static void sleep_seconds(double s)
{
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void hang_from(const char *path)
{
    char buf[64];
    if (read_file(path, buf, sizeof buf) > 0)
        sleep_seconds(strtod(buf, NULL));
}

static void global_hang(void)
{
    char path[4096];
    if (state_path(path, sizeof path, "hang") == 0)
        hang_from(path);
}

static int gpu_count(void)
{
    char path[4096];
    int n = 0;
    while (n < MAX_GPUS && state_path(path, sizeof path, "gpu%d/info", n) == 0 && exists(path))
        n++;
    return n;
}

typedef struct {
    unsigned long long total_mb;
    char uuid[96];
    char name[96];
} gpu_info;

static int read_info(int gpu, gpu_info *info)
{
    char path[4096], buf[512];
    if (state_path(path, sizeof path, "gpu%d/info", gpu) != 0 || read_file(path, buf, sizeof buf) < 0)
        return -1;
    char *save = NULL;
    char *total = strtok_r(buf, "\n", &save);
    char *uuid = strtok_r(NULL, "\n", &save);
    char *name = strtok_r(NULL, "\n", &save);
    info->total_mb = total ? strtoull(total, NULL, 10) : 0;
    snprintf(info->uuid, sizeof info->uuid, "%s", uuid ? uuid : "GPU-00000000-0000-0000-0000-000000000000");
    snprintf(info->name, sizeof info->name, "%s", name ? name : "Fake GPU");
    return 0;
}

/* The start time (field 22 of /proc/PID/stat) of a live, non-zombie process; 0 when it is gone. */
static unsigned long long start_time_of(unsigned int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    if (read_file(path, buf, sizeof buf) <= 0)
        return 0;
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses: fields restart after the last ')' */
    if (!p)
        return 0;
    p++;
    char *save = NULL;
    char *tok = strtok_r(p, " ", &save); /* field 3: state */
    if (!tok || *tok == 'Z' || *tok == 'X' || *tok == 'x')
        return 0;
    for (int field = 4; field <= 22; field++) {
        tok = strtok_r(NULL, " ", &save);
        if (!tok)
            return 0;
    }
    return strtoull(tok, NULL, 10);
}

typedef struct {
    unsigned int pid;
    unsigned long long mb;
} claim;

/* Live claims on one GPU; returns how many (up to max written to out, all counted). */
static int live_claims(int gpu, claim *out, int max, unsigned long long *sum_mb)
{
    char path[4096];
    *sum_mb = 0;
    if (state_path(path, sizeof path, "claims") != 0)
        return 0;
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int g;
        unsigned int pid;
        unsigned long long start;
        char tail;
        if (sscanf(e->d_name, "%d.%u.%llu%c", &g, &pid, &start, &tail) != 3 || g != gpu)
            continue;
        if (start_time_of(pid) != start)
            continue;
        char file[4096], buf[64];
        if (state_path(file, sizeof file, "claims/%s", e->d_name) != 0 || read_file(file, buf, sizeof buf) <= 0)
            continue;
        unsigned long long mb = strtoull(buf, NULL, 10);
        *sum_mb += mb;
        if (n < max && out) {
            out[n].pid = pid;
            out[n].mb = mb;
        }
        n++;
    }
    closedir(d);
    return n;
}

static unsigned long long foreign_mb(int gpu)
{
    char path[4096], buf[64];
    if (state_path(path, sizeof path, "gpu%d/foreign_mb", gpu) != 0 || read_file(path, buf, sizeof buf) <= 0)
        return 0;
    return strtoull(buf, NULL, 10);
}

/* Every per-device call starts here: init state, handle validity, the GPU's hang and fault switches. */
static nvmlReturn_t check_device(nvmlDevice_t dev)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!dev || dev < devices || dev >= devices + MAX_GPUS)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = (int)dev->index;
    char path[4096];
    if (state_path(path, sizeof path, "gpu%d/hang", gpu) == 0)
        hang_from(path);
    if (gpu >= gpu_count())
        return NVML_ERROR_INVALID_ARGUMENT;
    if (state_path(path, sizeof path, "gpu%d/lost", gpu) == 0 && exists(path))
        return NVML_ERROR_GPU_IS_LOST;
    if (state_path(path, sizeof path, "gpu%d/reset", gpu) == 0 && exists(path))
        return NVML_ERROR_RESET_REQUIRED;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    if (!dst)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------- init */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    global_hang();
    char path[4096], buf[64];
    if (!state_dir())
        return NVML_ERROR_DRIVER_NOT_LOADED; /* no state: a library without a driver behind it */
    if (state_path(path, sizeof path, "init_error") == 0 && read_file(path, buf, sizeof buf) >= 0) {
        int code = atoi(buf);
        return code > 0 ? code : NVML_ERROR_DRIVER_NOT_LOADED;
    }
    pthread_mutex_lock(&init_lock);
    if (init_count == 0)
        for (unsigned int i = 0; i < MAX_GPUS; i++)
            devices[i].index = i;
    init_count++;
    pthread_mutex_unlock(&init_lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlInit(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&init_lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (init_count <= 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else
        init_count--;
    pthread_mutex_unlock(&init_lock);
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 25: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    char path[4096], buf[96];
    if (state_path(path, sizeof path, "driver") != 0 || read_file(path, buf, sizeof buf) <= 0)
        snprintf(buf, sizeof buf, "550.54.15");
    buf[strcspn(buf, "\n")] = 0;
    return copy_string(version, length, buf);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return copy_string(version, length, "12.550.54.15");
}

/* ---------------------------------------------------------------- devices */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned int)gpu_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count)
{
    return nvmlDeviceGetCount_v2(count);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (!device || index >= MAX_GPUS) {
        global_hang();
        return init_count <= 0 ? NVML_ERROR_UNINITIALIZED : NVML_ERROR_INVALID_ARGUMENT;
    }
    nvmlReturn_t ret = check_device(&devices[index]);
    if (ret == NVML_SUCCESS || ret == NVML_ERROR_RESET_REQUIRED)
        *device = &devices[index]; /* a GPU that needs a reset still has a handle; a lost one does not */
    return ret == NVML_ERROR_RESET_REQUIRED ? NVML_SUCCESS : ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    int n = gpu_count();
    for (int i = 0; i < n; i++) {
        gpu_info info;
        if (read_info(i, &info) == 0 && strcmp(info.uuid, uuid) == 0) {
            nvmlReturn_t ret = check_device(&devices[i]);
            if (ret == NVML_SUCCESS)
                *device = &devices[i];
            return ret;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!index)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    return nvmlDeviceGetIndex(device, minor);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t ret = check_device(device);
    gpu_info info;
    if (ret != NVML_SUCCESS)
        return ret;
    if (read_info((int)device->index, &info) != 0)
        return NVML_ERROR_UNKNOWN;
    return copy_string(name, length, info.name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t ret = check_device(device);
    gpu_info info;
    if (ret != NVML_SUCCESS)
        return ret;
    if (read_info((int)device->index, &info) != 0)
        return NVML_ERROR_UNKNOWN;
    return copy_string(uuid, length, info.uuid);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    pci->bus = device->index + 1;
    pci->pciDeviceId = 0x233010de;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

static nvmlReturn_t memory_of(nvmlDevice_t device, unsigned long long *total, unsigned long long *used)
{
    nvmlReturn_t ret = check_device(device);
    gpu_info info;
    if (ret != NVML_SUCCESS)
        return ret;
    if (read_info((int)device->index, &info) != 0)
        return NVML_ERROR_UNKNOWN;
    unsigned long long claimed;
    live_claims((int)device->index, NULL, 0, &claimed);
    unsigned long long used_mb = foreign_mb((int)device->index) + claimed;
    *total = info.total_mb * MIB;
    *used = used_mb * MIB;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    unsigned long long total, used;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = memory_of(device, &total, &used);
    if (ret != NVML_SUCCESS)
        return ret;
    memory->total = total;
    memory->used = used;
    memory->free = used > total ? 0 : total - used;
    return NVML_SUCCESS;
}

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* Percent of the last sample period the GPU was busy: gpu<N>/utilization (absent: 0). */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!utilization)
        return NVML_ERROR_INVALID_ARGUMENT;
    char path[4096], buf[64];
    unsigned long long percent = 0;
    if (state_path(path, sizeof path, "gpu%d/utilization", (int)device->index) == 0 &&
        read_file(path, buf, sizeof buf) > 0)
        percent = strtoull(buf, NULL, 10);
    utilization->gpu = (unsigned int)(percent > 100 ? 100 : percent);
    utilization->memory = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    unsigned long long total, used;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t ret = memory_of(device, &total, &used);
    if (ret != NVML_SUCCESS)
        return ret;
    memory->total = total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = used > total ? 0 : total - used;
    return NVML_SUCCESS;
}

/*
 * The process queries follow NVML's two-call pattern: with *count too small (a NULL buffer is how callers ask),
 * *count is set to the number needed and NVML_ERROR_INSUFFICIENT_SIZE comes back; with no process at all, SUCCESS
 * and 0. The binding relies on this: a SUCCESS to its buffer-less first call means "no processes".
 */
#define PROCESS_QUERY(NAME, TYPE, FILL_EXTRA)                                                                     \
    nvmlReturn_t NAME(nvmlDevice_t device, unsigned int *count, TYPE *infos)                                     \
    {                                                                                                              \
        nvmlReturn_t ret = check_device(device);                                                                  \
        if (ret != NVML_SUCCESS)                                                                                  \
            return ret;                                                                                            \
        if (!count)                                                                                                \
            return NVML_ERROR_INVALID_ARGUMENT;                                                                   \
        claim claims[256];                                                                                         \
        unsigned long long sum;                                                                                    \
        int n = live_claims((int)device->index, claims, 256, &sum);                                               \
        if (n > 256)                                                                                               \
            n = 256;                                                                                               \
        if (n == 0) {                                                                                              \
            *count = 0;                                                                                            \
            return NVML_SUCCESS;                                                                                  \
        }                                                                                                          \
        if (!infos || *count < (unsigned int)n) {                                                                 \
            *count = (unsigned int)n;                                                                              \
            return NVML_ERROR_INSUFFICIENT_SIZE;                                                                  \
        }                                                                                                          \
        for (int i = 0; i < n; i++) {                                                                              \
            memset(&infos[i], 0, sizeof infos[i]);                                                                 \
            infos[i].pid = claims[i].pid;                                                                          \
            infos[i].usedGpuMemory = claims[i].mb * MIB;                                                           \
            FILL_EXTRA                                                                                             \
        }                                                                                                          \
        *count = (unsigned int)n;                                                                                  \
        return NVML_SUCCESS;                                                                                      \
    }

#define NO_MIG                                                                                                     \
    infos[i].gpuInstanceId = 0xFFFFFFFFu;                                                                          \
    infos[i].computeInstanceId = 0xFFFFFFFFu;

PROCESS_QUERY(nvmlDeviceGetComputeRunningProcesses_v3, nvmlProcessInfo_v2_t, NO_MIG)
PROCESS_QUERY(nvmlDeviceGetComputeRunningProcesses_v2, nvmlProcessInfo_v2_t, NO_MIG)
PROCESS_QUERY(nvmlDeviceGetComputeRunningProcesses, nvmlProcessInfo_v1_t, )

/* Graphics contexts: the fake has none. */
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count, void *infos)
{
    (void)infos;
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = 0;
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------- events */

static long xid_lines(int gpu, unsigned long long *nth_code, long nth)
{
    char path[4096];
    if (state_path(path, sizeof path, "gpu%d/xid", gpu) != 0)
        return 0;
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    char line[64];
    long n = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '\n')
            continue;
        n++;
        if (n == nth && nth_code)
            *nth_code = strtoull(line, NULL, 10);
    }
    fclose(f);
    return n;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!eventTypes)
        return NVML_ERROR_INVALID_ARGUMENT;
    *eventTypes = SUPPORTED_EVENTS;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof **set);
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (eventTypes & ~SUPPORTED_EVENTS)
        return NVML_ERROR_NOT_SUPPORTED;
    int gpu = (int)device->index;
    if (!(set->mask[gpu] & EVENT_XID) && (eventTypes & EVENT_XID))
        set->delivered[gpu] = xid_lines(gpu, NULL, 0); /* only Xids raised from now on */
    set->mask[gpu] |= eventTypes;
    return NVML_SUCCESS;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static nvmlReturn_t wait_common(nvmlEventSet_t set, nvmlDevice_t *dev, unsigned long long *type,
                                unsigned long long *data, unsigned int timeoutms)
{
    global_hang();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    double deadline = now_s() + timeoutms / 1000.0;
    for (;;) {
        int n = gpu_count();
        int lost = 0;
        for (int gpu = 0; gpu < n; gpu++) {
            if (!(set->mask[gpu] & EVENT_XID))
                continue;
            unsigned long long code = 0;
            long lines = xid_lines(gpu, &code, set->delivered[gpu] + 1);
            if (lines > set->delivered[gpu]) {
                set->delivered[gpu]++;
                *dev = &devices[gpu];
                *type = EVENT_XID;
                *data = code;
                return NVML_SUCCESS;
            }
            char path[4096];
            if (state_path(path, sizeof path, "gpu%d/lost", gpu) == 0 && exists(path))
                lost = 1;
        }
        if (lost)
            return NVML_ERROR_GPU_IS_LOST; /* pending Xids first (the driver raises 79 before the bus drop) */
        if (now_s() >= deadline)
            return NVML_ERROR_TIMEOUT;
        sleep_seconds(0.005);
    }
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    if (!data)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(data, 0, sizeof *data);
    data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
    return wait_common(set, &data->device, &data->eventType, &data->eventData, timeoutms);
}

nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data, unsigned int timeoutms)
{
    if (!data)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(data, 0, sizeof *data);
    return wait_common(set, &data->device, &data->eventType, &data->eventData, timeoutms);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    free(set);
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------- per-process accounting */

typedef struct {
    unsigned int gpuUtilization;
    unsigned int memoryUtilization;
    unsigned long long maxMemoryUsage;
    unsigned long long time;
    unsigned long long startTime;
    unsigned int isRunning;
    unsigned int reserved[5];
} nvmlAccountingStats_t;

#define ACCOUNTING_BUFFER 4000u

static int gpu_flag(int gpu, const char *name)
{
    char path[4096];
    return state_path(path, sizeof path, "gpu%d/%s", gpu, name) == 0 && exists(path);
}

static int accounting_is_on(int gpu)
{
    char path[4096], buf[16];
    if (state_path(path, sizeof path, "gpu%d/accounting", gpu) != 0 || read_file(path, buf, sizeof buf) <= 0)
        return 0;
    return buf[0] == '1';
}

static unsigned int accounting_buffer(int gpu)
{
    char path[4096], buf[64];
    if (state_path(path, sizeof path, "gpu%d/accounting_buffer", gpu) != 0 || read_file(path, buf, sizeof buf) <= 0)
        return ACCOUNTING_BUFFER;
    unsigned long n = strtoul(buf, NULL, 10);
    return n ? (unsigned int)n : ACCOUNTING_BUFFER;
}

typedef struct {
    unsigned long long seq, start_ticks, max_mb, start_us, last_us;
    unsigned int pid;
} acct_record;

static int by_seq(const void *a, const void *b)
{
    const acct_record *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* The GPU's accounting ring, oldest first, at most its buffer size (the newest); returns how many (malloc'd). */
static int accounting_records(int gpu, acct_record **out)
{
    char path[4096];
    *out = NULL;
    if (state_path(path, sizeof path, "gpu%d/accounted", gpu) != 0)
        return 0;
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int n = 0, cap = 0;
    acct_record *recs = NULL;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        acct_record r;
        char tail;
        if (sscanf(e->d_name, "%llu.%u.%llu%c", &r.seq, &r.pid, &r.start_ticks, &tail) != 3)
            continue;
        char file[4096], buf[128];
        if (state_path(file, sizeof file, "gpu%d/accounted/%s", gpu, e->d_name) != 0 ||
            read_file(file, buf, sizeof buf) <= 0)
            continue;
        if (sscanf(buf, "%llu %llu %llu", &r.max_mb, &r.start_us, &r.last_us) != 3)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            acct_record *grown = realloc(recs, (size_t)cap * sizeof *recs);
            if (!grown)
                break;
            recs = grown;
        }
        recs[n++] = r;
    }
    closedir(d);
    if (n > 1)
        qsort(recs, (size_t)n, sizeof *recs, by_seq);
    unsigned int keep = accounting_buffer(gpu);
    if ((unsigned int)n > keep) {
        memmove(recs, recs + (n - (int)keep), keep * sizeof *recs);
        n = (int)keep;
    }
    *out = recs;
    return n;
}

/* Every accounting call starts here: the device, then whether the GPU supports accounting at all. */
static nvmlReturn_t check_accounting(nvmlDevice_t device)
{
    nvmlReturn_t ret = check_device(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (gpu_flag((int)device->index, "accounting_unsupported"))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAccountingMode(nvmlDevice_t device, int *mode)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!mode)
        return NVML_ERROR_INVALID_ARGUMENT;
    *mode = accounting_is_on((int)device->index);
    return NVML_SUCCESS;
}

static void clear_records(int gpu, int only_terminated)
{
    acct_record *recs;
    int n = accounting_records(gpu, &recs);
    for (int i = 0; i < n; i++) {
        if (only_terminated && start_time_of(recs[i].pid) == recs[i].start_ticks)
            continue;
        char path[4096];
        if (state_path(path, sizeof path, "gpu%d/accounted/%llu.%u.%llu", gpu, recs[i].seq, recs[i].pid,
                       recs[i].start_ticks) == 0)
            unlink(path);
    }
    free(recs);
}

/* Root only (NO_PERMISSION otherwise, or with accounting_denied); turning it off clears every record. */
nvmlReturn_t nvmlDeviceSetAccountingMode(nvmlDevice_t device, int mode)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (mode != 0 && mode != 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = (int)device->index;
    if (geteuid() != 0 || gpu_flag(gpu, "accounting_denied"))
        return NVML_ERROR_NO_PERMISSION;
    char path[4096], tmp[4200];
    if (state_path(path, sizeof path, "gpu%d/accounting", gpu) != 0)
        return NVML_ERROR_UNKNOWN;
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    FILE *f = fopen(tmp, "we");
    if (!f)
        return NVML_ERROR_UNKNOWN;
    fprintf(f, "%d\n", mode);
    fclose(f);
    if (rename(tmp, path) != 0)
        return NVML_ERROR_UNKNOWN;
    if (!mode)
        clear_records(gpu, 0);
    else if (state_path(path, sizeof path, "gpu%d/accounted", gpu) == 0 &&
             (mkdir(path, 01777) == 0 || errno == EEXIST))
        chmod(path, 01777); /* every user's jobs write their own records there (sticky, like claims/) */
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceClearAccountingPids(nvmlDevice_t device)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (geteuid() != 0)
        return NVML_ERROR_NO_PERMISSION;
    clear_records((int)device->index, 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAccountingBufferSize(nvmlDevice_t device, unsigned int *bufferSize)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!bufferSize)
        return NVML_ERROR_INVALID_ARGUMENT;
    *bufferSize = accounting_buffer((int)device->index);
    return NVML_SUCCESS;
}

/* The PIDs in the ring (each once), with the two-call pattern of the process queries. Mode off: NOT_SUPPORTED. */
nvmlReturn_t nvmlDeviceGetAccountingPids(nvmlDevice_t device, unsigned int *count, unsigned int *pids)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = (int)device->index;
    if (!accounting_is_on(gpu))
        return NVML_ERROR_NOT_SUPPORTED;
    acct_record *recs;
    int n = accounting_records(gpu, &recs);
    unsigned int distinct = 0;
    for (int i = n - 1; i >= 0; i--) { /* newest first; a PID listed once */
        int seen = 0;
        for (int j = n - 1; j > i; j--)
            if (recs[j].pid == recs[i].pid)
                seen = 1;
        if (seen)
            continue;
        if (pids && distinct < *count)
            pids[distinct] = recs[i].pid;
        distinct++;
    }
    free(recs);
    if (!pids || *count < distinct) {
        *count = distinct;
        return distinct ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    }
    *count = distinct;
    return NVML_SUCCESS;
}

/* A process's stats: the newest record of that PID (the one that terminated last). Mode off: NOT_SUPPORTED;
 * no record: NOT_FOUND. */
nvmlReturn_t nvmlDeviceGetAccountingStats(nvmlDevice_t device, unsigned int pid, nvmlAccountingStats_t *stats)
{
    nvmlReturn_t ret = check_accounting(device);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!stats)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = (int)device->index;
    if (!accounting_is_on(gpu))
        return NVML_ERROR_NOT_SUPPORTED;
    acct_record *recs;
    int n = accounting_records(gpu, &recs);
    int found = -1;
    for (int i = 0; i < n; i++)
        if (recs[i].pid == pid)
            found = i;
    if (found < 0) {
        free(recs);
        return NVML_ERROR_NOT_FOUND;
    }
    acct_record r = recs[found];
    free(recs);
    memset(stats, 0, sizeof *stats);
    stats->maxMemoryUsage = r.max_mb * MIB;
    stats->startTime = r.start_us;
    stats->isRunning = start_time_of(r.pid) == r.start_ticks;
    stats->time = stats->isRunning || r.last_us < r.start_us ? 0 : (r.last_us - r.start_us) / 1000;
    return NVML_SUCCESS;
}
