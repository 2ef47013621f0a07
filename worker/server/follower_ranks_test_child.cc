// The child follower_ranks_test starts in place of a worker rank: it checks that the rank's flags
// come right after argv[0], then does what its last argument says: "exit0", "exit3" or "hang".
#include <unistd.h>

#include <cstring>
#include <string>

int main(int argc, char** argv) {
  if (argc < 5 || std::strncmp(argv[1], "--tp_rank=", 10) != 0 ||
      std::strncmp(argv[2], "--tp_control_fd=", 16) != 0 ||
      std::strncmp(argv[3], "--tp_memory_fd=", 15) != 0) {
    return 64;
  }
  const std::string what = argv[argc - 1];
  if (what == "exit0") return 0;
  if (what == "exit3") return 3;
  while (true) pause();
}
