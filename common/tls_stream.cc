#include "common/tls_stream.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "common/tcp.h"
#include "openssl/err.h"
#include "openssl/ssl.h"
#include "openssl/x509v3.h"

namespace strata {
namespace {

using UniqueSsl = std::unique_ptr<SSL, void (*)(SSL*)>;

std::string OpensslErrors() {
  const std::string text = OpensslErrorText();
  return text.empty() ? "no detail" : text;
}

// "http/1.1" when the client offers it; else no ALPN (the client may still speak HTTP/1.1).
int SelectHttp11(SSL*, const unsigned char** out, unsigned char* out_len, const unsigned char* in,
                 unsigned int in_len, void*) {
  static constexpr unsigned char kHttp11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, out_len, kHttp11, sizeof(kHttp11), in, in_len) ==
      OPENSSL_NPN_NEGOTIATED) {
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
  }
  return SSL_TLSEXT_ERR_NOACK;
}

absl::StatusOr<std::shared_ptr<SSL_CTX>> MakeContext(const TlsOptions& o, TlsRole role,
                                                     bool alpn_http11) {
  std::shared_ptr<SSL_CTX> ctx(
      SSL_CTX_new(role == TlsRole::kServer ? TLS_server_method() : TLS_client_method()),
      SSL_CTX_free);
  if (ctx == nullptr) return absl::InternalError("SSL_CTX_new: " + OpensslErrors());
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION);
  // SSL_write may take part of a buffer, and the rest is offered again from where it moved to.
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (!o.cert_file.empty()) {
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), o.cert_file.c_str()) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_cert: ", o.cert_file, ": ", OpensslErrors()));
    }
    if (SSL_CTX_use_PrivateKey_file(ctx.get(), o.key_file.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx.get()) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_key: ", o.key_file, ": ", OpensslErrors()));
    }
  }
  // Peers' certificates: the server's always (a client), the client's as client_auth says.
  const bool verify = role == TlsRole::kClient || o.client_auth != TlsClientAuth::kNone;
  if (verify) {
    if (!o.ca_file.empty()) {
      if (SSL_CTX_load_verify_locations(ctx.get(), o.ca_file.c_str(), nullptr) != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("--tls_ca: ", o.ca_file, ": ", OpensslErrors()));
      }
    } else if (SSL_CTX_set_default_verify_paths(ctx.get()) != 1) {
      return absl::InternalError("the system's CA certificates: " + OpensslErrors());
    }
    SSL_CTX_set_verify(
        ctx.get(),
        SSL_VERIFY_PEER | (role == TlsRole::kServer && o.client_auth == TlsClientAuth::kRequire
                               ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                               : 0),
        nullptr);
  }
  if (role == TlsRole::kServer && alpn_http11) {
    SSL_CTX_set_alpn_select_cb(ctx.get(), &SelectHttp11, nullptr);
  }
  return ctx;
}

// The files' identity now (inode, size, modification time), to tell a replaced file.
std::string Stamp(const TlsOptions& o) {
  std::string out;
  for (const std::string& path : {o.cert_file, o.key_file, o.ca_file}) {
    if (path.empty()) continue;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return "";
    absl::StrAppend(&out, st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                    st.st_mtim.tv_nsec, ";");
  }
  return out;
}

// A socket BIO whose writes never raise SIGPIPE: OpenSSL's own writes with write(2), and a
// client gone before (or while) the server writes would kill the process. The descriptor is not
// owned (the bridge's thread closes it).
struct SocketBioState {
  int fd;
  const std::atomic<int64_t>* read_deadline_ns;  // or null
};

int NoSigpipeWrite(BIO* b, const char* data, int len) {
  const int fd = static_cast<SocketBioState*>(BIO_get_data(b))->fd;
  const ssize_t n = ::send(fd, data, static_cast<size_t>(len), MSG_NOSIGNAL);
  BIO_clear_retry_flags(b);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
  return static_cast<int>(n);
}

