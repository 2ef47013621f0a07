// Runs a fuzz target (tests/fuzz/fuzz_target.h) without libFuzzer:
//
//   NAME_fuzz_test [--runs=N] [--seed=S] [--max_len=B] [--timeout_s=T] [--slow_s=W]
//                  [--dict=FILE] PATH...
//
// PATH is a corpus file or a directory of them. Every corpus input runs first, as it is; then N
// inputs (default 1000, or none when every PATH is a file: a replay), each a corpus input changed
// by one to four random edits (a bit flipped, a byte set to one that parsers treat specially, bytes
// inserted, erased or repeated, a word of the dictionary inserted, a number swapped for an extreme
// one, or the tail of another input spliced on), cut to B bytes (default 4096). The same seed gives
// the same inputs, so a failure in CI replays. An input that crashes the target, fails a FUZZ_CHECK
// or runs past T seconds (default 20) is written to $TEST_UNDECLARED_OUTPUTS_DIR (else the working
// directory) as crash-HASH, and its path printed: `NAME_fuzz_test that/path` replays it alone, and
// so does the libFuzzer build (tools/fuzz.sh). With --slow_s, every input that takes longer than W
// seconds is written there too, as slow-HASH (inputs that cost a server too much time).
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) __attribute__((weak));
extern "C" void __sanitizer_set_death_callback(void (*callback)()) __attribute__((weak));

namespace {

struct Options {
  int64_t runs = -1;  // -1: 1000, or 0 for a replay of files
  uint64_t seed = 1;
  size_t max_len = 4096;
  double timeout_s = 20;
  double slow_s = 0;
  std::string dict;
  std::vector<std::string> paths;
};

// The input being run, for the crash handlers. Written by the main thread between runs only;
// never destroyed (a sanitizer's report at exit may still call SaveInput).
std::string& g_input = *new std::string;
char g_out_dir[2048] = ".";
std::atomic<int64_t> g_started_ns{0};  // 0 between runs
std::atomic<bool> g_reported{false};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Say(const char* s) { (void)!write(2, s, std::strlen(s)); }

// Writes g_input to g_out_dir/KIND-HASH and says where. Async-signal-safe.
void SaveInputAs(const char* kind) {
  uint64_t h = 1469598103934665603ull;
  for (char c : g_input) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  char path[2200];
  size_t n = 0;
  for (const char* p = g_out_dir; *p != '\0' && n < 2100; ++p) path[n++] = *p;
  path[n++] = '/';
  for (const char* p = kind; *p != '\0'; ++p) path[n++] = *p;
  path[n++] = '-';
  for (int i = 60; i >= 0; i -= 4) path[n++] = "0123456789abcdef"[(h >> i) & 15];
  path[n] = '\0';
  const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    (void)!write(fd, g_input.data(), g_input.size());
    close(fd);
  }
  Say(kind[0] == 'c' ? "fuzz_driver: the failing input is in "
                     : "fuzz_driver: a slow input is in ");
  Say(path);
  Say("\n");
}

// Saves the input being run, if one is (not, say, for LeakSanitizer's report at exit).
void SaveInput() {
  if (g_started_ns.load() == 0 || g_reported.exchange(true)) return;
  SaveInputAs("crash");
}

void OnSignal(int sig) {
  SaveInput();
  signal(sig, SIG_DFL);
  raise(sig);
}

// The watchdog's signal to the main thread, which is then inside the target with g_input
// steady (or between inputs, where the watchdog looks again).
void OnTimeout(int) {
  if (g_started_ns.load() == 0) return;
  Say("fuzz_driver: an input ran past the time limit\n");
  SaveInput();
  signal(SIGABRT, SIG_DFL);
  abort();
}

// Handlers run on a stack of their own, so that a stack overflow (deep recursion in a parser)
// still saves its input.
alignas(16) char g_signal_stack[1 << 16];

