#!/usr/bin/env bash
# Make sure RabbitMQ answers on the AMQP URL's host and port; start a local
# one (rabbitmq-server -detached) when it is installed but stopped.
set -euo pipefail
url="${1:-amqp://guest:guest@127.0.0.1:5672/}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%:*}"; port="${hostport##*:}"
[ "$host" = "$hostport" ] && port=5672
[ -n "$host" ] || host=127.0.0.1

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if answers; then
  echo "RabbitMQ answers on $host:$port"
  exit 0
fi
case "$host" in
  localhost|127.*|::1) ;;
  *) echo "RabbitMQ does not answer on $host:$port; start it or set COURIER_AMQP_URL" >&2; exit 1 ;;
esac
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ does not answer on $host:$port and rabbitmq-server is not installed." >&2
  echo "Install it (apt-get install rabbitmq-server) or point COURIER_AMQP_URL at a broker." >&2
  exit 1
fi
echo "starting RabbitMQ (rabbitmq-server -detached)"
rabbitmq-server -detached || true
for _ in $(seq 1 90); do
  if answers && rabbitmqctl -q await_startup >/dev/null 2>&1; then
    echo "RabbitMQ answers on $host:$port"
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up on $host:$port within 90s" >&2
exit 1
