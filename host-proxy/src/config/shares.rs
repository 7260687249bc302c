//! The `shares` setting: `berth config set shares` syntax, and resolving the list (configured,
//! or the defaults) into the folders a start shares. Configured folders are checked strictly:
//! absolute, existing directories, not listed twice, none inside another, none over the
//! guest's own system directories. Symlinks are resolved; a folder configured through one is
//! mounted at both paths in the guest (`Share::alias`).

use std::path::{Path, PathBuf};

use super::{Invalid, ShareConfig};
use crate::settings::Share;

/// Where the guest's own system lives: a share there would hide it.
const GUEST_SYSTEM: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var",
];
/// Trees of the guest a share may not be inside of.
const GUEST_TREES: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/var/lib/docker",
    "/var/lib/containerd",
];

/// `PATH[:ro|:rw],...` as typed after `berth config set shares`; an empty value shares nothing.
pub(super) fn parse_list(value: &str) -> Result<Vec<ShareConfig>, Invalid> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| {
            let item = item.trim();
            let (path, read_only) = match (item.strip_suffix(":ro"), item.strip_suffix(":rw")) {
                (Some(path), _) => (path, true),
                (_, Some(path)) => (path, false),
                _ => (item, false),
            };
            if path.is_empty() {
                return Err(Invalid::ShareSpec(item.into()));
            }
            Ok(ShareConfig {
                path: path.into(),
                read_only,
            })
        })
        .collect()
}

/// The configured shares, checked; the first problem is the error.
pub(super) fn resolve(configured: &[ShareConfig]) -> Result<Vec<Share>, Invalid> {
    let mut shares: Vec<(Share, &Path)> = Vec::new();
    for entry in configured {
        let share = resolve_one(&entry.path, entry.read_only)?;
        for (earlier, written) in &shares {
            if earlier.path == share.path {
                return Err(Invalid::ShareDuplicate {
                    path: entry.path.clone(),
                    other: written.to_path_buf(),
                });
            }
            if let Some((inner, outer)) = nesting(&share.path, &entry.path, &earlier.path, written)
            {
                return Err(Invalid::ShareNested { inner, outer });
            }
        }
        shares.push((share, &entry.path));
    }
    Ok(shares.into_iter().map(|(share, _)| share).collect())
}

/// `(inner, outer)` as written when one of two shares is inside the other.
fn nesting(a: &Path, a_written: &Path, b: &Path, b_written: &Path) -> Option<(PathBuf, PathBuf)> {
    if a.starts_with(b) {
        Some((a_written.into(), b_written.into()))
    } else if b.starts_with(a) {
        Some((b_written.into(), a_written.into()))
    } else {
        None
    }
}

fn resolve_one(path: &Path, read_only: bool) -> Result<Share, Invalid> {
    if !path.is_absolute() {
        return Err(Invalid::ShareNotAbsolute(path.into()));
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Invalid::ShareMissing(path.into()))
        }
        Err(source) => {
            return Err(Invalid::ShareResolve {
                path: path.into(),
                source,
            })
        }
        Ok(meta) if !meta.is_dir() => return Err(Invalid::ShareNotADirectory(path.into())),
        Ok(_) => {}
    }
    let canonical = std::fs::canonicalize(path).map_err(|source| Invalid::ShareResolve {
        path: path.into(),
        source,
    })?;
    if GUEST_SYSTEM.iter().any(|p| canonical == Path::new(p))
        || GUEST_TREES.iter().any(|p| canonical.starts_with(p))
    {
        return Err(Invalid::ShareSystem(path.into()));
    }
    // `Path` equality compares components: `/home/u/` is `/home/u`.
    let alias = (canonical != path).then(|| path.to_path_buf());
    Ok(Share {
        path: canonical,
        alias,
        read_only,
    })
}

