#include "worker/server/kv_transfer.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/tcp.h"
#include "openssl/err.h"
#include "openssl/ssl.h"

namespace strata {
namespace {

constexpr char kMagic[4] = {'S', 'T', 'K', 'V'};
constexpr uint32_t kVersion = 1;
constexpr uint8_t kBlockFrame = 1;
constexpr uint8_t kEndFrame = 2;
constexpr uint32_t kMaxSecretBytes = 4096;
constexpr uint32_t kMaxRequestBytes = 1 << 20;
constexpr uint32_t kMaxMessageBytes = 64 << 10;
// A send that makes no progress for this long (a caller that stopped reading) fails.
constexpr int kSendTimeoutS = 10;
// Longest a connection may take to be made.
constexpr absl::Duration kConnectTimeout = absl::Milliseconds(300);

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t GetU64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The caller's "HOST:PORT" of a source (HOST may be bracketed IPv6).
absl::Status SplitAddress(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  int p = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &p) || p < 0 ||
      p > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV transfer address \"", address, "\" is not HOST:PORT"));
  }
  *host = address.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  *port = address.substr(colon + 1);
  return absl::OkStatus();
}

void SetTimeout(int fd, int option, absl::Duration d) {
  d = std::max(d, absl::Milliseconds(1));
  timeval tv = absl::ToTimeval(d);
  setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
}

// A new SSL on `fd` from `source`'s context, or null. Bulk bytes go through it, so both ways
// move many records a system call: reads take what has arrived (read-ahead into a 256 KiB
// buffer) and writes gather records in a 256 KiB buffer, flushed after each frame (SendAll).
constexpr int kTlsBufferBytes = 256 << 10;
SSL* NewSsl(TlsContextSource* source, int fd, const std::atomic<int64_t>* read_deadline_ns) {
  std::shared_ptr<SSL_CTX> ctx = source->Get();
  SSL* ssl = SSL_new(ctx.get());
  BIO* rbio = NewSocketBioWithoutSigpipe(fd, read_deadline_ns);
  BIO* wsock = NewSocketBioWithoutSigpipe(fd);
  BIO* wbuf = BIO_new(BIO_f_buffer());
  if (ssl == nullptr || rbio == nullptr || wsock == nullptr || wbuf == nullptr) {
    if (ssl != nullptr) SSL_free(ssl);
    for (BIO* b : {rbio, wsock, wbuf}) {
      if (b != nullptr) BIO_free(b);
    }
    return nullptr;
  }
  BIO_set_write_buffer_size(wbuf, kTlsBufferBytes);
  SSL_set_bio(ssl, rbio, BIO_push(wbuf, wsock));  // the SSL owns the chain
  SSL_set_read_ahead(ssl, 1);
  SSL_set_default_read_buffer_len(ssl, kTlsBufferBytes);
  return ssl;
}

}  // namespace

// A connection's bytes: the socket itself, or TLS over it (`ssl`, owned). Reads and writes block
// up to the socket's timeouts (SO_RCVTIMEO, SO_SNDTIMEO) either way.
class KvTransferWire {
 public:
  explicit KvTransferWire(int fd) : fd_(fd), ssl_(nullptr) {}
  // TLS over `fd`, an SSL from `tls`'s context (ssl() null when OpenSSL could not make one).
  KvTransferWire(int fd, TlsContextSource* tls)
      : fd_(fd), ssl_(NewSsl(tls, fd, &read_deadline_ns_)) {}
  ~KvTransferWire() {
    if (ssl_ != nullptr) SSL_free(ssl_);
  }
  KvTransferWire(const KvTransferWire&) = delete;
  KvTransferWire& operator=(const KvTransferWire&) = delete;

  int fd() const { return fd_; }
  bool tls() const { return ssl_ != nullptr; }
  SSL* ssl() const { return ssl_; }
  // Reads (TLS's, record by record) are not made past `t`: see NewSocketBioWithoutSigpipe.
  void set_read_deadline(absl::Time t) {
    read_deadline_ns_.store(absl::ToUnixNanos(t), std::memory_order_relaxed);
  }

