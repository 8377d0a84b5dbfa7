//! Where nodes registered at peer relays are: what their HAVE and GONE
//! messages said. No I/O; the peering links feed it, CONNECTs read it.
//!
//! A key may be announced by more than one peer (a node that moved and
//! whose old relay has not said GONE yet, or two instances); the newest
//! announcement wins, and the others stand in when it is withdrawn.

use std::collections::{HashMap, HashSet};

use pool_core::PublicKey;

/// What a HAVE did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Added {
    /// Recorded (new, or announced again: now the newest).
    Yes,
    /// The peer already advertises its cap of keys: ignored.
    OverCap,
}

#[derive(Debug, Default)]
pub(crate) struct Directory {
    seq: u64,
    /// Per node key: the peers announcing it, with when (a sequence).
    by_key: HashMap<PublicKey, Vec<(PublicKey, u64)>>,
    /// Per peer: the keys it announces.
    by_peer: HashMap<PublicKey, HashSet<PublicKey>>,
}

impl Directory {
    /// `peer` says `key` is registered there.
    pub(crate) fn have(&mut self, peer: PublicKey, key: PublicKey, cap: usize) -> Added {
        let keys = self.by_peer.entry(peer).or_default();
        if !keys.contains(&key) && keys.len() >= cap {
            return Added::OverCap;
        }
        keys.insert(key);
        self.seq += 1;
        let seq = self.seq;
        let at = self.by_key.entry(key).or_default();
        at.retain(|(p, _)| *p != peer);
        at.push((peer, seq));
        Added::Yes
    }

    /// `peer` says `key` is no longer registered there.
    pub(crate) fn gone(&mut self, peer: PublicKey, key: PublicKey) {
        if let Some(keys) = self.by_peer.get_mut(&peer) {
            keys.remove(&key);
        }
        if let Some(at) = self.by_key.get_mut(&key) {
            at.retain(|(p, _)| *p != peer);
            if at.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    /// Forgets everything `peer` announced (its link went down, or its
    /// enrolment ended).
    pub(crate) fn drop_peer(&mut self, peer: PublicKey) {
        for key in self.by_peer.remove(&peer).unwrap_or_default() {
            if let Some(at) = self.by_key.get_mut(&key) {
                at.retain(|(p, _)| *p != peer);
                if at.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// The peer that announced `key` most recently.
    pub(crate) fn lookup(&self, key: &PublicKey) -> Option<PublicKey> {
        self.by_key
            .get(key)?
            .iter()
            .max_by_key(|(_, seq)| *seq)
            .map(|(p, _)| *p)
    }

    /// How many keys `peer` announces now.
    pub(crate) fn count(&self, peer: &PublicKey) -> usize {
        self.by_peer.get(peer).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    #[test]
    fn the_newest_announcement_wins_and_others_stand_in() {
        let mut d = Directory::default();
        let (r2, r3) = (k(2), k(3));
        assert_eq!(d.lookup(&k(9)), None);
        assert_eq!(d.have(r2, k(9), 10), Added::Yes);
        assert_eq!(d.lookup(&k(9)), Some(r2));
        // The node moved to r3 before r2 said GONE: r3 wins.
        d.have(r3, k(9), 10);
        assert_eq!(d.lookup(&k(9)), Some(r3));
        // It came back to r2: announced again, r2 is the newest.
        d.have(r2, k(9), 10);
        assert_eq!(d.lookup(&k(9)), Some(r2));
        d.gone(r2, k(9));
        assert_eq!(d.lookup(&k(9)), Some(r3));
        d.gone(r3, k(9));
        assert_eq!(d.lookup(&k(9)), None);
        assert!(d.by_key.is_empty());
    }

    #[test]
    fn a_peer_going_away_takes_its_keys_only() {
        let mut d = Directory::default();
        for n in 10..20 {
            d.have(k(2), k(n), 100);
        }
        d.have(k(3), k(15), 100);
        d.have(k(3), k(30), 100);
        d.drop_peer(k(2));
        assert_eq!(d.count(&k(2)), 0);
        assert_eq!(d.lookup(&k(10)), None);
        assert_eq!(d.lookup(&k(15)), Some(k(3)));
        assert_eq!(d.lookup(&k(30)), Some(k(3)));
        // GONE for a key never announced, or from an unknown peer: no-op.
        d.gone(k(4), k(30));
        d.gone(k(3), k(99));
        assert_eq!(d.lookup(&k(30)), Some(k(3)));
    }

    #[test]
    fn a_peer_cannot_advertise_past_its_cap() {
        let mut d = Directory::default();
        assert_eq!(d.have(k(2), k(10), 2), Added::Yes);
        assert_eq!(d.have(k(2), k(11), 2), Added::Yes);
        assert_eq!(d.have(k(2), k(12), 2), Added::OverCap);
        // Announcing a key it already has is not "more".
        assert_eq!(d.have(k(2), k(11), 2), Added::Yes);
        assert_eq!(d.count(&k(2)), 2);
        assert_eq!(d.lookup(&k(12)), None);
        // Another peer has its own cap.
        assert_eq!(d.have(k(3), k(12), 2), Added::Yes);
    }
}
