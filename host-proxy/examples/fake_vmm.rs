//! A fake `berth-vmm` for the host proxy's tests (`tests/daemon.rs`, `tests/control_api.rs`):
//! `fake_vmm --config vm.json` reads the machine description as the real VMM does, connects
//! its net device to passt's socket (again after passt restarts), serves the hybrid vsock
//! socket with a fake guest agent behind it (Hello, Health, Stats, Shutdown, Subscribe pushing
//! one event, dockerd's ping, a shell) and the VMM API socket (Stop → exit 5). `BERTH_FAKE_VMM_MODE` (comma-separated) changes it: `panic` (exit 3 at boot), `deaf`
//! (the control port refuses), `ignore-shutdown` (acknowledges Shutdown, never powers off),
//! `old-agent` (answers Stats as unsupported), `hang-stats` (never answers Stats), `stuck-api`
//! (acknowledges Stop, never exits).
#![allow(clippy::unwrap_used)] // a test helper: a failure is a test failure

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_machine::{
    read_message, write_message, ApiRequest, BalloonRequest, BalloonStats, DeviceConfig, VmConfig,
    VmmRequest, VmmResponse,
};
use berth_protocol::{
    decode_request, read_frame, read_frame_body, write_frame, write_shell_frame, DecodeError,
    Event, Request, Response, ShellFrame, ShellRequest, PROTOCOL_VERSION,
};

const MODE_ENV: &str = "BERTH_FAKE_VMM_MODE";

fn mode(flag: &str) -> bool {
    std::env::var(MODE_ENV)
        .unwrap_or_default()
        .split(',')
        .any(|m| m == flag)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert_eq!(args.len(), 3, "usage: fake_vmm --config vm.json");
    assert_eq!(args[1], "--config");
    let config = VmConfig::from_json(&std::fs::read(&args[2]).unwrap()).unwrap();
    println!(
        "fake VMM: {} vCPUs, {} MiB, {} disks",
        config.cpus,
        config.memory_mib,
        config.disks().count()
    );
    let console = config.serial_log.clone().unwrap();
    std::fs::write(&console, "fake kernel booting\n").unwrap();
    if mode("panic") {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&console, "Kernel panic - not syncing: fake\n").unwrap();
        std::process::exit(3);
    }
    if let Some(api) = config.api_socket.clone() {
        serve_api(api);
    }
    for device in &config.devices {
        if let DeviceConfig::Net(net) = device {
            connect_net(net.socket.clone());
        }
    }
    let vsock = config.vsock_socket().unwrap().to_path_buf();
    let _ = std::fs::remove_file(&vsock); // as the real VMM does with a stale socket
    let listener = UnixListener::bind(&vsock).unwrap();
    let booted = Instant::now();
    for stream in listener.incoming() {
        let stream = stream.unwrap();
        std::thread::spawn(move || fake_guest(stream, booted));
    }
}

