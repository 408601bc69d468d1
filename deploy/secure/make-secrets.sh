#!/usr/bin/env sh
# Makes the files deploy/compose.secure.yaml mounts: a private CA, one certificate for the
# NATS and Redis servers (names nats, nats-1..3, redis, localhost), one client certificate,
# and random passwords for the NATS user and the Redis ACL user `tokenfan`. Run once from this
# directory (needs openssl); the files stay out of git (.gitignore). With a real CA or a
# secrets manager, put your own files under the same names instead.
set -eu
cd "$(dirname "$0")"
umask 077
days=825
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" \
  -subj "/CN=tokenfan backends CA" -keyout ca.key -out ca.crt 2>/dev/null
cat > server.ext <<EXT
subjectAltName = DNS:nats, DNS:nats-1, DNS:nats-2, DNS:nats-3, DNS:redis, DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth, clientAuth
EXT
openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=tokenfan backends" \
  -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile server.ext -out server.crt 2>/dev/null
printf 'extendedKeyUsage = clientAuth\n' > client.ext
openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=tokenfan-edge" \
  -keyout client.key -out client.csr 2>/dev/null
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile client.ext -out client.crt 2>/dev/null
rm -f server.csr client.csr server.ext client.ext ca.srl
nats_password=$(openssl rand -hex 24)
redis_password=$(openssl rand -hex 24)
printf '%s\n' "$nats_password" > nats-password
printf '%s\n' "$redis_password" > redis-password
# The NATS servers read the password from the environment (nats.conf: $NATS_PASSWORD).
printf 'NATS_PASSWORD=%s\n' "$nats_password" > nats.env
# Redis keeps only the SHA-256 of the password; redis-cli (health checks) reads REDISCLI_AUTH.
hash=$(printf '%s' "$redis_password" | openssl dgst -sha256 -r | cut -d' ' -f1)
printf 'user default off\nuser tokenfan on #%s ~tokenfan:* +@all -@dangerous\n' "$hash" > users.acl
printf 'REDISCLI_AUTH=%s\n' "$redis_password" > redis.env
# The containers run as non-root users: let them read the files (they stay out of git).
chmod 644 ca.crt server.crt client.crt users.acl
chmod 644 server.key client.key nats-password redis-password
echo "wrote CA, server and client certificates, passwords and users.acl into $(pwd)"
