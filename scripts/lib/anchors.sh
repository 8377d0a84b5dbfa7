# shellcheck shell=bash
# Shared helpers for the benchmark scripts (sourced, not executed).
#
# Every background process is started with start_bg, which runs it under
# setsid (its own session and process group) so that cleanup_bg can kill
# whole pipelines, and records it in BG_PIDS. Callers install:
#   trap cleanup_bg EXIT

BG_PIDS=()
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}   # seconds any one step may take

log() { printf '%s\n' "$*" >&2; }

now() { date +%s.%N; }

# Float arithmetic: calc 'expression' (awk syntax), prints the result.
calc() { awk "BEGIN { printf \"%s\", $1 }" </dev/null; }

# parse_bytes 1G | 256M | 64KiB | 1048576  ->  number of bytes (binary units)
parse_bytes() {
    local v=$1 n unit
    if [[ $v =~ ^([0-9]+)([KMGT]?)(i?B)?$ ]]; then
        n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
    else
        log "bad byte count: '$v' (use e.g. 1048576, 256M, 1G)"; return 1
    fi
    case $unit in
        K) n=$((n << 10)) ;; M) n=$((n << 20)) ;;
        G) n=$((n << 30)) ;; T) n=$((n << 40)) ;;
    esac
    printf '%s\n' "$n"
}

# Start "$@" (a program, not a shell function) in the background in its own
# process group; sets LAST_BG to its pid, which is also the group id.
start_bg() {
    setsid "$@" &
    LAST_BG=$!
    BG_PIDS+=("$LAST_BG")
}

# Kill one background job (its whole process group) if still alive.
kill_bg() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

cleanup_bg() {
    local pid
    for pid in "${BG_PIDS[@]}"; do kill_bg "$pid"; done
    BG_PIDS=()
}

# Is something listening on 127.0.0.1:port (TCP)? Never connects, so a
# one-shot listener (socat without fork, `pool listen --once`) is not consumed.
port_listening() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]
    else
        # /proc/net/tcp: local address is hex IP:PORT, state 0A = LISTEN
        local hex
        hex=$(printf ':%04X' "$port")
        grep -q "^ *[0-9]*: [0-9A-F]*$hex [0-9A-F:]* 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
    fi
}

# wait_port PORT [PID] [SECONDS=5]: wait until PORT is listening; fail early
# if PID (the process expected to listen) has died.
wait_port() {
    local port=$1 pid=${2:-} secs=${3:-5} i
    for ((i = 0; i < secs * 50; i++)); do
        port_listening "$port" && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited before listening on port $port"
            return 1
        fi
        sleep 0.02
    done
    log "timed out after ${secs}s waiting for port $port"
    return 1
}

# pick_port VAR: store in VAR a random free TCP port in 20000-32000 (below the kernel's ephemeral range, so outgoing connections never hold it) that
# this shell has not handed out before. (Sets a variable rather than printing
# so that the record of handed-out ports survives: no subshell.)
PICKED_PORTS=" "
pick_port() {
    local _pp_port _pp_try   # names unlikely to shadow the caller's VAR
    for ((_pp_try = 0; _pp_try < 200; _pp_try++)); do
        _pp_port=$((20000 + RANDOM % 12001))
        [[ $PICKED_PORTS == *" $_pp_port "* ]] && continue
        port_listening "$_pp_port" && continue
        PICKED_PORTS+="$_pp_port "
        printf -v "$1" '%s' "$_pp_port"
        return 0
    done
    log "could not find a free port"; return 1
}

# make_cert DIR: throwaway self-signed cert DIR/cert.pem + DIR/key.pem
make_cert() {
    local dir=$1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 1 -subj /CN=localhost -keyout "$dir/key.pem" -out "$dir/cert.pem" \
        >/dev/null 2>&1
}

# start_stunnel_pair DIR CLIENT_PORT SERVER_PORT TARGET_PORT
# TLS 1.3 only: plain TCP on CLIENT_PORT -> stunnel client -> TLS on
# SERVER_PORT -> stunnel server -> plain TCP to TARGET_PORT. Both run in the
# foreground (as background jobs) and are torn down by cleanup_bg.
start_stunnel_pair() {
    local dir=$1 p1=$2 p2=$3 p3=$4
    [[ -f $dir/cert.pem ]] || make_cert "$dir" || { log "openssl cert generation failed"; return 1; }
    cat >"$dir/stunnel-server.conf" <<EOF
foreground = yes
pid =
debug = 6
[server]
accept = 127.0.0.1:$p2
connect = 127.0.0.1:$p3
cert = $dir/cert.pem
key = $dir/key.pem
sslVersionMin = TLSv1.3
EOF
    cat >"$dir/stunnel-client.conf" <<EOF
foreground = yes
pid =
debug = 6
[client]
client = yes
accept = 127.0.0.1:$p1
connect = 127.0.0.1:$p2
sslVersionMin = TLSv1.3
CAfile = $dir/cert.pem
verifyPeer = yes
EOF
    start_bg stunnel "$dir/stunnel-server.conf" 2>"$dir/stunnel-server.log"
    local spid=$LAST_BG
    start_bg stunnel "$dir/stunnel-client.conf" 2>"$dir/stunnel-client.log"
    local cpid=$LAST_BG
    wait_port "$p2" "$spid" && wait_port "$p1" "$cpid"
}

# start_socat_pair CLIENT_PORT SERVER_PORT TARGET_PORT: two plain socat
# relays with default options (what a user would type), forking per connection.
start_socat_pair() {
    local p1=$1 p2=$2 p3=$3
    start_bg socat TCP-LISTEN:"$p2",bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:"$p3"
    local spid=$LAST_BG
    start_bg socat TCP-LISTEN:"$p1",bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:"$p2"
    local cpid=$LAST_BG
    wait_port "$p2" "$spid" && wait_port "$p1" "$cpid"
}
