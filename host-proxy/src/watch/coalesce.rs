//! One coalescing window's worth of changes: each path and kind once, a create swallowing the
//! modifies after it, rename halves paired by their cookie, and a burst over the window's limit
//! of distinct paths collapsed into a bounded number (`BURST_LIMIT`) of directory `Modify`s.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use berth_protocol::files::{FileEvent, FileEventKind};

use super::plan::Root;

/// Most events one window (and, through `Budget`, one second) sends.
pub const BURST_LIMIT: usize = 1000;
/// A window may always send this many distinct paths as they are, whatever the budget.
pub const QUIET_LIMIT: usize = 32;

/// A change as the backend reports it, before coalescing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Raw {
    Event(FileEvent),
    /// The first half of a rename (the name went away), with its cookie.
    MovedFrom(usize, PathBuf),
    /// The second half (the name appeared), with its cookie.
    MovedTo(usize, PathBuf),
    /// Both halves, paired by the backend.
    Renamed(usize, PathBuf, PathBuf),
    /// The backend lost events (its queue overflowed): everything may have changed.
    Rescan,
}

/// The events of one window, in arrival order.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<FileEvent>,
    seen: HashSet<FileEvent>,
    from: HashMap<usize, PathBuf>,
    to: HashMap<usize, PathBuf>,
    paired: HashSet<usize>,
    rescan: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.from.is_empty() && self.to.is_empty() && !self.rescan
    }

    /// Adds one raw change, keeping only what `roots` want.
    pub fn push(&mut self, raw: Raw, roots: &[Root]) {
        let wanted = |p: &Path| roots.iter().any(|r| r.wants(p));
        match raw {
            Raw::Event(event) if wanted(&event.path) => self.add(event),
            Raw::Event(_) => {}
            Raw::MovedFrom(cookie, path) if wanted(&path) => {
                self.from.insert(cookie, path);
            }
            Raw::MovedTo(cookie, path) if wanted(&path) => {
                self.to.insert(cookie, path);
            }
            Raw::MovedFrom(..) | Raw::MovedTo(..) => {}
            Raw::Renamed(cookie, from, to) => {
                self.paired.insert(cookie);
                self.from.remove(&cookie);
                self.to.remove(&cookie);
                match (wanted(&from), wanted(&to)) {
                    (_, true) => self.add(FileEvent {
                        kind: FileEventKind::Rename { from },
                        path: to,
                    }),
                    (true, false) => self.add(FileEvent {
                        kind: FileEventKind::Delete,
                        path: from,
                    }),
                    (false, false) => {}
                }
            }
            Raw::Rescan => self.rescan = true,
        }
    }

    fn add(&mut self, event: FileEvent) {
        let path = event.path.clone();
        let has = |seen: &HashSet<FileEvent>, kind: FileEventKind| {
            seen.contains(&FileEvent {
                kind,
                path: path.clone(),
            })
        };
        let created =
            has(&self.seen, FileEventKind::Create) || has(&self.seen, FileEventKind::Mkdir);
        match &event.kind {
            FileEventKind::Modify | FileEventKind::Attrib if created => return,
            FileEventKind::Delete | FileEventKind::Rmdir => self.forget(&path),
            FileEventKind::Rename { from } => {
                let from = from.clone();
                self.forget(&from);
                self.forget(&path);
            }
            _ => {}
        }
        if self.seen.insert(event.clone()) {
            self.events.push(event);
        }
    }

    /// Lets later events on `path` count again (it went away or changed identity).
    fn forget(&mut self, path: &Path) {
        self.seen.retain(|e| e.path != path);
    }

    /// The window's events: unpaired rename halves become a delete or a create, and more than
    /// `limit` distinct paths become directory events (at most `BURST_LIMIT`), never above a
    /// root.
    pub fn finish(mut self, roots: &[Root], limit: usize) -> Vec<FileEvent> {
        let from: Vec<_> = self.from.drain().collect();
        for (cookie, path) in from {
            if !self.paired.contains(&cookie) {
                self.add(FileEvent {
                    kind: FileEventKind::Delete,
                    path,
                });
            }
        }
        let to: Vec<_> = self.to.drain().collect();
        for (cookie, path) in to {
            if !self.paired.contains(&cookie) {
                let kind = if path.is_dir() {
                    FileEventKind::Mkdir
                } else {
                    FileEventKind::Create
                };
                self.add(FileEvent { kind, path });
            }
        }
        if self.rescan {
            return collapse(roots.iter().map(|r| r.top().to_path_buf()).collect(), roots);
        }
        let distinct: BTreeSet<&Path> = self.events.iter().map(|e| e.path.as_path()).collect();
        if distinct.len() <= limit.min(BURST_LIMIT) {
            return self.events;
        }
        let parents = self
            .events
            .iter()
            .flat_map(|e| {
                let from = match &e.kind {
                    FileEventKind::Rename { from } => Some(from.as_path()),
                    _ => None,
                };
                std::iter::once(e.path.as_path()).chain(from)
            })
            .map(|p| parent_within(p, roots))
            .collect();
        collapse(parents, roots)
    }
}

/// How many paths a window may send as they are: what is left of `BURST_LIMIT` after the
/// windows of the last second, and never less than `QUIET_LIMIT`. A `git checkout` of 10k
/// files thus sends about `BURST_LIMIT` file events, then directory events until it is over.
#[derive(Debug, Default)]
pub struct Budget {
    sent: std::collections::VecDeque<(std::time::Instant, usize)>,
}

