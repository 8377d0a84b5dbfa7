//! Codec and proof tests, hostile input included.

use super::*;
use crate::keys::SecretKey;
use crate::SeededRng;
use rand_core::RngCore;

#[test]
fn messages_round_trip() {
    let k = PublicKey([7; 32]);
    let msgs = [
        Msg::Hello { version: VERSION },
        Msg::Challenge {
            ephemeral: [1; 32],
            nonce: [2; 32],
        },
        Msg::Auth {
            key: k,
            proof: [3; 32],
            intent: Intent::Register,
        },
        Msg::Auth {
            key: k,
            proof: [3; 32],
            intent: Intent::Connect(PublicKey([9; 32])),
        },
        Msg::Auth {
            key: k,
            proof: [3; 32],
            intent: Intent::Accept([4; 16]),
        },
        Msg::Welcome {
            observed: "[fd00::1]:443".parse().unwrap(),
        },
        Msg::Welcome {
            observed: "10.1.2.3:9".parse().unwrap(),
        },
        Msg::Error {
            code: ERR_UNKNOWN_PEER,
            message: "no such peer".into(),
        },
        Msg::Incoming {
            circuit: [5; 16],
            from: k,
        },
        Msg::Ping(42),
        Msg::Pong(43),
    ];
    let mut buf = Vec::new();
    for m in &msgs {
        m.encode(&mut buf);
    }
    let mut at = 0;
    for m in &msgs {
        // Every prefix short of the whole message asks for more.
        let (got, used) = Msg::decode(&buf[at..]).unwrap().unwrap();
        assert_eq!(&got, m);
        for cut in 0..used {
            assert_eq!(Msg::decode(&buf[at..at + cut]).unwrap(), None);
        }
        at += used;
    }
    assert_eq!(at, buf.len());
}

#[test]
fn long_error_is_cut_on_a_character_boundary() {
    let message = "é".repeat(MAX_BODY); // 2 bytes each
    let mut buf = Vec::new();
    Msg::Error {
        code: ERR_PROTOCOL,
        message: message.clone(),
    }
    .encode(&mut buf);
    assert!(buf.len() <= 3 + MAX_BODY);
    let (Msg::Error { message: got, .. }, used) = Msg::decode(&buf).unwrap().unwrap() else {
        panic!("not an ERROR")
    };
    assert_eq!(used, buf.len());
    assert!(!got.contains('\u{fffd}'));
    assert!(message.starts_with(&got) && got.len() >= MAX_BODY - 2);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(Msg::decode(&[0, 0, 0]).is_err());
    assert!(Msg::decode(&[9, 0, 0]).is_err());
    assert!(matches!(
        Msg::decode(&[1, 0xff, 0xff]),
        Err(RelayError::TooLong(_))
    ));
    assert!(Msg::decode(b"\x01\x00\x0bNOT-RELAY!\x01").is_err());
    assert!(Msg::decode(&[3, 0, 66, 0, 0]).is_ok()); // incomplete: wait
    let mut auth = vec![3, 0, 66];
    auth.extend_from_slice(&[0; 66]);
    assert!(Msg::decode(&auth).is_err()); // REGISTER with a body
                                          // Fuzz-ish: random bytes never panic.
    let mut rng = SeededRng::from_u64(1);
    for _ in 0..20_000 {
        let mut b = [0u8; 80];
        rng.fill_bytes(&mut b);
        b[0] %= 10;
        b[1] = 0;
        let _ = Msg::decode(&b);
    }
}

#[test]
fn proof_checks_key_ownership_and_binding() {
    let mut rng = SeededRng::from_u64(2);
    let node = SecretKey::from_bytes([11; 32]);
    let other = SecretKey::from_bytes([12; 32]);
    let ch = Challenge::new(&mut rng);
    let Msg::Challenge { ephemeral, nonce } = ch.msg() else {
        unreachable!()
    };
    let intent = Intent::Connect(other.public_key());
    let Some(Msg::Auth {
        key,
        proof,
        intent: i,
    }) = authenticate(&node, &ephemeral, &nonce, intent)
    else {
        panic!("no auth")
    };
    assert!(ch.verify(&key, &proof, &i));
    // Claiming another key with this proof fails.
    assert!(!ch.verify(&other.public_key(), &proof, &i));
    // The proof is bound to the intent.
    assert!(!ch.verify(&key, &proof, &Intent::Register));
    // ... and to this challenge.
    let ch2 = Challenge::new(&mut rng);
    assert!(!ch2.verify(&key, &proof, &i));
    // A low-order key is refused outright.
    assert!(!ch.verify(&PublicKey([0; 32]), &proof, &i));
    assert!(authenticate(&node, &[0; 32], &nonce, Intent::Register).is_none());
}

