//! Who may be the daemon: the checks made before the shim sends anything
//! to the socket at `POOL_SHIM_SOCKET`.
//!
//! The kernel tells the shim which uid listens on a Unix socket
//! (`SO_PEERCRED`); this module says which uids to accept. With
//! `POOL_SHIM_DAEMON_UID=N`: `N` (and root). Without it: the owner of the
//! socket's directory (and root), and only if no one else could have put
//! a socket there — the directory and every directory above it must be
//! owned by root or that owner and writable by neither group nor others.
//! A socket in `/tmp` (or any world-writable place) is never trusted
//! without `POOL_SHIM_DAEMON_UID`.

use std::io;
use std::path::{Path, PathBuf};

/// Where to connect and whom to accept there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The socket path to connect to (its directory resolved, so a
    /// symbolic link swapped afterwards cannot redirect the connection).
    pub path: PathBuf,
    /// The uids the listening process may have.
    pub uids: [u32; 2],
}

/// Why the shim will not talk to the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The socket's directory does not exist: no daemon was ever started
    /// there (not worth a message).
    Missing,
    /// Someone other than the daemon could have created the socket.
    Unsafe(String),
}

/// What the checks need to know of a directory (`stat`, symbolic links
/// followed): owner, mode bits, and whether it is a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirInfo {
    /// Owner uid.
    pub uid: u32,
    /// Mode bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// A directory.
    pub is_dir: bool,
}

/// The checks, over `canonicalize` and `stat` functions (the file system,
/// or a test's table).
pub fn expect(
    socket: &Path,
    explicit_uid: Option<u32>,
    canonicalize: impl Fn(&Path) -> io::Result<PathBuf>,
    stat: impl Fn(&Path) -> io::Result<DirInfo>,
) -> Result<Expect, Refusal> {
    if let Some(uid) = explicit_uid {
        return Ok(Expect {
            path: socket.to_path_buf(),
            uids: [uid, 0],
        });
    }
    let (Some(parent), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(Refusal::Unsafe(format!(
            "{} is not a socket path",
            socket.display()
        )));
    };
    let dir = match canonicalize(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Refusal::Missing),
        Err(e) => {
            return Err(Refusal::Unsafe(format!(
                "cannot resolve {}: {e}",
                parent.display()
            )))
        }
    };
    let unsafe_dir = |why: String| {
        Refusal::Unsafe(format!(
            "{why}, so anyone could have created {}; not trusting it (set POOL_SHIM_DAEMON_UID to the daemon's uid to trust the socket's owner instead)",
            socket.display()
        ))
    };
    let owner = stat(&dir)
        .map_err(|e| unsafe_dir(format!("cannot stat {}: {e}", dir.display())))?
        .uid;
    for a in dir.ancestors() {
        let i = stat(a).map_err(|e| unsafe_dir(format!("cannot stat {}: {e}", a.display())))?;
        if !i.is_dir {
            return Err(unsafe_dir(format!("{} is not a directory", a.display())));
        }
        if i.mode & 0o022 != 0 {
            return Err(unsafe_dir(format!(
                "{} is writable by others (mode {:o})",
                a.display(),
                i.mode
            )));
        }
        if i.uid != 0 && i.uid != owner {
            return Err(unsafe_dir(format!(
                "{} is owned by uid {}",
                a.display(),
                i.uid
            )));
        }
    }
    Ok(Expect {
        path: dir.join(name),
        uids: [owner, 0],
    })
}

/// [`expect`] on the real file system.
pub fn expect_here(socket: &Path, explicit_uid: Option<u32>) -> Result<Expect, Refusal> {
    use std::os::unix::fs::MetadataExt;
    expect(
        socket,
        explicit_uid,
        |p| std::fs::canonicalize(p),
        |p| {
            let m = std::fs::metadata(p)?;
            Ok(DirInfo {
                uid: m.uid(),
                mode: m.mode() & 0o7777,
                is_dir: m.is_dir(),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fs(dirs: &[(&str, u32, u32)]) -> HashMap<PathBuf, DirInfo> {
        dirs.iter()
            .map(|(p, uid, mode)| {
                (
                    PathBuf::from(p),
                    DirInfo {
                        uid: *uid,
                        mode: *mode,
                        is_dir: true,
                    },
                )
            })
            .collect()
    }

    fn check(dirs: &HashMap<PathBuf, DirInfo>, socket: &str) -> Result<Expect, Refusal> {
        expect(
            Path::new(socket),
            None,
            |p| {
                dirs.contains_key(p)
                    .then(|| p.to_path_buf())
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            },
            |p| {
                dirs.get(p)
                    .copied()
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            },
        )
    }

    #[test]
    fn the_directory_owner_is_the_daemon_when_no_one_else_can_write() {
        let d = fs(&[
            ("/", 0, 0o755),
            ("/run", 0, 0o755),
            ("/run/pool", 998, 0o755),
        ]);
        assert_eq!(
            check(&d, "/run/pool/shim.sock"),
            Ok(Expect {
                path: PathBuf::from("/run/pool/shim.sock"),
                uids: [998, 0]
            })
        );
        let d = fs(&[("/", 0, 0o755), ("/run", 0, 0o755), ("/run/pool", 0, 0o700)]);
        assert_eq!(check(&d, "/run/pool/shim.sock").map(|e| e.uids), Ok([0, 0]));
    }

    #[test]
    fn a_place_others_could_write_is_never_trusted() {
        // An attacker's own directory in /tmp: it owns it, but /tmp is
        // world-writable (sticky or not).
        let d = fs(&[
            ("/", 0, 0o755),
            ("/tmp", 0, 0o1777),
            ("/tmp/pool", 4242, 0o755),
        ]);
        assert!(
            matches!(check(&d, "/tmp/pool/shim.sock"), Err(Refusal::Unsafe(m)) if m.contains("/tmp is writable"))
        );
        // The socket's directory itself writable by others.
        let d = fs(&[("/", 0, 0o755), ("/run", 0, 0o755), ("/run/pool", 0, 0o777)]);
        assert!(matches!(
            check(&d, "/run/pool/shim.sock"),
            Err(Refusal::Unsafe(_))
        ));
        let d = fs(&[("/", 0, 0o755), ("/run", 0, 0o755), ("/run/pool", 0, 0o775)]);
        assert!(matches!(
            check(&d, "/run/pool/shim.sock"),
            Err(Refusal::Unsafe(_))
        ));
        // A directory above owned by a third user.
        let d = fs(&[
            ("/", 0, 0o755),
            ("/home", 0, 0o755),
            ("/home/eve", 4242, 0o755),
            ("/home/eve/pool", 998, 0o755),
        ]);
        assert!(
            matches!(check(&d, "/home/eve/pool/shim.sock"), Err(Refusal::Unsafe(m)) if m.contains("uid 4242"))
        );
        // Nothing there at all: the daemon never ran; no message.
        assert_eq!(check(&d, "/run/pool/shim.sock"), Err(Refusal::Missing));
    }

    #[test]
    fn an_explicit_uid_is_all_that_counts() {
        let e = expect(
            Path::new("/tmp/x/shim.sock"),
            Some(998),
            |_| Err(io::Error::from(io::ErrorKind::NotFound)),
            |_| Err(io::Error::from(io::ErrorKind::NotFound)),
        );
        assert_eq!(
            e,
            Ok(Expect {
                path: PathBuf::from("/tmp/x/shim.sock"),
                uids: [998, 0]
            })
        );
    }
}
