#!/usr/bin/env bash
# Create the Secret goinfer-secrets that the manifests read, with fresh credentials: an SM2 key
# pair (from `goinfer keygen`), one appId with its appSecret, and the Redis password. Nothing is
# written to disk; the client's credentials are printed once, on stderr.
#
# Usage: deploy/kubernetes/create-secret.sh [kubectl create options]
#   deploy/kubernetes/create-secret.sh -n goinfer                     # create it in namespace goinfer
#   deploy/kubernetes/create-secret.sh --dry-run=client -o yaml       # only show it
#
# Environment:
#   REDIS_PASSWORD           the password of the Redis you use (default: a new random one, which
#                            deploy/kubernetes/redis sets on its Redis)
#   REDIS_SENTINEL_PASSWORD  overlays/sentinel: the Sentinels' own password ("" if they have none)
#   GOINFER                  how to run goinfer (default: goinfer; or: "docker run --rm goinfer:0.1.0")
#   KUBECTL                  how to run kubectl (default: kubectl)
#
# Equivalent by hand (the key names are what the manifests read):
#   kubectl create secret generic goinfer-secrets \
#     --from-literal=GOINFER_API__SM2PRIVATEKEY="<SM2PrivateKey from goinfer keygen>" \
#     --from-literal=GOINFER_API__APPIDSECRET='{"<APPID>": "<APPSECRET>"}' \
#     --from-literal=GOINFER_SERVER__REDISPASSWD="<Redis password>" \
#     [--from-literal=GOINFER_SERVER__REDISSENTINELPASSWD="<Sentinel password>"]
set -euo pipefail

GOINFER=${GOINFER:-goinfer}
KUBECTL=${KUBECTL:-kubectl}

random_hex() {  # N random bytes as upper-case hex, as `goinfer init` makes appIds and appSecrets
    head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F'
}

keygen=$($GOINFER keygen) || { echo "create-secret.sh: '$GOINFER keygen' failed (set GOINFER)" >&2; exit 2; }
sm2_private_key=$(printf '%s\n' "$keygen" | sed -n 's/^SM2PrivateKey: //p')
sm2_public_key=$(printf '%s\n' "$keygen" | sed -n 's/^public key (x||y): //p')
if [ -z "$sm2_private_key" ]; then
    echo "create-secret.sh: '$GOINFER keygen' printed no SM2PrivateKey" >&2
    exit 2
fi
app_id=$(random_hex 16)
app_secret=$(random_hex 16)
redis_password=${REDIS_PASSWORD:-$(random_hex 24 | tr 'A-F' 'a-f')}

literals=(
    --from-literal=GOINFER_API__SM2PRIVATEKEY="$sm2_private_key"
    --from-literal=GOINFER_API__APPIDSECRET="{\"$app_id\": \"$app_secret\"}"
    --from-literal=GOINFER_SERVER__REDISPASSWD="$redis_password"
)
if [ -n "${REDIS_SENTINEL_PASSWORD+set}" ]; then
    literals+=(--from-literal=GOINFER_SERVER__REDISSENTINELPASSWD="$REDIS_SENTINEL_PASSWORD")
fi

$KUBECTL create secret generic goinfer-secrets "${literals[@]}" "$@"

cat >&2 <<EOF
goinfer-secrets: the credentials of goinfer's clients (shown once; also in the Secret):
  appId:           $app_id
  appSecret:       $app_secret
  SM2 private key: $sm2_private_key   (clients that sign with SM2)
  SM2 public key:  $sm2_public_key   (x||y)
EOF
