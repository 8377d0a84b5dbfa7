//! Who may use the shim socket: `[shim] allow_users` / `allow_groups`,
//! resolved against `/etc/passwd` and `/etc/group`.

use std::collections::HashSet;

use crate::config::ShimSection;
use crate::types::Principal;

/// `name:…:id:…` lines of `/etc/passwd` or `/etc/group`: name, id, and
/// the third and fourth fields (primary gid, or the member list).
fn db_lines(text: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    text.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next()?;
        let id = f.next()?.trim().parse().ok()?;
        Some((name, id, f.next().unwrap_or("")))
    })
}

fn lookup(db: &str, p: &Principal, what: &str, file: &str) -> Result<u32, String> {
    match p {
        Principal::Id(id) => Ok(*id),
        Principal::Name(n) => match n.trim().parse::<u32>() {
            Ok(id) => Ok(id),
            Err(_) => db_lines(db)
                .find(|(name, _, _)| *name == n.trim())
                .map(|(_, id, _)| id)
                .ok_or_else(|| format!("no {what} `{n}` in {file} (a numeric id works too)")),
        },
    }
}

/// Who may use the daemon's shim socket, resolved once from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    uids: HashSet<u32>,
    gids: HashSet<u32>,
}

impl Allow {
    /// From `[shim]` and the texts of `/etc/passwd` and `/etc/group`;
    /// `daemon_uid` is always allowed, and so is root.
    pub fn resolve(
        section: &ShimSection,
        daemon_uid: u32,
        passwd: &str,
        group: &str,
    ) -> Result<Allow, String> {
        let mut uids: HashSet<u32> = [0, daemon_uid].into();
        for u in &section.allow_users {
            uids.insert(lookup(passwd, u, "user", "/etc/passwd")?);
        }
        let mut gids = HashSet::new();
        for g in &section.allow_groups {
            let gid = lookup(group, g, "group", "/etc/group")?;
            gids.insert(gid);
            // Supplementary members listed in /etc/group (SO_PEERCRED
            // gives only the caller's own group).
            let members = db_lines(group)
                .filter(|(_, id, _)| *id == gid)
                .flat_map(|(_, _, m)| m.split(',').map(str::trim));
            for m in members.filter(|m| !m.is_empty()) {
                if let Some((_, uid, _)) = db_lines(passwd).find(|(n, _, _)| *n == m) {
                    uids.insert(uid);
                }
            }
        }
        Ok(Allow { uids, gids })
    }

    /// [`Allow::resolve`] with this host's `/etc/passwd` and `/etc/group`.
    pub fn resolve_here(section: &ShimSection, daemon_uid: u32) -> Result<Allow, String> {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Allow::resolve(section, daemon_uid, &passwd, &group)
    }

    /// Whether a caller with this uid and gid (`SO_PEERCRED`) is served.
    pub fn permits(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}