void Handle(int sig, void (*handler)(int)) {
  static const bool stacked = [] {
    stack_t ss{};
    ss.ss_sp = g_signal_stack;
    ss.ss_size = sizeof g_signal_stack;
    return sigaltstack(&ss, nullptr) == 0;
  }();
  struct sigaction sa {};
  sa.sa_handler = handler;
  sa.sa_flags = stacked ? SA_ONSTACK : 0;
  sigemptyset(&sa.sa_mask);
  sigaction(sig, &sa, nullptr);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// libFuzzer's dictionary format: one "word" a line (optionally name="word"), with \\, \" and \xNN
// escapes; # starts a comment.
std::vector<std::string> ReadDict(const std::string& path) {
  std::vector<std::string> words;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    const size_t open = line.find('"');
    const size_t close = line.rfind('"');
    if (line.empty() || line[0] == '#' || open == std::string::npos || close <= open) continue;
    std::string w;
    for (size_t i = open + 1; i < close; ++i) {
      if (line[i] == '\\' && i + 1 < close) {
        if (line[i + 1] == 'x' && i + 3 < close) {
          const std::string hex = line.substr(i + 2, 2);
          char* end = nullptr;
          const long v = std::strtol(hex.c_str(), &end, 16);
          if (end != hex.c_str() + 2) {
            std::fprintf(stderr, "fuzz_driver: %s: bad \\x escape in %s\n", path.c_str(),
                         line.c_str());
            std::exit(2);
          }
          w.push_back(static_cast<char>(v));
          i += 3;
        } else {
          w.push_back(line[++i]);
        }
      } else {
        w.push_back(line[i]);
      }
    }
    if (!w.empty()) words.push_back(w);
  }
  return words;
}

std::vector<std::string> CorpusFiles(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  for (const std::string& p : paths) {
    if (std::filesystem::is_directory(p)) {
      std::vector<std::string> in_dir;
      for (const auto& e : std::filesystem::recursive_directory_iterator(p)) {
        if (e.is_regular_file()) in_dir.push_back(e.path().string());
      }
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (std::filesystem::is_regular_file(p)) {
      files.push_back(p);
    } else {
      std::fprintf(stderr, "fuzz_driver: no corpus file or directory %s\n", p.c_str());
      std::exit(2);
    }
  }
  return files;
}

constexpr char kSpecialBytes[] = {
    '\0', '\x7f', '\x80', '\xbf', '\xc0', '\xe2', '\xf0', '\xff', '"',  '\\', '{', '}', '[', ']',
    ',',  ':',    '0',    '9',    '-',    '.',    'e',    ' ',    '\n', '\t', '<', '>', '|', '*',
    '+',  '?',    '(',    ')',    '%',    '#',    '/',    '\'',   '=',  '^',  '$', '~'};
const char* const kNumbers[] = {"0",
                                "-1",
                                "1e308",
                                "-1e308",
                                "1e-400",
                                "4294967296",
                                "2147483648",
                                "-2147483649",
                                "9223372036854775808",
                                "18446744073709551616",
                                "65536",
                                "0.5",
                                "1e100000",
                                "-0",
                                "99999999999999999999999"};

// One to four random edits of `s`, cut to max_len bytes.
std::string Mutate(std::string s, const std::vector<std::string>& corpus,
                   const std::vector<std::string>& dict, std::mt19937_64& rng, size_t max_len) {
  auto below = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 9) {
      case 0:
        if (!s.empty()) s[below(s.size())] ^= static_cast<char>(1 << (rng() % 8));
        break;
      case 1:
        if (!s.empty()) s[below(s.size())] = kSpecialBytes[below(sizeof kSpecialBytes)];
        break;
      case 2: {
        std::string bytes;
        for (size_t n = 1 + below(8); n > 0; --n) {
          bytes.push_back(rng() % 4 == 0 ? static_cast<char>(rng())
                                         : static_cast<char>(' ' + rng() % 95));
        }
        s.insert(below(s.size() + 1), bytes);
        break;
      }
      case 3:
        if (!s.empty()) {
          const size_t at = below(s.size());
          s.erase(at, 1 + below(std::min<size_t>(16, s.size() - at)));
        }
        break;
      case 4:
        if (!s.empty()) {
          const size_t at = below(s.size());
          const std::string piece = s.substr(at, 1 + below(std::min<size_t>(64, s.size() - at)));
          for (size_t n = 1 + (rng() % 8 == 0 ? below(32) : 0); n > 0; --n) {
            s.insert(below(s.size() + 1), piece);
          }
        }
        break;
      case 5:
        if (!dict.empty()) {
          s.insert(below(s.size() + 1), dict[below(dict.size())]);
        } else {
          s.insert(below(s.size() + 1), 1, kSpecialBytes[below(sizeof kSpecialBytes)]);
        }
        break;
      case 6: {
        // A run of digits from a random place on, or anywhere when there is none.
        size_t at = s.find_first_of("0123456789", below(s.size() + 1));
        const std::string number = kNumbers[below(sizeof kNumbers / sizeof kNumbers[0])];
        if (at == std::string::npos) {
          s.insert(below(s.size() + 1), number);
        } else {
          size_t end = at;
          while (end < s.size() && (std::isdigit(static_cast<unsigned char>(s[end])) ||
                                    s[end] == '.' || s[end] == 'e')) {
            ++end;
          }
          s.replace(at, end - at, number);
        }
        break;
      }
      case 7: {
        const std::string& other = corpus[below(corpus.size())];
        s = s.substr(0, below(s.size() + 1)) + other.substr(below(other.size() + 1));
        break;
      }
      default:
        if (s.size() >= 2) std::swap(s[below(s.size())], s[below(s.size())]);
        break;
    }
  }
  if (s.size() > max_len) s.resize(max_len);
  return s;
}