  // As recv(2): bytes read, 0 at the end, -1 with errno (EAGAIN: the timeout passed).
  ssize_t Recv(void* buf, size_t n) {
    if (ssl_ == nullptr) return recv(fd_, buf, n, 0);
    ERR_clear_error();
    errno = 0;
    const int r = SSL_read(ssl_, buf, static_cast<int>(std::min<size_t>(n, 1 << 30)));
    if (r > 0) return r;
    const int e = SSL_get_error(ssl_, r);
    if (e == SSL_ERROR_ZERO_RETURN) return 0;
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
      errno = EAGAIN;
      return -1;
    }
    const bool eof = (e == SSL_ERROR_SYSCALL && errno == 0) ||
                     ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING;
    ERR_clear_error();
    if (eof) return 0;  // closed without close_notify
    if (errno == 0) errno = EPROTO;
    return -1;
  }

  // Sends all of `iov` (advancing it); false on error or timeout (errno says which).
  bool SendAll(iovec* iov, int n) {
    if (ssl_ == nullptr) return SendAllPlain(iov, n);
    for (; n > 0; ++iov, --n) {
      const char* p = static_cast<const char*>(iov->iov_base);
      size_t left = iov->iov_len;
      while (left > 0) {
        ERR_clear_error();
        const int w = SSL_write(ssl_, p, static_cast<int>(std::min<size_t>(left, 1 << 30)));
        if (w > 0) {
          p += w;
          left -= static_cast<size_t>(w);
          continue;
        }
        const int e = SSL_get_error(ssl_, w);
        ERR_clear_error();
        errno = e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ ? EAGAIN
                : errno != 0                                          ? errno
                                                                      : EPIPE;
        return false;
      }
    }
    // The frame's records, gathered in the write buffer (NewSsl), out now.
    if (BIO_flush(SSL_get_wbio(ssl_)) != 1) {
      if (errno == 0) errno = EPIPE;
      return false;
    }
    return true;
  }

  // TLS's close_notify (best effort), before the socket's shutdown.
  void CloseNotify() {
    if (ssl_ != nullptr) {
      ERR_clear_error();
      SSL_shutdown(ssl_);
      BIO_flush(SSL_get_wbio(ssl_));
      ERR_clear_error();
    }
  }

 private:
  bool SendAllPlain(iovec* iov, int n);

  const int fd_;
  std::atomic<int64_t> read_deadline_ns_{std::numeric_limits<int64_t>::max()};  // before ssl_
  SSL* const ssl_;
};

namespace {

// The TLS handshake on `wire`'s socket (blocking, with timeouts) by `deadline`: OK, or why not.
absl::Status Handshake(KvTransferWire& wire, bool server, absl::Time deadline) {
  SSL* const ssl = wire.ssl();
  const int fd = wire.fd();
  wire.set_read_deadline(deadline);
  SetTimeout(fd, SO_RCVTIMEO, std::min(deadline - absl::Now(), absl::Milliseconds(100)));
  while (true) {
    ERR_clear_error();
    const int rc = server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (rc == 1) return absl::OkStatus();
    const int e = SSL_get_error(ssl, rc);
    if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) && absl::Now() < deadline) {
      SetTimeout(fd, SO_RCVTIMEO, std::min(deadline - absl::Now(), absl::Milliseconds(100)));
      continue;
    }
    const bool timed_out = e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
    const std::string errors = OpensslErrorText();
    std::string why = timed_out ? "timed out" : "";
    if (!errors.empty()) absl::StrAppend(&why, why.empty() ? "" : "; ", errors);
    if (why.empty()) why = "the connection closed";
    return absl::UnavailableError(absl::StrCat("TLS handshake: ", why));
  }
}

}  // namespace

