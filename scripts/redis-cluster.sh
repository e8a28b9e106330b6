#!/usr/bin/env bash
# A local Redis Cluster for imgcache's cluster suite: masters only, no replicas, on loopback,
# keeping nothing on disk.
#
#   bash scripts/redis-cluster.sh start   # prints the addresses, comma-separated, on stdout
#   bash scripts/redis-cluster.sh stop    # shuts the nodes down and removes their directories
#
#   IMGCACHE_CLUSTER_PORTS="7101 7102 7103"   the masters' ports (the default); at least 3, which is
#                                             what redis-cli --cluster create requires
#   IMGCACHE_CLUSTER_DIR                      where the nodes keep their config and logs, one
#                                             directory per port; stop removes it (default
#                                             $TMPDIR/imgcache-cluster-<first port>)
#
# Each node also listens on its port + 10000 (the cluster bus). Needs redis-server and redis-cli
# (Debian: the redis-server package, which pulls in redis-tools).
set -euo pipefail

read -r -a ports <<<"${IMGCACHE_CLUSTER_PORTS:-7101 7102 7103}"
dir=${IMGCACHE_CLUSTER_DIR:-${TMPDIR:-/tmp}/imgcache-cluster-${ports[0]}}

log() { printf 'redis-cluster.sh: %s\n' "$*" >&2; }

cli() { # cli PORT ARGS...: one command to one node, failing fast when nothing listens
	local port=$1
	shift
	redis-cli -h 127.0.0.1 -p "$port" "$@"
}

# stop shuts down only the nodes this script started (those with a directory under $dir), so that
# it never stops a Redis someone else runs on one of the ports.
stop() {
	for port in "${ports[@]}"; do
		[ -d "$dir/$port" ] || continue
		cli "$port" shutdown nosave >/dev/null 2>&1 || true
	done
	# SHUTDOWN returns before the process has exited; wait for each pid so that a start right
	# after a stop does not find the ports still taken.
	for port in "${ports[@]}"; do
		local pidfile=$dir/$port/redis.pid
		[ -f "$pidfile" ] || continue
		local pid
		pid=$(cat "$pidfile")
		for _ in $(seq 1 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
	done
	rm -rf "$dir"
}

check_free() {
	if [ "${#ports[@]}" -lt 3 ]; then
		log "need at least 3 ports for 3 masters, got: ${ports[*]}"
		exit 1
	fi
	for port in "${ports[@]}"; do
		if cli "$port" ping >/dev/null 2>&1; then
			log "something already answers on 127.0.0.1:$port; stop it first (or set IMGCACHE_CLUSTER_PORTS)"
			exit 1
		fi
	done
}

start() {
	rm -rf "$dir"
	local addrs=()
	for port in "${ports[@]}"; do
		mkdir -p "$dir/$port"
		redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
			--cluster-config-file "$dir/$port/nodes.conf" --cluster-node-timeout 5000 \
			--save "" --appendonly no --dir "$dir/$port" \
			--daemonize yes --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log"
		addrs+=("127.0.0.1:$port")
	done
	for port in "${ports[@]}"; do
		local up=""
		for _ in $(seq 1 100); do
			if cli "$port" ping 2>/dev/null | grep -q PONG; then
				up=1
				break
			fi
			sleep 0.1
		done
		if [ -z "$up" ]; then
			log "127.0.0.1:$port did not start; its log:"
			cat "$dir/$port/redis.log" >&2 || true
			exit 1
		fi
	done
	redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || {
		cat "$dir/create.log" >&2
		exit 1
	}
	# --cluster create returns once the slots are assigned; each node reports cluster_state:ok only
	# when gossip has told it where every slot lives.
	for port in "${ports[@]}"; do
		local ok=""
		for _ in $(seq 1 300); do
			if cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
				ok=1
				break
			fi
			sleep 0.1
		done
		if [ -z "$ok" ]; then
			log "127.0.0.1:$port: cluster_state is not ok after 30 s:"
			cli "$port" cluster info >&2 || true
			exit 1
		fi
	done
	log "cluster ok: ${addrs[*]} (dir $dir)"
	(
		IFS=,
		echo "${addrs[*]}"
	)
}

case "${1:-}" in
start)
	check_free
	# A start that fails half-way leaves nothing running.
	trap stop EXIT
	start
	trap - EXIT
	;;
stop) stop ;;
*)
	echo "usage: $0 start|stop" >&2
	exit 2
	;;
esac
