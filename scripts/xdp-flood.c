/* A raw UDP flood for scripts/bench-xdp.sh: 64-byte frames out of IFNAME through AF_PACKET
 * (qdisc bypassed, sendmmsg batches of 64), as a compromised pod would send them, for SECONDS.
 * Prints the frames the kernel took. Usage:
 *   xdp-flood IFNAME DST_MAC SRC_MAC SRC_IP DST_IP DPORT SECONDS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define LEN 64

static int mac(const char *s, unsigned char *m) {
  return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) == 6 ? 0 : -1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s IFNAME DST_MAC SRC_MAC SRC_IP DST_IP DPORT SECONDS\n", argv[0]);
    return 2;
  }
  unsigned char f[LEN] = {0};
  if (mac(argv[2], f) || mac(argv[3], f + 6)) {
    fprintf(stderr, "bad mac\n");
    return 2;
  }
  f[12] = 0x08; f[13] = 0x00;
  unsigned char *ip = f + 14;
  ip[0] = 0x45; ip[3] = LEN - 14; ip[8] = 64; ip[9] = 17;
  if (inet_pton(AF_INET, argv[4], ip + 12) != 1 || inet_pton(AF_INET, argv[5], ip + 16) != 1) {
    fprintf(stderr, "bad ip\n");
    return 2;
  }
  unsigned sum = 0;
  for (int i = 0; i < 20; i += 2) sum += (ip[i] << 8) | ip[i + 1];
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  sum = ~sum & 0xffff;
  ip[10] = sum >> 8; ip[11] = sum & 0xff;
  unsigned char *udp = ip + 20;
  int dport = atoi(argv[6]);
  udp[0] = 0x9c; udp[1] = 0x40; udp[2] = dport >> 8; udp[3] = dport & 0xff; udp[5] = LEN - 34;

  int s = socket(AF_PACKET, SOCK_RAW, 0);
  if (s < 0) { perror("socket"); return 1; }
  int one = 1;
  setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
  struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = if_nametoindex(argv[1]), .sll_halen = 6};
  if (!to.sll_ifindex) { perror("if_nametoindex"); return 1; }
  memcpy(to.sll_addr, f, 6);
  struct iovec iov = {.iov_base = f, .iov_len = LEN};
  struct mmsghdr msgs[BATCH];
  for (int i = 0; i < BATCH; i++) {
    memset(&msgs[i], 0, sizeof msgs[i]);
    msgs[i].msg_hdr.msg_iov = &iov;
    msgs[i].msg_hdr.msg_iovlen = 1;
    msgs[i].msg_hdr.msg_name = &to;
    msgs[i].msg_hdr.msg_namelen = sizeof to;
  }
  double end = now() + atof(argv[7]);
  unsigned long long sent = 0;
  while (now() < end) {
    int n = sendmmsg(s, msgs, BATCH, 0);
    if (n > 0) sent += n;
  }
  printf("%llu\n", sent);
  return 0;
}
