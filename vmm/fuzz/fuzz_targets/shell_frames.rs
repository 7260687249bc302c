//! The shell port's frames (kind, 4-byte big-endian length, payload) on arbitrary bytes, read
//! frame by frame and as `ShellOutput`'s byte stream. Oracles: no panic, no payload over
//! `MAX_DATA`, and a frame that decodes encodes back to the bytes it came from.
#![no_main]

use std::io::{Cursor, Read};

use berth_protocol::{read_shell_frame, ShellFrame, ShellOutput, MAX_DATA};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut stream = Cursor::new(data);
    loop {
        let start = stream.position() as usize;
        let Ok(Some(frame)) = read_shell_frame(&mut stream) else {
            break;
        };
        let end = stream.position() as usize;
        if let ShellFrame::Stdin(p) | ShellFrame::Stdout(p) | ShellFrame::Stderr(p) = &frame {
            assert!(p.len() <= MAX_DATA, "a payload over MAX_DATA");
        }
        let wire = frame.encode().expect("a decoded frame encodes");
        assert_eq!(wire, &data[start..end], "a frame changed through encode");
    }
    let mut output = ShellOutput::new(Cursor::new(data));
    let mut text = Vec::new();
    if output.read_to_end(&mut text).is_ok() {
        assert!(
            output.exit().is_some(),
            "the output ended without an exit status"
        );
    }
    assert!(text.len() <= data.len(), "more output than input");
});
