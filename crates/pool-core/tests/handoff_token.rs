//! The handoff's migration token (docs/handoff.md §1.6), on a virtual
//! clock: minted by the target, good once, only for its session, target,
//! client and source, only until its expiry, only for epochs from its
//! floor; the table is bounded.

use std::time::Duration;

use pool_core::handoff::{Imports, TokenError};
use pool_core::{PublicKey, SecretKey, SeededRng, SessionId};

fn key(n: u8) -> PublicKey {
    SecretKey::from_bytes([n; 32]).public_key()
}

const T0: u64 = 1_800_000_000_000;
const LIFE: Duration = Duration::from_secs(10);

struct Setup {
    imports: Imports,
    rng: SeededRng,
    session: SessionId,
    target: PublicKey,
    source: PublicKey,
    client: PublicKey,
}

fn setup() -> Setup {
    let mut rng = SeededRng::new([7; 32]);
    Setup {
        imports: Imports::new(&mut rng),
        rng,
        session: SessionId([1; 16]),
        target: key(1),
        source: key(2),
        client: key(3),
    }
}

impl Setup {
    fn mint(&mut self, at: u64, floor: u32) -> [u8; 48] {
        self.imports
            .prepare(
                at,
                self.session,
                77,
                &self.target,
                self.source,
                self.client,
                floor,
                LIFE,
                &mut self.rng,
            )
            .expect("prepared")
    }

    fn check(&self, at: u64, token: &[u8], epoch: u32) -> Result<u32, TokenError> {
        self.imports
            .check(at, &self.session, &self.target, &self.client, token, epoch)
            .map(|i| i.handoff)
    }
}

#[test]
fn a_token_is_good_until_its_expiry_and_from_its_floor() {
    let mut s = setup();
    let t = s.mint(T0, 5);
    assert_eq!(s.check(T0, &t, 5), Ok(77));
    assert_eq!(s.check(T0 + 9_999, &t, 6), Ok(77));
    assert_eq!(s.check(T0 + 10_000, &t, 6), Err(TokenError::Expired));
    assert_eq!(
        s.check(T0, &t, 4),
        Err(TokenError::EpochTooLow {
            proposed: 4,
            floor: 5
        })
    );
}

#[test]
fn a_token_is_bound_to_its_session_target_client_and_source() {
    let mut s = setup();
    let t = s.mint(T0, 1);
    let other_client = key(9);
    assert_eq!(
        s.imports
            .check(T0, &s.session, &s.target, &other_client, &t, 1)
            .unwrap_err(),
        TokenError::BadMac
    );
    assert_eq!(
        s.imports
            .check(T0, &s.session, &key(8), &s.client, &t, 1)
            .unwrap_err(),
        TokenError::BadMac
    );
    assert_eq!(
        s.imports
            .check(T0, &SessionId([2; 16]), &s.target, &s.client, &t, 1)
            .unwrap_err(),
        TokenError::NotPrepared
    );
    // Any altered byte is refused.
    for i in 0..48 {
        let mut bad = t;
        bad[i] ^= 1;
        assert!(s.check(T0, &bad, 1).is_err(), "byte {i}");
    }
    assert_eq!(s.check(T0, &t[..47], 1), Err(TokenError::Malformed));
    // Another target's table (another key) never accepts it, even for a
    // session it has prepared itself.
    let mut other = setup();
    other.rng = SeededRng::new([8; 32]);
    other.imports = Imports::new(&mut other.rng);
    other.mint(T0, 1);
    assert_eq!(other.check(T0, &t, 1), Err(TokenError::BadMac));
}

#[test]
fn a_token_is_good_once() {
    let mut s = setup();
    let t = s.mint(T0, 1);
    assert!(s.imports.spend(&s.session).is_some());
    assert_eq!(s.check(T0 + 1, &t, 1), Err(TokenError::Spent));
    // A new handoff of the same session gets a new token; the old one
    // stays refused.
    let t2 = s.mint(T0 + 2, 1);
    assert_ne!(t, t2);
    assert_eq!(s.check(T0 + 3, &t, 1), Err(TokenError::Spent));
    assert_eq!(s.check(T0 + 3, &t2, 1), Ok(77));
    // Expired imports are spent too, and forgotten a minute after expiry.
    s.imports.expire(T0 + 2 + 10_000);
    assert_eq!(s.imports.pending(), 0);
    assert_eq!(s.check(T0 + 20_000, &t2, 1), Err(TokenError::Spent));
    s.imports.expire(T0 + 2 + 70_000);
    assert_eq!(s.check(T0 + 70_002, &t2, 1), Err(TokenError::NotPrepared));
}

#[test]
fn one_pending_handoff_per_session_and_a_bounded_table() {
    let mut s = setup();
    s.mint(T0, 1);
    assert_eq!(
        s.imports
            .prepare(T0, s.session, 78, &s.target, s.source, s.client, 1, LIFE, &mut s.rng),
        Err(TokenError::Pending)
    );
    for i in 1..Imports::MAX as u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        s.imports
            .prepare(
                T0,
                SessionId(id),
                i,
                &s.target,
                s.source,
                s.client,
                1,
                LIFE,
                &mut s.rng,
            )
            .expect("room");
    }
    assert_eq!(
        s.imports.prepare(
            T0,
            SessionId([0xff; 16]),
            1,
            &s.target,
            s.source,
            s.client,
            1,
            LIFE,
            &mut s.rng
        ),
        Err(TokenError::Full)
    );
    // Room again once they expire.
    assert!(s
        .imports
        .prepare(
            T0 + 10_000,
            SessionId([0xff; 16]),
            1,
            &s.target,
            s.source,
            s.client,
            1,
            LIFE,
            &mut s.rng
        )
        .is_ok());
}