bool KvTransferWire::SendAllPlain(iovec* iov, int n) {
  const int fd = fd_;
  while (n > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    const ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    size_t left = static_cast<size_t>(w);
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

namespace {

bool SendString(KvTransferWire& wire, const std::string& s) {
  iovec iov{const_cast<char*>(s.data()), s.size()};
  return wire.SendAll(&iov, 1);
}

// Reads exactly n bytes by `deadline`: OK, or why not (EOF counts as UNAVAILABLE).
// (A read waits at most kReadWait before the deadline is looked at again: one timeout set per
// call, not per read, on the copy's path.)
constexpr absl::Duration kReadWait = absl::Milliseconds(100);
absl::Status RecvAll(KvTransferWire& wire, void* buf, size_t n, const char* what,
                     absl::Time deadline) {
  const int fd = wire.fd();
  wire.set_read_deadline(deadline);
  char* p = static_cast<char*>(buf);
  auto timed_out = [&] {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return true;
    SetTimeout(fd, SO_RCVTIMEO, std::min(left, kReadWait));
    return false;
  };
  if (timed_out()) return absl::DeadlineExceededError(absl::StrCat("timed out reading ", what));
  while (n > 0) {
    const ssize_t r = wire.Recv(p, n);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      // A peer that trickles bytes in never lets a read time out.
      if (n > 0 && absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("timed out reading ", what));
      }
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!timed_out()) continue;
      return absl::DeadlineExceededError(absl::StrCat("timed out reading ", what));
    }
    return absl::UnavailableError(r == 0
                                      ? absl::StrCat("the connection closed before ", what)
                                      : absl::StrCat("reading ", what, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

std::string EndFrame(const absl::Status& status) {
  std::string out(1, static_cast<char>(kEndFrame));
  PutU32(&out, static_cast<uint32_t>(status.code()));
  const std::string message(status.message().substr(0, kMaxMessageBytes));
  PutU32(&out, static_cast<uint32_t>(message.size()));
  out += message;
  return out;
}

}  // namespace

v1::KvBlockData ToKvBlockData(Engine::KvBlockCopy copy) {
  v1::KvBlockData data;
  data.set_block_hash(copy.key.hash);
  data.set_cache_namespace(copy.key.cache_namespace);
  data.set_payload(std::move(copy.payload));
  return data;
}

Engine::KvBlockCopy FromKvBlockData(v1::KvBlockData& data) {
  Engine::KvBlockCopy copy;
  copy.key.hash = data.block_hash();
  copy.key.cache_namespace = data.cache_namespace();
  copy.payload = std::move(*data.mutable_payload());
  return copy;
}

// One accepted connection as the exporter's sink. Owned jointly by its connection thread (which
// sends what is queued, in Pump) and the exporter (until it ends the copy with Finish or Abort);
// the fd is closed when both are done with it. Thread contract: the KvExportSink methods from
// the exporter's thread, Pump from the connection thread, Stop from the server's.
class KvTransferServer::Connection final : public KvExportSink {
 public:
  explicit Connection(int fd) : fd_(fd), wire_(std::make_unique<KvTransferWire>(fd)) {}
  ~Connection() override {
    wire_.reset();
    close(fd_);
  }
  // TLS from here on (the handshake still to make): false when no SSL could be made. Before any
  // other use of the connection.
  bool UseTls(TlsContextSource* tls) {
    wire_ = std::make_unique<KvTransferWire>(fd_, tls);
    return wire_->ssl() != nullptr;
  }
  KvTransferWire& wire() { return *wire_; }

  bool Write(Engine::KvBlockCopy copy) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_ || ended_ || stopping_) return false;
    queue_.push_back(std::move(copy));
    cv_.notify_all();
    return true;
  }
  size_t num_queued() override {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.size();
  }
  bool cancelled() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_ || stopping_) return true;
    }
    // The client closed its end (it sends nothing after its request).
    pollfd p{fd_, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
  }
  void Finish(absl::Status status) override { End(std::move(status), /*drop=*/false); }
  void Abort(absl::Status status) override { End(std::move(status), /*drop=*/true); }
  void WakeWhenBelow(size_t blocks, std::function<void()> wake) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.size() >= blocks) {
        wake_below_ = blocks;
        wake_ = std::move(wake);
        return;
      }
      wake_ = nullptr;
    }
    wake();
  }

  // Sends what is queued until the owner ends the copy (or the server stops).
  void Pump() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty() || ended_; });
      if (stopping_) return;
      if (!queue_.empty()) {
        Engine::KvBlockCopy copy = std::move(queue_.front());
        queue_.pop_front();
        std::function<void()> wake;
        if (wake_ != nullptr && queue_.size() < wake_below_) wake = std::exchange(wake_, nullptr);
        lock.unlock();
        if (wake != nullptr) wake();
        const bool ok = SendBlock(copy);
        lock.lock();
        if (!ok) {
          failed_ = true;
          queue_.clear();
        }
        continue;
      }
      // Ended, and everything queued went out.
      const bool failed = failed_;
      const absl::Status end = end_;
      lock.unlock();
      if (!failed) SendEnd(end);
      return;
    }
  }

  void SendEnd(const absl::Status& status) {
    if (SendString(*wire_, EndFrame(status))) {
      wire_->CloseNotify();
      shutdown(fd_, SHUT_WR);
    }
  }

  void Stop() {
    shutdown(fd_, SHUT_RDWR);  // first: it breaks a send in progress
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }

  int fd() const { return fd_; }

 private:
  void End(absl::Status status, bool drop) {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return;
    ended_ = true;
    end_ = std::move(status);
    if (drop) queue_.clear();
    cv_.notify_all();
  }

  bool SendBlock(const Engine::KvBlockCopy& copy) {
    std::string head(1, static_cast<char>(kBlockFrame));
    PutU64(&head, copy.key.hash);
    PutU64(&head, copy.key.cache_namespace);
    PutU64(&head, copy.payload.size());
    iovec iov[2] = {{head.data(), head.size()},
                    {const_cast<char*>(copy.payload.data()), copy.payload.size()}};
    return wire_->SendAll(iov, 2);
  }

  const int fd_;
  std::unique_ptr<KvTransferWire> wire_;  // set before the connection is shared
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Engine::KvBlockCopy> queue_;  // guarded by mu_
  bool ended_ = false;                     // guarded by mu_
  bool failed_ = false;                    // guarded by mu_
  bool stopping_ = false;                  // guarded by mu_
  absl::Status end_;                       // guarded by mu_
  size_t wake_below_ = 0;                  // guarded by mu_
  std::function<void()> wake_;             // guarded by mu_
};

