//! Known-answer tests of every primitive POOL uses, run before a process
//! opens a session: a miscompiled or wrongly linked crypto library then
//! stops the process with the name of the primitive instead of speaking a
//! broken protocol.
//!
//! The vectors are published ones (RFC 8439, the GCM specification,
//! RFC 7748, RFC 7693) plus one Noise `IK` handshake between fixed static
//! and ephemeral keys, whose handshake hash and first message were computed
//! once with this code and checked in. Every test goes through the same
//! code paths the protocol uses: `ring` for the data-path AEADs, snow's
//! resolver for X25519, BLAKE2s and the Noise ChaChaPoly.

use std::fmt;
use std::time::{Duration, Instant};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use snow::resolvers::{CryptoResolver, DefaultResolver};

use crate::handshake::{params, NOISE_IK};
use crate::rng::SeededRng;

/// One test's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestResult {
    /// The test's name, e.g. `"chacha20-poly1305"`.
    pub name: &'static str,
    /// How long it took.
    pub elapsed: Duration,
}

/// All tests passed: their names and times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Each test, in the order run.
    pub tests: Vec<TestResult>,
    /// Time for the whole run.
    pub total: Duration,
}

/// A known-answer test failed: the primitive named must not be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfTestFailure {
    /// The failing test's name.
    pub name: &'static str,
    /// What differed.
    pub detail: String,
}

impl fmt::Display for SelfTestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crypto self-test {} failed ({}): this build's cryptography is broken; \
             refusing to start. Reinstall pool from a trusted build",
            self.name, self.detail
        )
    }
}

impl std::error::Error for SelfTestFailure {}

/// The names of the tests, in the order [`run`] runs them.
pub const TESTS: [&str; 5] = [
    "chacha20-poly1305",
    "aes-256-gcm",
    "x25519",
    "blake2s",
    "noise-ik",
];

/// Runs every known-answer test; the first failure stops the run.
pub fn run() -> Result<Report, SelfTestFailure> {
    run_inner(None)
}

/// Like [`run`], with the expected answer of test `corrupt` altered, so
/// that it fails: lets a test check what a process does when a primitive is
/// broken. Production code never calls it (no flag or variable reaches it).
#[doc(hidden)]
pub fn run_corrupted(corrupt: &str) -> Result<Report, SelfTestFailure> {
    run_inner(Some(corrupt))
}

type Test = fn(bool) -> Result<(), String>;

fn run_inner(corrupt: Option<&str>) -> Result<Report, SelfTestFailure> {
    let all: [(&'static str, Test); 5] = [
        (TESTS[0], chacha20_poly1305),
        (TESTS[1], aes_256_gcm),
        (TESTS[2], x25519),
        (TESTS[3], blake2s),
        (TESTS[4], noise_ik),
    ];
    let start = Instant::now();
    let mut tests = Vec::with_capacity(all.len());
    for (name, test) in all {
        let t = Instant::now();
        test(corrupt == Some(name)).map_err(|detail| SelfTestFailure { name, detail })?;
        tests.push(TestResult {
            name,
            elapsed: t.elapsed(),
        });
    }
    Ok(Report {
        tests,
        total: start.elapsed(),
    })
}

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            d(p[0]) << 4 | d(p.get(1).copied().unwrap_or(b'0'))
        })
        .collect()
}

/// The expected bytes, with the first bit flipped when `corrupt`.
fn expected(s: &str, corrupt: bool) -> Vec<u8> {
    let mut v = hex(s);
    if corrupt {
        if let Some(b) = v.first_mut() {
            *b ^= 1;
        }
    }
    v
}

fn check(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} differs from the known answer"))
    }
}

/// Seals with `ring`, checks ciphertext and tag, opens again.
fn aead_kat(
    alg: &'static aead::Algorithm,
    key: &str,
    nonce: &str,
    aad: &[u8],
    plain: &[u8],
    sealed: &[u8],
) -> Result<(), String> {
    let key = hex(key);
    let nonce: [u8; 12] = hex(nonce)
        .try_into()
        .map_err(|_| "bad nonce length".to_string())?;
    let make = || -> Result<LessSafeKey, String> {
        Ok(LessSafeKey::new(
            UnboundKey::new(alg, &key).map_err(|_| "key refused".to_string())?,
        ))
    };
    let mut buf = plain.to_vec();
    make()?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| "seal failed".to_string())?;
    check("ciphertext and tag", &buf, sealed)?;
    let opened = make()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| "open of the known ciphertext failed".to_string())?;
    check("decrypted text", opened, plain)?;
    // A flipped tag bit must be refused.
    let mut forged = sealed.to_vec();
    if let Some(b) = forged.last_mut() {
        *b ^= 0x80;
    }
    if make()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut forged,
        )
        .is_ok()
    {
        return Err("a forged tag was accepted".into());
    }
    Ok(())
}

