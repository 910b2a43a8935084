/* The peer of bench/firecracker-source.js: what Firecracker does when it restores a snapshot with
 * a Uffd memory backend, then a guest reading its memory. Maps anonymous guest memory, registers
 * it (MISSING), connects to the handler's socket and sends one region's
 * JSON with the uffd attached, closes its own copy, then `threads` threads read one byte of every
 * page of their share (thread t: the t-th contiguous slice), timed from the first touch to the
 * last thread's end. Then every byte is checked against the memory file (untimed).
 *
 *   fc_guest <socket> <mem-file> <MiB> <threads>
 *
 * Prints {"ms":..., "mismatches":...}. */
#include "bench_common.h"

#include <sys/socket.h>
#include <sys/un.h>

struct share {
  volatile char* base;
  size_t len;
  pthread_t tid;
  unsigned sink;
};

static void* reader(void* arg) {
  struct share* s = arg;
  unsigned sum = 0;
  for (size_t off = 0; off < s->len; off += PAGE) sum += (unsigned char)s->base[off];
  s->sink = sum;
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: fc_guest <socket> <mem-file> <MiB> <threads>\n");
    return 2;
  }
  size_t len = strtoul(argv[3], NULL, 10) << 20;
  int threads = atoi(argv[4]);
  if (len == 0 || threads < 1 || threads > 64) {
    fprintf(stderr, "fc_guest: bad arguments\n");
    return 2;
  }
  int uffd = open_uffd();
  char* base = registered_memory(uffd, len);

  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof addr.sun_path, "%s", argv[1]);
  if (connect(s, (struct sockaddr*)&addr, sizeof addr) < 0) die("connect");
  char json[512];
  int n = snprintf(json, sizeof json,
                   "[{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":0,\"page_size\":4096,"
                   "\"page_size_kib\":4096}]",
                   (unsigned long)(uintptr_t)base, len);
  char control[CMSG_SPACE(sizeof(int))] = {0};
  struct iovec iov = {.iov_base = json, .iov_len = (size_t)n};
  struct msghdr msg = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
  if (sendmsg(s, &msg, 0) != n) die("sendmsg");
  close(uffd); /* the handler has it now */

  struct share shares[64];
  size_t slice = (len / PAGE / threads) * PAGE;
  uint64_t t0 = now_ns();
  for (int t = 0; t < threads; t++) {
    shares[t].base = base + t * slice;
    shares[t].len = t == threads - 1 ? len - t * slice : slice;
    if (pthread_create(&shares[t].tid, NULL, reader, &shares[t])) die("pthread_create");
  }
  for (int t = 0; t < threads; t++) pthread_join(shares[t].tid, NULL);
  uint64_t ns = now_ns() - t0;

  int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open");
  char* want = malloc(1 << 20);
  size_t mismatches = 0;
  for (size_t off = 0; off < len; off += 1 << 20) {
    size_t chunk = len - off < (1 << 20) ? len - off : (1 << 20);
    if (pread(fd, want, chunk, (off_t)off) != (ssize_t)chunk) die("pread");
    for (size_t p = 0; p < chunk; p += PAGE)
      if (memcmp(want + p, base + off + p, PAGE) != 0) mismatches++;
  }
  printf("{\"ms\":%.3f,\"mismatches\":%zu}\n", ns / 1e6, mismatches);
  return 0;
}
