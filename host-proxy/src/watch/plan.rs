//! What to watch for a set of bind-mount sources: directories recursively, a single file through
//! its parent directory (non-recursive) keeping only that file's events, nothing twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One path whose changes are wanted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Root {
    /// Everything under this directory.
    Dir(PathBuf),
    /// This file only.
    File(PathBuf),
}

impl Root {
    /// Whether a change at `path` is one this root wants.
    pub fn wants(&self, path: &Path) -> bool {
        match self {
            Root::Dir(dir) => path.starts_with(dir),
            Root::File(file) => path == file,
        }
    }

    /// The directory a burst at `path` collapses to at most: the root itself for a directory
    /// root, the file for a file root.
    pub fn top(&self) -> &Path {
        match self {
            Root::Dir(p) | Root::File(p) => p,
        }
    }
}

/// The roots for `paths` (those that exist; a directory is a `Dir`, anything else a `File`),
/// without any root that another one already covers.
pub fn roots(paths: &[PathBuf]) -> Vec<Root> {
    let mut found: Vec<Root> = paths
        .iter()
        .filter(|p| p.is_absolute())
        .filter_map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some(if meta.is_dir() {
                Root::Dir(p.clone())
            } else {
                Root::File(p.clone())
            })
        })
        .collect();
    found.sort();
    found.dedup();
    let dirs: Vec<PathBuf> = found
        .iter()
        .filter_map(|r| match r {
            Root::Dir(d) => Some(d.clone()),
            Root::File(_) => None,
        })
        .collect();
    found.retain(|r| {
        let p = r.top();
        !dirs
            .iter()
            .any(|d| p.starts_with(d) && (p != d || matches!(r, Root::File(_))))
    });
    found
}

/// The watches `roots` need: each directory root recursively (`true`), each file root's parent
/// non-recursively (`false`), keyed by path.
pub fn watches(roots: &[Root]) -> BTreeMap<PathBuf, bool> {
    let mut watches = BTreeMap::new();
    for root in roots {
        match root {
            Root::Dir(dir) => {
                watches.insert(dir.clone(), true);
            }
            Root::File(file) => {
                if let Some(parent) = file.parent() {
                    watches.entry(parent.to_path_buf()).or_insert(false);
                }
            }
        }
    }
    watches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_roots_are_dropped_and_files_watch_their_parent() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("app/src")).unwrap();
        std::fs::create_dir_all(d.join("other")).unwrap();
        std::fs::write(d.join("app/src/x.js"), b"").unwrap();
        std::fs::write(d.join("test.txt"), b"").unwrap();
        let got = roots(&[
            d.join("app"),
            d.join("app/src"),
            d.join("app/src/x.js"),
            d.join("test.txt"),
            d.join("test.txt"),
            d.join("missing"),
            d.join("other"),
        ]);
        assert_eq!(
            got,
            vec![
                Root::Dir(d.join("app")),
                Root::Dir(d.join("other")),
                Root::File(d.join("test.txt")),
            ]
        );
        let w = watches(&got);
        assert_eq!(w.get(&d.join("app")), Some(&true));
        assert_eq!(w.get(d), Some(&false));
        assert_eq!(w.len(), 3);
        assert!(got[2].wants(&d.join("test.txt")));
        assert!(!got[2].wants(&d.join("test.txt.swp")));
        assert!(got[0].wants(&d.join("app/deep/y")));
        assert!(!got[0].wants(&d.join("apple")));
    }
}
