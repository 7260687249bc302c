//! `berth diagnose`: one tarball with what explains a problem — the VM console, the host proxy
//! and passt logs, the settings, `berth status --json`, and from a running VM its `dmesg`,
//! dockerd's and containerd's logs, `docker info` and the versions — with nothing secret in it
//! (the docker config's registry credentials and any password in a URL are redacted). A piece
//! that cannot be had (the VM is stopped, the guest does not answer) is named in the bundle's
//! `README.txt` with the reason; it never stops the others from being collected.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::{config, Layout};
use berth_protocol::{read_shell_frame, ShellFrame};

use crate::{shell, status};

/// Each log is cut to its last this many bytes (the newest part is the one that explains).
const MAX_LOG: u64 = 16 << 20;
/// How long one question to the guest or to dockerd may take before it is given up on.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// What stands in for a secret.
const REDACTED: &str = "<redacted>";
/// The guest's logs directory (the agent writes the daemons' output there).
const GUEST_LOG_DIR: &str = "/var/log/berth";

#[derive(clap::Args, Debug)]
pub struct DiagnoseArgs {
    /// Where to write the tarball (default: BERTH_HOME/diagnostics/berth-diagnose-TIME.tar.gz).
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

pub fn diagnose(args: &DiagnoseArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let now = SystemTime::now();
    let out = match &args.output {
        Some(path) => path.clone(),
        None => layout
            .home()
            .join("diagnostics")
            .join(format!("berth-diagnose-{}.tar.gz", stamp(now))),
    };
    let mut bundle = Bundle::default();
    collect_host(&mut bundle, &layout, &docker_config_path());
    match lock::probe(&layout) {
        Ok(Status::Running { .. }) => collect_guest(&mut bundle, &layout),
        Ok(Status::Stopped) => bundle.missing("guest/", "Berth is not running"),
        Err(e) => bundle.missing("guest/", format!("{e:#}")),
    }
    bundle.write(&out, now)?;
    if !bundle.problems.is_empty() {
        eprintln!(
            "berth diagnose: {} piece(s) could not be collected (listed in README.txt)",
            bundle.problems.len()
        );
    }
    println!("{}", out.display());
    Ok(())
}

/// The files of the tarball, in order, and what could not be had.
#[derive(Default)]
struct Bundle {
    files: Vec<(String, Vec<u8>)>,
    problems: Vec<(String, String)>,
}

impl Bundle {
    fn add(&mut self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.files.push((name.into(), bytes.into()));
    }

    fn missing(&mut self, name: impl Into<String>, why: impl Into<String>) {
        self.problems.push((name.into(), why.into()));
    }

    fn add_result(&mut self, name: &str, result: anyhow::Result<Vec<u8>>) {
        match result {
            Ok(bytes) => self.add(name, bytes),
            Err(e) => self.missing(name, format!("{e:#}")),
        }
    }

    fn readme(&self, now: SystemTime) -> String {
        let mut text = format!(
            "Berth diagnostics, made {} UTC by berth {}.\n\n\
             logs/         the host's Berth logs: the VM console, the host proxy, passt\n\
             settings/     the Berth settings file and the docker CLI's config (credentials redacted)\n\
             status.json   berth status --json\n\
             run/          the machine description the VMM booted\n\
             versions.txt  the host and Berth versions\n\
             docker/       docker version and docker info from the guest's dockerd\n\
             guest/        from the running VM: dmesg, its system state and the daemons' logs\n\n",
            human(now),
            env!("CARGO_PKG_VERSION")
        );
        if self.problems.is_empty() {
            text.push_str("Everything was collected.\n");
        } else {
            text.push_str("Not collected:\n");
            for (name, why) in &self.problems {
                text.push_str(&format!("  {name}: {why}\n"));
            }
        }
        text
    }

    /// Writes the tarball to a temporary file beside `out`, then renames it there: a failed run
    /// leaves no half-written bundle.
    fn write(&self, out: &Path, now: SystemTime) -> anyhow::Result<()> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let partial = out.with_extension("partial");
        let result = (|| -> anyhow::Result<()> {
            let file = std::fs::File::create(&partial)?;
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            let top = out
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".tar.gz").or(n.strip_suffix(".tgz")))
                .unwrap_or("berth-diagnose")
                .to_string();
            let mtime = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let readme = self.readme(now).into_bytes();
            let entries = std::iter::once(("README.txt", readme.as_slice()))
                .chain(self.files.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
            for (name, bytes) in entries {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o600);
                header.set_mtime(mtime);
                header.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut header, format!("{top}/{name}"), bytes)?;
            }
            let gz = tar.into_inner()?;
            gz.finish()?.sync_all()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(e).with_context(|| format!("cannot write {}", partial.display()));
        }
        std::fs::rename(&partial, out)
            .with_context(|| format!("cannot move the bundle to {}", out.display()))
    }
}

