/* Shared by the C reference handlers (best.c, restore.c): opening a uffd, registering memory,
 * toucher threads with per-touch latency, and the JSON line they print. Same workload as the
 * package's native toucher: thread t touches entries t, t+T, ... of the order array. */
#pragma once
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

static inline void die(const char* what) {
  fprintf(stderr, "%s: %s\n", what, strerror(errno));
  exit(1);
}

/* The syscall, or /dev/userfaultfd where the syscall is not allowed. Non-blocking. */
static inline int open_uffd(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) die("userfaultfd");
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    close(dev);
    if (fd < 0) die("USERFAULTFD_IOC_NEW");
  }
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(fd, UFFDIO_API, &api)) die("UFFDIO_API");
  return fd;
}

/* Anonymous memory registered for MISSING faults. */
static inline char* registered_memory(int uffd, size_t len) {
  char* base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) die("mmap");
  struct uffdio_register reg = {.range = {.start = (uintptr_t)base, .len = len},
                                .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
  return base;
}

struct touchers {
  char* base;
  size_t* order;
  double* ns;
  size_t pages;
  int threads;
  pthread_t tids[64];
  struct job {
    struct touchers* all;
    size_t begin;
  } jobs[64];
};

/* Pins the calling thread to the CPU named by environment variable `name` (when set): the
 * benchmark places handler and touchers on purpose (same CPU, or not). */
static inline void pin_from_env(const char* name) {
  const char* v = getenv(name);
  if (v == NULL || *v == 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(atoi(v), &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof set, &set)) {
    errno = EINVAL;
    die(name);
  }
}

static inline void* toucher_main(void* arg) {
  struct job* j = arg;
  struct touchers* t = j->all;
  pin_from_env("BENCH_TOUCHER_CPU");
  for (size_t i = j->begin; i < t->pages; i += (size_t)t->threads) {
    volatile uint64_t* p = (volatile uint64_t*)(t->base + t->order[i] * PAGE);
    uint64_t t0 = now_ns();
    (void)*p;
    t->ns[i] = (double)(now_ns() - t0);
  }
  return NULL;
}

/* Starts `threads` threads touching every page of base once, in address or shuffled order. */
static inline void start_touchers(struct touchers* t, char* base, size_t pages, int threads,
                                  int random_order) {
  pin_from_env("BENCH_HANDLER_CPU"); /* the calling thread handles the faults */
  t->base = base;
  t->pages = pages;
  t->threads = threads;
  t->order = malloc(pages * sizeof *t->order);
  t->ns = calloc(pages, sizeof *t->ns);
  for (size_t i = 0; i < pages; i++) t->order[i] = i;
  if (random_order) {
    srand(12345);
    for (size_t i = pages - 1; i > 0; i--) {
      size_t k = (size_t)rand() % (i + 1), x = t->order[i];
      t->order[i] = t->order[k];
      t->order[k] = x;
    }
  }
  for (int i = 0; i < threads; i++) {
    t->jobs[i].all = t;
    t->jobs[i].begin = (size_t)i;
    pthread_create(&t->tids[i], NULL, toucher_main, &t->jobs[i]);
  }
}

static inline void join_touchers(struct touchers* t) {
  for (int i = 0; i < t->threads; i++) pthread_join(t->tids[i], NULL);
}

static inline int cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

/* {"faults":N,"seconds":S,"faultsPerSec":F,"p50us":X,"p99us":Y} */
static inline void print_result(struct touchers* t, size_t faults, double seconds) {
  qsort(t->ns, t->pages, sizeof *t->ns, cmp_double);
  printf("{\"faults\":%zu,\"seconds\":%.6f,\"faultsPerSec\":%.1f,\"p50us\":%.2f,\"p99us\":%.2f}\n", faults,
         seconds, (double)faults / seconds, t->ns[t->pages / 2] / 1e3,
         t->ns[(size_t)(0.99 * (double)t->pages)] / 1e3);
}
