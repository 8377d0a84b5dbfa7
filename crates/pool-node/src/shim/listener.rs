//! The shim's local side: binding `[shim] socket` (its directory's
//! ownership and modes checked, the socket made and renamed into place so
//! it never exists in another state) and the loopback data port.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tracing::warn;

use super::allow::Allow;
use super::ShimNode;
use crate::config::ShimSection;

/// The bound listeners of `[shim]`.
pub struct ShimListener {
    pub(super) unix: UnixListener,
    pub(super) data: TcpListener,
    pub(super) path: PathBuf,
    /// (device, inode) of the socket file we made, so only it is removed.
    pub(super) file: (u64, u64),
    pub(super) allow: Allow,
}

impl ShimListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loopback data port.
    pub fn data_addr(&self) -> std::io::Result<SocketAddr> {
        self.data.local_addr()
    }
}

fn io_err(kind: std::io::ErrorKind, msg: String) -> std::io::Error {
    std::io::Error::new(kind, msg)
}

/// Removes the socket file at `path` if it is still the one we bound.
pub(super) fn remove_ours(path: &Path, file: (u64, u64)) {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() && (m.dev(), m.ino()) == file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Why the shims (without `POOL_SHIM_DAEMON_UID`) will not trust a socket
/// in `dir` run by `uid`: the same rule as `pool_shim::peer`.
fn shims_would_refuse(dir: &Path, uid: u32) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    for a in dir.ancestors() {
        let m = std::fs::metadata(a).ok()?;
        if m.mode() & 0o022 != 0 {
            return Some(format!(
                "{} is writable by others (mode {:o})",
                a.display(),
                m.mode() & 0o7777
            ));
        }
        if m.uid() != 0 && m.uid() != uid {
            return Some(format!("{} is owned by uid {}", a.display(), m.uid()));
        }
    }
    None
}

impl ShimNode {
    /// Binds `[shim] socket` and the loopback data port, and resolves
    /// `allow_users` / `allow_groups`.
    ///
    /// The socket's directory is created (0755) if missing; it must then
    /// be a directory owned by this user and writable by no one else, so
    /// no one else can create, replace or remove the socket. A file
    /// already at the path is removed only if it is a socket of ours that
    /// no daemon answers on. The socket is bound in a fresh 0700
    /// directory of ours, made connectable for everyone (who may use it is
    /// decided per caller from its credentials, not by file modes) and
    /// renamed into place, so it never exists at the path in another
    /// state, and the mode change never goes through a path another user
    /// could have put a link in.
    pub async fn bind(section: &ShimSection) -> std::io::Result<ShimListener> {
        use std::io::ErrorKind;
        let me = UnixStream::pair()?.0.peer_cred()?;
        let allow = Allow::resolve_here(section, me.uid())
            .map_err(|e| io_err(ErrorKind::InvalidInput, e))?;
        let path = section.socket.clone();
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io_err(
                ErrorKind::InvalidInput,
                format!("{} is not a socket path", path.display()),
            ));
        };
        if std::fs::symlink_metadata(dir).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        let m = std::fs::symlink_metadata(dir)?;
        if !m.is_dir() || m.uid() != me.uid() || m.mode() & 0o022 != 0 {
            return Err(io_err(
                ErrorKind::PermissionDenied,
                format!(
                    "{} must be a directory owned by uid {} and writable by no one else (it is {}, uid {}, mode {:o}); fix it or choose another [shim] socket",
                    dir.display(),
                    me.uid(),
                    if m.is_dir() { "a directory" } else { "not a directory" },
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
        if let Some(why) = shims_would_refuse(dir, me.uid()) {
            warn!(
                socket = %path.display(),
                "{why}: programs under the shim will not trust this socket unless they set POOL_SHIM_DAEMON_UID={}",
                me.uid()
            );
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() && m.uid() == me.uid() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(io_err(
                        ErrorKind::AddrInUse,
                        format!("another daemon is listening on {}", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
            Ok(_) => {
                return Err(io_err(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket of this user's; remove it",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut nonce = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let staging = dir.join(format!(
            ".{}.{}.new",
            name.to_string_lossy(),
            u64::from_be_bytes(nonce)
        ));
        // Fails if anything is there already: the directory is ours alone.
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        let placed = (|| {
            let tmp = staging.join("s");
            let unix = UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))?;
            std::fs::rename(&tmp, &path)?;
            let m = std::fs::symlink_metadata(&path)?;
            Ok::<_, std::io::Error>((unix, (m.dev(), m.ino())))
        })();
        let _ = std::fs::remove_file(staging.join("s"));
        let _ = std::fs::remove_dir(&staging);
        let (unix, file) = placed?;
        // As every POOL listener (a deep accept queue: a burst of shimmed
        // connects must not meet a full one, whose SYN the kernel drops).
        let data = match crate::net::bind_tcp("127.0.0.1:0").await {
            Ok(d) => d,
            Err(e) => {
                remove_ours(&path, file);
                return Err(e);
            }
        };
        Ok(ShimListener {
            unix,
            data,
            path,
            file,
            allow,
        })
    }
}