/// What the host has: logs, settings, status, versions.
fn collect_host(bundle: &mut Bundle, layout: &Layout, docker_config: &Path) {
    match std::fs::read_dir(layout.logs_dir()) {
        Ok(dir) => {
            let mut names: Vec<_> = dir
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name())
                .collect();
            names.sort();
            for name in names {
                let name = name.to_string_lossy().into_owned();
                let path = layout.logs_dir().join(&name);
                bundle.add_result(&format!("logs/{name}"), read_tail(&path, MAX_LOG));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bundle.missing(
            "logs/",
            format!(
                "none yet: Berth has not been started with this home ({})",
                layout.home().display()
            ),
        ),
        Err(e) => bundle.missing(
            "logs/",
            format!("cannot read {}: {e}", layout.logs_dir().display()),
        ),
    }
    match config::path() {
        Ok(path) => match std::fs::read(&path) {
            Ok(bytes) => bundle.add("settings/config.toml", bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bundle.add(
                "settings/config.toml",
                format!(
                    "# {} does not exist: every setting is its default\n",
                    path.display()
                ),
            ),
            Err(e) => bundle.missing(
                "settings/config.toml",
                format!("cannot read {}: {e}", path.display()),
            ),
        },
        Err(e) => bundle.missing("settings/config.toml", format!("{e:#}")),
    }
    match std::fs::read(docker_config) {
        Ok(bytes) => bundle.add_result("settings/docker-config.json", redact_docker_config(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bundle.missing(
            "settings/docker-config.json",
            format!("cannot read {}: {e}", docker_config.display()),
        ),
    }
    if let Ok(bytes) = std::fs::read(layout.vm_config()) {
        bundle.add("run/vm.json", bytes);
    }
    bundle.add_result(
        "status.json",
        status::report(layout).and_then(|r| Ok(r.to_json()?.into_bytes())),
    );
    let uname = std::process::Command::new("uname")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("(uname: {e})"));
    bundle.add(
        "versions.txt",
        format!("berth {}\nhost {uname}\n", env!("CARGO_PKG_VERSION")),
    );
}

/// What the running VM has: dockerd's answers through the Docker socket, and through the shell
/// channel dmesg, the system's state and the daemons' logs.
fn collect_guest(bundle: &mut Bundle, layout: &Layout) {
    let socket = layout.docker_socket();
    for (name, path) in [
        ("docker/version.json", "/version"),
        ("docker/info.json", "/info"),
    ] {
        bundle.add_result(name, docker_get(&socket, path, GUEST_TIMEOUT));
    }
    // What the image has (minbase: no iproute2 or procps), so /proc stands in for `ip` and `free`.
    let system = "for c in 'uname -a' 'cat /etc/os-release' 'cat /proc/uptime' \
                  'cat /proc/meminfo' 'df -h' 'cat /proc/mounts' 'cat /proc/net/dev' \
                  'cat /proc/net/route' 'cat /etc/resolv.conf' 'ls -l /var/log/berth'; \
                  do echo \"\\$ $c\"; $c 2>&1; echo; done";
    bundle.add_result("guest/dmesg.txt", guest_output(layout, &["dmesg"]));
    bundle.add_result(
        "guest/system.txt",
        guest_output(layout, &["sh", "-c", system]),
    );
    let listing = guest_output(
        layout,
        &[
            "sh",
            "-c",
            &format!("cd {GUEST_LOG_DIR} && for f in *; do [ -f \"$f\" ] && echo \"$f\"; done"),
        ],
    );
    match listing {
        Ok(names) => {
            for name in String::from_utf8_lossy(&names)
                .lines()
                .filter(|n| !n.is_empty())
            {
                let path = format!("{GUEST_LOG_DIR}/{name}");
                bundle.add_result(
                    &format!("guest/logs/{name}"),
                    guest_output(layout, &["tail", "-c", &MAX_LOG.to_string(), &path]),
                );
            }
        }
        Err(e) => bundle.missing("guest/logs/", format!("{e:#}")),
    }
}

/// The last `max` bytes of the file at `path`.
fn read_tail(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = file.metadata()?.len();
    if len > max {
        file.seek(SeekFrom::Start(len - max))?;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}

/// `GET path` on the Docker socket: the body when dockerd answered 200.
fn docker_get(socket: &Path, path: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // HTTP/1.0: the answer ends where the stream does.
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("no whole answer to GET {path} within {timeout:?}"))?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET {path}: not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let body = reply[split + 4..].to_vec();
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// Runs `command` in the guest: what it wrote to stdout and stderr, in order. A non-zero exit
/// is recorded after the output; no answer within `GUEST_TIMEOUT` is an error.
fn guest_output(layout: &Layout, command: &[&str]) -> anyhow::Result<Vec<u8>> {
    let session = shell::run(layout, command.iter().map(|s| s.to_string()).collect())?;
    session.stream.set_read_timeout(Some(GUEST_TIMEOUT))?;
    collect_frames(session.output(), MAX_LOG as usize * 2)
        .with_context(|| format!("`{}` in the guest", command.join(" ")))
}

/// The output frames of a shell session until its exit status, at most `max` bytes kept.
fn collect_frames(mut from_guest: impl Read, max: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match read_shell_frame(&mut from_guest).context("no answer from the guest")? {
            Some(ShellFrame::Stdout(data) | ShellFrame::Stderr(data)) => {
                let room = max.saturating_sub(out.len());
                out.extend_from_slice(&data[..data.len().min(room)]);
            }
            Some(ShellFrame::Exit(0)) => return Ok(out),
            Some(ShellFrame::Exit(code)) => {
                out.extend_from_slice(format!("\n(exit status {code})\n").as_bytes());
                return Ok(out);
            }
            Some(other) => bail!("the guest sent {other:?}"),
            None => bail!("the session ended without an exit status (did the VM stop?)"),
        }
    }
}

/// The docker CLI's config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn docker_config_path() -> PathBuf {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("config.json"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".docker")
            .join("config.json"),
    }
}

/// The docker config with its secrets replaced: every value under `auths` (auth, identitytoken,
/// password...) and under `HttpHeaders`, and the user and password of any URL (proxies). The
/// registries' names, credential helpers and contexts stay: they explain a login problem.
fn redact_docker_config(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(e) => {
            // Not JSON: nothing of it can be shown safely.
            return Ok(format!("{{\"unreadable\": \"not JSON ({e}); left out\"}}\n").into_bytes());
        }
    };
    if let Some(map) = value.as_object_mut() {
        for key in ["auths", "HttpHeaders"] {
            if let Some(section) = map.get_mut(key).and_then(|v| v.as_object_mut()) {
                for entry in section.values_mut() {
                    redact_leaves(entry);
                }
            }
        }
    }
    redact_urls(&mut value);
    Ok(serde_json::to_vec_pretty(&value)?)
}

