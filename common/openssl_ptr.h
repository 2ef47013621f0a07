// Owning pointers for the OpenSSL objects Strata handles (certificates, keys, memory BIOs), each
// freed by its OpenSSL free function.
#ifndef STRATA_COMMON_OPENSSL_PTR_H_
#define STRATA_COMMON_OPENSSL_PTR_H_

#include <memory>

#include "openssl/bio.h"
#include "openssl/evp.h"
#include "openssl/x509.h"

namespace strata {

template <typename T, void (*Free)(T*)>
struct OpensslFree {
  void operator()(T* p) const { Free(p); }
};

inline void FreeBio(BIO* bio) { BIO_free(bio); }

using UniqueBio = std::unique_ptr<BIO, OpensslFree<BIO, FreeBio>>;
using UniqueX509 = std::unique_ptr<X509, OpensslFree<X509, X509_free>>;
using UniqueEvpPkey = std::unique_ptr<EVP_PKEY, OpensslFree<EVP_PKEY, EVP_PKEY_free>>;
using UniqueX509Store = std::unique_ptr<X509_STORE, OpensslFree<X509_STORE, X509_STORE_free>>;
using UniqueX509StoreCtx =
    std::unique_ptr<X509_STORE_CTX, OpensslFree<X509_STORE_CTX, X509_STORE_CTX_free>>;

}  // namespace strata

#endif  // STRATA_COMMON_OPENSSL_PTR_H_
