//! `pool-bench reload`: a daemon with `--bridges` tcp2pool bridges (to its
//! own pool2tcp end and an echo target) carrying `--connections` live TCP
//! connections, each exchanging 64-byte messages without pause, while the
//! config is reloaded `--rounds` times (what SIGHUP runs: read the file,
//! plan, prepare, swap). Each reload adds or removes one bridge and one
//! trusted key. Prints the time each reload took and how many connections
//! failed (the goal is none); every connection must still echo afterwards.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_net::SecretKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{self, Opts, Result};

fn config(
    dir: &std::path::Path,
    key: &str,
    listen: &str,
    echo: &str,
    bridges: usize,
    extra: bool,
) -> String {
    let me = SecretKey::from_bytes([0x5a; 32]).public_key();
    let other = common::client_key(7).public_key();
    let allow = if extra {
        format!("\"{me}\", \"{other}\"")
    } else {
        format!("\"{me}\"")
    };
    let mut t = format!(
        "[node]\nkey = \"{key}\"\nlisten = \"{listen}\"\nstate_dir = \"{}\"\n\n[trust]\nallow = [{allow}]\n\n[[pool2tcp]]\ntarget = \"{echo}\"\n",
        dir.display()
    );
    for i in 0..bridges + usize::from(extra) {
        t.push_str(&format!(
            "\n[[tcp2pool]]\nname = \"b{i}\"\nlisten = \"127.0.0.1:0\"\npeer = \"{listen}\"\npeer_key = \"{me}\"\n"
        ));
    }
    t
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let o = Opts::parse(args, &["--bridges", "--connections", "--rounds"])?;
    let bridges: usize = o.num("--bridges", 100)?;
    let conns: usize = o.num("--connections", 1000)?;
    let rounds: usize = o.num("--rounds", 10)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = std::env::temp_dir().join(format!("pool-bench-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let key_path: PathBuf = dir.join("node.key");
        std::fs::write(&key_path, SecretKey::from_bytes([0x5a; 32]).to_file_text())?;
        std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?.to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let listen = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
        let key = key_path.display().to_string();
        let texts = [
            config(&dir, &key, &listen, &echo_addr, bridges, false),
            config(&dir, &key, &listen, &echo_addr, bridges, true),
        ];
        let path = dir.join("pool.toml");
        std::fs::write(&path, &texts[0])?;
        let cfg = pool_node::config::Config::parse(&texts[0], &path)?;
        let daemon = pool_node::daemon::start(Some(path.clone()), cfg, &texts[0]).await?;
        let addrs: Vec<String> = {
            let m = daemon.bridge_addrs();
            (0..bridges).filter_map(|i| m.get(&format!("b{i}")).cloned()).collect()
        };
        if addrs.len() != bridges {
            return Err("not every bridge is up".into());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (exchanges, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        let t_open = Instant::now();
        for i in 0..conns {
            let mut s = TcpStream::connect(&addrs[i % bridges]).await?;
            s.set_nodelay(true)?;
            let (stop, exchanges, failed) = (stop.clone(), exchanges.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let msg = [(i % 251) as u8; 64];
                let mut buf = [0u8; 64];
                loop {
                    let ok = async {
                        s.write_all(&msg).await?;
                        s.read_exact(&mut buf).await?;
                        Ok::<_, std::io::Error>(buf == msg)
                    };
                    match tokio::time::timeout(Duration::from_secs(10), ok).await {
                        Ok(Ok(true)) => {
                            exchanges.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }));
        }
        println!("{conns} connections open through {bridges} bridges in {:.2} s", t_open.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut times = Vec::new();
        for r in 0..rounds {
            std::fs::write(&path, &texts[(r + 1) % 2])?;
            let before = exchanges.load(Ordering::Relaxed);
            let t0 = Instant::now();
            daemon.reload().await?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(300)).await;
            if exchanges.load(Ordering::Relaxed) == before {
                return Err(format!("no traffic after reload {r}").into());
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let (med, max) = common::median_max(&mut times);
        let lost = failed.load(Ordering::Relaxed);
        println!(
            "reload with {bridges} bridges and {conns} live connections: median {med:.2} ms, max {max:.2} ms over {rounds} reloads; {} exchanges; connections failed: {lost}",
            exchanges.load(Ordering::Relaxed)
        );
        common::result("reload_ms_median", med, "ms");
        common::result("reload_ms_max", max, "ms");
        common::result("reload_connections_failed", lost as f64, "1");
        let _ = std::fs::remove_dir_all(&dir);
        if lost > 0 {
            return Err(format!("{lost} connections failed during the reloads").into());
        }
        Ok::<(), common::Error>(())
    })
}
