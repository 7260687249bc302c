//! Host file-change events for shared folders: what the host's watcher saw, carried to the agent
//! (`Request::FileEvents`), which raises the same inotify events in the guest.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most events the host puts in one `Request::FileEvents`.
pub const MAX_EVENTS_PER_REQUEST: usize = 512;
/// Budget for one request's paths, counted as JSON's worst case (6 bytes per path byte), well
/// under `MAX_FRAME`.
const REQUEST_PATH_BUDGET: usize = crate::MAX_FRAME as usize / 2;

/// Splits `events` into runs that each fit one `Request::FileEvents` frame.
pub fn request_chunks(events: &[FileEvent]) -> Vec<&[FileEvent]> {
    let mut chunks = Vec::new();
    let (mut start, mut cost) = (0, 0);
    for (i, event) in events.iter().enumerate() {
        let from = match &event.kind {
            FileEventKind::Rename { from } => from.as_os_str().len(),
            _ => 0,
        };
        let this = 64 + 6 * (event.path.as_os_str().len() + from);
        if i > start && (i - start == MAX_EVENTS_PER_REQUEST || cost + this > REQUEST_PATH_BUDGET) {
            chunks.push(&events[start..i]);
            (start, cost) = (i, 0);
        }
        cost += this;
    }
    if start < events.len() {
        chunks.push(&events[start..]);
    }
    chunks
}

/// One change the host saw under a watched path. Paths are absolute host paths, which are the
/// guest's too (shares are mounted at the same path).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileEvent {
    #[serde(flatten)]
    pub kind: FileEventKind,
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileEventKind {
    /// A file (or symlink, socket, ...) appeared.
    Create,
    /// A directory appeared.
    Mkdir,
    /// A file's content changed.
    Modify,
    /// Metadata changed (mode, owner, times, xattrs).
    Attrib,
    /// A file went away.
    Delete,
    /// A directory went away.
    Rmdir,
    /// `from` was renamed to `path`.
    Rename { from: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_tagged_json() {
        let event = FileEvent {
            kind: FileEventKind::Rename {
                from: "/home/u/a b".into(),
            },
            path: "/home/u/c\td".into(),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"rename","from":"/home/u/a b","path":"/home/u/c\td"}"#
        );
        assert_eq!(serde_json::from_str::<FileEvent>(&json).unwrap(), event);
        let json = serde_json::to_string(&FileEvent {
            kind: FileEventKind::Mkdir,
            path: "/tmp/x".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"mkdir","path":"/tmp/x"}"#);
    }

    fn rename(len: usize, n: usize) -> Vec<FileEvent> {
        // Control characters are JSON's worst case: \u0001 is 6 bytes for one.
        let long = format!("/{}", "\u{1}".repeat(len));
        (0..n)
            .map(|_| FileEvent {
                kind: FileEventKind::Rename {
                    from: long.clone().into(),
                },
                path: long.clone().into(),
            })
            .collect()
    }

    #[test]
    fn every_chunk_fits_in_a_frame_and_none_is_lost() {
        for (len, n) in [(4095, 200), (10, 5000), (300, 1)] {
            let events = rename(len, n);
            let chunks = request_chunks(&events);
            assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), n);
            for chunk in chunks {
                assert!(chunk.len() <= MAX_EVENTS_PER_REQUEST);
                let body = serde_json::to_vec(&crate::Request::FileEvents {
                    events: chunk.to_vec(),
                })
                .unwrap();
                assert!(
                    (body.len() as u64) < u64::from(crate::MAX_FRAME),
                    "{}",
                    body.len()
                );
            }
        }
        assert!(request_chunks(&[]).is_empty());
        assert_eq!(request_chunks(&rename(10, 1025)).len(), 3);
    }
}