int NoSigpipeRead(BIO* b, char* out, int len) {
  const SocketBioState* st = static_cast<SocketBioState*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  // Past the deadline no read is made: a peer that trickles a record in a byte at a time cannot
  // hold SSL_read (which reads until its record is whole) beyond it.
  if (st->read_deadline_ns != nullptr &&
      absl::GetCurrentTimeNanos() >= st->read_deadline_ns->load(std::memory_order_relaxed)) {
    BIO_set_retry_read(b);
    errno = EAGAIN;
    return -1;
  }
  const ssize_t n = ::recv(st->fd, out, static_cast<size_t>(len), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(b);
  return static_cast<int>(n);
}

long NoSigpipeCtrl(BIO*, int cmd, long, void*) {
  return cmd == BIO_CTRL_FLUSH ? 1 : 0;  // writes are not buffered; nothing else is asked of it
}

int NoSigpipeCreate(BIO* b) {
  BIO_set_init(b, 1);
  return 1;
}

int NoSigpipeDestroy(BIO* b) {
  delete static_cast<SocketBioState*>(BIO_get_data(b));
  BIO_set_data(b, nullptr);
  return 1;
}

}  // namespace

const BIO_METHOD* NoSigpipeSocket() {
  static const BIO_METHOD* const method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "strata socket");
    CHECK(m != nullptr);
    BIO_meth_set_write(m, &NoSigpipeWrite);
    BIO_meth_set_read(m, &NoSigpipeRead);
    BIO_meth_set_ctrl(m, &NoSigpipeCtrl);
    BIO_meth_set_create(m, &NoSigpipeCreate);
    BIO_meth_set_destroy(m, &NoSigpipeDestroy);
    return m;
  }();
  return method;
}

BIO* NewSocketBioWithoutSigpipe(int fd, const std::atomic<int64_t>* read_deadline_ns) {
  BIO* bio = BIO_new(NoSigpipeSocket());
  if (bio != nullptr) BIO_set_data(bio, new SocketBioState{fd, read_deadline_ns});
  return bio;
}

namespace {

bool SetNonBlocking(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && ::fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK)) == 0;
}

// How long the pump goes on once the server is done with a connection (it closed its end, or
// sent its last bytes and close_notify): to deliver what is left and hear the client's
// close_notify. A client that neither reads nor answers (an idle pooled connection) does not
// hold the server's connection thread longer.
constexpr absl::Duration kFinishGrace = absl::Seconds(2);

