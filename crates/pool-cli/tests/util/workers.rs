//! Worker daemons for the handoff tests: each with a `[[pool2tcp]]`
//! target and the other worker in `[handoff] peers`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

pub struct Worker {
    pub name: &'static str,
    pub key: PathBuf,
    pub public: String,
    pub listen: String,
    pub control: PathBuf,
    pub journal: PathBuf,
}

impl Worker {
    pub fn new(dir: &TempDir, name: &'static str) -> Worker {
        let (key, public) = keygen(dir, name);
        Worker {
            name,
            key,
            public,
            listen: format!("127.0.0.1:{}", free_port()),
            control: dir.join(&format!("{name}.sock")),
            journal: dir.join(&format!("{name}.journal")),
        }
    }

    pub fn start(&self, dir: &TempDir, client: &str, peer: &str, target: &str) -> Proc {
        let text = format!(
            "[node]\nkey = \"{}\"\nlisten = \"{}\"\ncontrol = \"{}\"\njournal = \"{}\"\n\n\
             [trust]\nallow = [\"{client}\", \"{peer}\"]\n\n\
             [[pool2tcp]]\ntarget = \"{target}\"\n\n\
             [handoff]\npeers = [\"{peer}\"]\n",
            self.key.display(),
            self.listen,
            self.control.display(),
            self.journal.display(),
        );
        let path = dir.join(&format!("{}.toml", self.name));
        std::fs::write(&path, text).expect("write config");
        let mut p = Proc::pool(
            self.name,
            &["daemon", "--config", path.to_str().unwrap()],
            dir,
        );
        wait_port(&self.listen, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.control).is_err() {
            assert!(Instant::now() < deadline, "no control socket:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p.assert_running();
        p
    }

    /// `pool ctl handoff` of the session of `client` to the worker with
    /// key `to_key` at `to_listen`; the command's output, success or not.
    pub fn try_handoff(&self, client: &str, to_listen: &str, to_key: &str) -> std::process::Output {
        pool_cmd(&[
            "ctl",
            "handoff",
            &client[..8],
            "--to",
            to_listen,
            "--to-key",
            to_key,
            "--control",
            self.control.to_str().unwrap(),
        ])
    }

    /// `pool ctl handoff` of the session of `client` to `to`, which must
    /// succeed.
    pub fn handoff(&self, client: &str, to: &Worker) {
        let out = self.try_handoff(client, &to.listen, &to.public);
        assert!(
            out.status.success(),
            "pool ctl handoff {} -> {} failed: {}",
            self.name,
            to.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains("handed to"), "{text}");
    }

    /// `pool ctl status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = pool_cmd(&[
            "ctl",
            "status",
            "--json",
            "--control",
            self.control.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

pub fn nginx(dir: &TempDir, name: &str, www: &std::path::Path) -> (Proc, String, PathBuf) {
    let port = free_port();
    let d = dir.path().display();
    let log = dir.join(&format!("{name}-access.log"));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/{name}.pid;\n\
         error_log {d}/{name}-error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n access_log {};\n client_body_temp_path {d}/{name}-cb;\n proxy_temp_path {d}/{name}-p;\n\
         fastcgi_temp_path {d}/{name}-f;\n uwsgi_temp_path {d}/{name}-u;\n scgi_temp_path {d}/{name}-s;\n\
         default_type application/octet-stream;\n server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
        log.display(),
        www.display()
    );
    let conf_path = dir.join(&format!("{name}.conf"));
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.join(&format!("{name}-error.log")))
        .arg("-c")
        .arg(&conf_path);
    let p = Proc::spawn(name, cmd, dir);
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr, Duration::from_secs(10));
    (p, addr, log)
}

pub fn curl_get(addr: &str, path: &str) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://{addr}{path}"));
    let out = run(c, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
