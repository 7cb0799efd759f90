#!/usr/bin/env bash
# TLS certificates for a Flower SuperLink, authentication keys for its SuperNodes and the
# SuperExec shared secret.
#
# Usage: scripts/make_certs.sh [--nodes N] [--san NAME]... [--days D] [--force] [OUT_DIR]
#
#   OUT_DIR        where the files go (default: .fedspeech/certs, git-ignored); created if missing
#   --nodes N      SuperNode key pairs to create: supernode-1 .. supernode-N (default 2)
#   --san NAME     extra subject alternative name for the SuperLink certificate, as a host name
#                  or IP address (repeatable), e.g. --san superlink --san 10.0.0.5. The
#                  certificate always covers localhost and 127.0.0.1.
#   --days D       validity of the CA and server certificate (default 365)
#   --force        regenerate everything (otherwise existing files are kept: idempotent)
#
# Writes:
#   ca.key ca.crt             self-signed certificate authority (keep ca.key private)
#   server.key server.crt     SuperLink certificate signed by the CA (SANs above)
#   supernode-K supernode-K.pub
#                             ECDSA P-384 key pair in OpenSSH format per SuperNode, the format
#                             flwr 1.42 expects: the SuperNode gets the private key
#                             (--auth-supernode-private-key), the SuperLink operator registers
#                             the .pub with `flwr supernode register supernode-K.pub <connection>`.
#   superexec.secret          32 random bytes as 64 hex digits and a newline (`openssl rand -hex
#                             32`), shared by the SuperLink and its ServerApp executors
#                             (--superexec-auth-secret-file: flwr reads the file as exact raw bytes)
#
# SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt \
#                 --ssl-keyfile server.key --enable-supernode-auth \
#                 --isolation process --superexec-auth-secret-file superexec.secret ...
# Executor:   flower-superexec --root-certificates ca.crt --superexec-auth-secret-file superexec.secret ...
# SuperNode:  flower-supernode --root-certificates ca.crt --auth-supernode-private-key supernode-1 ...
# See docs/deployment.md.
set -euo pipefail

out=.fedspeech/certs
nodes=2
days=365
force=0
sans=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --san) sans+=("$2"); shift 2 ;;
    --days) days=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make_certs: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
case "$nodes" in ''|*[!0-9]*) echo "make_certs: --nodes wants a number, got '$nodes'" >&2; exit 2 ;; esac
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make_certs: $tool not found (install openssl / openssh-client)" >&2; exit 1; }
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only
if [ "$force" = 1 ]; then
  rm -f ca.key ca.crt ca.srl server.key server.csr server.crt supernode-[0-9]* ./*.cnf superexec.secret
fi

# Subject alternative names: always localhost + 127.0.0.1, plus --san entries.
alt="DNS.1 = localhost
IP.1 = 127.0.0.1"
n_dns=1
n_ip=1
for name in "${sans[@]+"${sans[@]}"}"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
    n_ip=$((n_ip + 1)); alt+=$'\n'"IP.$n_ip = $name"
  else
    n_dns=$((n_dns + 1)); alt+=$'\n'"DNS.$n_dns = $name"
  fi
done

# 1. Certificate authority (EC P-256: small, fast, accepted by gRPC and Python's ssl).
if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/O=fedspeech/CN=fedspeech CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out ca.crt
  rm -f server.crt  # a new CA invalidates the old server certificate
  echo "make_certs: created CA $out/ca.crt"
fi

# 2. SuperLink certificate, re-issued when missing or when its SANs differ from the request.
cat > server.cnf <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
O = fedspeech
CN = localhost
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName = @alt
[alt]
$alt
EOF
wanted_sans=$(printf '%s\n' "$alt" | sed 's/^[A-Z]*\.[0-9]* = //' | sort | tr '\n' ' ')
current_sans=""
if [ -s server.crt ]; then
  current_sans=$(openssl x509 -in server.crt -noout -ext subjectAltName 2>/dev/null \
    | tail -n +2 | tr ',' '\n' | sed 's/^ *//; s/^DNS://; s/^IP Address://' | sed '/^$/d' | sort | tr '\n' ' ')
fi
if [ ! -s server.key ] || [ ! -s server.crt ] || [ "$wanted_sans" != "$current_sans" ]; then
  [ -s server.key ] || openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -config server.cnf -out server.csr
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 \
    -extfile server.cnf -extensions ext -out server.crt 2>/dev/null
  openssl verify -CAfile ca.crt server.crt >/dev/null
  echo "make_certs: created SuperLink certificate $out/server.crt (SAN: $wanted_sans)"
fi
chmod 644 ca.crt server.crt

# 3. SuperNode authentication keys (ECDSA on a NIST curve, OpenSSH format: flwr 1.42).
for k in $(seq 1 "$nodes"); do
  key="supernode-$k"
  if [ ! -s "$key" ] || [ ! -s "$key.pub" ]; then
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedspeech-$key" -f "$key"
    echo "make_certs: created SuperNode key pair $out/$key(.pub)"
  fi
done
chmod 644 ./*.pub 2>/dev/null || true

# 4. SuperExec shared secret (mode 600 like the keys; kept once it exists).
if [ ! -s superexec.secret ]; then
  openssl rand -hex 32 > superexec.secret
  echo "make_certs: created SuperExec secret $out/superexec.secret"
fi
echo "make_certs: ok ($(pwd))"
