//! Which host paths a container may bind-mount: those inside a share (the host folders the VM
//! sees at the same absolute path) and a fixed list of the guest's own paths. Anything else
//! would make dockerd create and mount an empty directory of the VM, so the request is refused
//! with a message naming the path and the setting that shares it.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde_json::Value;

/// The guest's own paths that tools legitimately bind-mount (the Docker socket for
/// docker-in-docker and CI runners, `/proc`, `/sys` and `/dev` for monitoring agents, dockerd's
/// state for cAdvisor-like tools, kernel modules, the clock's zone). They name the VM's files,
/// never the host's, so they are allowed whatever the shares are. An entry allows itself and
/// everything below it.
pub const GUEST_PATHS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/proc",
    "/sys",
    "/dev",
    "/var/lib/docker",
    "/lib/modules",
    "/etc/localtime",
    "/etc/timezone",
];

/// The setting a user changes to share a folder (named in the refusal).
const SHARES_SETTING: &str = "shares";

/// A bind mount that cannot work, or a body that cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error(
        "Mounts denied: the path {path} is not shared from the host with Berth. Share it with \
         `berth config set {SHARES_SETTING} ...` (now: {}) and `berth restart`.",
        list(shares)
    )]
    NotShared { path: String, shares: Vec<PathBuf> },
    #[error("Berth cannot check the mounts of this request: its body is not a JSON object")]
    Unreadable(#[source] serde_json::Error),
}

fn list(shares: &[PathBuf]) -> String {
    if shares.is_empty() {
        return "no folder is shared".into();
    }
    let mut out = String::new();
    for (i, share) in shares.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}{}", share.display());
    }
    out
}

/// The shares bind mounts are checked against; cheap to clone (all clones see `set_shares`).
/// The default has no share list yet and allows everything.
#[derive(Clone, Debug, Default)]
pub struct MountPolicy {
    shares: Arc<RwLock<Option<Vec<PathBuf>>>>,
}

impl MountPolicy {
    pub fn new(shares: Vec<PathBuf>) -> MountPolicy {
        let policy = MountPolicy::default();
        policy.set_shares(shares);
        policy
    }

    /// Replaces the share list (at each VM start, from the config).
    pub fn set_shares(&self, shares: Vec<PathBuf>) {
        let shares = shares.iter().filter_map(|s| normalize(s)).collect();
        *self.shares.write().unwrap_or_else(|e| e.into_inner()) = Some(shares);
    }

