//! Vault paths, grants, and confinement to the vault's root.
//!
//! A vault path is `/`-separated and starts at the vault's root: `/incoming/a.tar`.
//! `..` is refused outright (not resolved), as are NUL bytes; `.` and empty
//! components are dropped. On disk, no component of a path may be a
//! symbolic link: a link that leads out of the root is refused (so nothing
//! is read or written outside it), and a link inside it is refused too,
//! since following it would step around the grants, which are checked on
//! the vault path.

use std::path::{Path, PathBuf};

use pool_net::PublicKey;

use crate::VaultError;

/// A checked vault path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VaultPath(Vec<String>);

fn component(c: &str, whole: &str) -> Result<Option<String>, VaultError> {
    match c {
        "" | "." => Ok(None),
        ".." => Err(VaultError::Refused(format!(
            "{whole}: `..` is not allowed in a vault path"
        ))),
        c if c.contains('\0') => Err(VaultError::Refused(format!("{whole}: NUL in a vault path"))),
        c => Ok(Some(c.to_string())),
    }
}

impl VaultPath {
    /// The root itself.
    pub fn root() -> VaultPath {
        VaultPath(Vec::new())
    }

    /// Parses `/a/b` (the leading `/` may be left out).
    pub fn parse(s: &str) -> Result<VaultPath, VaultError> {
        let mut v = Vec::new();
        for c in s.split('/') {
            if let Some(c) = component(c, s)? {
                v.push(c);
            }
        }
        Ok(VaultPath(v))
    }

    /// This path with the relative path `rel` (`a/b`) under it.
    pub fn join(&self, rel: &str) -> Result<VaultPath, VaultError> {
        let mut v = self.0.clone();
        for c in rel.split('/') {
            if let Some(c) = component(c, rel)? {
                v.push(c);
            }
        }
        Ok(VaultPath(v))
    }

    /// Whether `self` is `other` or under it.
    pub fn starts_with(&self, other: &VaultPath) -> bool {
        self.0.len() >= other.0.len() && self.0[..other.0.len()] == other.0[..]
    }

    /// The last component (`None` for the root).
    pub fn file_name(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    /// The components.
    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// Where it is under `root` (unchecked: see [`resolve`]).
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for c in &self.0 {
            p.push(c);
        }
        p
    }
}

impl std::fmt::Display for VaultPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for c in &self.0 {
            write!(f, "/{c}")?;
        }
        Ok(())
    }
}

/// What a grant lets a key do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// `ls` and `pull`.
    Read,
    /// `push` too.
    Write,
}

/// `[[vault.grant]]`: a key (or every trusted key), a subtree, an access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The key; `None` for `"*"` (every key the node trusts).
    pub key: Option<PublicKey>,
    /// The subtree.
    pub path: VaultPath,
    /// What it allows there.
    pub access: Access,
}

/// Whether `grants` let `peer` do `need` at `path`.
pub fn allowed(grants: &[Grant], peer: &PublicKey, path: &VaultPath, need: Access) -> bool {
    grants.iter().any(|g| {
        g.key.as_ref().is_none_or(|k| k == peer) && path.starts_with(&g.path) && g.access >= need
    })
}

/// The local path of `path` under `root`, refusing symbolic links on the
/// way (see the module docs). With `create`, missing directories on the way
/// to the last component are made. The last component may be missing.
pub fn resolve(root: &Path, path: &VaultPath, create: bool) -> Result<PathBuf, VaultError> {
    let mut p = root.to_path_buf();
    let n = path.0.len();
    for (i, c) in path.0.iter().enumerate() {
        p.push(c);
        let last = i + 1 == n;
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                let out = match (std::fs::canonicalize(&p), std::fs::canonicalize(root)) {
                    (Ok(t), Ok(r)) => !t.starts_with(r),
                    _ => true,
                };
                let shown = VaultPath(path.0[..=i].to_vec());
                return Err(VaultError::Refused(if out {
                    format!("{shown} is a symbolic link out of the vault (to {target}): refused")
                } else {
                    format!(
                        "{shown} is a symbolic link (to {target}); the vault does not follow links"
                    )
                }));
            }
            Ok(m) if !last && !m.is_dir() => {
                return Err(VaultError::Refused(format!(
                    "{} is not a directory",
                    VaultPath(path.0[..=i].to_vec())
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if last {
                    break;
                }
                if !create {
                    return Err(VaultError::Refused(format!(
                        "{} does not exist",
                        VaultPath(path.0[..=i].to_vec())
                    )));
                }
                match std::fs::create_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(VaultError::io(&p, e)),
                }
            }
            Err(e) => return Err(VaultError::io(&p, e)),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        pool_net::SecretKey::from_bytes([n; 32]).public_key()
    }

    #[test]
    fn paths_refuse_dot_dot_and_normalize_the_rest() {
        assert_eq!(VaultPath::parse("/a//b/./c").unwrap().to_string(), "/a/b/c");
        assert_eq!(VaultPath::parse("a/b").unwrap().to_string(), "/a/b");
        assert_eq!(VaultPath::parse("/").unwrap(), VaultPath::root());
        for bad in ["../escape", "/a/../../etc", "/a/..", "a\0b"] {
            assert!(VaultPath::parse(bad).is_err(), "{bad}");
        }
        let base = VaultPath::parse("/in").unwrap();
        assert!(base.join("x/../../y").is_err());
        assert_eq!(base.join("x/y").unwrap().to_string(), "/in/x/y");
    }

    #[test]
    fn grants_are_by_key_subtree_and_access() {
        let g = vec![
            Grant {
                key: Some(key(1)),
                path: VaultPath::parse("/incoming").unwrap(),
                access: Access::Write,
            },
            Grant {
                key: None,
                path: VaultPath::parse("/pub").unwrap(),
                access: Access::Read,
            },
        ];
        let p = |s| VaultPath::parse(s).unwrap();
        assert!(allowed(&g, &key(1), &p("/incoming/a"), Access::Write));
        assert!(allowed(&g, &key(1), &p("/incoming"), Access::Read));
        assert!(!allowed(&g, &key(1), &p("/incomingx"), Access::Read));
        assert!(!allowed(&g, &key(2), &p("/incoming/a"), Access::Read));
        assert!(allowed(&g, &key(2), &p("/pub/a"), Access::Read));
        assert!(!allowed(&g, &key(2), &p("/pub/a"), Access::Write));
        assert!(!allowed(&g, &key(1), &p("/"), Access::Read));
    }
}
