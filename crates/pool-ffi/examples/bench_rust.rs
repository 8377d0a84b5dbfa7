//! scripts/bench-cabi's Rust side: the same client as bench/bench.c's
//! `send` and `rtt`, through the Rust API (pool-net) instead of the ABI.
//!
//! `bench_rust send|rtt KEYFILE ADDR SERVERKEY N`

use std::time::Instant;

use pool_net::{Endpoint, EndpointConfig, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert_eq!(
        a.len(),
        6,
        "usage: bench_rust send|rtt KEYFILE ADDR SERVERKEY N"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let key = SecretKey::from_file_text(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
        let ep = Endpoint::client(EndpointConfig::new(key));
        let s = ep.connect(&a[3], a[4].parse().unwrap()).await.unwrap();
        let mut st = s.open_stream().await.unwrap();
        let n: u64 = a[5].parse().unwrap();
        if a[1] == "send" {
            let buf = vec![0u8; 1 << 16];
            st.write_all(b"S").await.unwrap();
            let t0 = Instant::now();
            for _ in 0..n * 16 {
                st.write_all(&buf).await.unwrap();
            }
            st.shutdown().await.unwrap();
            let mut k = [0u8; 1];
            st.read_exact(&mut k).await.unwrap();
            println!("send {:.1} MiB/s", n as f64 / t0.elapsed().as_secs_f64());
        } else {
            let (msg, mut got) = ([0u8; 32], [0u8; 32]);
            st.write_all(b"E").await.unwrap();
            for warm in 0..2 {
                let t0 = Instant::now();
                for _ in 0..n {
                    st.write_all(&msg).await.unwrap();
                    st.read_exact(&mut got).await.unwrap();
                }
                if warm == 1 {
                    println!("rtt {:.1} us", t0.elapsed().as_secs_f64() / n as f64 * 1e6);
                }
            }
        }
    });
}
