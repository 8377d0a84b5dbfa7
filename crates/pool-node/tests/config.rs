//! The documented example config parses, and mistakes get clear errors.

use std::path::Path;

use pool_node::config::{Config, ConfigError};

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/pool.example.toml");
    let (cfg, _) = Config::load(&path).expect("docs/pool.example.toml must stay valid");
    assert_eq!(cfg.node.listen, "[::]:9253");
    assert_eq!(cfg.tcp2pool.len(), 1);
    assert_eq!(cfg.tcp2pool[0].name, "web");
    assert_eq!(cfg.pool2tcp[0].target, "127.0.0.1:80");
    assert_eq!(cfg.node.drain_timeout_secs, 30);
}

#[test]
fn unknown_key_is_named() {
    let e = Config::parse(
        "[node]\nlisten = \"[::]:9253\"\nlsiten = 1\n",
        Path::new("x.toml"),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::Parse { .. }));
    assert!(msg.contains("lsiten"), "{msg}");
}

#[test]
fn bad_peer_key_is_explained() {
    let text = "[[tcp2pool]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\npeer = \"h:1\"\npeer_key = \"nope\"\n";
    let msg = Config::parse(text, Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a POOL public key"), "{msg}");
}

#[test]
fn duplicate_bridge_names_refused() {
    let b = "[[tcp2pool]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\npeer = \"h:1\"\npeer_key = \"uDTsXcomEBnCOnNsAuCPGfz_IbhljoeDxeOmE64zUiU\"\n";
    let msg = Config::parse(&format!("{b}{b}"), Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("two [[tcp2pool]] sections are named `a`"),
        "{msg}"
    );
}

#[test]
fn example_config_has_the_shim_sections() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/pool.example.toml");
    let (cfg, _) = Config::load(&path).expect("docs/pool.example.toml must stay valid");
    let shim = cfg.shim.expect("[shim]");
    assert!(shim.enabled);
    assert_eq!(shim.socket, Path::new("/run/pool/shim.sock"));
    assert!(shim.allow_users.is_empty() && shim.allow_groups.is_empty());
    assert_eq!(shim.default_peer_port, 9253);
    assert_eq!(cfg.route[0].cidr.to_string(), "10.4.4.0/24");
    assert_eq!(cfg.expose[0].port, 80);
    assert_eq!(cfg.expose[0].target, None);
}

#[test]
fn shim_sections_are_checked() {
    let parse = |t: &str| {
        Config::parse(t, Path::new("x.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let defaults = Config::parse("[shim]\n", Path::new("x.toml")).expect("[shim] alone");
    assert_eq!(
        defaults.shim.map(|s| s.socket),
        Some("/run/pool/shim.sock".into())
    );
    let e = parse("[shim]\nlisten = \"127.0.0.1:9256\"\n").unwrap_err();
    assert!(
        e.contains("[shim] listen") && e.contains("Unix socket"),
        "{e}"
    );
    let e = parse("[shim]\nsocket = \"relative.sock\"\n").unwrap_err();
    assert!(e.contains("absolute path"), "{e}");
    let e = parse("[shim]\nallow_users = [\"no-such-user-here\"]\n").unwrap_err();
    assert!(e.contains("no user `no-such-user-here`"), "{e}");
    parse("[shim]\nallow_users = [\"root\", 4242]\nallow_groups = [0]\n").expect("names and ids");
    let e = parse("[[route]]\ncidr = \"10.0.0.0/33\"\npeer = \"h:1\"\n").unwrap_err();
    assert!(e.contains("not an address range"), "{e}");
    let e =
        parse("[[route]]\ncidr = \"10.0.0.0/8\"\npeer = \"h:1\"\npeer_key = \"x\"\n").unwrap_err();
    assert!(e.contains("not a POOL public key"), "{e}");
    let e = parse("[[expose]]\nport = 80\n[[expose]]\nport = 80\n").unwrap_err();
    assert!(e.contains("listed twice"), "{e}");
    let e = parse("[node]\nlisten = \"\"\n[[expose]]\nport = 80\n").unwrap_err();
    assert!(e.contains("needs [node] listen"), "{e}");
    parse("[[route]]\ncidr = \"fd00::/8\"\npeer = \"[fd00::1]:9253\"\n").expect("IPv6 route");
}

/// Every bad entry is reported, each with its line; none is skipped.
#[test]
fn every_problem_is_reported_with_its_line() {
    let k = "uDTsXcomEBnCOnNsAuCPGfz_IbhljoeDxeOmE64zUiU";
    let text = format!(
        "[node]\nlisten = \"127.0.0.1:9253\"\n\n\
         [[tcp2pool]]\nname = \"a\"\nlisten = \"127.0.0.1:8080\"\npeer = \"h:1\"\npeer_key = \"{k}\"\n\n\
         [[tcp2pool]]\nname = \"b\"\nlisten = \"[::]:8080\"\npeer = \"h:1\"\npeer_key = \"{k}\"\n\n\
         [[tcp2pool]]\nname = \"c\"\nlisten = \"127.0.0.1:9253\"\npeer = \"h:1\"\npeer_key = \"{k}\"\nservice = \"pool.nope\"\n\n\
         [[pool2tcp]]\nservice = \"web\"\ntarget = \"127.0.0.1:80\"\n\n\
         [[pool2tcp]]\nservice = \"web\"\ntarget = \"127.0.0.1:81\"\n"
    );
    let e = Config::parse(&text, Path::new("/etc/pool/x.toml")).unwrap_err();
    let p: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
    assert_eq!(p.len(), 4, "{p:#?}");
    assert!(
        p[0].starts_with("line 12:") && p[0].contains("[[tcp2pool]] `a` already uses"),
        "{p:#?}"
    );
    assert!(
        p[1].starts_with("line 18:") && p[1].contains("[node] listen already uses"),
        "{p:#?}"
    );
    assert!(
        p[2].starts_with("line 21:") && p[2].contains("no such node service"),
        "{p:#?}"
    );
    assert!(
        p[3].starts_with("line 28:")
            && p[3].contains("two [[pool2tcp]] sections have service `web`"),
        "{p:#?}"
    );
    assert!(e.to_string().contains("/etc/pool/x.toml"));

    // A bad value in [[route]] names its line too (from the TOML reader).
    let bad = "[[route]]\ncidr = \"10.0.0.0/8\"\npeer = \"h:1\"\npeer_key = \"not-a-key\"\n";
    let e = Config::parse(bad, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 4") && e.contains("not a POOL public key"),
        "{e}"
    );
    let bad = "[[route]]\ncidr = \"10.0.0.0/40\"\npeer = \"h:1\"\n";
    let e = Config::parse(bad, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 2") && e.contains("not an address range"),
        "{e}"
    );
}
