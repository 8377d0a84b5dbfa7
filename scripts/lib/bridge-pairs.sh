# shellcheck shell=bash
# Bridge pairs for scripts/bench-bridge (sourced after scripts/lib/anchors.sh,
# whose start_bg / wait_port / kill_bg they use). Every pair has the same
# shape: plain TCP on FRONT -> client-side bridge -> (encrypted) hop on MIDDLE
# -> server-side bridge -> plain TCP to TARGET. The stunnel and socat pairs
# are start_stunnel_pair and start_socat_pair in anchors.sh.

# start_spiped_pair DIR FRONT MIDDLE TARGET
# spiped -e (encrypt) listens on FRONT and connects to MIDDLE; spiped -d
# (decrypt) listens on MIDDLE and connects to TARGET. Both share DIR/spiped.key
# (32 random bytes). Default handshake, i.e. with the Diffie-Hellman exchange
# (perfect forward secrecy; -f would skip it). -F keeps them in the foreground
# (no daemon, no pidfile). -n 0 lifts the default cap of 100 simultaneous
# connections. -o is only the connect/handshake timeout (default 5 s), not an
# idle timeout, so it is left alone. spiped wants addresses as [IP]:PORT.
start_spiped_pair() {
    local dir=$1 p1=$2 p2=$3 p3=$4
    if [[ ! -s $dir/spiped.key ]]; then
        dd if=/dev/urandom of="$dir/spiped.key" bs=32 count=1 status=none || return 1
        chmod 600 "$dir/spiped.key"
    fi
    start_bg spiped -d -F -n 0 -s "[127.0.0.1]:$p2" -t "[127.0.0.1]:$p3" \
        -k "$dir/spiped.key" 2>>"$dir/spiped-server.log"
    local spid=$LAST_BG
    start_bg spiped -e -F -n 0 -s "[127.0.0.1]:$p1" -t "[127.0.0.1]:$p2" \
        -k "$dir/spiped.key" 2>>"$dir/spiped-client.log"
    local cpid=$LAST_BG
    wait_port "$p2" "$spid" && wait_port "$p1" "$cpid"
}

# pool_pubkey_of POOL_BIN KEYFILE: create KEYFILE with `pool keygen --out`
# (which prints the public key) unless it exists, then print the public key.
pool_pubkey_of() {
    local bin=$1 key=$2 pub=
    if [[ ! -e $key ]]; then
        pub=$("$bin" keygen --out "$key" | tail -n 1 | tr -d '[:space:]') || return 1
    fi
    if [[ -z $pub ]]; then
        pub=$("$bin" pubkey "$key" | tail -n 1 | tr -d '[:space:]') || return 1
    fi
    [[ -n $pub ]] && printf '%s\n' "$pub"
}

# start_pool_pair POOL_BIN DIR FRONT MIDDLE TARGET [THREADS]
# `pool bridge tcp2pool` listens on FRONT and carries each connection over a
# POOL session to `pool bridge pool2tcp` on MIDDLE, which connects it to
# TARGET. Keys DIR/s.key (pool2tcp) and DIR/c.key (tcp2pool) are created on
# first use; each side trusts only the other's key. Default log level.
# THREADS, if given, is passed to both as POOL_THREADS (0: a worker thread
# per core); without it POOL_THREADS is unset (pool's default, one thread).
start_pool_pair() {
    local bin=$1 dir=$2 p1=$3 p2=$4 p3=$5 threads=${6:-} spub cpub
    local envset=(env -u POOL_THREADS)
    [[ -z $threads ]] || envset=(env "POOL_THREADS=$threads")
    spub=$(pool_pubkey_of "$bin" "$dir/s.key") || { log "pool keygen/pubkey failed for s.key"; return 1; }
    cpub=$(pool_pubkey_of "$bin" "$dir/c.key") || { log "pool keygen/pubkey failed for c.key"; return 1; }
    start_bg "${envset[@]}" "$bin" bridge pool2tcp --listen "127.0.0.1:$p2" --target "127.0.0.1:$p3" \
        --key "$dir/s.key" --allow "$cpub" 2>>"$dir/pool2tcp.log" >&2
    local spid=$LAST_BG
    start_bg "${envset[@]}" "$bin" bridge tcp2pool --listen "127.0.0.1:$p1" --peer "127.0.0.1:$p2" \
        --peer-key "$spub" --key "$dir/c.key" 2>>"$dir/tcp2pool.log" >&2
    local cpid=$LAST_BG
    wait_port "$p2" "$spid" && wait_port "$p1" "$cpid"
}

# start_forward_pair FWD_BIN DIR FRONT MIDDLE TARGET
# Two `pool-bench forward` relays (no crypto, a blocked thread per direction):
# the first listens on FRONT and connects to MIDDLE, the second listens on
# MIDDLE and connects to TARGET. The floor for any pair of relay processes.
start_forward_pair() {
    local bin=$1 dir=$2 p1=$3 p2=$4 p3=$5
    start_bg "$bin" forward "127.0.0.1:$p2" "127.0.0.1:$p3" 2>>"$dir/forward-server.log"
    local spid=$LAST_BG
    start_bg "$bin" forward "127.0.0.1:$p1" "127.0.0.1:$p2" 2>>"$dir/forward-client.log"
    local cpid=$LAST_BG
    wait_port "$p2" "$spid" && wait_port "$p1" "$cpid"
}

# proc_cpu_ticks PID...: user+system CPU clock ticks used so far by these
# processes (all threads) and their reaped children (socat forks one per
# connection). Divide by `getconf CLK_TCK`.
proc_cpu_ticks() {
    local pid total=0 t
    for pid in "$@"; do
        # Fields after the ") " that ends the command name: utime is the 12th,
        # stime 13th, cutime 14th, cstime 15th of what remains.
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || t=0
        total=$((total + ${t:-0}))
    done
    printf '%s\n' "$total"
}

# pick_listen_port VAR: like pick_port (anchors.sh), but below the kernel's
# ephemeral range (net.ipv4.ip_local_port_range, usually 32768-60999), so that
# a port picked for a listener is never one that an outgoing connection (or a
# socket of one in TIME-WAIT) already holds: binding such a port fails with
# "address in use" even though nothing listens on it.
pick_listen_port() {
    local _pl_lo=32768 _pl_max _pl_port _pl_try
    read -r _pl_lo _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || _pl_lo=32768
    _pl_max=$((_pl_lo - 1))
    ((_pl_max > 12000)) || { pick_port "$1"; return; }   # odd range: fall back
    for ((_pl_try = 0; _pl_try < 200; _pl_try++)); do
        _pl_port=$((10000 + RANDOM % (_pl_max - 10000 + 1)))
        [[ $PICKED_PORTS == *" $_pl_port "* ]] && continue
        port_listening "$_pl_port" && continue
        PICKED_PORTS+="$_pl_port "
        printf -v "$1" '%s' "$_pl_port"
        return 0
    done
    log "could not find a free port"; return 1
}
