//! The host side of container file events: watches the host folders the agent names
//! (`Event::WatchPaths`: running containers' bind-mount sources inside shares) with the `notify`
//! crate, coalesces what it reports over a short window and hands the batches, as protocol
//! `FileEvent`s, to a channel whose reader sends them to the agent (`control::FileEventSender`).
//!
//! Changes the guest itself makes through virtio-fs happen on the host too and so come back as
//! events: a container writing a file gets one extra `IN_MODIFY` (and its clean page cache for
//! that file dropped) per window per file it writes. That echo is bounded (coalesced like any
//! other change) and cannot loop: raising an event in the guest writes nothing to the host.

mod coalesce;
mod plan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_protocol::files::{FileEvent, FileEventKind};
use notify::event::{CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

pub use coalesce::BURST_LIMIT;
use coalesce::{Batch, Budget, Raw};
use plan::Root;

/// How long events are gathered before a batch goes out (from the first event of the batch).
pub const WINDOW: Duration = Duration::from_millis(75);
/// Raw backend events that may wait for the coalescer before the backend thread blocks.
const RAW_QUEUE: usize = 8192;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("start the file watcher")]
    Start(#[source] notify::Error),
}

/// Watches a set of host paths and sends coalesced batches of their changes.
pub struct Watcher {
    backend: notify::RecommendedWatcher,
    roots: Arc<Mutex<Vec<Root>>>,
    /// What the backend watches now: path → recursive.
    watched: BTreeMap<PathBuf, bool>,
    coalescer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("watched", &self.watched)
            .finish()
    }
}

impl Watcher {
    /// Starts a watcher with nothing to watch; batches go to `out`. Must be called inside a
    /// tokio runtime (the coalescer is a task); it ends when `out`'s reader goes away or the
    /// watcher is dropped.
    pub fn start(out: mpsc::Sender<Vec<FileEvent>>) -> Result<Watcher, Error> {
        let (raw_tx, raw_rx) = mpsc::channel(RAW_QUEUE);
        let backend = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            let raws = match result {
                Ok(event) => translate(&event),
                Err(e) => {
                    tracing::debug!(error = %e, "file watcher backend");
                    vec![Raw::Rescan]
                }
            };
            for raw in raws {
                // The backend's own thread: blocking here is back-pressure, and an error means
                // the coalescer is gone (the watcher is being dropped).
                if raw_tx.blocking_send(raw).is_err() {
                    return;
                }
            }
        })
        .map_err(Error::Start)?;
        let roots = Arc::new(Mutex::new(Vec::new()));
        let coalescer = tokio::spawn(coalesce_loop(raw_rx, roots.clone(), out));
        Ok(Watcher {
            backend,
            roots,
            watched: BTreeMap::new(),
            coalescer,
        })
    }

    /// Watches exactly `paths` from now on (directories recursively, a file alone); paths that
    /// do not exist are skipped, and a watch that cannot be added (inotify's limit) is logged.
    /// Unchanged watches stay as they are, so the agent's repeats cost nothing.
    pub fn set_paths(&mut self, paths: Vec<PathBuf>) {
        let roots = plan::roots(&paths);
        let wanted = plan::watches(&roots);
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(path, recursive)| wanted.get(*path) != Some(recursive))
            .map(|(path, _)| path.clone())
            .collect();
        for path in stale {
            // Gone already (the directory was deleted) is fine.
            let _ = self.backend.unwatch(&path);
            self.watched.remove(&path);
        }
        for (path, &recursive) in &wanted {
            if self.watched.contains_key(path) {
                continue;
            }
            let mode = if recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match self.backend.watch(path, mode) {
                Ok(()) => {
                    self.watched.insert(path.clone(), recursive);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot watch for file events")
                }
            }
        }
        *lock(&self.roots) = roots;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.coalescer.abort();
    }
}

fn lock(roots: &Mutex<Vec<Root>>) -> MutexGuard<'_, Vec<Root>> {
    // Only ever replaced whole: a panic cannot leave it half-written.
    roots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Gathers raw events into windows of `WINDOW` and sends each window's coalesced batch.
