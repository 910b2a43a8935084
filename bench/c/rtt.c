// One small request, one 4 KiB answer, over TCP: the idle round trip that a demand fault's
// latency is measured against in the migration benchmark.
//   rtt server ADDR PORT REPLY          answers every 16-byte request with REPLY bytes
//   rtt client ADDR PORT COUNT REPLY    prints {"p50us":..,"p99us":..} of COUNT round trips
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static int full(int fd, char* buf, size_t n, int writing) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = writing ? send(fd, buf + done, n - done, 0) : recv(fd, buf + done, n - done, 0);
    if (r <= 0) return -1;
    done += r;
  }
  return 0;
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: rtt server ADDR PORT REPLY | rtt client ADDR PORT COUNT REPLY\n");
    return 2;
  }
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(atoi(argv[3]));
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  int one = 1;
  char req[16] = {0};
  if (strcmp(argv[1], "server") == 0) {
    size_t reply = strtoull(argv[4], NULL, 10);
    char* buf = calloc(1, reply);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (void*)&a, sizeof a) != 0 || listen(l, 1) != 0) return perror("bind"), 1;
    printf("{\"listening\":true}\n");
    fflush(stdout);
    int c = accept(l, 0, 0);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (full(c, req, sizeof req, 0) == 0)
      if (full(c, buf, reply, 1) != 0) break;
    return 0;
  }
  int count = atoi(argv[4]);
  size_t reply = strtoull(argv[5], NULL, 10);
  char* buf = calloc(1, reply);
  double* t = calloc(count, sizeof(double));
  int c = socket(AF_INET, SOCK_STREAM, 0);
  double start = now();
  while (connect(c, (void*)&a, sizeof a) != 0) {
    if (now() - start > 10) return perror("connect"), 1;
    usleep(1000);
    close(c);
    c = socket(AF_INET, SOCK_STREAM, 0);
  }
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  for (int i = 0; i < count; i++) {
    double t0 = now();
    if (full(c, req, sizeof req, 1) != 0 || full(c, buf, reply, 0) != 0) return perror("rtt"), 1;
    t[i] = (now() - t0) * 1e6;
    usleep(200);  // idle link between requests, like sparse faults
  }
  qsort(t, count, sizeof(double), cmp);
  printf("{\"p50us\":%.2f,\"p99us\":%.2f}\n", t[count / 2], t[count * 99 / 100]);
  return 0;
}
