#!/usr/bin/env bash
# Makes a development CA and one certificate for a whole Strata cluster, for TLS (docs/TLS.md): every
# coordinator and worker serves and calls with it, and checks its peers against the CA.
#
# Usage: tools/make_dev_certs.sh DIR [NAME...]
#
# Writes DIR/ca.crt, DIR/ca.key (the CA; keep its key away from the cluster), DIR/tls.crt and
# DIR/tls.key, the files a Kubernetes Secret made from them (or cert-manager's) holds. The
# certificate carries strata.internal (the name peers check: --tls_server_name=strata.internal),
# localhost, 127.0.0.1 and ::1, and each NAME given (a DNS name, or an IP address): the names clients
# dial the coordinators by. It is valid for 365 days. Run again (DIR/ca.key present), it issues a new
# certificate from the same CA and swaps the pair in at once (below): servers reading the files
# again pick it up without a restart.
# Needs openssl (Debian: openssl).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: $0 DIR [NAME...]" >&2
  exit 2
fi
dir=$1
shift
command -v openssl >/dev/null || { echo "$0: needs openssl (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077

names="DNS:strata.internal,DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for n in "$@"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then
    names+=",IP:$n"
  else
    names+=",DNS:$n"
  fi
done

if [[ ! -f $dir/ca.key || ! -f $dir/ca.crt ]]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/CN=Strata development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt"
fi

# The new pair is written into a directory of its own, then DIR/..data (which DIR/tls.crt and
# DIR/tls.key link through) is switched to it in one rename, as a Kubernetes Secret volume is
# updated: a server reading the files again sees the old pair or the new one, never a key beside
# a certificate it does not belong to (gRPC would serve such a pair, and fail every handshake
# until its next read).
new=$(mktemp -d "$dir/..certs.XXXXXX")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$new/tls.key" 2>/dev/null
openssl req -new -key "$new/tls.key" -subj "/CN=strata" -out "$tmp/tls.csr"
cat >"$tmp/ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$names
EXT
openssl x509 -req -in "$tmp/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days 365 -sha256 -extfile "$tmp/ext" \
  -out "$new/tls.crt" 2>/dev/null
chmod 755 "$new"
chmod 644 "$new/tls.crt" "$dir/ca.crt"
chmod 600 "$new/tls.key"
old=$(readlink "$dir/..data" 2>/dev/null || true)
ln -sfn "$(basename "$new")" "$dir/..data.tmp"
mv -T "$dir/..data.tmp" "$dir/..data"
for f in tls.crt tls.key; do
  if [[ ! -L $dir/$f ]]; then
    rm -f "$dir/$f"
    ln -s "..data/$f" "$dir/$f"
  fi
done
[[ -n $old && $old != "$(basename "$new")" ]] && rm -rf "${dir:?}/$old"
echo "$dir: ca.crt, tls.crt and tls.key for ${names//,/, }"