    /// The current share list; `None` before one is set.
    pub fn shares(&self) -> Option<Vec<PathBuf>> {
        self.shares
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks the bind mounts of a `POST /containers/create` body (`HostConfig.Binds`,
    /// `HostConfig.Mounts`) or a `POST /services/create|update` body
    /// (`TaskTemplate.ContainerSpec.Mounts`). An empty body has nothing to check (dockerd
    /// refuses it itself).
    pub fn check(&self, body: &[u8]) -> Result<(), Denied> {
        let Some(shares) = self.shares() else {
            return Ok(());
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        // dockerd decodes the first JSON value and ignores what follows; so do we.
        let config = serde_json::Deserializer::from_slice(body)
            .into_iter::<Value>()
            .next()
            .unwrap_or(Ok(Value::Null))
            .map_err(Denied::Unreadable)?;
        for source in bind_sources(&config) {
            if !allowed(source, &shares) {
                return Err(Denied::NotShared {
                    path: source.into(),
                    shares,
                });
            }
        }
        Ok(())
    }
}

/// Every host path the request asks to bind-mount.
fn bind_sources(config: &Value) -> Vec<&str> {
    let mut sources = Vec::new();
    for host in fields(config, "HostConfig") {
        for bind in fields(host, "Binds").flat_map(items) {
            // `SRC:DST[:OPTS]`; a SRC that is not absolute is a volume name, a lone `DST` an
            // anonymous volume.
            if let Some((src, _)) = bind.as_str().and_then(|b| b.split_once(':')) {
                if src.starts_with('/') {
                    sources.push(src);
                }
            }
        }
        mount_sources(host, &mut sources);
    }
    for task in fields(config, "TaskTemplate") {
        for spec in fields(task, "ContainerSpec") {
            mount_sources(spec, &mut sources);
        }
    }
    sources
}

/// The sources of `Mounts` entries that are binds: `Type: "bind"`, or any absolute `Source`
/// (a volume or tmpfs never has one).
fn mount_sources<'a>(parent: &'a Value, sources: &mut Vec<&'a str>) {
    for mount in fields(parent, "Mounts").flat_map(items) {
        let bind = fields(mount, "Type").any(|t| t.as_str().is_some_and(|t| fold_eq(t, "bind")));
        for source in fields(mount, "Source").filter_map(Value::as_str) {
            if bind || source.starts_with('/') {
                sources.push(source);
            }
        }
    }
}

/// The values of `object`'s keys that dockerd's decoder (Go's encoding/json) takes for the
/// field `name`: it matches keys case-insensitively, and with several matches the last wins, so
/// every one of them is checked.
fn fields<'a>(object: &'a Value, name: &'a str) -> impl Iterator<Item = &'a Value> {
    object
        .as_object()
        .into_iter()
        .flat_map(|map| map.iter())
        .filter(move |(key, _)| fold_eq(key, name))
        .map(|(_, value)| value)
}

fn items(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// Go's case folding for JSON field names: ASCII case, plus the two non-ASCII letters that
/// fold to ASCII ones (U+017F long s → s, U+212A Kelvin sign → k).
fn fold_eq(key: &str, name: &str) -> bool {
    let fold = |c: char| match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    };
    key.chars().map(fold).eq(name.chars().map(fold))
}

/// Whether `source` may be bind-mounted: a guest path, or inside a share, compared by whole
/// components after resolving `.` and `..` lexically.
fn allowed(source: &str, shares: &[PathBuf]) -> bool {
    let Some(path) = normalize(Path::new(source)) else {
        return false;
    };
    GUEST_PATHS.iter().any(|g| path.starts_with(g)) || shares.iter().any(|s| path.starts_with(s))
}

/// `path` absolute, with `.`, `..` and repeated slashes resolved lexically (`..` at the root
/// stays there, as the kernel does); `None` for a relative path.
fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> MountPolicy {
        MountPolicy::new(vec!["/home/u".into(), "/tmp".into()])
    }

    fn binds(binds: &[&str]) -> Vec<u8> {
        serde_json::json!({"Image": "alpine", "HostConfig": {"Binds": binds}})
            .to_string()
            .into_bytes()
    }

    fn denied_path(result: Result<(), Denied>) -> String {
        match result {
            Err(Denied::NotShared { path, .. }) => path,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn binds_inside_a_share_are_allowed_and_others_named_in_the_refusal() {
        let p = policy();
        p.check(&binds(&[
            "/home/u/project:/app",
            "/tmp:/t:ro",
            "/home/u:/h",
        ]))
        .unwrap();
        let err = p
            .check(&binds(&["/home/u/a:/a", "/opt/project:/app"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Mounts denied: the path /opt/project is not shared from the host with Berth. \
             Share it with `berth config set shares ...` (now: /home/u, /tmp) and `berth restart`."
        );
    }

    #[test]
    fn shares_compare_by_whole_components_after_resolving_dot_dot() {
        let p = policy();
        for source in [
            "/home/ux",
            "/home/ux/y",
            "/home",
            "/home/u/../../etc",
            "/home/u/..",
            "/tmp/../etc/passwd",
            "/tmpfoo",
        ] {
            let bind = format!("{source}:/x");
            assert_eq!(denied_path(p.check(&binds(&[&bind]))), source);
        }
        for source in ["/home/u/./a", "/home//u/b", "/tmp/a/../b", "/home/u/x/.."] {
            p.check(&binds(&[&format!("{source}:/x")])).unwrap();
        }
        // A share given with `..` or a trailing slash is normalized too.
        let p = MountPolicy::new(vec!["/home/u/../v/".into()]);
        p.check(&binds(&["/home/v/x:/x"])).unwrap();
        denied_path(p.check(&binds(&["/home/u/x:/x"])));
    }

    #[test]
    fn volume_names_and_anonymous_volumes_are_allowed() {
        policy()
            .check(&binds(&["data:/var/lib/data", "/anonymous", "cache:/c:ro"]))
            .unwrap();
    }

    #[test]
    fn the_guests_own_paths_are_allowed_but_not_their_neighbours() {
        let p = policy();
        for source in [
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/proc",
            "/sys/fs/cgroup",
            "/dev/kvm",
            "/var/lib/docker/volumes",
            "/lib/modules",
            "/etc/localtime",
            "/etc/timezone",
        ] {
            p.check(&binds(&[&format!("{source}:/x:ro")])).unwrap();
        }
        for source in ["/var/run", "/etc", "/devices", "/proc/../etc", "/var/lib"] {
            denied_path(p.check(&binds(&[&format!("{source}:/x")])));
        }
    }

    #[test]
    fn mounts_of_type_bind_are_checked_and_volumes_and_tmpfs_allowed() {
        let p = policy();
        let body = |mounts: Value| {
            serde_json::json!({"HostConfig": {"Mounts": mounts}})
                .to_string()
                .into_bytes()
        };
        p.check(&body(serde_json::json!([
            {"Type": "bind", "Source": "/home/u/src", "Target": "/src"},
            {"Type": "volume", "Source": "data", "Target": "/data"},
            {"Type": "volume", "Target": "/anon"},
            {"Type": "tmpfs", "Target": "/run"},
        ])))
        .unwrap();
        let err = p.check(&body(serde_json::json!([
            {"Type": "volume", "Source": "data", "Target": "/data"},
            {"Type": "bind", "Source": "/srv/www", "Target": "/www"},
        ])));
        assert_eq!(denied_path(err), "/srv/www");
    }

    #[test]
    fn keys_match_as_dockerd_matches_them() {
        // Go's decoder takes `hostconfig`, `BINDS` and `Bind\u{17f}` for HostConfig.Binds.
        let p = policy();
        let body = br#"{"hostconfig": {"BINDS": ["/home/u:/h"], "Bind\u017f": ["/opt:/o"]}}"#;
        assert_eq!(denied_path(p.check(body)), "/opt");
        let dup = br#"{"HostConfig": {"Binds": ["/etc:/e"]}, "HostConfig": {"Binds": []}}"#;
        // serde keeps the last duplicate, as Go does: nothing to refuse.
        p.check(dup).unwrap();
        let mounts = br#"{"HostConfig": {"mounts": [{"type": "BIND", "source": "/opt"}]}}"#;
        assert_eq!(denied_path(p.check(mounts)), "/opt");
    }

    #[test]
    fn service_mounts_are_checked() {
        let body = serde_json::json!({"TaskTemplate": {"ContainerSpec": {"Image": "nginx",
            "Mounts": [{"Type": "bind", "Source": "/opt/site", "Target": "/usr/share/nginx"}]}}});
        let err = policy().check(body.to_string().as_bytes());
        assert_eq!(denied_path(err), "/opt/site");
    }

    #[test]
    fn no_share_list_yet_allows_everything_and_set_shares_takes_effect() {
        let p = MountPolicy::default();
        p.check(&binds(&["/opt:/o"])).unwrap();
        p.check(b"not json").unwrap();
        let clone = p.clone();
        clone.set_shares(vec!["/opt".into()]);
        p.check(&binds(&["/opt:/o"])).unwrap();
        denied_path(p.check(&binds(&["/home/u:/h"])));
        let empty = MountPolicy::new(Vec::new());
        let err = empty.check(&binds(&["/srv:/s"])).unwrap_err();
        assert!(
            err.to_string().contains("(now: no folder is shared)"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_body_is_refused_and_an_empty_or_trailing_one_is_not() {
        let p = policy();
        assert!(matches!(
            p.check(b"{\"HostConfig\": "),
            Err(Denied::Unreadable(_))
        ));
        assert!(matches!(p.check(b"\xff\xfe"), Err(Denied::Unreadable(_))));
        p.check(b"").unwrap();
        p.check(b" \r\n").unwrap();
        // Bytes after the first value are ignored by dockerd; the value itself is still checked.
        assert_eq!(
            denied_path(p.check(&[binds(&["/opt:/o"]), b"junk".to_vec()].concat())),
            "/opt"
        );
    }
}
