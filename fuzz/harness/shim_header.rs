//! The shim's header as the daemon reads it (`pool_node::shim::ShimHeader`,
//! what any local program can send to the `[shim]` listener), and the
//! `[[route]]` ranges it is matched against (`pool_node::shim::Cidr`).
//!
//! Input: the 28 header bytes (the daemon reads exactly 28; shorter input
//! is never decoded), then optional text taken as a `[[route]]` cidr.
//!
//! Checked: a header decodes exactly when it starts with `PSH2`; it
//! writes back to its bytes (bar the reserved byte) with the encoder the
//! shim uses (`pool_shim_wire`, shared by both sides); IPv4 comes out as IPv4;
//! the service name the daemon makes of the port gives the port back; a
//! range of one address, and `/0`, contain the destination; and a range
//! treats an IPv4 address and its v4-mapped IPv6 form alike.

use std::net::{IpAddr, Ipv6Addr};

use pool_node::shim::{service_for_port, Cidr, ShimHeader, HEADER_LEN, MAGIC};

/// Fuzzing entry.
pub(crate) fn run(data: &[u8]) {
    check(data, false);
}

/// As [`run`], also asking that a range written as one IPv6 address
/// contains that address when it is v4-mapped (it does not: see
/// `fuzz/regressions/README.md`).
// Used by the regression tests, not by the fuzz target.
#[allow(dead_code)]
pub(crate) fn run_strict(data: &[u8]) {
    check(data, true);
}

fn check(data: &[u8], strict: bool) {
    let Some(h) = data.get(..HEADER_LEN) else {
        return;
    };
    let h: [u8; HEADER_LEN] = h.try_into().expect("28 bytes");
    let got = ShimHeader::decode(&h);
    assert_eq!(got.is_some(), h[..4] == MAGIC);
    if let Some(hd) = got {
        let mut want = h;
        want[5] = 0;
        assert_eq!(hd.encode(), want);
        let ip = hd.destination.ip();
        if let IpAddr::V6(v6) = ip {
            assert_eq!(v6.to_ipv4_mapped(), None, "v4-mapped must come out as IPv4");
        }
        let port = hd.destination.port();
        let service = service_for_port(port);
        assert!(service.starts_with(':'));
        assert_eq!(service[1..].parse::<u16>(), Ok(port));
        let one = Cidr::parse(&ip.to_string()).expect("an address is a range");
        assert!(one.contains(ip), "{ip} not in its own range");
        let all = Cidr::parse(if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" }).expect("/0");
        assert!(all.contains(ip));
    }

    // The rest, as a range from a config's [[route]].
    let Ok(text) = std::str::from_utf8(&data[HEADER_LEN..]) else {
        return;
    };
    let Some(range) = Cidr::parse(text) else {
        return;
    };
    let raw = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).expect("16 bytes"));
    if let Some(v4) = raw.to_ipv4_mapped() {
        assert_eq!(
            range.contains(IpAddr::V4(v4)),
            range.contains(IpAddr::V6(raw))
        );
    }
    if strict && !text.contains('/') {
        let ip: IpAddr = text
            .trim()
            .parse()
            .expect("Cidr::parse took it as an address");
        assert!(
            range.contains(ip),
            "the range `{text}` does not contain {ip}"
        );
    }
}