async fn coalesce_loop(
    mut raw: mpsc::Receiver<Raw>,
    roots: Arc<Mutex<Vec<Root>>>,
    out: mpsc::Sender<Vec<FileEvent>>,
) {
    let mut budget = Budget::default();
    while let Some(first) = raw.recv().await {
        let mut batch = Batch::default();
        batch.push(first, &lock(&roots));
        let deadline = tokio::time::Instant::now() + WINDOW;
        loop {
            tokio::select! {
                next = raw.recv() => match next {
                    Some(next) => batch.push(next, &lock(&roots)),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let roots = lock(&roots).clone();
        let now = std::time::Instant::now();
        let events = batch.finish(&roots, budget.limit(now));
        budget.spent(now, events.len());
        if !events.is_empty() && out.send(events).await.is_err() {
            return;
        }
    }
}

/// The raw changes one backend event stands for (none for reads, opens and closes).
fn translate(event: &notify::Event) -> Vec<Raw> {
    if event.need_rescan() {
        return vec![Raw::Rescan];
    }
    let plain = |kind: FileEventKind| -> Vec<Raw> {
        event
            .paths
            .iter()
            .map(|path| {
                Raw::Event(FileEvent {
                    kind: kind.clone(),
                    path: path.clone(),
                })
            })
            .collect()
    };
    let first = || event.paths.first().cloned();
    match event.kind {
        EventKind::Create(CreateKind::Folder) => plain(FileEventKind::Mkdir),
        EventKind::Create(_) => plain(FileEventKind::Create),
        EventKind::Remove(RemoveKind::Folder) => plain(FileEventKind::Rmdir),
        EventKind::Remove(_) => plain(FileEventKind::Delete),
        EventKind::Modify(ModifyKind::Metadata(_)) => plain(FileEventKind::Attrib),
        EventKind::Modify(ModifyKind::Name(mode)) => {
            // A watched root moving itself (MOVE_SELF) has no cookie: its parent, if watched,
            // reports the move; alone it is nothing a container can follow.
            let Some(cookie) = event.tracker() else {
                return Vec::new();
            };
            match (mode, first(), event.paths.get(1)) {
                (RenameMode::From, Some(p), _) => vec![Raw::MovedFrom(cookie, p)],
                (RenameMode::To, Some(p), _) => vec![Raw::MovedTo(cookie, p)],
                (RenameMode::Both, Some(from), Some(to)) => {
                    vec![Raw::Renamed(cookie, from, to.clone())]
                }
                _ => Vec::new(),
            }
        }
        EventKind::Modify(_) => plain(FileEventKind::Modify),
        EventKind::Access(_) | EventKind::Any | EventKind::Other => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::time::Instant;

    /// Everything that arrives within `within`.
    async fn drain(
        rx: &mut mpsc::Receiver<Vec<FileEvent>>,
        within: Duration,
    ) -> Vec<Vec<FileEvent>> {
        let deadline = Instant::now() + within;
        let mut batches = Vec::new();
        while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            batches.push(batch);
        }
        batches
    }

    /// Does `act`, then asserts `want` arrives within 500 ms and nothing else about its path
    /// (no duplicate) within the next 300 ms.
    async fn expect_once(
        rx: &mut mpsc::Receiver<Vec<FileEvent>>,
        act: impl FnOnce(),
        want: FileEvent,
    ) {
        let started = Instant::now();
        act();
        let mut seen = Vec::new();
        while !seen.contains(&want) {
            let left = Duration::from_millis(500).saturating_sub(started.elapsed());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(batch)) => seen.extend(batch),
                _ => panic!("{want:?} did not arrive within 500 ms; got {seen:?}"),
            }
        }
        seen.extend(
            drain(rx, Duration::from_millis(300))
                .await
                .into_iter()
                .flatten(),
        );
        let same: Vec<_> = seen
            .iter()
            .filter(|e| {
                e.path == want.path
                    || matches!(&e.kind, FileEventKind::Rename { from } if *from == want.path)
            })
            .collect();
        assert_eq!(same, [&want], "after {:?}", started.elapsed());
    }

    fn event(kind: FileEventKind, path: &Path) -> FileEvent {
        FileEvent {
            kind,
            path: path.to_path_buf(),
        }
    }

    async fn watching(paths: Vec<PathBuf>) -> (Watcher, mpsc::Receiver<Vec<FileEvent>>) {
        let (tx, rx) = mpsc::channel(64);
        let mut watcher = Watcher::start(tx).unwrap();
        watcher.set_paths(paths);
        (watcher, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_modify_rename_delete_each_arrive_once_within_500_ms() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        std::fs::create_dir(&root).unwrap();
        let (_watcher, mut rx) = watching(vec![root.clone()]).await;
        let a = root.join("a file.txt");
        let b = root.join("b.txt");
        let sub = root.join("sub");

        expect_once(
            &mut rx,
            || std::fs::write(&a, b"one").unwrap(),
            event(FileEventKind::Create, &a),
        )
        .await;
        expect_once(
            &mut rx,
            || std::fs::write(&a, b"two").unwrap(),
            event(FileEventKind::Modify, &a),
        )
        .await;
        expect_once(
            &mut rx,
            || std::fs::rename(&a, &b).unwrap(),
            event(FileEventKind::Rename { from: a.clone() }, &b),
        )
        .await;
        expect_once(
            &mut rx,
            || std::fs::remove_file(&b).unwrap(),
            event(FileEventKind::Delete, &b),
        )
        .await;
        expect_once(
            &mut rx,
            || std::fs::create_dir(&sub).unwrap(),
            event(FileEventKind::Mkdir, &sub),
        )
        .await;
        // The new directory is watched too.
        let deep = sub.join("deep.js");
        expect_once(
            &mut rx,
            || std::fs::write(&deep, b"x").unwrap(),
            event(FileEventKind::Create, &deep),
        )
        .await;
        let perms = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        expect_once(
            &mut rx,
            || std::fs::set_permissions(&deep, perms).unwrap(),
            event(FileEventKind::Attrib, &deep),
        )
        .await;
        std::fs::remove_file(&deep).unwrap();
        drain(&mut rx, Duration::from_millis(200)).await;
        expect_once(
            &mut rx,
            || std::fs::remove_dir(&sub).unwrap(),
            event(FileEventKind::Rmdir, &sub),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ten_thousand_file_burst_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        for d in 0..20 {
            std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
        }
        let (_watcher, mut rx) = watching(vec![root.clone()]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let writer = root.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..10_000 {
                std::fs::write(writer.join(format!("d{}/f{i}", i % 20)), b"checked out").unwrap();
            }
        })
        .await
        .unwrap();
        let batches = drain(&mut rx, Duration::from_secs(2)).await;
        let total: usize = batches.iter().map(Vec::len).sum();
        assert!(
            batches.iter().all(|b| b.len() <= BURST_LIMIT),
            "a batch over the limit"
        );
        assert!(total > 0, "the burst went unseen");
        assert!(
            total < 5_000,
            "{total} events in {} batches for 10k files",
            batches.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_file_watch_ignores_its_siblings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("test.txt");
        let sibling = dir.path().join("other.txt");
        std::fs::write(&file, b"hello").unwrap();
        std::fs::write(&sibling, b"hello").unwrap();
        let (mut watcher, mut rx) = watching(vec![file.clone()]).await;
        std::fs::write(&sibling, b"changed").unwrap();
        std::fs::remove_file(&sibling).unwrap();
        expect_once(
            &mut rx,
            || std::fs::write(&file, b"changed").unwrap(),
            event(FileEventKind::Modify, &file),
        )
        .await;
        // An editor's save by rename: the file's event, the temp file's name only as `from`.
        let tmp = dir.path().join(".test.txt.swp");
        std::fs::write(&tmp, b"saved").unwrap();
        expect_once(
            &mut rx,
            || std::fs::rename(&tmp, &file).unwrap(),
            event(FileEventKind::Rename { from: tmp.clone() }, &file),
        )
        .await;
        // Dropped from the set: no more events.
        watcher.set_paths(Vec::new());
        std::fs::write(&file, b"again").unwrap();
        assert!(drain(&mut rx, Duration::from_millis(300)).await.is_empty());
    }
}