absl::StatusOr<std::unique_ptr<KvTransferServer>> KvTransferServer::Start(
    KvTransferServerOptions options) {
  // An empty host is every address, as getaddrinfo's passive wildcard ("[::]", or 0.0.0.0 on a
  // host without IPv6).
  std::string listen = options.listen_address;
  if (!listen.empty() && listen.front() == ':') listen = "[::]" + listen;
  ASSIGN_OR_RETURN(ListenSocket socket, ListenTcp(listen, "--kv_transfer_listen", 64));
  // Accept blocks (Stop shuts the socket down to end it).
  const int flags = fcntl(socket.fd.get(), F_GETFL);
  if (flags < 0 || fcntl(socket.fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return absl::UnavailableError(absl::StrCat("--kv_transfer_listen: fcntl: ", strerror(errno)));
  }
  const int bound_port = socket.port;
  const int fd = socket.fd.release();
  std::unique_ptr<KvTransferServer> server(new KvTransferServer(std::move(options)));
  server->listener_ = fd;
  server->port_ = bound_port;
  server->acceptor_ = std::thread([s = server.get()] { s->Accept(); });
  LOG(INFO) << "KV transfers on port " << bound_port
            << (server->options_.tls != nullptr ? " (TLS)" : "");
  return server;
}

KvTransferServer::KvTransferServer(KvTransferServerOptions options)
    : options_(std::move(options)) {}

KvTransferServer::~KvTransferServer() { Stop(); }

void KvTransferServer::Stop() {
  // A second caller waits for the first to finish.
  std::lock_guard<std::mutex> stopping(stop_mu_);
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    shutdown(listener_, SHUT_RDWR);
    for (const std::shared_ptr<Connection>& c : live_) c->Stop();
  }
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Served& s : threads_) threads.push_back(std::move(s.thread));
    threads_.clear();
  }
  for (std::thread& t : threads) t.join();
  close(listener_);
}

