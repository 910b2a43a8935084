/* Naive blocking C reference handler: poll + read ONE message + one 4 KiB UFFDIO_COPY per fault.
 * This is the handler most people write by hand; the JS handler and the FaultServer are measured
 * against it in the same run.
 *
 *   naive <pages> <threads> <seq|random>
 *
 * <threads> toucher threads read the pages interleaved (thread t takes pages t, t+T, ...), in
 * address order or in a shuffled order, exactly like the package's native toucher. Prints JSON:
 * {"faults":N,"seconds":S,"faultsPerSec":F,"p50us":X,"p99us":Y} (latency = one touch, in us).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#define PAGE 4096UL

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char* what) {
  fprintf(stderr, "naive: %s: %s\n", what, strerror(errno));
  exit(1);
}

/* The syscall, or /dev/userfaultfd where the syscall is not allowed (as the package does). */
static int open_uffd(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd >= 0) return fd;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) die("userfaultfd");
  fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  close(dev);
  if (fd < 0) die("USERFAULTFD_IOC_NEW");
  return fd;
}

struct job {
  char* base;
  size_t* order;
  double* ns;
  size_t pages;
  size_t begin, step;
};

/* Pins the calling thread to the CPU named by environment variable `name`, when set (the
 * benchmark places handler and touchers on purpose; as bench_common.h's pin_from_env). */
static void pin_from_env(const char* name) {
  const char* v = getenv(name);
  if (v == NULL || *v == 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(atoi(v), &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set)) die(name);
}

static void* toucher(void* arg) {
  struct job* j = arg;
  pin_from_env("BENCH_TOUCHER_CPU");
  for (size_t i = j->begin; i < j->pages; i += j->step) {
    volatile uint64_t* p = (volatile uint64_t*)(j->base + j->order[i] * PAGE);
    uint64_t t0 = now_ns();
    (void)*p;
    j->ns[i] = (double)(now_ns() - t0);
  }
  return NULL;
}

static int cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: naive <pages> <threads> <seq|random>\n");
    return 2;
  }
  size_t pages = strtoul(argv[1], NULL, 10);
  int threads = atoi(argv[2]);
  int random_order = strcmp(argv[3], "random") == 0;
  if (pages == 0 || threads < 1 || threads > 64) {
    fprintf(stderr, "naive: bad arguments\n");
    return 2;
  }

  int uffd = open_uffd();
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");

  size_t len = pages * PAGE;
  char* base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) die("mmap");
  struct uffdio_register reg = {.range = {.start = (uintptr_t)base, .len = len},
                                .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");

  char* src = aligned_alloc(PAGE, PAGE);
  memset(src, 1, PAGE);
  size_t* order = malloc(pages * sizeof *order);
  double* ns = calloc(pages, sizeof *ns);
  for (size_t i = 0; i < pages; i++) order[i] = i;
  if (random_order) {
    srand(12345);
    for (size_t i = pages - 1; i > 0; i--) {
      size_t k = (size_t)rand() % (i + 1), t = order[i];
      order[i] = order[k];
      order[k] = t;
    }
  }

  pin_from_env("BENCH_HANDLER_CPU"); /* this thread handles the faults */
  uint64_t t0 = now_ns();
  pthread_t tids[64];
  struct job jobs[64];
  for (int t = 0; t < threads; t++) {
    jobs[t] = (struct job){base, order, ns, pages, (size_t)t, (size_t)threads};
    pthread_create(&tids[t], NULL, toucher, &jobs[t]);
  }

  struct pollfd pfd = {.fd = uffd, .events = POLLIN};
  size_t served = 0;
  while (served < pages) {
    if (poll(&pfd, 1, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    struct uffd_msg msg;
    ssize_t n = read(uffd, &msg, sizeof msg);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      die("read");
    }
    if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
    struct uffdio_copy copy = {
        .dst = msg.arg.pagefault.address & ~(PAGE - 1), .src = (uintptr_t)src, .len = PAGE};
    if (ioctl(uffd, UFFDIO_COPY, &copy) && errno != EEXIST) die("UFFDIO_COPY");
    served++;
  }
  for (int t = 0; t < threads; t++) pthread_join(tids[t], NULL);
  double seconds = (double)(now_ns() - t0) / 1e9;

  qsort(ns, pages, sizeof *ns, cmp_double);
  printf("{\"faults\":%zu,\"seconds\":%.6f,\"faultsPerSec\":%.1f,\"p50us\":%.2f,\"p99us\":%.2f}\n", pages,
         seconds, (double)pages / seconds, ns[pages / 2] / 1e3, ns[(size_t)(0.99 * (double)pages)] / 1e3);
  return 0;
}
