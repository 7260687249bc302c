//! `berth logs`: the VM console (kernel and agent), the host proxy's log, or dockerd's log
//! read in the guest through the host proxy's shell upgrade.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::Layout;

use crate::shell;

/// Where the guest agent writes dockerd's output.
const DOCKERD_LOG: &str = "/var/log/berth/dockerd.log";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The VM's serial console: kernel and agent output.
    Console,
    /// The host proxy (VMM exits, Docker socket, shutdowns).
    HostProxy,
    /// dockerd in the guest (needs the VM running).
    Dockerd,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Keep printing what is appended.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(long, value_enum, default_value = "console")]
    pub source: Source,
    /// Only the last N lines.
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<usize>,
}

pub fn logs(args: &LogsArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    match args.source {
        Source::Console => file_log(&layout.console_log(), args),
        Source::HostProxy => file_log(&layout.host_proxy_log(), args),
        Source::Dockerd => dockerd_log(&layout, args),
    }
}

fn file_log(path: &Path, args: &LogsArgs) -> anyhow::Result<()> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "there is no {} yet: Berth has not been started",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = std::io::stdout().lock();
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    out.write_all(last_lines(&text, args.tail))?;
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    let mut pos = text.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Truncated or replaced by a new run: start over from its beginning.
            file = File::open(path).with_context(|| format!("cannot reopen {}", path.display()))?;
            pos = 0;
        }
        file.seek(SeekFrom::Start(pos))?;
        let n = file.read(&mut buf)?;
        if n == 0 {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
        pos += n as u64;
    }
}

/// The last `n` lines of `text` (all of it for `None`).
fn last_lines(text: &[u8], n: Option<usize>) -> &[u8] {
    let Some(n) = n else { return text };
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut start = body.len();
    for _ in 0..n {
        match body[..start].iter().rposition(|&b| b == b'\n') {
            Some(i) => start = i,
            None => return text,
        }
    }
    &text[(start + 1).min(text.len())..]
}

fn dockerd_log(layout: &Layout, args: &LogsArgs) -> anyhow::Result<()> {
    if lock::probe(layout)? == Status::Stopped {
        bail!("Berth is not running: dockerd's log lives in the VM (`berth start` first)");
    }
    let lines = args.tail.map_or("+1".to_string(), |n| n.to_string());
    let mut command = vec!["tail".to_string(), "-n".into(), lines];
    if args.follow {
        command.push("-F".into());
    }
    command.push(DOCKERD_LOG.into());
    let session = shell::run(layout, command)?;
    match shell::print_output(session.output())? {
        0 => Ok(()),
        code => bail!("reading {DOCKERD_LOG} in the guest failed (tail exited with status {code})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_counts_from_the_end() {
        let text = b"one\ntwo\nthree\n";
        assert_eq!(last_lines(text, None), text);
        assert_eq!(last_lines(text, Some(1)), b"three\n");
        assert_eq!(last_lines(text, Some(2)), b"two\nthree\n");
        assert_eq!(last_lines(text, Some(9)), text);
        assert_eq!(last_lines(b"a\nb", Some(1)), b"b");
        assert_eq!(last_lines(b"", Some(3)), b"");
        assert_eq!(last_lines(b"a\nb", Some(0)), b"");
    }
}
