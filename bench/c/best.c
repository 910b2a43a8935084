/* The best C reference handler we could write for 4 KiB faults: batch reads (up to 64 messages
 * per read(2)), one UFFDIO_COPY per fault, and a spin on the non-blocking fd before sleeping in
 * poll (a sleeping handler costs one more cross-CPU wake-up per fault).
 *
 *   best <pages> <threads> <seq|random> [spinUs = 50] [one|each = each]
 *
 * Same workload and JSON output as naive.c. spinUs 0 never spins; -1 never sleeps. 'each' copies
 * every page from its own page of a source as large as the memory (what a real handler and the
 * FaultServer bench do); 'one' copies the same hot page every time (as naive.c does). */
#include "bench_common.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: best <pages> <threads> <seq|random> [spinUs]\n");
    return 2;
  }
  size_t pages = strtoul(argv[1], NULL, 10);
  int threads = atoi(argv[2]);
  int random_order = strcmp(argv[3], "random") == 0;
  long spin_us = argc > 4 ? atol(argv[4]) : 50;
  int each = !(argc > 5 && strcmp(argv[5], "one") == 0);
  if (pages == 0 || threads < 1 || threads > 64) {
    fprintf(stderr, "best: bad arguments\n");
    return 2;
  }
  int uffd = open_uffd();
  char* base = registered_memory(uffd, pages * PAGE);
  size_t src_len = each ? pages * PAGE : PAGE;
  char* src = aligned_alloc(PAGE, src_len);
  memset(src, 1, src_len);

  struct touchers t;
  uint64_t t0 = now_ns();
  start_touchers(&t, base, pages, threads, random_order);

  struct uffd_msg msgs[64];
  struct pollfd pfd = {.fd = uffd, .events = POLLIN};
  uint64_t spin_ns = spin_us < 0 ? UINT64_MAX : (uint64_t)spin_us * 1000;
  uint64_t idle_since = 0;
  size_t served = 0;
  while (served < pages) {
    ssize_t n = read(uffd, msgs, sizeof msgs);
    if (n > 0) {
      idle_since = 0;
      for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t dst = msgs[i].arg.pagefault.address & ~(PAGE - 1);
        struct uffdio_copy copy = {
            .dst = dst, .src = (uintptr_t)src + (each ? dst - (uintptr_t)base : 0), .len = PAGE};
        if (ioctl(uffd, UFFDIO_COPY, &copy) && errno != EEXIST) die("UFFDIO_COPY");
        served++;
      }
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN) die("read");
    uint64_t now = now_ns();
    if (idle_since == 0) idle_since = now;
    if (now - idle_since < spin_ns) {
      for (int i = 0; i < 16; i++) cpu_relax();
      continue;
    }
    if (poll(&pfd, 1, -1) < 0 && errno != EINTR) die("poll");
    idle_since = 0;
  }
  join_touchers(&t);
  print_result(&t, pages, (double)(now_ns() - t0) / 1e9);
  return 0;
}