fn round_trip(msgs: &[Msg]) {
    let mut buf = Vec::new();
    for m in msgs {
        m.encode(&mut buf);
    }
    let mut at = 0;
    for m in msgs {
        let (got, used) = Msg::decode(&buf[at..]).unwrap().unwrap();
        assert_eq!(&got, m);
        for cut in 0..used {
            assert_eq!(Msg::decode(&buf[at..at + cut]).unwrap(), None);
        }
        at += used;
    }
    assert_eq!(at, buf.len());
}

#[test]
fn peering_messages_round_trip() {
    let ch = PeerChallenge {
        ephemeral: [1; 32],
        nonce: [2; 32],
    };
    let (a, b) = (PublicKey([7; 32]), PublicKey([8; 32]));
    let auth = |intent| Msg::Auth {
        key: a,
        proof: [3; 32],
        intent,
    };
    let hops: Vec<RouteHop> = (0..MAX_ROUTE as u8)
        .map(|i| RouteHop {
            key: PublicKey([i; 32]),
            addr: format!("10.0.0.{i}:9255").parse().unwrap(),
        })
        .collect();
    let keys: Vec<PublicKey> = (0..MAX_KEYS_PER_MSG as u8)
        .map(|i| PublicKey([i; 32]))
        .collect();
    round_trip(&[
        auth(Intent::Peer(ch)),
        auth(Intent::PeerCircuit {
            challenge: ch,
            from: a,
            to: b,
        }),
        auth(Intent::ConnectRouted(b)),
        auth(Intent::AcceptRouted([4; 16])),
        Msg::PeerProof {
            key: b,
            proof: [5; 32],
        },
        Msg::Route(Vec::new()),
        Msg::Route(hops[..1].to_vec()),
        Msg::Route(hops.clone()),
        Msg::Have(vec![a]),
        Msg::Have(keys.clone()),
        Msg::Gone(vec![b, a]),
        Msg::End {
            message: "enrolment ended by the operator".into(),
        },
        Msg::End {
            message: String::new(),
        },
    ]);
    assert!(Intent::Peer(ch).is_relay() && !Intent::Connect(a).is_relay());
    assert!(Intent::ConnectRouted(a).wants_route() && !Intent::Connect(a).wants_route());
}

#[test]
fn oversized_batches_are_cut_and_key_batches_split() {
    let keys: Vec<PublicKey> = (0..70u8).map(|i| PublicKey([i; 32])).collect();
    let mut buf = Vec::new();
    Msg::Have(keys.clone()).encode(&mut buf);
    let (Msg::Have(got), _) = Msg::decode(&buf).unwrap().unwrap() else {
        panic!("not HAVE")
    };
    assert_eq!(got, keys[..MAX_KEYS_PER_MSG]);
    let batches: Vec<Msg> = key_batches(&keys, true).collect();
    assert_eq!(batches.len(), 3);
    let mut all = Vec::new();
    for m in batches {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert!(buf.len() <= 3 + MAX_BODY);
        let Msg::Gone(k) = Msg::decode(&buf).unwrap().unwrap().0 else {
            panic!("not GONE")
        };
        all.extend(k);
    }
    assert_eq!(all, keys);
    let hops = vec![
        RouteHop {
            key: PublicKey([1; 32]),
            addr: "[::1]:1".parse().unwrap()
        };
        MAX_ROUTE + 3
    ];
    let mut buf = Vec::new();
    Msg::Route(hops).encode(&mut buf);
    let Msg::Route(got) = Msg::decode(&buf).unwrap().unwrap().0 else {
        panic!("not ROUTE")
    };
    assert_eq!(got.len(), MAX_ROUTE);
}

