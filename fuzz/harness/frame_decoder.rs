//! The record peeker and the frame decoder on arbitrary bytes: no panic,
//! no over-read, and every frame that decodes re-encodes to itself.

use pool_core::wire::{self, Frame};

pub(crate) fn run(data: &[u8]) {
    // A carrier's front: a record is either incomplete, whole and within
    // the limit, or an error.
    if let Ok(Some((_, len))) = wire::peek_record(data) {
        assert!(len <= pool_core::MAX_RECORD_LEN);
        assert!(len <= data.len());
    }
    // A record's plaintext: frames back to back.
    let mut rest = data;
    while !rest.is_empty() {
        let Ok((frame, used)) = wire::decode(rest) else {
            break;
        };
        assert!(used > 0 && used <= rest.len());
        check_round_trip(&frame);
        rest = &rest[used..];
    }
}

fn check_round_trip(frame: &Frame<'_>) {
    let mut buf = Vec::new();
    frame.encode_to_vec(&mut buf);
    assert_eq!(buf.len(), frame.encoded_len());
    let (again, used) = wire::decode(&buf).expect("re-encoded frame decodes");
    assert_eq!(used, buf.len());
    assert_eq!(&again, frame);
}
