# Starts a RabbitMQ node as root from the extracted /usr/lib/erlang + /usr/lib/rabbitmq.
# usage: source rabbit.sh PORT DIR NODENAME DISTPORT
RPORT=$1; RDIR=$2; RNODE=$3; RDIST=$4
mkdir -p $RDIR/mnesia $RDIR/log
echo "[]." > $RDIR/enabled_plugins
printf 'listeners.tcp.default = %s\nloopback_users = none\n' $RPORT > $RDIR/rabbitmq.conf
( export HOME=$RDIR RABBITMQ_MNESIA_BASE=$RDIR/mnesia RABBITMQ_LOG_BASE=$RDIR/log \
  RABBITMQ_ENABLED_PLUGINS_FILE=$RDIR/enabled_plugins RABBITMQ_CONFIG_FILE=$RDIR/rabbitmq.conf \
  RABBITMQ_NODENAME=$RNODE RABBITMQ_PID_FILE=$RDIR/pid RABBITMQ_DIST_PORT=$RDIST \
  RABBITMQ_NODE_PORT=$RPORT PATH=/usr/lib/erlang/bin:$PATH;
  setsid /usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/sbin/rabbitmq-server > $RDIR/server.out 2>&1 < /dev/null & )
python3 - $RPORT <<'PY'
import socket, sys, time
port = int(sys.argv[1]); deadline = time.time() + 90
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close(); print("RABBIT UP", port); sys.exit(0)
    except OSError:
        time.sleep(0.5)
print("RABBIT DID NOT START"); sys.exit(1)
PY
