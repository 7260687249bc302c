//! `vsock-stress`: an end-to-end stress test of Berth's virtio-vsock device against a real Linux
//! guest. One binary, two roles:
//!
//! ```text
//! vsock-stress guest-serve PORT                      # in the guest (uploaded by `host`)
//! vsock-stress host --socket PATH --self BINARY [--vmm-pid PID] [--scenarios a,b,..] [sizes]
//! vsock-stress shell --socket PATH SCRIPT            # one `sh -c SCRIPT` in the guest
//! ```
//!
//! `host` runs next to `berth-vmm --vsock PATH`: it uploads BINARY into the guest through the
//! agent's shell port, starts `guest-serve` there in a shell session, runs the scenarios and
//! prints one `ok NAME figures…` or `FAIL NAME why` line each. Exit status 1 if any failed.

mod guest;
mod host;
mod pattern;
mod request;
mod scenarios;
mod vsock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use scenarios::{Ctx, Opts, Outcome};

#[derive(Parser, Debug)]
#[command(
    name = "vsock-stress",
    about = "Stress Berth's virtio-vsock device end to end"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve stress connections on a guest vsock port (runs inside the guest).
    GuestServe { port: u32 },
    /// Run the scenarios against a guest through berth-vmm's vsock socket.
    Host(HostArgs),
    /// Run one `sh -c SCRIPT` in the guest and print its output.
    Shell {
        #[arg(long)]
        socket: PathBuf,
        script: String,
    },
}

#[derive(clap::Args, Debug)]
struct HostArgs {
    /// berth-vmm's `--vsock` socket.
    #[arg(long)]
    socket: PathBuf,
    /// This binary, to upload into the guest.
    #[arg(long = "self")]
    self_binary: PathBuf,
    /// berth-vmm's PID: checked to be alive after every scenario.
    #[arg(long)]
    vmm_pid: Option<i32>,
    /// Guest port for guest-serve.
    #[arg(long, default_value_t = 7000)]
    port: u32,
    /// Comma-separated scenarios to run (default: all, in order).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    #[arg(long, default_value_t = 32)]
    bulk_conns: u32,
    #[arg(long, default_value_t = 8)]
    bulk_mib: u64,
    #[arg(long, default_value_t = 300)]
    many_conns: u32,
    #[arg(long, default_value_t = 64)]
    many_kib: u64,
    /// Size of the stalled connection in the slow-reader scenarios.
    #[arg(long, default_value_t = 8)]
    slow_mib: u64,
    /// How long a slow reader does not read.
    #[arg(long, default_value_t = 6)]
    pause_secs: u64,
    /// Connections that must complete while a slow reader stalls, and their size.
    #[arg(long, default_value_t = 8)]
    side_conns: u32,
    #[arg(long, default_value_t = 256)]
    side_kib: u64,
    #[arg(long, default_value_t = 64)]
    dial_conns: u32,
    #[arg(long, default_value_t = 256)]
    dial_kib: u64,
    #[arg(long, default_value_t = 4)]
    reset_conns: u32,
    /// No progress on a socket for this long is a failure.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
}

const ALL: [&str; 8] = [
    "bulk",
    "many",
    "host-slow-reader",
    "guest-slow-reader",
    "guest-dial",
    "peer-close",
    "peer-exit",
    "device-reset",
];

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Cmd::GuestServe { port } => match guest::serve(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("guest-serve: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Shell { socket, script } => {
            match host::shell_run(&socket, &script, b"", Duration::from_secs(30)) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vsock-stress: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Host(h) => host_main(h),
    }
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn host_main(h: HostArgs) -> ExitCode {
    let idle = Duration::from_secs(h.idle_secs);
    let nofile = vsock::raise_nofile();
    let wanted: Vec<String> = if h.scenarios.is_empty() {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        h.scenarios.clone()
    };
    if let Some(bad) = wanted.iter().find(|w| !ALL.contains(&w.as_str())) {
        eprintln!(
            "vsock-stress: error: unknown scenario {bad:?} (known: {})",
            ALL.join(",")
        );
        return ExitCode::from(2);
    }
    println!("vsock-stress: host nofile limit {nofile}");
    let started = Instant::now();
    match host::upload(&h.socket, &h.self_binary, idle) {
        Ok(bytes) => println!(
            "ok upload bytes={bytes} sha256=match secs={:.1}",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            println!("FAIL upload {e}");
            return ExitCode::FAILURE;
        }
    }
    let serve = match host::GuestServe::start(&h.socket, h.port, idle) {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL guest-serve {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ctx = Ctx {
        socket: h.socket.clone(),
        serve,
        opts: Opts {
            bulk_conns: h.bulk_conns,
            bulk_mib: h.bulk_mib,
            many_conns: h.many_conns,
            many_kib: h.many_kib,
            slow_mib: h.slow_mib,
            pause: Duration::from_secs(h.pause_secs),
            side_conns: h.side_conns,
            side_kib: h.side_kib,
            dial_conns: h.dial_conns,
            dial_kib: h.dial_kib,
            reset_conns: h.reset_conns,
            idle,
        },
    };
    let mut failed = 0;
    for name in &wanted {
        let t = Instant::now();
        let outcome: Outcome = match name.as_str() {
            "bulk" => scenarios::bulk(&ctx),
            "many" => scenarios::many(&ctx),
            "host-slow-reader" => scenarios::host_slow_reader(&ctx),
            "guest-slow-reader" => scenarios::guest_slow_reader(&ctx),
            "guest-dial" => scenarios::guest_dial(&ctx),
            "peer-close" => scenarios::peer_abort(&ctx, false),
            "peer-exit" => scenarios::peer_abort(&ctx, true),
            "device-reset" => scenarios::device_reset(&ctx).map(|(figures, serve)| {
                ctx.serve = serve;
                figures
            }),
            _ => unreachable!("names were checked above"),
        };
        let outcome = match (outcome, h.vmm_pid) {
            (_, Some(pid)) if !alive(pid) => {
                Err(format!("berth-vmm (pid {pid}) is no longer running"))
            }
            (o, _) => o,
        };
        let took = t.elapsed().as_secs_f64();
        match outcome {
            Ok(figures) => println!("ok {name} {figures} (scenario {took:.1}s)"),
            Err(why) => {
                failed += 1;
                println!("FAIL {name} {why} (after {took:.1}s)");
            }
        }
        if h.vmm_pid.is_some_and(|pid| !alive(pid)) {
            break;
        }
    }
    println!(
        "vsock-stress: {} scenarios, {failed} failed, {:.1}s",
        wanted.len(),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