/// The net device's backend, as the real VMM uses it: connect to passt's socket, and connect
/// again whenever passt goes away.
fn connect_net(socket: PathBuf) {
    std::thread::spawn(move || {
        let mut connections = 0;
        loop {
            match UnixStream::connect(&socket) {
                Ok(mut stream) => {
                    connections += 1;
                    let what = if connections == 1 {
                        "connected"
                    } else {
                        "reconnected"
                    };
                    println!("fake VMM: net backend {what}");
                    // Until passt closes it.
                    let _ = std::io::copy(&mut stream, &mut std::io::sink());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
}

/// The VMM API socket: one JSON line each way.
fn serve_api(path: PathBuf) {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while let Ok(Some(request)) = read_message::<ApiRequest>(&mut reader) {
                match request {
                    Ok(ApiRequest::Vmm(VmmRequest::Stop)) => {
                        write_message(&mut stream, &VmmResponse::Ack).unwrap();
                        if !mode("stuck-api") {
                            std::thread::sleep(Duration::from_millis(50));
                            std::process::exit(5);
                        }
                    }
                    Ok(ApiRequest::Vmm(VmmRequest::Ping)) => {
                        let pong = VmmResponse::Pong {
                            pid: std::process::id(),
                            cpus: 1,
                            memory_mib: 256,
                        };
                        write_message(&mut stream, &pong).unwrap();
                    }
                    // A guest that gave back 64 MiB of the 256 asked, with two statistics.
                    Ok(ApiRequest::Balloon(BalloonRequest::BalloonStats)) => {
                        let status = VmmResponse::BalloonStatus {
                            target_mib: 256,
                            actual_mib: 64,
                            stats: Box::new(BalloonStats {
                                free_memory_bytes: Some(100 << 20),
                                disk_caches_bytes: Some(30 << 20),
                                ..BalloonStats::default()
                            }),
                        };
                        write_message(&mut stream, &status).unwrap();
                    }
                    Ok(ApiRequest::Balloon(BalloonRequest::Balloon { .. })) => {
                        write_message(&mut stream, &VmmResponse::Ack).unwrap();
                    }
                    Err(e) => {
                        let answer = VmmResponse::Unsupported {
                            message: e.to_string(),
                        };
                        write_message(&mut stream, &answer).unwrap();
                    }
                }
            }
        }
    });
}

fn fake_guest(stream: UnixStream, booted: Instant) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let port: u32 = line
        .trim()
        .strip_prefix("CONNECT ")
        .unwrap()
        .parse()
        .unwrap();
    if mode("deaf") && port == berth_protocol::CONTROL_PORT {
        return; // an agent that is not up: the VMM closes without OK
    }
    stream.write_all(b"OK 1073741824\n").unwrap();
    match port {
        berth_protocol::DOCKER_API_PORT => {
            // Reads the request head, answers one ping and closes.
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                .unwrap();
        }
        berth_protocol::CONTROL_PORT => control(reader, stream, booted),
        berth_protocol::SHELL_PORT => {
            let shell: ShellRequest = read_frame(&mut reader).unwrap().unwrap();
            let ran = format!("ran {}\n", shell.command.join(" "));
            write_shell_frame(&mut stream, &ShellFrame::Stdout(ran.into_bytes())).unwrap();
            write_shell_frame(&mut stream, &ShellFrame::Exit(0)).unwrap();
        }
        _ => {}
    }
}

/// The fake agent's control connection: requests until the host closes it.
fn control(mut reader: BufReader<UnixStream>, mut stream: UnixStream, booted: Instant) {
    while let Ok(Some(body)) = read_frame_body(&mut reader) {
        let request = match decode_request(&body) {
            Ok(request) => request,
            Err(DecodeError::Unsupported(request)) => {
                write_frame(&mut stream, &Response::Unsupported { request }).unwrap();
                continue;
            }
            Err(e) => panic!("the host sent a malformed request: {e}"),
        };
        let answer = match request {
            Request::Hello { .. } => Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "fake-agent 9.9".into(),
                uptime_ms: u64::try_from(booted.elapsed().as_millis()).unwrap(),
            },
            Request::Health => Response::Health {
                dockerd: true,
                containerd: true,
                detail: "fake dockerd answers".into(),
            },
            Request::Stats if mode("hang-stats") => {
                // A guest too busy to answer: the status must not wait for it.
                std::thread::sleep(Duration::from_secs(3600));
                return;
            }
            Request::Stats if mode("old-agent") => Response::Unsupported {
                request: "stats".into(),
            },
            Request::Stats => Response::Stats {
                mem_total_kib: 2_000_000,
                mem_available_kib: 1_500_000,
                disk_total_kib: 8_000_000,
                disk_used_kib: 1_000,
                load_avg_1m: "0.42".into(),
            },
            Request::Shutdown { .. } => {
                write_frame(&mut stream, &Response::Ack).unwrap();
                if mode("ignore-shutdown") {
                    continue;
                }
                std::thread::sleep(Duration::from_millis(100));
                std::process::exit(0); // powered off
            }
            Request::FileEvents { .. } => Response::Ack,
            Request::Subscribe => {
                write_frame(&mut stream, &Response::Ack).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                let event = Event::DaemonReady {
                    daemon: "dockerd".into(),
                };
                write_frame(&mut stream, &event).unwrap();
                // Events only from now on: wait for the host to close.
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
                return;
            }
            Request::SetClock { .. } => Response::Ack,
            Request::Clock => Response::Clock {
                unix_nanos: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64,
            },
        };
        write_frame(&mut stream, &answer).unwrap();
    }
}
