//! Shared helpers: keys, endpoints, argument parsing, /proc readers, output.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pool_net::{CipherSuite, Config, Endpoint, EndpointConfig, PublicKey, SecretKey, Trust};

/// A boxed error with a message; the benchmarks only report and exit.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Result<T> = std::result::Result<T, Error>;

/// The listener's key. Fixed so that a child process can be told it.
pub(crate) fn server_key() -> SecretKey {
    SecretKey::from_bytes([0x5a; 32])
}

/// Client key number `i`. Each concurrent client worker uses its own key:
/// the listener's replay check wants handshake timestamps from one key to
/// increase, which parallel handshakes under one key would not guarantee.
pub(crate) fn client_key(i: usize) -> SecretKey {
    let mut b = [0xc1u8; 32];
    // Not byte 0: X25519 clamping clears its low three bits.
    b[1..9].copy_from_slice(&(i as u64).to_le_bytes());
    SecretKey::from_bytes(b)
}

/// Trust for client keys `0..n`.
pub(crate) fn trust_clients(n: usize) -> Trust {
    (0..n).fold(Trust::new(), |t, i| t.allow(client_key(i).public_key()))
}

/// The protocol configuration every benchmark uses: defaults, except that
/// the per-source handshake rate limit (200/s, burst 400 by default) is
/// off, since every benchmark client comes from 127.0.0.1.
pub(crate) fn protocol(cipher: Option<CipherSuite>) -> Config {
    let mut c = Config::default();
    c.handshake_rate(None);
    if let Some(s) = cipher {
        c.ciphers(&[s]);
    }
    c
}

/// Binds a listener on 127.0.0.1 with an ephemeral port, trusting client
/// keys `0..clients`.
pub(crate) async fn listener(config: Config, clients: usize) -> Result<Endpoint> {
    let cfg = EndpointConfig::new(server_key())
        .protocol(config)
        .trust(trust_clients(clients))
        .max_pending_handshakes(4096);
    Ok(Endpoint::bind("127.0.0.1:0", cfg).await?)
}

/// A dialling endpoint with client key `i`.
pub(crate) fn client(config: Config, i: usize) -> Endpoint {
    Endpoint::client(EndpointConfig::new(client_key(i)).protocol(config))
}

/// The listener's address as `HOST:PORT`.
pub(crate) fn addr_of(ep: &Endpoint) -> Result<String> {
    Ok(ep
        .local_addr()
        .ok_or("listener has no address")?
        .to_string())
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Resident set size of this process, KiB (VmRSS in /proc/self/status).
pub(crate) fn rss_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let n = rest.trim().trim_end_matches("kB").trim();
            return Ok(n.parse()?);
        }
    }
    Err("no VmRSS line in /proc/self/status".into())
}

/// CPU time (user + system) of one thread of this process, from
/// /proc/self/task/TID/stat, in clock ticks of 10 ms (USER_HZ is 100 on
/// Linux x86-64 and arm64).
pub(crate) fn thread_cpu(tid: u32) -> Result<Duration> {
    cpu_from_stat(&std::fs::read_to_string(format!(
        "/proc/self/task/{tid}/stat"
    ))?)
}

/// CPU time of the whole process so far (all threads, live and exited).
pub(crate) fn process_cpu() -> Result<Duration> {
    cpu_from_stat(&std::fs::read_to_string("/proc/self/stat")?)
}

fn cpu_from_stat(stat: &str) -> Result<Duration> {
    // Fields after the command name (which may contain spaces) start at
    // field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").ok_or("bad stat line")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).ok_or("short stat")?.parse::<u64>()?
        + f.get(12).ok_or("short stat")?.parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// The id of the calling thread (for [`thread_cpu`]).
pub(crate) fn current_tid() -> Result<u32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    Ok(stat
        .split_whitespace()
        .next()
        .ok_or("empty stat")?
        .parse()?)
}

/// Open sockets of this process.
pub(crate) fn socket_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|p| p.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Prints the machine-readable line the scripts collect.
pub(crate) fn result(name: &str, value: f64, unit: &str) {
    result_with(name, value, unit, "");
}

/// [`result`] with extra `key=value` words at the end.
pub(crate) fn result_with(name: &str, value: f64, unit: &str, extra: &str) {
    let v = if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    };
    let sep = if extra.is_empty() { "" } else { " " };
    println!("RESULT {name}={v} unit={unit}{sep}{extra}");
}

/// Hand-rolled option parsing: `--name value` pairs only.
pub(crate) struct Opts {
    pairs: Vec<(String, String)>,
}

impl Opts {
    /// Parses `args` (after the subcommand); only names in `known` are
    /// accepted.
    pub(crate) fn parse(args: &[String], known: &[&str]) -> Result<Opts> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (name, value) = match a.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                    (a.clone(), v.clone())
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(format!("unknown option {name} (known: {})", known.join(" ")).into());
            }
            pairs.push((name, value));
        }
        Ok(Opts { pairs })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}: not a number: {v}").into()),
        }
    }
}

/// `1073741824`, `1G`, `512M`, `64K`, `1GiB`, `100MB` (binary multiples).
pub(crate) fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size: {s}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit: {s}").into()),
    };
    Ok(n * mult)
}

/// Median and maximum of a sample (sorted in place).
pub(crate) fn median_max(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[n - 1])
}

/// Parses a public key token given on the command line.
pub(crate) fn parse_key(s: &str) -> Result<PublicKey> {
    Ok(PublicKey::from_token(s)?)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
