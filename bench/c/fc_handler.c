/* A minimal Firecracker-style page-fault handler, the reference `userfaultfd serve` is measured
 * against (bench/firecracker-source.js): what Firecracker's example uffd handler does. It listens
 * on a Unix socket; each connection (served one after another) sends the guest's regions as JSON
 * with its uffd attached (SCM_RIGHTS); every MISSING fault is served by one UFFDIO_COPY of one
 * page from a private read-only mmap of the memory file (poll, read one message, copy). A
 * connection ends when the peer hangs up.
 *
 *   fc_handler <socket> <mem-file>
 *
 * Prints "ready" on stdout once listening. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REGIONS 64

struct region {
  uint64_t base, size, offset, page_size;
};

static void die(const char* what) {
  fprintf(stderr, "fc_handler: %s: %s\n", what, strerror(errno));
  exit(1);
}

/* The value after "key": in obj (up to the object's end), or 0. */
static uint64_t field(const char* obj, const char* end, const char* key) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char* p = strstr(obj, pat);
  if (p == NULL || p > end) return 0;
  p = strchr(p + strlen(pat), ':');
  return p == NULL ? 0 : strtoull(p + 1, NULL, 10);
}

static int parse(char* json, struct region* out) {
  int n = 0;
  for (char* obj = strchr(json, '{'); obj != NULL && n < MAX_REGIONS; obj = strchr(obj + 1, '{')) {
    const char* end = strchr(obj, '}');
    if (end == NULL) break;
    out[n].base = field(obj, end, "base_host_virt_addr");
    out[n].size = field(obj, end, "size");
    out[n].offset = field(obj, end, "offset");
    out[n].page_size = field(obj, end, "page_size");
    if (out[n].page_size == 0) out[n].page_size = field(obj, end, "page_size_kib");
    if (out[n].page_size == 0) out[n].page_size = 4096;
    n++;
  }
  return n;
}

static void serve(int conn, const uint8_t* mem, uint64_t mem_size) {
  char json[65536];
  char control[CMSG_SPACE(sizeof(int))];
  struct iovec iov = {.iov_base = json, .iov_len = sizeof json - 1};
  struct msghdr msg = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  ssize_t got = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
  if (got <= 0) return;
  json[got] = 0;
  struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (c == NULL || c->cmsg_type != SCM_RIGHTS || (msg.msg_flags & MSG_CTRUNC)) {
    fprintf(stderr, "fc_handler: no uffd attached\n");
    return;
  }
  int uffd;
  memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
  struct region regions[MAX_REGIONS];
  int n = parse(json, regions);
  for (int i = 0; i < n; i++)
    if (regions[i].offset + regions[i].size > mem_size) {
      fprintf(stderr, "fc_handler: region beyond the memory file\n");
      close(uffd);
      return;
    }
  struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLIN}};
  for (;;) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (fds[1].revents) break; /* the peer hung up (it never sends after the handshake) */
    if (!(fds[0].revents & POLLIN)) {
      if (fds[0].revents) break;
      continue;
    }
    struct uffd_msg m;
    ssize_t r = read(uffd, &m, sizeof m);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (r <= 0) break;
    if (m.event != UFFD_EVENT_PAGEFAULT) continue; /* REMOVE and the rest: nothing to do here */
    uint64_t addr = m.arg.pagefault.address;
    for (int i = 0; i < n; i++) {
      struct region* g = &regions[i];
      if (addr < g->base || addr >= g->base + g->size) continue;
      uint64_t page = addr & ~(g->page_size - 1);
      struct uffdio_copy copy = {
          .dst = page, .src = (uintptr_t)(mem + g->offset + (page - g->base)), .len = g->page_size};
      if (ioctl(uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST && errno != EAGAIN) {
        if (errno == ESRCH) goto out; /* the peer is gone */
        die("UFFDIO_COPY");
      }
      break;
    }
  }
out:
  close(uffd);
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: fc_handler <socket> <mem-file>\n");
    return 2;
  }
  int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open");
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat");
  uint8_t* mem = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mem == MAP_FAILED) die("mmap");
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof addr.sun_path, "%s", argv[1]);
  unlink(argv[1]);
  if (bind(s, (struct sockaddr*)&addr, sizeof addr) < 0) die("bind");
  if (listen(s, 16) < 0) die("listen");
  printf("ready\n");
  fflush(stdout);
  for (;;) {
    int conn = accept4(s, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) {
      if (errno == EINTR) continue;
      die("accept");
    }
    serve(conn, mem, (uint64_t)st.st_size);
    close(conn);
  }
}