/// The shares when none are configured: the home directory and the temporary directory (and
/// `/tmp`), read-write; those missing or unusable are left out, and one inside another is
/// covered by it.
pub(super) fn defaults() -> Vec<Share> {
    let candidates = dirs::home_dir()
        .into_iter()
        .chain([std::env::temp_dir(), PathBuf::from("/tmp")]);
    let mut shares: Vec<Share> = Vec::new();
    for candidate in candidates {
        let share = match resolve_one(&candidate, false) {
            Ok(share) => share,
            Err(e) => {
                tracing::debug!("not sharing {} by default: {e}", candidate.display());
                continue;
            }
        };
        if shares.iter().any(|s| share.path.starts_with(&s.path)) {
            continue;
        }
        shares.retain(|s| !s.path.starts_with(&share.path));
        shares.push(share);
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &Path, read_only: bool) -> ShareConfig {
        ShareConfig {
            path: path.into(),
            read_only,
        }
    }

    #[test]
    fn every_bad_share_is_named_with_its_problem() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let a = root.join("a");
        let file = root.join("file");
        std::fs::create_dir_all(a.join("inner")).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let show = |p: &Path| p.display().to_string();
        let cases: Vec<(Vec<ShareConfig>, Vec<String>)> = vec![
            (
                vec![entry(Path::new("rel/dir"), false)],
                vec!["rel/dir".into(), "not an absolute path".into()],
            ),
            (
                vec![entry(&root.join("nope"), false)],
                vec![show(&root.join("nope")), "does not exist".into()],
            ),
            (
                vec![entry(&file, false)],
                vec![show(&file), "is not a directory".into()],
            ),
            (
                vec![entry(&a, false), entry(&link, true)],
                vec![format!("{} is listed twice (as {})", show(&link), show(&a))],
            ),
            (
                vec![entry(&a, false), entry(&a.join("inner"), false)],
                vec![format!(
                    "{} is inside {}, which is shared already",
                    show(&a.join("inner")),
                    show(&a)
                )],
            ),
            (
                vec![entry(&a.join("inner"), false), entry(&a, false)],
                vec![format!("{} is inside {}", show(&a.join("inner")), show(&a))],
            ),
            (
                vec![entry(Path::new("/"), false)],
                vec!["shares: / ".into(), "guest's own".into()],
            ),
            (
                vec![entry(Path::new("/proc/self"), false)],
                vec!["/proc/self".into(), "guest's own".into()],
            ),
        ];
        for (configured, wanted) in cases {
            let err = resolve(&configured).unwrap_err().to_string();
            assert!(err.starts_with("shares: "), "{err}");
            for w in &wanted {
                assert!(
                    err.contains(w.as_str()),
                    "{configured:?}: {err:?} lacks {w:?}"
                );
            }
        }
    }

    #[test]
    fn a_share_through_a_symlink_is_mounted_at_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("home")).unwrap();
        let shares = resolve(&[
            entry(&root.join("home"), false),
            entry(&root.join("other"), true),
        ]);
        assert!(shares.is_err(), "other does not exist");
        std::fs::create_dir(root.join("other")).unwrap();
        let shares = resolve(&[
            entry(&root.join("home"), false),
            entry(&root.join("other/"), true),
        ])
        .unwrap();
        assert_eq!(shares[0].path, root.join("real"));
        assert_eq!(
            shares[0].alias.as_deref(),
            Some(root.join("home").as_path())
        );
        assert_eq!(shares[1].path, root.join("other"));
        assert_eq!(shares[1].alias, None, "a trailing slash is no alias");
        assert!(shares[1].read_only);
    }

    #[test]
    fn the_command_line_syntax_takes_modes_and_an_empty_list() {
        let list = parse_list(" /a , /b:ro,/c:rw ").unwrap();
        let seen: Vec<(&str, bool)> = list
            .iter()
            .map(|s| (s.path.to_str().unwrap(), s.read_only))
            .collect();
        assert_eq!(seen, [("/a", false), ("/b", true), ("/c", false)]);
        assert!(parse_list("").unwrap().is_empty());
        let err = parse_list("/a,,/b").unwrap_err().to_string();
        assert!(err.contains("is not PATH, PATH:ro or PATH:rw"), "{err}");
    }

    #[test]
    fn the_defaults_are_existing_distinct_directories() {
        let shares = defaults();
        assert!(!shares.is_empty(), "/tmp at least");
        for (i, share) in shares.iter().enumerate() {
            assert!(share.path.is_dir(), "{share:?}");
            assert!(!share.read_only);
            for other in &shares[i + 1..] {
                assert!(
                    !share.path.starts_with(&other.path) && !other.path.starts_with(&share.path),
                    "{shares:?}"
                );
            }
        }
        let tmp = std::fs::canonicalize("/tmp").unwrap();
        assert!(
            shares.iter().any(|s| tmp.starts_with(&s.path)),
            "{shares:?}"
        );
    }
}