/// RFC 8439 §2.8.2.
fn chacha20_poly1305(corrupt: bool) -> Result<(), String> {
    let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip \
for the future, sunscreen would be it.";
    let sealed = expected(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
         3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
         92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
         3ff4def08e4b7a9de576d26586cec64b6116\
         1ae10b594f09e26a7e902ecbd0600691",
        corrupt,
    );
    aead_kat(
        &aead::CHACHA20_POLY1305,
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        "070000004041424344454647",
        &hex("50515253c0c1c2c3c4c5c6c7"),
        plain,
        &sealed,
    )
}

/// The GCM specification (McGrew & Viega), test case 14: AES-256, zero key
/// and IV, one zero block.
fn aes_256_gcm(corrupt: bool) -> Result<(), String> {
    let sealed = expected(
        "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
        corrupt,
    );
    aead_kat(
        &aead::AES_256_GCM,
        &"00".repeat(32),
        &"00".repeat(12),
        b"",
        &[0u8; 16],
        &sealed,
    )
}

/// RFC 7748 §6.1: both public keys and the shared secret.
fn x25519(corrupt: bool) -> Result<(), String> {
    let choice = "25519".parse().map_err(|_| "no 25519 choice".to_string())?;
    let mut alice = DefaultResolver
        .resolve_dh(&choice)
        .ok_or("snow has no X25519")?;
    let mut bob = DefaultResolver
        .resolve_dh(&choice)
        .ok_or("snow has no X25519")?;
    alice.set(&hex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    bob.set(&hex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    check(
        "Alice's public key",
        alice.pubkey(),
        &hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"),
    )?;
    check(
        "Bob's public key",
        bob.pubkey(),
        &hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"),
    )?;
    let want = expected(
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
        corrupt,
    );
    let (mut ab, mut ba) = ([0u8; 32], [0u8; 32]);
    alice
        .dh(bob.pubkey(), &mut ab)
        .map_err(|_| "dh refused".to_string())?;
    bob.dh(alice.pubkey(), &mut ba)
        .map_err(|_| "dh refused".to_string())?;
    check("shared secret (Alice)", &ab, &want)?;
    check("shared secret (Bob)", &ba, &want)
}

/// RFC 7693 appendix A: BLAKE2s-256("abc").
fn blake2s(corrupt: bool) -> Result<(), String> {
    let choice = "BLAKE2s"
        .parse()
        .map_err(|_| "no BLAKE2s choice".to_string())?;
    let mut h = DefaultResolver
        .resolve_hash(&choice)
        .ok_or("snow has no BLAKE2s")?;
    h.reset();
    h.input(b"abc");
    let mut out = [0u8; 32];
    h.result(&mut out);
    check(
        "digest",
        &out,
        &expected(
            "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982",
            corrupt,
        ),
    )
}

/// Fixed keys of the Noise vector: initiator static, responder static,
/// initiator ephemeral, responder ephemeral.
const IK_KEYS: [[u8; 32]; 4] = [[0x11; 32], [0x22; 32], [0x33; 32], [0x44; 32]];
/// The handshake hash of [`noise_ik`], computed once and checked in.
const IK_HASH: &str = "b159ba8eaee26936c1e42df7e00c7b6409c4b10bedbc21557ce7ec99a3ecb34f";
/// BLAKE2s of the initiator's first message.
const IK_MSG1: &str = "4cad32405f6539b932f90fdad6364570a30c6225461a9f856b9a325c658468a4";

/// A full `Noise_IK_25519_ChaChaPoly_BLAKE2s` handshake between fixed
/// static and ephemeral keys in memory: the first message and the
/// handshake hash must equal the checked-in ones, and a transport message
/// must cross both ways.
fn noise_ik(corrupt: bool) -> Result<(), String> {
    let (hash, msg1) = ik_transcript()?;
    check("first message", &msg1, &hex(IK_MSG1))?;
    check("handshake hash", &hash, &expected(IK_HASH, corrupt))
}

/// Runs the fixed handshake; returns (handshake hash, BLAKE2s(message 1)).
fn ik_transcript() -> Result<([u8; 32], [u8; 32]), String> {
    let e = |_| "noise handshake failed".to_string();
    let p = params(NOISE_IK).map_err(|_| "no IK params".to_string())?;
    let choice = "25519".parse().map_err(|_| "no 25519 choice".to_string())?;
    let mut rs = DefaultResolver
        .resolve_dh(&choice)
        .ok_or("snow has no X25519")?;
    rs.set(&IK_KEYS[1]);
    let resolver = || crate::rng::Resolver::boxed(&mut SeededRng::new([0; 32]));
    let mut init = snow::Builder::with_resolver(p.clone(), resolver())
        .prologue(b"POOL selftest")
        .and_then(|b| b.local_private_key(&IK_KEYS[0]))
        .and_then(|b| b.remote_public_key(rs.pubkey()))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&IK_KEYS[2]))
        .and_then(|b| b.build_initiator())
        .map_err(e)?;
    let mut resp = snow::Builder::with_resolver(p, resolver())
        .prologue(b"POOL selftest")
        .and_then(|b| b.local_private_key(&IK_KEYS[1]))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(&IK_KEYS[3]))
        .and_then(|b| b.build_responder())
        .map_err(e)?;
    let (mut m1, mut m2, mut scratch) = ([0u8; 256], [0u8; 256], [0u8; 256]);
    let n1 = init.write_message(b"hello", &mut m1).map_err(e)?;
    let msg1 = m1;
    let r = resp.read_message(&m1[..n1], &mut scratch).map_err(e)?;
    check("first payload", &scratch[..r], b"hello")?;
    let n2 = resp.write_message(b"welcome", &mut m2).map_err(e)?;
    let r = init.read_message(&m2[..n2], &mut scratch).map_err(e)?;
    check("second payload", &scratch[..r], b"welcome")?;
    let mut hash = [0u8; 32];
    let h = init.get_handshake_hash();
    if h != resp.get_handshake_hash() || h.len() != 32 {
        return Err("the two sides' handshake hashes differ".into());
    }
    hash.copy_from_slice(h);
    let mut ti = init.into_transport_mode().map_err(e)?;
    let mut tr = resp.into_transport_mode().map_err(e)?;
    let n = ti.write_message(b"ping", &mut m1).map_err(e)?;
    let r = tr.read_message(&m1[..n], &mut scratch).map_err(e)?;
    check("transport message", &scratch[..r], b"ping")?;
    let n = tr.write_message(b"pong", &mut m2).map_err(e)?;
    let r = ti.read_message(&m2[..n], &mut scratch).map_err(e)?;
    check("transport answer", &scratch[..r], b"pong")?;
    let bchoice = "BLAKE2s"
        .parse()
        .map_err(|_| "no BLAKE2s choice".to_string())?;
    let mut b = DefaultResolver
        .resolve_hash(&bchoice)
        .ok_or("snow has no BLAKE2s")?;
    b.reset();
    b.input(&msg1[..n1]);
    let mut digest = [0u8; 32];
    b.result(&mut digest);
    Ok((hash, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints the Noise vector (to regenerate the golden values after a
    /// deliberate change of the fixed handshake: `--nocapture`).
    #[test]
    fn print_ik_golden() {
        let (h, m) = ik_transcript().unwrap();
        let x = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
        println!("IK_HASH {}\nIK_MSG1 {}", x(&h), x(&m));
    }

    #[test]
    fn fast_enough() {
        let r = run().unwrap();
        // The goal is < 5 ms in release builds; debug builds get slack.
        assert!(r.total < Duration::from_millis(200), "{r:?}");
    }

    #[test]
    fn all_pass() {
        let r = run().unwrap();
        assert_eq!(r.tests.len(), TESTS.len());
    }

    #[test]
    fn each_corruption_names_its_test() {
        for name in TESTS {
            let err = run_corrupted(name).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}
