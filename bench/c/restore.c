/* Lazy-restore C reference: a 1 GiB (or any size) file-backed snapshot served into anonymous
 * memory by a single-threaded handler that copies the aligned CHUNK (default 2 MiB) around each
 * fault straight from a read-only mapping of the file (batch reads, EEXIST = done), while one
 * thread touches every page in order. And the floor: the same memory filled without
 * userfaultfd (pread of the whole file into fresh anonymous memory, 2 MiB at a time).
 *
 *   restore <file> uffd [chunkBytes]     restore <file> floor
 *
 * Prints {"bytes":B,"seconds":S,"gibPerSec":G} (time until every page is resident). */
#include "bench_common.h" /* first: it defines _GNU_SOURCE */

#include <sys/stat.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: restore <file> uffd|floor [chunkBytes]\n");
    return 2;
  }
  int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open");
  struct stat st;
  if (fstat(fd, &st)) die("fstat");
  size_t len = (size_t)st.st_size & ~(PAGE - 1);
  size_t chunk = argc > 3 ? strtoul(argv[3], NULL, 10) : 2UL << 20;
  if (len == 0 || chunk < PAGE || chunk % PAGE) {
    fprintf(stderr, "restore: bad file size or chunk\n");
    return 2;
  }
  double seconds;
  if (strcmp(argv[2], "floor") == 0) {
    uint64_t t0 = now_ns();
    char* base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) die("mmap");
    for (size_t off = 0; off < len; off += chunk) {
      size_t n = len - off < chunk ? len - off : chunk;
      if (pread(fd, base + off, n, (off_t)off) != (ssize_t)n) die("pread");
    }
    seconds = (double)(now_ns() - t0) / 1e9;
  } else {
    uint64_t t0 = now_ns();
    const char* src = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (src == MAP_FAILED) die("mmap file");
    int uffd = open_uffd();
    char* base = registered_memory(uffd, len);
    struct touchers t;
    start_touchers(&t, base, len / PAGE, 1, 0);
    struct uffd_msg msgs[64];
    struct pollfd pfd = {.fd = uffd, .events = POLLIN};
    size_t done = 0;
    while (done < len) {
      ssize_t n = read(uffd, msgs, sizeof msgs);
      if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) die("read");
        if (poll(&pfd, 1, -1) < 0 && errno != EINTR) die("poll");
        continue;
      }
      for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t at = (msgs[i].arg.pagefault.address - (uintptr_t)base) & ~(chunk - 1);
        uint64_t end = at + chunk < len ? at + chunk : len;
        while (at < end) {
          struct uffdio_copy copy = {
              .dst = (uintptr_t)base + at, .src = (uintptr_t)src + at, .len = end - at};
          if (ioctl(uffd, UFFDIO_COPY, &copy) == 0) {
            done += end - at;
            break;
          }
          if (errno == EEXIST) break; /* a stale fault: copied before */
          if (errno != EAGAIN || copy.copy <= 0) die("UFFDIO_COPY");
          done += (uint64_t)copy.copy;
          at += (uint64_t)copy.copy;
        }
      }
    }
    join_touchers(&t);
    seconds = (double)(now_ns() - t0) / 1e9;
  }
  printf("{\"bytes\":%zu,\"seconds\":%.6f,\"gibPerSec\":%.3f}\n", len, seconds,
         (double)len / seconds / (1 << 30));
  return 0;
}
