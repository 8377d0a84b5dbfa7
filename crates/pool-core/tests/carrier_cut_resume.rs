//! A carrier cut in the middle of a 64 MiB transfer on several streams,
//! then a resume: what arrives equals what was sent, nothing twice.
mod util;

#[test]
fn cut_mid_transfer_then_resume_loses_and_duplicates_nothing() {
    let mut p = util::pair();
    let mut cuts = 0;
    let results = util::transfer(&mut p, 4, 64 << 20, |p, got| {
        if p.hold_ab {
            // A round of records is in flight: the cut loses it.
            assert!(!p.ab.is_empty());
            cuts += 1;
            p.cut();
            p.resume().expect("resume");
        } else if (cuts == 0 && got > 20 << 20) || (cuts == 1 && got > 45 << 20) {
            p.hold_ab = true;
        }
    });
    assert_eq!(cuts, 2);
    for (sent, got, n_sent, n_got) in results {
        assert_eq!(n_sent, n_got);
        assert_eq!(sent, got);
    }
    let sa = p.a.stats();
    let sb = p.b.stats();
    assert_eq!(sa.resumes, 2);
    assert_eq!(sb.resumes, 2);
    assert!(
        sa.frames_resent > 0,
        "the cut lost frames in flight, so some must be resent"
    );
    assert_eq!(sb.stream_bytes_received, 64 << 20);
}