fn raw(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn hostile_peering_frames_are_clear_errors() {
    let malformed = |b: Vec<u8>| {
        let r = Msg::decode(&b);
        assert!(matches!(r, Err(RelayError::Malformed(_))), "{b:?}: {r:?}");
    };
    // HAVE / GONE: empty, or not a whole number of keys.
    malformed(raw(11, &[]));
    malformed(raw(12, &[]));
    malformed(raw(11, &[0; 33]));
    malformed(raw(12, &[0; 31]));
    // ROUTE: a partial hop, or more hops than allowed.
    malformed(raw(10, &[0; 49]));
    malformed(raw(10, &[0; 50 * (MAX_ROUTE + 1)]));
    // PEER_PROOF: wrong size.
    malformed(raw(9, &[0; 63]));
    malformed(raw(9, &[0; 65]));
    // AUTH intents with the wrong body for peering.
    for (code, n) in [
        (3u8, 63usize),
        (3, 65),
        (4, 127),
        (4, 129),
        (5, 31),
        (6, 17),
        (7, 0),
    ] {
        let mut body = vec![0u8; 65];
        body[64] = code;
        body.extend(std::iter::repeat_n(0u8, n));
        malformed(raw(3, &body));
    }
    // An unknown type past the new ones.
    assert_eq!(Msg::decode(&raw(14, &[])), Err(RelayError::UnknownType(14)));
    // An END with bytes that are not UTF-8 decodes (lossily), not panics.
    let Msg::End { message } = Msg::decode(&raw(13, &[0xff, b'x'])).unwrap().unwrap().0 else {
        panic!("not END")
    };
    assert!(message.ends_with('x'));
    // Random frames of every type, every length: errors or messages,
    // never a panic; what decodes re-encodes to the same bytes, except
    // the lossy texts.
    let mut rng = SeededRng::from_u64(9);
    for _ in 0..50_000 {
        let ty = (rng.next_u32() % 16) as u8;
        let len = (rng.next_u32() % 420) as usize;
        let mut body = vec![0u8; len];
        rng.fill_bytes(&mut body);
        if ty == 3 && len > 64 {
            body[64] %= 8;
        }
        let frame = raw(ty, &body);
        if let Ok(Some((m, used))) = Msg::decode(&frame) {
            assert_eq!(used, frame.len());
            if !matches!(
                m,
                Msg::Error { .. } | Msg::End { .. } | Msg::Hello { .. } | Msg::Welcome { .. }
            ) {
                let mut again = Vec::new();
                m.encode(&mut again);
                assert_eq!(again, frame, "{m:?}");
            }
        }
    }
}

#[test]
fn peer_proof_binds_the_dialled_relay_key_the_dialler_and_the_challenge() {
    let mut rng = SeededRng::from_u64(3);
    let r1 = SecretKey::from_bytes([21; 32]);
    let r2 = SecretKey::from_bytes([22; 32]);
    let node = SecretKey::from_bytes([23; 32]);
    let ch = Challenge::new(&mut rng);
    let pc = ch.peer_challenge();
    let Some(Msg::PeerProof { key, proof }) = peer_proof(&r2, &pc, &r1.public_key()) else {
        panic!("no proof")
    };
    assert_eq!(key, r2.public_key());
    assert!(ch.verify_peer(&key, &r1.public_key(), &proof));
    // Another relay's key with this proof fails (a node or relay posing
    // as r2 does not hold its secret).
    assert!(!ch.verify_peer(&node.public_key(), &r1.public_key(), &proof));
    let Some(Msg::PeerProof { proof: forged, .. }) = peer_proof(&node, &pc, &r1.public_key())
    else {
        panic!("no proof")
    };
    assert!(!ch.verify_peer(&r2.public_key(), &r1.public_key(), &forged));
    // Bound to the dialler's key and to this challenge.
    assert!(!ch.verify_peer(&key, &node.public_key(), &proof));
    assert!(!Challenge::new(&mut rng).verify_peer(&key, &r1.public_key(), &proof));
    // A low-order ephemeral key gives no proof; a low-order claimed key
    // never verifies.
    let low = PeerChallenge {
        ephemeral: [0; 32],
        nonce: [1; 32],
    };
    assert!(peer_proof(&r2, &low, &r1.public_key()).is_none());
    assert!(!ch.verify_peer(&PublicKey([0; 32]), &r1.public_key(), &proof));
    // A node's AUTH for CONNECT is no proof for a PEER intent.
    let Msg::Challenge { ephemeral, nonce } = ch.msg() else {
        unreachable!()
    };
    let Some(Msg::Auth { key, proof, .. }) =
        authenticate(&node, &ephemeral, &nonce, Intent::Connect(r2.public_key()))
    else {
        panic!("no auth")
    };
    assert!(!ch.verify(&key, &proof, &Intent::Peer(pc)));
}