// Moves bytes between the TLS connection `conn` (its `ssl`) and the socket pair's end `pair`
// until both directions are done, either side fails, `wake_fd` turns readable (the server is
// stopping), or kFinishGrace after `done_fd` turns readable (the bridge is going) or after
// close_notify went out.
void Pump(SSL* ssl, int conn, int pair, int wake_fd, int done_fd) {
  std::string to_app, to_tls;  // read from one side, not yet written to the other
  bool client_done = false;    // the client sent close_notify: nothing more comes from it
  bool server_done = false;    // the server's end shut for writing: nothing more comes from it
  bool app_shut = false, close_sent = false;
  bool server_gone = false;  // the bridge is going: nothing reads the client's bytes any more
  absl::Time finish_by = absl::InfiniteFuture();
  char buf[16384];
  while (true) {
    bool progress = false;
    short conn_events = 0, pair_events = 0;
    // Client to server.
    if (!client_done && to_app.empty()) {
      ERR_clear_error();
      const int n = SSL_read(ssl, buf, sizeof(buf));
      if (n > 0) {
        to_app.assign(buf, static_cast<size_t>(n));
        progress = true;
      } else {
        const int e = SSL_get_error(ssl, n);
        if (e == SSL_ERROR_WANT_READ) {
          conn_events |= POLLIN;
        } else if (e == SSL_ERROR_WANT_WRITE) {
          conn_events |= POLLOUT;
        } else if (e == SSL_ERROR_ZERO_RETURN) {
          client_done = progress = true;
        } else {
          break;  // gone without close_notify, or a TLS error
        }
      }
    }
    if (!to_app.empty()) {
      const ssize_t w = ::send(pair, to_app.data(), to_app.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        to_app.erase(0, static_cast<size_t>(w));
        progress = true;
      } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        pair_events |= POLLOUT;
      } else if (!(w < 0 && errno == EINTR)) {
        // The server no longer reads (it closed its end): what the client sends is dropped,
        // and what the server wrote before still goes out.
        to_app.clear();
        client_done = app_shut = progress = true;
      }
    }
    if (client_done && to_app.empty() && !app_shut) {
      ::shutdown(pair, SHUT_WR);  // the server reads the end of the request stream
      app_shut = progress = true;
    }
    // Server to client.
    if (!server_done && to_tls.empty()) {
      const ssize_t r = ::recv(pair, buf, sizeof(buf), MSG_DONTWAIT);
      if (r > 0) {
        to_tls.assign(buf, static_cast<size_t>(r));
        progress = true;
      } else if (r == 0 || errno == ECONNRESET) {
        // The end of the server's bytes (a reset: it closed with the client's bytes unread).
        server_done = progress = true;
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        pair_events |= POLLIN;
      } else if (errno != EINTR) {
        break;
      }
    }
    if (!to_tls.empty()) {
      ERR_clear_error();
      const int w = SSL_write(ssl, to_tls.data(), static_cast<int>(to_tls.size()));
      if (w > 0) {
        to_tls.erase(0, static_cast<size_t>(w));
        progress = true;
      } else {
        const int e = SSL_get_error(ssl, w);
        if (e == SSL_ERROR_WANT_WRITE) {
          conn_events |= POLLOUT;
        } else if (e == SSL_ERROR_WANT_READ) {
          conn_events |= POLLIN;
        } else {
          break;
        }
      }
    }
    if (server_done && to_tls.empty() && !close_sent) {
      ERR_clear_error();
      const int r = SSL_shutdown(ssl);  // close_notify
      if (r < 0 && SSL_get_error(ssl, r) == SSL_ERROR_WANT_WRITE) {
        conn_events |= POLLOUT;  // the alert part sent: the rest, before the FIN
      } else {
        ::shutdown(conn, SHUT_WR);
        close_sent = progress = true;
        finish_by = std::min(finish_by, absl::Now() + kFinishGrace);
      }
    }
    // Both directions done; or the server's bytes all out and nobody left to read the client's
    // (an idle connection closed: its client's close_notify is not waited for).
    if (close_sent && (app_shut || server_gone)) break;
    if (progress) continue;
    if (absl::Now() >= finish_by) break;
    // Only what a side is waited for is polled (a descriptor of -1 is left out): a hang-up,
    // which poll reports whatever was asked, then shows in the next read or write, not as a
    // wake-up with nothing to do.
    pollfd fds[4] = {{conn_events != 0 ? conn : -1, conn_events, 0},
                     {pair_events != 0 ? pair : -1, pair_events, 0},
                     {done_fd, POLLIN, 0},
                     {wake_fd, POLLIN, 0}};
    const int timeout_ms = finish_by == absl::InfiniteFuture()
                               ? -1
                               : static_cast<int>(std::max<int64_t>(
                                     1, absl::ToInt64Milliseconds(finish_by - absl::Now()) + 1));
    const int rc = ::poll(fds, wake_fd >= 0 ? 4 : 3, timeout_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (wake_fd >= 0 && fds[3].revents != 0) break;  // the server is stopping
    if (fds[2].revents != 0) {
      // The bridge is going (its end closed): what is left gets kFinishGrace.
      finish_by = std::min(finish_by, absl::Now() + kFinishGrace);
      server_gone = true;
      fds[2].fd = -1;
      done_fd = -1;
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<TlsContextSource>> TlsContextSource::Create(
    const TlsOptions& options, TlsRole role, bool alpn_http11) {
  if (role == TlsRole::kServer && options.cert_file.empty()) {
    return absl::InvalidArgumentError("a TLS server needs --tls_cert and --tls_key");
  }
  RETURN_IF_ERROR(CheckTlsFiles(options).status());
  std::unique_ptr<TlsContextSource> a(new TlsContextSource(options, role, alpn_http11));
  ASSIGN_OR_RETURN(std::shared_ptr<SSL_CTX> ctx, MakeContext(options, role, alpn_http11));
  absl::MutexLock lock(&a->mu_);
  a->context_ = std::move(ctx);
  a->stamp_ = Stamp(options);
  a->checked_ = absl::Now();
  return a;
}

TlsContextSource::TlsContextSource(TlsOptions options, TlsRole role, bool alpn_http11)
    : options_(std::move(options)), role_(role), alpn_http11_(alpn_http11) {}

TlsContextSource::~TlsContextSource() = default;

absl::StatusOr<std::unique_ptr<TlsAcceptor>> TlsAcceptor::Create(const TlsOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<TlsContextSource> source,
                   TlsContextSource::Create(options, TlsRole::kServer, /*alpn_http11=*/true));
  return std::unique_ptr<TlsAcceptor>(new TlsAcceptor(std::move(source)));
}

TlsAcceptor::TlsAcceptor(std::unique_ptr<TlsContextSource> source) : source_(std::move(source)) {}

TlsAcceptor::~TlsAcceptor() = default;

std::shared_ptr<SSL_CTX> TlsContextSource::Get() {
  std::string before;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Now() - checked_ < options_.reload_interval) return context_;
    checked_ = absl::Now();
    before = stamp_;
  }
  // The files looked at, and read when changed, without the lock (other connections go on).
  const std::string now = Stamp(options_);
  if (now.empty() || now == before) {
    absl::MutexLock lock(&mu_);
    return context_;
  }
  // The same checks as at start (an expired replacement is not taken), then the context.
  absl::Status checked = CheckTlsFiles(options_).status();
  absl::StatusOr<std::shared_ptr<SSL_CTX>> fresh =
      checked.ok() ? MakeContext(options_, role_, alpn_http11_) : checked;
  absl::MutexLock lock(&mu_);
  if (fresh.ok()) {
    context_ = *std::move(fresh);
    stamp_ = now;
    LOG(INFO) << "TLS: " << (options_.cert_file.empty() ? options_.ca_file : options_.cert_file)
              << " read again";
  } else {
    // Half replaced (a new certificate beside the old key), say: the context before serves on,
    // and the files are looked at again next time.
    LOG(WARNING) << "TLS: the changed files cannot be used yet, keeping the ones before: "
                 << fresh.status().message();
  }
  return context_;
}