impl Budget {
    pub fn limit(&mut self, now: std::time::Instant) -> usize {
        let second = std::time::Duration::from_secs(1);
        while self.sent.front().is_some_and(|(at, _)| now - *at > second) {
            self.sent.pop_front();
        }
        let used: usize = self.sent.iter().map(|(_, n)| n).sum();
        BURST_LIMIT.saturating_sub(used).max(QUIET_LIMIT)
    }

    pub fn spent(&mut self, now: std::time::Instant, events: usize) {
        self.sent.push_back((now, events));
    }
}

/// `path`'s parent, unless that would leave every root containing `path`.
fn parent_within(path: &Path, roots: &[Root]) -> PathBuf {
    let parent = path.parent().unwrap_or(path);
    let inside = roots.iter().any(|r| match r {
        Root::Dir(d) => parent.starts_with(d),
        Root::File(_) => false,
    });
    if inside { parent } else { path }.to_path_buf()
}

/// `Modify` on each of `dirs`, climbing towards the roots until there are at most
/// `BURST_LIMIT`.
fn collapse(mut dirs: BTreeSet<PathBuf>, roots: &[Root]) -> Vec<FileEvent> {
    while dirs.len() > BURST_LIMIT {
        let up: BTreeSet<PathBuf> = dirs.iter().map(|d| parent_within(d, roots)).collect();
        if up == dirs {
            // Every one is a root: more roots than the limit, each gets its event.
            break;
        }
        dirs = up;
    }
    dirs.into_iter()
        .map(|path| FileEvent {
            kind: FileEventKind::Modify,
            path,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: FileEventKind, path: &str) -> Raw {
        Raw::Event(FileEvent {
            kind,
            path: path.into(),
        })
    }

    fn finish(raws: Vec<Raw>, roots: &[Root]) -> Vec<FileEvent> {
        let mut batch = Batch::default();
        for raw in raws {
            batch.push(raw, roots);
        }
        batch.finish(roots, BURST_LIMIT)
    }

    #[test]
    fn duplicates_and_modifies_after_a_create_are_dropped() {
        let roots = [Root::Dir("/w".into())];
        let got = finish(
            vec![
                ev(FileEventKind::Create, "/w/a"),
                ev(FileEventKind::Modify, "/w/a"),
                ev(FileEventKind::Attrib, "/w/a"),
                ev(FileEventKind::Modify, "/w/b"),
                ev(FileEventKind::Modify, "/w/b"),
                ev(FileEventKind::Delete, "/w/a"),
                ev(FileEventKind::Create, "/w/a"),
                ev(FileEventKind::Modify, "/elsewhere"),
            ],
            &roots,
        );
        let kinds: Vec<(FileEventKind, &str)> = got
            .iter()
            .map(|e| (e.kind.clone(), e.path.to_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [
                (FileEventKind::Create, "/w/a"),
                (FileEventKind::Modify, "/w/b"),
                (FileEventKind::Delete, "/w/a"),
                (FileEventKind::Create, "/w/a"),
            ]
        );
    }

    #[test]
    fn rename_halves_pair_and_unpaired_ones_become_delete_or_create() {
        let roots = [Root::Dir("/w".into())];
        let got = finish(
            vec![
                Raw::MovedFrom(1, "/w/a".into()),
                Raw::MovedTo(1, "/w/b".into()),
                Raw::Renamed(1, "/w/a".into(), "/w/b".into()),
                Raw::MovedFrom(2, "/w/gone".into()),
                Raw::MovedTo(3, "/w/new-file-that-is-not-a-dir".into()),
            ],
            &roots,
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            FileEvent {
                kind: FileEventKind::Rename {
                    from: "/w/a".into()
                },
                path: "/w/b".into()
            }
        );
        assert!(got.contains(&FileEvent {
            kind: FileEventKind::Delete,
            path: "/w/gone".into()
        }));
        assert!(got.contains(&FileEvent {
            kind: FileEventKind::Create,
            path: "/w/new-file-that-is-not-a-dir".into()
        }));
    }

    #[test]
    fn the_budget_shrinks_with_what_the_last_second_sent() {
        let mut budget = Budget::default();
        let t0 = std::time::Instant::now();
        assert_eq!(budget.limit(t0), BURST_LIMIT);
        budget.spent(t0, 900);
        assert_eq!(budget.limit(t0), 100);
        budget.spent(t0, 900);
        assert_eq!(budget.limit(t0), QUIET_LIMIT);
        assert_eq!(
            budget.limit(t0 + std::time::Duration::from_millis(1100)),
            BURST_LIMIT
        );
    }

    #[test]
    fn a_burst_collapses_to_bounded_directory_events() {
        let roots = [Root::Dir("/w".into())];
        let raws = (0..3000)
            .map(|i| ev(FileEventKind::Modify, &format!("/w/d{}/f{i}", i % 7)))
            .collect();
        let got = finish(raws, &roots);
        assert_eq!(got.len(), 7, "{got:?}");
        assert!(got.iter().all(|e| e.kind == FileEventKind::Modify));
        // 5000 directories of two files each: climbs to /w itself, never above it.
        let raws = (0..10_000)
            .map(|i| ev(FileEventKind::Create, &format!("/w/d{}/f{i}", i / 2)))
            .collect();
        let got = finish(raws, &roots);
        assert_eq!(
            got,
            [FileEvent {
                kind: FileEventKind::Modify,
                path: "/w".into()
            }]
        );
    }
}
