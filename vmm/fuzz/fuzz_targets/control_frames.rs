//! The control channel's framing (a 4-byte big-endian length, then JSON) on arbitrary bytes,
//! read as each side reads it. Oracles: no panic, no body over `MAX_FRAME`, and a request that
//! decodes goes back through a frame unchanged.
#![no_main]

use std::io::Cursor;

use berth_protocol::{
    decode_request, read_frame, read_frame_body, write_frame, Event, Response, ShellRequest,
    MAX_FRAME,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The agent's side: bodies, then `decode_request`, until the stream ends or breaks.
    let mut stream = Cursor::new(data);
    while let Ok(Some(body)) = read_frame_body(&mut stream) {
        assert!(
            body.len() as u64 <= u64::from(MAX_FRAME),
            "a body over MAX_FRAME"
        );
        if let Ok(request) = decode_request(&body) {
            let mut wire = Vec::new();
            write_frame(&mut wire, &request).expect("a decoded request encodes");
            let again = decode_request(&wire[4..]).expect("an encoded request decodes");
            assert_eq!(again, request, "a request changed through a frame");
        }
    }
    // The host's side: answers, events, and the shell port's first frame.
    let _ = read_frame::<Response>(&mut Cursor::new(data));
    let mut events = Cursor::new(data);
    while let Ok(Some(_)) = read_frame::<Event>(&mut events) {}
    let _ = read_frame::<ShellRequest>(&mut Cursor::new(data));
});