// The TLS handshake on the non-blocking `conn` (`server`: accept, else connect) by `deadline`,
// cut short by `wake_fd`; then a bridge whose thread pumps the connection.
struct TlsBridgeFactory {
  static absl::StatusOr<std::unique_ptr<TlsBridge>> Make(UniqueSsl ssl, UniqueFd conn, bool server,
                                                         int wake_fd, absl::Time deadline);
};

absl::StatusOr<std::unique_ptr<TlsBridge>> TlsBridgeFactory::Make(UniqueSsl ssl, UniqueFd conn,
                                                                  bool server, int wake_fd,
                                                                  absl::Time deadline) {
  // Each record out at once: a stream's small records would otherwise wait for the peer's
  // delayed acknowledgement of the one before (Nagle), 40 ms a token event.
  const int one = 1;
  ::setsockopt(conn.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  while (true) {
    ERR_clear_error();
    const int rc = server ? SSL_accept(ssl.get()) : SSL_connect(ssl.get());
    if (rc == 1) break;
    const int e = SSL_get_error(ssl.get(), rc);
    const short events = e == SSL_ERROR_WANT_READ    ? POLLIN
                         : e == SSL_ERROR_WANT_WRITE ? POLLOUT
                                                     : 0;
    if (events == 0) {
      return absl::UnavailableError(
          absl::StrCat("TLS handshake failed: ",
                       e == SSL_ERROR_SYSCALL ? "the peer went away" : OpensslErrors()));
    }
    if (!WaitFor(conn.get(), events, wake_fd, deadline)) {
      return absl::UnavailableError("TLS handshake not completed in time");
    }
  }
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    return absl::UnavailableError(absl::StrCat("socketpair: ", strerror(errno)));
  }
  std::unique_ptr<TlsBridge> bridge(new TlsBridge());
  bridge->local_ = UniqueFd(pair[0]);
  UniqueFd remote(pair[1]);
  bridge->protocol_ = absl::StrCat(SSL_get_version(ssl.get()), " ",
                                   SSL_CIPHER_get_name(SSL_get_current_cipher(ssl.get())));
  bridge->done_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!bridge->done_.valid()) {
    return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(errno)));
  }
  try {
    bridge->thread_ = std::thread(
        [ssl = std::move(ssl), conn = std::move(conn), remote = std::move(remote), wake_fd,
         done = bridge->done_.get()] { Pump(ssl.get(), conn.get(), remote.get(), wake_fd, done); });
  } catch (const std::system_error& e) {
    return absl::UnavailableError(absl::StrCat("cannot start a TLS thread: ", e.what()));
  }
  return bridge;
}