void KvTransferServer::Accept() {
  while (true) {
    const int fd = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    std::vector<std::thread> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) {
        if (fd >= 0) close(fd);
        return;
      }
      if (fd < 0) {
        // Pending network errors and short memory pass; a listener that is broken is shut, so
        // that callers are refused (and copy over gRPC) rather than left waiting.
        if (errno == EBADF || errno == EINVAL || errno == ENOTSOCK) {
          LOG(ERROR) << "KV transfers: accept failed: " << std::strerror(errno)
                     << "; no more KV transfers on port " << port_;
          shutdown(listener_, SHUT_RDWR);
          return;
        }
      } else if (active_.load() >= 2 * options_.max_connections) {
        close(fd);  // far past the limit: not even a thread to say why
      } else {
        active_.fetch_add(1);
        auto finished = std::make_shared<std::atomic<bool>>(false);
        try {
          threads_.push_back({std::thread([this, fd, finished] {
                                Serve(fd);
                                active_.fetch_sub(1);
                                finished->store(true);
                              }),
                              finished});
        } catch (const std::system_error& e) {  // out of threads
          LOG(WARNING) << "KV transfers: no thread for a connection: " << e.what();
          active_.fetch_sub(1);
          close(fd);
        }
      }
      // Threads that finished are joined as new connections come.
      for (auto it = threads_.begin(); it != threads_.end();) {
        if (it->finished->load()) {
          done.push_back(std::move(it->thread));
          it = threads_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (std::thread& t : done) t.join();
    if (fd < 0) absl::SleepFor(absl::Milliseconds(10));
  }
}

void KvTransferServer::Serve(int fd) {
  auto conn = std::make_shared<Connection>(fd);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    live_.push_back(conn);
  }
  auto forget = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(std::find(live_.begin(), live_.end(), conn));
  };
  auto refuse = [&](absl::Status status) {
    conn->SendEnd(status);
    // What the caller sent beyond what was read is drained before the close (closing with
    // unread bytes resets the connection, which can lose the answer on the caller's side).
    const absl::Time until = absl::Now() + absl::Seconds(1);
    conn->wire().set_read_deadline(until);  // (TLS reads keep to a deadline of their own)
    char sink[4096];
    for (size_t drained = 0; drained < (1u << 20) && absl::Now() < until;) {
      SetTimeout(fd, SO_RCVTIMEO, until - absl::Now());
      const ssize_t r = conn->wire().Recv(sink, sizeof sink);
      if (r <= 0) break;
      drained += static_cast<size_t>(r);
    }
    forget();
  };
  SetTimeout(fd, SO_SNDTIMEO, absl::Seconds(kSendTimeoutS));
  // The end frame goes out at once after the last block (not held back for an acknowledgement).
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // The whole request by then (the TLS handshake too), however slowly it trickles in.
  const absl::Time by = absl::Now() + options_.request_timeout;
  if (options_.tls != nullptr) {
    if (!conn->UseTls(options_.tls)) return forget();
    // The handshake's writes by then too; the copy's sends afterwards get the usual timeout.
    SetTimeout(fd, SO_SNDTIMEO, by - absl::Now());
    if (absl::Status s = Handshake(conn->wire(), /*server=*/true, by); !s.ok()) {
      VLOG(1) << "KV transfers: " << s.message();
      if (options_.on_tls_failure) options_.on_tls_failure();
      return forget();
    }
    SetTimeout(fd, SO_SNDTIMEO, absl::Seconds(kSendTimeoutS));
  }
  KvTransferWire& wire = conn->wire();
  unsigned char head[12];
  if (!RecvAll(wire, head, sizeof head, "the request", by).ok()) return forget();
  if (std::memcmp(head, kMagic, 4) != 0 || GetU32(head + 4) != kVersion) {
    return refuse(absl::InvalidArgumentError(
        absl::StrCat("not a KV transfer request (this port speaks KV transfer protocol version ",
                     kVersion, "; gRPC is on the worker's --listen port)")));
  }
  const uint32_t secret_len = GetU32(head + 8);
  if (secret_len > kMaxSecretBytes) {
    return refuse(absl::InvalidArgumentError(
        absl::StrCat("secret: ", secret_len, " bytes; at most ", kMaxSecretBytes)));
  }
  std::string secret(secret_len, '\0');
  unsigned char len4[4];
  if (!RecvAll(wire, secret.data(), secret.size(), "the secret", by).ok() ||
      !RecvAll(wire, len4, 4, "the request", by).ok()) {
    return forget();
  }
  const uint32_t request_len = GetU32(len4);
  if (request_len > kMaxRequestBytes) {
    return refuse(absl::InvalidArgumentError(
        absl::StrCat("request: ", request_len, " bytes; at most ", kMaxRequestBytes)));
  }
  std::string bytes(request_len, '\0');
  if (!RecvAll(wire, bytes.data(), bytes.size(), "the request", by).ok()) return forget();
  if (options_.cluster_secret != nullptr) {
    const int match = options_.cluster_secret->Match(secret);
    if (match < 0) {
      if (options_.on_unauthenticated) options_.on_unauthenticated();
      return refuse(absl::UnauthenticatedError(
          "this worker copies KV blocks for its cluster's workers only: the connection lacks the "
          "cluster secret (--cluster_secret_file)"));
    }
    if (match > 0 && options_.on_other_secret) options_.on_other_secret();
  }
  v1::FetchKvBlocksRequest request;
  if (!request.ParseFromString(bytes)) {
    return refuse(absl::InvalidArgumentError("request: not a FetchKvBlocksRequest"));
  }
  if (active_.load() > options_.max_connections) {
    return refuse(absl::ResourceExhaustedError(
        absl::StrCat("this worker serves at most ", options_.max_connections,
                     " KV transfers at once; the caller computes its blocks instead")));
  }
  options_.on_request(request, conn);
  conn->Pump();
  forget();
}

