//! `boot-timer`: how long a VM takes from spawn to a line on its console.
//!
//! ```text
//! boot-timer [--pattern TEXT] [--timeout SECONDS] [--exit-wait SECONDS] -- COMMAND [ARGS...]
//! ```
//!
//! Spawns COMMAND with its stdout piped (stdin from /dev/null, stderr inherited), reads stdout
//! line by line and, at the first line containing TEXT (default `berth-agent: ready`) within
//! `--timeout` (default 120 s), prints the milliseconds since the spawn on stdout. Then it waits
//! up to `--exit-wait` (default 10 s) for COMMAND to exit by itself (our VMM does when the guest
//! powers off; QEMU's microvm without ACPI only halts) and kills it otherwise.
//! Exit status 0 if the line appeared, 1 if it did not (the console is then printed on stderr),
//! 2 on a usage error.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

struct Args {
    pattern: String,
    timeout: Duration,
    exit_wait: Duration,
    command: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut pattern = "berth-agent: ready".to_owned();
    let mut timeout = Duration::from_secs(120);
    let mut exit_wait = Duration::from_secs(10);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pattern" => pattern = args.next().context("--pattern needs TEXT")?,
            "--timeout" => timeout = seconds(args.next(), "--timeout")?,
            "--exit-wait" => exit_wait = seconds(args.next(), "--exit-wait")?,
            "--" => break,
            other => bail!("unexpected argument {other:?}"),
        }
    }
    let command: Vec<String> = args.collect();
    if command.is_empty() {
        bail!("no command given");
    }
    Ok(Args {
        pattern,
        timeout,
        exit_wait,
        command,
    })
}

fn seconds(arg: Option<String>, option: &str) -> anyhow::Result<Duration> {
    let secs: f64 = arg
        .with_context(|| format!("{option} needs SECONDS"))?
        .parse()
        .with_context(|| format!("{option} needs a number of seconds"))?;
    Duration::try_from_secs_f64(secs).with_context(|| format!("{option}: {secs} is not a duration"))
}

/// What the reader thread sees on the command's stdout.
enum Seen {
    Line(String),
    Eof,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("boot-timer: {e:#}");
            eprintln!(
                "usage: boot-timer [--pattern TEXT] [--timeout SECONDS] [--exit-wait SECONDS] \
                 -- COMMAND [ARGS...]"
            );
            return ExitCode::from(2);
        }
    };
    match time(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("boot-timer: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs the command; true if the pattern appeared.
fn time(args: &Args) -> anyhow::Result<bool> {
    let start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", args.command[0]))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || read_lines(stdout, &tx));

    let mut deadline = start + args.timeout;
    let mut console = Vec::new();
    let mut found = None;
    while found.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Seen::Line(line)) => {
                if line.contains(&args.pattern) {
                    found = Some(start.elapsed());
                }
                console.push(line);
            }
            Ok(Seen::Eof) | Err(_) => break,
        }
    }
    if let Some(elapsed) = found {
        println!("{}", elapsed.as_millis());
        deadline = Instant::now() + args.exit_wait;
    }
    let status = finish(&mut child, deadline)?;
    // Drain what is left so the reader thread ends (the pipe closes when the child is gone).
    while let Ok(Seen::Line(line)) = rx.recv_timeout(Duration::from_secs(2)) {
        console.push(line);
    }
    drop(reader);
    if found.is_none() {
        eprintln!(
            "boot-timer: {:?} did not appear within {:.0?} ({status}); console:",
            args.pattern,
            start.elapsed()
        );
        for line in &console {
            eprintln!("  {line}");
        }
    }
    Ok(found.is_some())
}

fn read_lines(stdout: impl Read, tx: &mpsc::Sender<Seen>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                eprintln!("boot-timer: reading the command's stdout: {e}");
                break;
            }
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\r', '\n']).to_owned();
                if tx.send(Seen::Line(line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Seen::Eof);
}

/// Waits for the child until the deadline, then kills it; says how it ended.
fn finish(child: &mut Child, deadline: Instant) -> anyhow::Result<String> {
    loop {
        if let Some(status) = child.try_wait().context("wait for the command")? {
            return Ok(format!("command exited: {status}"));
        }
        if Instant::now() >= deadline {
            child.kill().context("kill the command")?;
            let status = child.wait().context("wait for the killed command")?;
            return Ok(format!("command killed at the timeout: {status}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}
