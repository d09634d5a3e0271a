// rmoe_linkem: one network link of the test cluster (tools/testcluster.sh), with latency
// and packet loss. It makes two TAP devices and copies Ethernet frames between them: what
// one side sends arrives at the other after the configured one-way delay, unless it is
// dropped with the configured probability. The test cluster moves one device into a node
// (its eth0) and attaches the other to the cluster's bridge. Rate limits are the kernel's
// (tbf on the devices); delay and loss are here because netem is not in every kernel.
//
//   rmoe_linkem NODE_IF BRIDGE_IF CONFIG READY
//
// CONFIG holds "DELAY_US LOSS_PPM" (one-way delay in microseconds, loss in parts per
// million, applied to frames in both directions) and is read again on SIGHUP; a missing
// file means no delay and no loss. READY is created once both devices exist. The devices
// vanish when the process ends (SIGTERM/SIGKILL), taking the link with them.
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <deque>
#include <vector>

namespace {

constexpr size_t kMaxFrame = 65536 + 64;

struct Frame {
  int64_t due_ns;
  std::vector<unsigned char> data;
};
// Frames in flight in one direction, in arrival order (the delay is the same for all, so
// they are due in that order too).
using Queue = std::deque<Frame>;

volatile sig_atomic_t g_reload = 1;
int64_t g_delay_ns = 0;
uint32_t g_loss_ppm = 0;
const char* g_config = NULL;
uint64_t g_random = 0x9e3779b97f4a7c15ull;

void OnHangup(int signal) {
  (void)signal;
  g_reload = 1;
}

int64_t NowNs(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

uint32_t NextRandomPpm(void) {  // xorshift64*: uniform in [0, 1e6)
  g_random ^= g_random >> 12;
  g_random ^= g_random << 25;
  g_random ^= g_random >> 27;
  return (uint32_t)(((g_random * 2685821657736338717ull) >> 32) % 1000000u);
}

void Reload(void) {
  g_reload = 0;
  long long delay_us = 0;
  unsigned long loss_ppm = 0;
  FILE* file = fopen(g_config, "r");
  if (file) {
    if (fscanf(file, "%lld %lu", &delay_us, &loss_ppm) != 2 || delay_us < 0 || loss_ppm > 1000000) {
      fprintf(stderr, "rmoe_linkem: %s: expected \"DELAY_US LOSS_PPM\"; keeping the old settings\n",
              g_config);
      fclose(file);
      return;
    }
    fclose(file);
  }
  g_delay_ns = delay_us * 1000;
  g_loss_ppm = (uint32_t)loss_ppm;
}

int OpenTap(const char* name) {
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    perror("rmoe_linkem: /dev/net/tun");
    exit(1);
  }
  struct ifreq request;
  memset(&request, 0, sizeof request);
  request.ifr_flags = IFF_TAP | IFF_NO_PI;
  strncpy(request.ifr_name, name, IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &request) < 0) {
    fprintf(stderr, "rmoe_linkem: cannot make TAP device %s: %s\n", name, strerror(errno));
    exit(1);
  }
  return fd;
}

// Reads every frame `from` has, dropping some and queueing the rest.
void Receive(int from, Queue& queue, std::vector<unsigned char>& buffer) {
  for (;;) {
    const ssize_t n = read(from, buffer.data(), buffer.size());
    if (n <= 0) return;  // EAGAIN: nothing more now; errors: a device that is down
    if (g_loss_ppm && NextRandomPpm() < g_loss_ppm) continue;
    queue.push_back(Frame{NowNs() + g_delay_ns, {buffer.begin(), buffer.begin() + n}});
  }
}

// Writes the frames that are due to `to`, until it is full.
void Deliver(int to, Queue& queue) {
  const int64_t now = NowNs();
  while (!queue.empty() && queue.front().due_ns <= now) {
    const ssize_t n = write(to, queue.front().data.data(), queue.front().data.size());
    if (n < 0 && errno == EAGAIN) return;
    queue.pop_front();  // written, or refused for good (a device that is down): gone
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: rmoe_linkem NODE_IF BRIDGE_IF CONFIG READY\n");
    return 2;
  }
  g_config = argv[3];
  prctl(PR_SET_TIMERSLACK, 1UL);  // wake-ups on time for sub-millisecond delays
  // A frame due now must not wait for a busy core: ranks that poll MPI keep the cores busy,
  // and a delayed frame then waited a time slice (3 ms instead of 50 us). Real-time
  // priority where permitted (root); the work per frame is a copy.
  struct sched_param priority;
  memset(&priority, 0, sizeof priority);
  priority.sched_priority = 10;
  sched_setscheduler(0, SCHED_FIFO, &priority);
  signal(SIGPIPE, SIG_IGN);
  struct sigaction hangup;
  memset(&hangup, 0, sizeof hangup);
  hangup.sa_handler = OnHangup;
  sigaction(SIGHUP, &hangup, NULL);
  g_random ^= (uint64_t)getpid() << 17;

  const int fds[2] = {OpenTap(argv[1]), OpenTap(argv[2])};
  FILE* ready = fopen(argv[4], "w");
  if (!ready) {
    perror("rmoe_linkem: ready file");
    return 1;
  }
  fclose(ready);

  Queue queues[2];  // queues[i]: frames read from fds[i], for fds[1 - i]
  std::vector<unsigned char> buffer(kMaxFrame);
  for (;;) {
    if (g_reload) Reload();
    int64_t wait_ns = -1;
    struct pollfd polls[2];
    for (int i = 0; i < 2; ++i) {
      polls[i].fd = fds[i];
      polls[i].events = POLLIN;
      polls[i].revents = 0;
    }
    for (int i = 0; i < 2; ++i) {
      if (queues[i].empty()) continue;
      const int64_t until = queues[i].front().due_ns - NowNs();
      if (until <= 0) {
        polls[1 - i].events |= POLLOUT;  // due now: wake when the other side has room
      } else if (wait_ns < 0 || until < wait_ns) {
        wait_ns = until;
      }
    }
    struct timespec timeout = {static_cast<time_t>(wait_ns / 1000000000),
                               static_cast<long>(wait_ns % 1000000000)};
    if (ppoll(polls, 2, wait_ns < 0 ? NULL : &timeout, NULL) < 0 && errno != EINTR) {
      perror("rmoe_linkem: ppoll");
      return 1;
    }
    for (int i = 0; i < 2; ++i) {
      if (polls[i].revents & POLLIN) Receive(fds[i], queues[i], buffer);
    }
    for (int i = 0; i < 2; ++i) Deliver(fds[1 - i], queues[i]);
  }
}
