// The floor of the migration benchmark: a plain TCP stream of N bytes over the same link.
//   tcp_stream recv ADDR PORT BYTES touched|fresh   (prints {"seconds":..} from accept to the last byte)
//   tcp_stream send ADDR PORT BYTES                 (prints {"seconds":..} from connect to the receiver's
//   ack)
// The receiver writes into memory it touched beforehand ("touched": the fastest case) or mapped
// just now ("fresh": first touch by recv, as a migration target's memory is).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: tcp_stream recv|send ADDR PORT BYTES [touched|fresh]\n");
    return 2;
  }
  size_t size = strtoull(argv[4], NULL, 10);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(atoi(argv[3]));
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  int one = 1;
  if (strcmp(argv[1], "recv") == 0) {
    int touched = argc > 5 && strcmp(argv[5], "touched") == 0;
    char* mem = mmap(0, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | (touched ? MAP_POPULATE : 0), -1, 0);
    if (mem == MAP_FAILED) return perror("mmap"), 1;
    if (touched) memset(mem, 1, size);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (void*)&a, sizeof a) != 0 || listen(l, 1) != 0) return perror("bind"), 1;
    printf("{\"listening\":true}\n");
    fflush(stdout);
    int c = accept(l, 0, 0);
    double t0 = now();
    size_t got = 0;
    while (got < size) {
      ssize_t n = recv(c, mem + got, size - got, 0);
      if (n <= 0) return perror("recv"), 1;
      got += n;
    }
    double t = now() - t0;
    send(c, "k", 1, 0);
    printf("{\"seconds\":%.6f}\n", t);
    return 0;
  }
  char* mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (mem == MAP_FAILED) return perror("mmap"), 1;
  for (size_t i = 0; i < size; i += 8) *(unsigned long*)(mem + i) = i * 0x9E3779B97F4A7C15ull;
  int c = socket(AF_INET, SOCK_STREAM, 0);
  double t0 = now();
  while (connect(c, (void*)&a, sizeof a) != 0) {
    if (now() - t0 > 10) return perror("connect"), 1;
    usleep(1000);
    close(c);
    c = socket(AF_INET, SOCK_STREAM, 0);
    t0 = now();
  }
  size_t sent = 0;
  while (sent < size) {
    ssize_t n = send(c, mem + sent, size - sent > (1 << 20) ? (1 << 20) : size - sent, 0);
    if (n <= 0) return perror("send"), 1;
    sent += n;
  }
  char b;
  if (recv(c, &b, 1, 0) != 1) return perror("ack"), 1;
  printf("{\"seconds\":%.6f}\n", now() - t0);
  return 0;
}