fn redact_leaves(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_leaves),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_leaves),
        serde_json::Value::Null => {}
        other => *other = REDACTED.into(),
    }
}

fn redact_urls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_urls),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_urls),
        serde_json::Value::String(s) => {
            if let Some(clean) = without_userinfo(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// `scheme://user:pass@host...` → `scheme://<redacted>@host...`; `None` when there is no
/// user part.
fn without_userinfo(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{scheme}://{REDACTED}@{}", &rest[at + 1..]))
}

/// `YYYYMMDD-HHMMSS` (UTC), for the default file name.
fn stamp(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC).
fn human(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// The UTC date and time of `t` (proleptic Gregorian, from the days since 1970-01-01).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil: eras of 400 years from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::write_shell_frame;
    use std::os::unix::net::UnixListener;

    #[test]
    fn dates_are_utc_and_right_across_leap_years() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(human(at(0)), "1970-01-01 00:00:00");
        assert_eq!(human(at(951_782_400)), "2000-02-29 00:00:00");
        assert_eq!(human(at(1_709_251_199)), "2024-02-29 23:59:59");
        assert_eq!(stamp(at(1_796_245_445)), "20261202-210405");
    }

    #[test]
    fn registry_credentials_and_url_passwords_are_left_out() {
        let config = br#"{
            "auths": {"registry.example.com": {"auth": "dXNlcjpzM2NyZXQ=", "identitytoken": "tok"},
                      "https://index.docker.io/v1/": {}},
            "HttpHeaders": {"X-Meta-Token": "hdr-secret"},
            "credsStore": "desktop",
            "proxies": {"default": {"httpProxy": "http://bob:pr0xy@proxy.example:3128/x",
                                    "noProxy": "localhost"}},
            "currentContext": "berth"
        }"#;
        let out = String::from_utf8(redact_docker_config(config).unwrap()).unwrap();
        for secret in ["dXNlcjpzM2NyZXQ=", "tok\"", "hdr-secret", "pr0xy", "bob"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        for kept in [
            "registry.example.com",
            "index.docker.io",
            "desktop",
            "proxy.example:3128/x",
            "berth",
            "X-Meta-Token",
        ] {
            assert!(out.contains(kept), "{kept} missing from {out}");
        }
        let bad = String::from_utf8(redact_docker_config(b"{\"auths\": tok").unwrap()).unwrap();
        assert!(!bad.contains("tok") && bad.contains("unreadable"), "{bad}");
    }

    #[test]
    fn only_the_user_part_of_a_url_goes() {
        assert_eq!(without_userinfo("http://proxy:3128"), None);
        assert_eq!(without_userinfo("not a url"), None);
        assert_eq!(
            without_userinfo("https://u:p@h/a@b").as_deref(),
            Some("https://<redacted>@h/a@b")
        );
    }

    #[test]
    fn a_log_is_cut_to_its_newest_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"old old old\nnew\n").unwrap();
        assert_eq!(read_tail(&path, 4).unwrap(), b"new\n");
        assert_eq!(read_tail(&path, 1000).unwrap(), b"old old old\nnew\n");
        assert!(read_tail(&dir.path().join("none"), 4).is_err());
    }

    #[test]
    fn the_guests_output_is_kept_in_order_with_a_failed_status_noted() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        for f in [
            ShellFrame::Stdout(b"one ".to_vec()),
            ShellFrame::Stderr(b"two ".to_vec()),
            ShellFrame::Stdout(b"three".to_vec()),
            ShellFrame::Exit(2),
        ] {
            write_shell_frame(&mut guest, &f).unwrap();
        }
        let out = collect_frames(&host, 9).unwrap();
        assert_eq!(out, b"one two t\n(exit status 2)\n");
        drop(guest);
        let (host, guest) = UnixStream::pair().unwrap();
        drop(guest);
        assert!(
            collect_frames(&host, 9).is_err(),
            "no exit status is an error"
        );
    }

    #[test]
    fn a_guest_that_does_not_answer_is_given_up_on() {
        let (host, _guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = std::time::Instant::now();
        assert!(collect_frames(&host, 9).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn dockers_answer_is_its_body_and_an_error_status_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server =
            std::thread::spawn(move || {
                for reply in [
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Version\":\"26.1.5\"}",
                "HTTP/1.0 503 Service Unavailable\r\n\r\n{\"message\":\"Berth is starting\"}",
            ] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                    request.push(byte[0]);
                }
                assert!(request.starts_with(b"GET /version HTTP/1.0\r\n"), "{request:?}");
                conn.write_all(reply.as_bytes()).unwrap();
            }
            });
        let timeout = Duration::from_secs(5);
        assert_eq!(
            docker_get(&socket, "/version", timeout).unwrap(),
            b"{\"Version\":\"26.1.5\"}"
        );
        let e = docker_get(&socket, "/version", timeout).unwrap_err();
        assert!(format!("{e:#}").contains("503") && format!("{e:#}").contains("Berth is starting"));
        server.join().unwrap();
        assert!(docker_get(&dir.path().join("none"), "/info", timeout).is_err());
    }

    /// The whole bundle of a Berth that is not running: the host's pieces, a README that says
    /// the guest's are missing and why, nothing secret, and no partial file left behind.
    #[test]
    fn a_stopped_berths_bundle_is_a_readable_tarball_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("home"));
        layout.create_dirs().unwrap();
        std::fs::write(layout.console_log(), b"[    0.000000] Linux version 6.1\n").unwrap();
        std::fs::write(layout.host_proxy_log(), b"host proxy started\n").unwrap();
        let docker_config = dir.path().join("config.json");
        std::fs::write(
            &docker_config,
            br#"{"auths": {"r.example": {"auth": "c2VjcmV0"}}}"#,
        )
        .unwrap();

        let mut bundle = Bundle::default();
        collect_host(&mut bundle, &layout, &docker_config);
        bundle.missing("guest/", "Berth is not running");
        let out = dir.path().join("out").join("bundle.tar.gz");
        let now = UNIX_EPOCH + Duration::from_secs(1_796_245_445);
        bundle.write(&out, now).unwrap();
        assert!(!out.with_extension("partial").exists());

        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(&out).unwrap(),
        ));
        let mut files = std::collections::BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            files.insert(name, text);
        }
        let names: Vec<_> = files.keys().map(String::as_str).collect();
        for want in [
            "bundle/README.txt",
            "bundle/logs/console.log",
            "bundle/logs/host-proxy.log",
            "bundle/settings/config.toml",
            "bundle/settings/docker-config.json",
            "bundle/versions.txt",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(files["bundle/logs/console.log"].contains("Linux version 6.1"));
        let readme = &files["bundle/README.txt"];
        assert!(readme.contains("2026-12-02 21:04:05 UTC"), "{readme}");
        assert!(readme.contains("guest/: Berth is not running"), "{readme}");
        assert!(
            files.values().all(|t| !t.contains("c2VjcmV0")),
            "a credential leaked"
        );
        assert!(files["bundle/settings/docker-config.json"].contains("r.example"));
    }

    #[test]
    fn a_bundle_that_cannot_be_written_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let mut bundle = Bundle::default();
        bundle.add("x", b"y".to_vec());
        let e = bundle.write(&blocker.join("sub").join("b.tar.gz"), SystemTime::now());
        assert!(e.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