bool ParseFlag(const char* arg, const char* name, std::string* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (ParseFlag(argv[i], "--runs", &v)) {
      o.runs = std::stoll(v);
    } else if (ParseFlag(argv[i], "--seed", &v)) {
      o.seed = std::stoull(v);
    } else if (ParseFlag(argv[i], "--max_len", &v)) {
      o.max_len = std::stoull(v);
    } else if (ParseFlag(argv[i], "--timeout_s", &v)) {
      o.timeout_s = std::stod(v);
    } else if (ParseFlag(argv[i], "--slow_s", &v)) {
      o.slow_s = std::stod(v);
    } else if (ParseFlag(argv[i], "--dict", &v)) {
      o.dict = v;
    } else if (argv[i][0] == '-') {
      std::fprintf(stderr, "fuzz_driver: unknown flag %s\n", argv[i]);
      std::exit(2);
    } else {
      o.paths.push_back(argv[i]);
    }
  }
  if (o.paths.empty()) {
    std::fprintf(stderr,
                 "usage: %s [--runs=N] [--seed=S] [--max_len=B] [--timeout_s=T] [--dict=FILE] "
                 "PATH...\n",
                 argv[0]);
    std::exit(2);
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = ParseOptions(argc, argv);
  if (o.runs < 0) {
    bool replay = true;
    for (const std::string& p : o.paths) replay = replay && !std::filesystem::is_directory(p);
    o.runs = replay ? 0 : 1000;
  }
  if (const char* dir = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
    std::snprintf(g_out_dir, sizeof g_out_dir, "%s", dir);
  }
  if (__sanitizer_set_death_callback != nullptr) {
    __sanitizer_set_death_callback(SaveInput);  // AddressSanitizer's reports
  } else {
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) Handle(sig, OnSignal);
  }
  Handle(SIGABRT, OnSignal);  // CHECK, FUZZ_CHECK
  Handle(SIGALRM, OnTimeout);
  if (LLVMFuzzerInitialize != nullptr) LLVMFuzzerInitialize(&argc, &argv);

  std::vector<std::string> corpus;
  for (const std::string& f : CorpusFiles(o.paths)) corpus.push_back(ReadFile(f));
  if (corpus.empty()) corpus.push_back("");
  const std::vector<std::string> dict =
      o.dict.empty() ? std::vector<std::string>{} : ReadDict(o.dict);

  const pthread_t main_thread = pthread_self();
  std::thread watchdog([&o, main_thread] {
    while (true) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const int64_t started = g_started_ns.load();
      if (started != 0 && static_cast<double>(NowNs() - started) / 1e9 > o.timeout_s) {
        // (The main thread saves the input and aborts: a debugger stops with the target's frames
        // in its stack.)
        pthread_kill(main_thread, SIGALRM);
        std::this_thread::sleep_for(std::chrono::seconds(1));
      }
    }
  });
  watchdog.detach();

  std::mt19937_64 rng(o.seed);
  double slowest_s = 0;
  size_t total_bytes = 0;
  const int64_t begin = NowNs();
  const int64_t total = static_cast<int64_t>(corpus.size()) + o.runs;
  for (int64_t i = 0; i < total; ++i) {
    const bool from_corpus = i < static_cast<int64_t>(corpus.size());
    std::string next = from_corpus
                           ? corpus[static_cast<size_t>(i)]
                           : Mutate(corpus[rng() % corpus.size()], corpus, dict, rng, o.max_len);
    g_input = std::move(next);
    total_bytes += g_input.size();
    const int64_t start = NowNs();
    g_started_ns.store(start);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(g_input.data()), g_input.size());
    g_started_ns.store(0);
    const double took_s = static_cast<double>(NowNs() - start) / 1e9;
    slowest_s = std::max(slowest_s, took_s);
    if (o.slow_s > 0 && took_s > o.slow_s) SaveInputAs("slow");
  }
  std::printf(
      "fuzz_driver: %zu corpus inputs and %lld mutated ones (seed %llu, %zu bytes in all) "
      "in %.2f s; the slowest took %.3f s\n",
      corpus.size(), static_cast<long long>(o.runs), static_cast<unsigned long long>(o.seed),
      total_bytes, static_cast<double>(NowNs() - begin) / 1e9, slowest_s);
  return 0;
}