// A new SSL from `ctx` on the socket `fd` (made non-blocking).
static absl::StatusOr<UniqueSsl> NewNonBlockingSsl(SSL_CTX* ctx, int fd) {
  if (!SetNonBlocking(fd, true)) {
    return absl::UnavailableError(absl::StrCat("fcntl: ", strerror(errno)));
  }
  UniqueSsl ssl(SSL_new(ctx), SSL_free);
  BIO* bio = NewSocketBioWithoutSigpipe(fd);
  if (ssl == nullptr || bio == nullptr) {
    if (bio != nullptr) BIO_free(bio);
    return absl::InternalError("SSL_new: " + OpensslErrors());
  }
  SSL_set_bio(ssl.get(), bio, bio);  // the SSL owns it
  return ssl;
}

absl::StatusOr<std::unique_ptr<TlsBridge>> TlsAcceptor::Accept(UniqueFd conn, int wake_fd,
                                                               absl::Time deadline) {
  std::shared_ptr<SSL_CTX> ctx = source_->Get();
  ASSIGN_OR_RETURN(UniqueSsl ssl, NewNonBlockingSsl(ctx.get(), conn.get()));
  return TlsBridgeFactory::Make(std::move(ssl), std::move(conn), /*server=*/true, wake_fd,
                                deadline);
}

absl::Status CheckServerName(SSL* ssl, const std::string& name) {
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) == 1) return absl::OkStatus();
  ERR_clear_error();
  if (X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0) != 1 ||
      SSL_set_tlsext_host_name(ssl, name.c_str()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("TLS: cannot check the name ", name));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TlsBridge>> TlsConnect(TlsContextSource& client, UniqueFd conn,
                                                      const std::string& server_name,
                                                      absl::Time deadline) {
  if (server_name.empty()) {
    return absl::InvalidArgumentError("TLS: no name to check the server's certificate against");
  }
  std::shared_ptr<SSL_CTX> ctx = client.Get();
  ASSIGN_OR_RETURN(UniqueSsl ssl, NewNonBlockingSsl(ctx.get(), conn.get()));
  RETURN_IF_ERROR(CheckServerName(ssl.get(), server_name));
  return TlsBridgeFactory::Make(std::move(ssl), std::move(conn), /*server=*/false,
                                /*wake_fd=*/-1, deadline);
}

TlsBridge::~TlsBridge() {
  local_.reset();  // the pump sees the server's end closed...
  const uint64_t one = 1;
  // ... and, told so, delivers what is left within its grace period.
  if (done_.valid() && ::write(done_.get(), &one, sizeof(one)) != sizeof(one)) {
    LOG(ERROR) << "TLS: cannot tell a connection's pump to finish: " << strerror(errno);
  }
  if (thread_.joinable()) thread_.join();
}

}  // namespace strata
