//! The relay message decoder (POOL-RELAY/1) on arbitrary bytes: no panic,
//! no over-read, and every message that decodes survives a round trip.

use pool_core::relay::Msg;

pub(crate) fn run(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((msg, used))) = Msg::decode(rest) {
        assert!(used >= 3 && used <= rest.len());
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let (again, n) = Msg::decode(&buf)
            .expect("re-encoded message decodes")
            .expect("re-encoded message is whole");
        assert_eq!(n, buf.len());
        match (&again, &msg) {
            // Invalid UTF-8 became U+FFFD (3 bytes each), so the text may
            // now be over the limit: encoding cuts it on a character
            // boundary.
            (
                Msg::Error {
                    code: c1,
                    message: m1,
                },
                Msg::Error {
                    code: c2,
                    message: m2,
                },
            ) => assert!(c1 == c2 && m2.starts_with(m1.as_str())),
            _ => assert_eq!(again, msg),
        }
        rest = &rest[used..];
    }
}