void KvTransferCall::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
}

absl::Status KvTransferCall::Run(const std::string& address, const std::string& secret,
                                 const v1::FetchKvBlocksRequest& request, absl::Time deadline,
                                 std::vector<Engine::KvBlockCopy>* blocks) {
  return Run(address, secret, request, deadline,
             [blocks](Engine::KvBlockCopy copy) { blocks->push_back(std::move(copy)); });
}

absl::Status KvTransferCall::Run(const std::string& address, const std::string& secret,
                                 const v1::FetchKvBlocksRequest& request, absl::Time deadline,
                                 absl::FunctionRef<void(Engine::KvBlockCopy)> on_block) {
  connected_ = false;
  refused_ = false;
  std::string host, port;
  if (absl::Status s = SplitAddress(address, &host, &port); !s.ok()) {
    return absl::UnavailableError(s.message());
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("KV transfer address ", address, ": ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) {
        close(fd);
        freeaddrinfo(found);
        return absl::CancelledError("the copy was cancelled");
      }
      fd_ = fd;
    }
    // A port that a firewall or NetworkPolicy silently drops would otherwise take the copy's whole
    // time; the caller then copies over gRPC.
    SetTimeout(fd, SO_SNDTIMEO, std::min(deadline - absl::Now(), kConnectTimeout));
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      refused_ = errno == ECONNREFUSED;
      why = errno == EINPROGRESS || errno == EAGAIN
                ? absl::StrCat("no answer within ", absl::FormatDuration(kConnectTimeout))
                : std::strerror(errno);
      std::lock_guard<std::mutex> lock(mu_);
      fd_ = -1;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) return absl::CancelledError("the copy was cancelled");
    return absl::UnavailableError(absl::StrCat("cannot connect to ", address, ": ", why));
  }
  SetTimeout(fd, SO_SNDTIMEO, deadline - absl::Now());
  // TLS: the handshake first. One that fails reached no export at the source: the caller may copy
  // another way (over gRPC, which says why if the source refuses TLS too).
  KvTransferWire plain(fd);
  std::unique_ptr<KvTransferWire> secured;
  if (tls_ != nullptr) {
    secured = std::make_unique<KvTransferWire>(fd, tls_);
    SSL* ssl = secured->ssl();
    absl::Status handshake = absl::InternalError("SSL_new failed");
    const std::string name = tls_server_name_.empty() ? host : tls_server_name_;
    if (ssl != nullptr && name.empty()) {
      handshake = absl::InvalidArgumentError("no name to check the source's certificate against");
    } else if (ssl != nullptr) {
      handshake = CheckServerName(ssl, name);
      if (handshake.ok()) handshake = Handshake(*secured, /*server=*/false, deadline);
    }
    if (!handshake.ok()) {
      secured.reset();
      std::lock_guard<std::mutex> lock(mu_);
      fd_ = -1;
      close(fd);
      if (cancelled_) return absl::CancelledError("the copy was cancelled");
      return absl::UnavailableError(absl::StrCat(address, ": ", handshake.message()));
    }
  }
  KvTransferWire& wire = secured != nullptr ? *secured : plain;
  connected_ = true;
  bool refused_before_a_frame = false;
  auto status = [&]() -> absl::Status {
    std::string hello(kMagic, 4);
    PutU32(&hello, kVersion);
    PutU32(&hello, static_cast<uint32_t>(secret.size()));
    hello += secret;
    const std::string serialized = request.SerializeAsString();
    PutU32(&hello, static_cast<uint32_t>(serialized.size()));
    hello += serialized;
    if (!SendString(wire, hello)) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return absl::DeadlineExceededError("timed out sending the request");
      }
      return absl::UnavailableError(absl::StrCat("sending the request: ", std::strerror(errno)));
    }
    // What the request allows: as many blocks as it names, and its bytes (one block at least).
    const int64_t most_blocks = request.block_hashes_size();
    const uint64_t most_bytes =
        request.max_bytes() == 0 ? (uint64_t{64} << 20) : request.max_bytes();
    int64_t blocks = 0;
    uint64_t bytes = 0;
    for (bool first = true;; first = false) {
      unsigned char type = 0;
      if (absl::Status s = RecvAll(wire, &type, 1, "the next frame", deadline); !s.ok()) {
        // In TLS 1.3 the source checks this end's certificate after the handshake has ended
        // here: its refusal (an alert) arrives in place of the first frame. Nothing reached an
        // export, and the caller may copy another way.
        if (first && wire.tls() && absl::IsUnavailable(s)) refused_before_a_frame = true;
        return s;
      }
      if (type == kEndFrame) {
        unsigned char end[8];
        if (absl::Status s = RecvAll(wire, end, sizeof end, "the end frame", deadline); !s.ok()) {
          return s;
        }
        const uint32_t code = GetU32(end);
        const uint32_t len = GetU32(end + 4);
        if (len > kMaxMessageBytes ||
            code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
          return absl::DataLossError("a malformed end frame");
        }
        std::string message(len, '\0');
        if (absl::Status s = RecvAll(wire, message.data(), len, "the end frame", deadline);
            !s.ok()) {
          return s;
        }
        return absl::Status(static_cast<absl::StatusCode>(code), message);
      }
      if (type != kBlockFrame) {
        return absl::DataLossError(absl::StrCat("a frame of unknown type ", int{type}));
      }
      unsigned char head[24];
      if (absl::Status s = RecvAll(wire, head, sizeof head, "a block frame", deadline); !s.ok()) {
        return s;
      }
      const uint64_t size = GetU64(head + 16);
      // (Past the request's bytes only by the one block a call always may send.)
      if (size > kMaxPayloadBytes || ++blocks > most_blocks ||
          (bytes > 0 && bytes + size > most_bytes)) {
        return absl::DataLossError(absl::StrCat("a block frame of ", size, " bytes after ",
                                                blocks - 1, " blocks (", bytes,
                                                " bytes) is more than the request asked for"));
      }
      bytes += size;
      Engine::KvBlockCopy copy;
      copy.key.hash = GetU64(head);
      copy.key.cache_namespace = GetU64(head + 8);
      // Grown as the bytes come, so that a frame that lies about its size costs no more memory
      // than was sent.
      for (size_t have = 0; have < size;) {
        const size_t step = std::min<size_t>(size - have, size_t{4} << 20);
        copy.payload.resize(have + step);
        if (absl::Status s = RecvAll(wire, copy.payload.data() + have, step, "a block", deadline);
            !s.ok()) {
          return s;
        }
        have += step;
      }
      on_block(std::move(copy));
    }
  }();
  if (refused_before_a_frame) connected_ = false;
  bool cancelled = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    fd_ = -1;
    cancelled = cancelled_;
    if (cancelled_) status = absl::CancelledError("the copy was cancelled");
  }
  if (cancelled) {
    // A reset, not a close: the source, perhaps blocked sending into a window this end no longer
    // reads (TLS has read its records out), learns at once that nobody is there.
    linger reset{1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
  }
  secured.reset();
  close(fd);
  return status;
}

}  // namespace strata
