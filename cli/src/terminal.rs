//! The local terminal during `berth shell`: raw mode (restored on drop) and its size.

use std::io::IsTerminal;

use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

/// Puts stdin in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `Ok(None)` when stdin is not a terminal.
    pub fn enable() -> std::io::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Flush, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Flush, &self.saved);
    }
}

/// (rows, cols) of the terminal on stdout, else 24×80.
pub fn size() -> (u16, u16) {
    match tcgetwinsize(std::io::stdout()) {
        Ok(ws) if ws.ws_row > 0 && ws.ws_col > 0 => (ws.ws_row, ws.ws_col),
        _ => (24, 80),
    }
}
