//! The control API (`host-proxy/API.md`) of the real `berth-host-proxy` against the fake VMM:
//! each endpoint and its JSON, the errors of bad requests, the `Hello` exchange in the status,
//! a second client following the events while another stops the VM, the VMM-API stop of a
//! guest that ignores Shutdown, an old agent's unsupported answer, and a shell.
#![allow(clippy::unwrap_used)] // test helpers panic on purpose

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use berth_protocol::{read_shell_frame, write_frame, ShellFrame, ShellRequest, PROTOCOL_VERSION};
use common::{get, post, request, Events, Home};

#[test]
fn the_status_shows_the_hello_exchange_the_guest_stats_and_the_settings() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    home.wait_state("running");
    let answer = get(&home.control(), "/v1/status");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json")
    );
    let status = answer.json();
    assert_eq!(status["api_version"], 1);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["pid"], proxy.id());
    assert!(status["vmm_pid"].as_u64().is_some(), "{status}");
    assert!(status["uptime_secs"].as_u64().is_some(), "{status}");
    assert_eq!(status["reason"], "dockerd answers");
    assert!(status["since_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let guest = &status["guest"];
    assert_eq!(guest["protocol_version"], PROTOCOL_VERSION);
    assert_eq!(guest["host_protocol_version"], PROTOCOL_VERSION);
    assert_eq!(guest["agent_version"], "fake-agent 9.9");
    assert_eq!(guest["dockerd"], true);
    assert_eq!(guest["stats"]["mem_total_kib"], 2_000_000);
    assert_eq!(guest["stats"]["load_avg_1m"], "0.42");
    // The VMM's balloon report (the fake VMM's figures), beside the VMM's RSS.
    assert!(status["vmm_rss_kib"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["balloon"]["target_mib"], 256, "{status}");
    assert_eq!(status["balloon"]["actual_mib"], 64);
    assert_eq!(status["balloon"]["stats"]["free_memory_bytes"], 100 << 20);
    assert_eq!(status["balloon"]["stats"]["disk_caches_bytes"], 30 << 20);
    assert!(status["balloon"]["stats"].get("oom_kills").is_none());
    let home_dir = home.path("home");
    assert_eq!(status["home"], home_dir.to_str().unwrap());
    assert_eq!(
        status["sockets"]["control"],
        home.control().to_str().unwrap()
    );
    assert_eq!(
        status["sockets"]["docker"],
        home_dir.join("run/docker.sock").to_str().unwrap()
    );
    assert_eq!(
        status["sockets"]["vmm_api"],
        home_dir.join("run/vmm.sock").to_str().unwrap()
    );
    assert_eq!(status["settings"]["cpus"], 1);
    assert_eq!(status["settings"]["memory_mib"], 256);
    assert_eq!(status["settings"]["disk_size_gib"], 1);
    let hello = format!(
        "guest agent fake-agent 9.9 answered Hello: protocol {PROTOCOL_VERSION}, ours {PROTOCOL_VERSION}"
    );
    assert!(home.log().contains(&hello), "{}", home.log());
    proxy.signal(rustix::process::Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn bad_requests_get_a_4xx_with_an_api_error() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &["--no-start"]);
    let socket = home.control();
    let error = |answer: &common::Answer, status: u16, code: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/json")
        );
        let json = answer.json();
        assert_eq!(json["code"], code, "{json}");
        json["message"].as_str().unwrap().to_string()
    };
    for path in ["/v1/nothing", "/v2/status", "/", "/v1", "/status"] {
        let message = error(&get(&socket, path), 404, "not_found");
        assert!(message.contains(path), "{message}");
    }
    let wrong = get(&socket, "/v1/stop");
    error(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.header("allow").as_deref(), Some("POST"));
    let wrong = post(&socket, "/v1/status", "");
    error(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.header("allow").as_deref(), Some("GET"));
    let message = error(
        &post(&socket, "/v1/stop", r#"{"timeout_secs": "soon"}"#),
        400,
        "bad_request",
    );
    assert!(message.contains("timeout_secs"), "{message}");
    let message = error(
        &post(&socket, "/v1/quit", r#"{"timeout": 3}"#),
        400,
        "bad_request",
    );
    assert!(message.contains("unknown field `timeout`"), "{message}");
    error(&post(&socket, "/v1/restart", "[1"), 400, "bad_request");
    let message = error(
        &request(&socket, "POST", "/v1/shell", ""),
        400,
        "bad_request",
    );
    assert!(message.contains("Upgrade"), "{message}");
    // Nothing above touched the VM; a shell needs one.
    assert_eq!(get(&socket, "/v1/status").json()["state"], "stopped");
    let shell = upgrade_request(&home);
    assert!(shell.starts_with("HTTP/1.1 503 "), "{shell}");
    assert!(shell.contains(r#""code":"not_running""#), "{shell}");
    // A stop of a stopped VM is no change.
    let stop = post(&socket, "/v1/stop", "");
    assert_eq!(stop.status, 200, "{stop:?}");
    assert_eq!(stop.json()["state"], "stopped");
    let quit = post(&socket, "/v1/quit", r#"{"timeout_secs": 2}"#);
    assert_eq!(quit.status, 202, "{quit:?}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(!socket.exists(), "the control socket is removed on quit");
}

/// `POST /v1/shell` with the upgrade headers; the answer's head (and body when not a 101).
fn upgrade_request(home: &Home) -> String {
    let mut s = UnixStream::connect(home.control()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /v1/shell HTTP/1.1\r\nHost: berth\r\nConnection: Upgrade\r\n\
          Upgrade: berth-shell\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    // A JSON error follows its head; give it a moment to arrive.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    if let Ok(n) = s.read(&mut buf) {
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_second_client_sees_the_whole_lifecycle_while_another_starts_and_stops_the_vm() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &["--no-start"]);
    let socket = home.control();
    let mut events = Events::open(&socket);
    let first = events.next().unwrap();
    assert_eq!(first["type"], "state");
    assert_eq!(first["state"], "stopped");

    let start = post(&socket, "/v1/start", "");
    assert_eq!(start.status, 202, "{start:?}");
    assert_eq!(start.json()["state"], "starting");
    let mut seen = events.until(|e| e["type"] == "guest");
    assert_eq!(
        seen.last().unwrap()["event"],
        serde_json::json!({"event": "daemon_ready", "daemon": "dockerd"})
    );
    let again = post(&socket, "/v1/start", "");
    assert_eq!(again.status, 200, "already running: {again:?}");
    assert_eq!(again.json()["state"], "running");

    let stop = post(&socket, "/v1/stop", r#"{"timeout_secs": 5}"#);
    assert_eq!(stop.status, 202, "{stop:?}");
    assert_eq!(stop.json()["state"], "stopping");
    seen.extend(events.until(|e| e["state"] == "stopped"));
    let states: Vec<&str> = seen
        .iter()
        .filter(|e| e["type"] == "state")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["starting", "running", "stopping", "stopped"]);
    let stopped = seen.last().unwrap();
    assert_eq!(stopped["reason"], "the guest powered off");
    assert!(home.log().contains("acknowledged the shutdown request"));

    // The daemon stays; a restart from stopped boots the VM again.
    let restart = post(&socket, "/v1/restart", "");
    assert_eq!(restart.status, 202, "{restart:?}");
    assert_eq!(restart.json()["state"], "starting");
    events.until(|e| e["state"] == "running");
    let quit = post(&socket, "/v1/quit", "");
    assert_eq!(quit.status, 202, "{quit:?}");
    assert_eq!(quit.json()["state"], "stopping");
    let states: Vec<String> = events
        .until(|e| e["state"] == "stopped")
        .iter()
        .filter(|e| e["type"] == "state")
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["stopping", "stopped"], "each state once");
    assert!(
        events.next().is_none(),
        "the stream ends when the daemon quits"
    );
    assert!(
        events.ended_cleanly,
        "the stream ends with HTTP's last chunk, not a cut connection"
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_guest_that_ignores_shutdown_is_stopped_through_the_vmm_api_and_a_start_meanwhile_conflicts() {
    let home = Home::new();
    let mut proxy = home.spawn("ignore-shutdown", &[]);
    let socket = home.control();
    home.wait_state("running");
    let stop = post(&socket, "/v1/stop", r#"{"timeout_secs": 2}"#);
    assert_eq!(stop.status, 202, "{stop:?}");
    let start = post(&socket, "/v1/start", "");
    assert_eq!(start.status, 409, "{start:?}");
    assert_eq!(start.json()["code"], "conflict");
    let status = home.wait_state("stopped");
    assert_eq!(status["reason"], "the VM was stopped by the host");
    assert_eq!(status["guest"], serde_json::Value::Null);
    let log = home.log();
    assert!(log.contains("acknowledged the shutdown request"), "{log}");
    assert!(
        log.contains("the guest did not power off within 2s"),
        "{log}"
    );
    assert!(
        log.contains("VMM exited: the VM was stopped by the host"),
        "{log}"
    );
    proxy.signal(rustix::process::Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn an_old_agents_unsupported_answer_is_logged_not_fatal() {
    let home = Home::new();
    let mut proxy = home.spawn("old-agent", &[]);
    home.wait_state("running");
    let status = get(&home.control(), "/v1/status").json();
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["guest"]["agent_version"], "fake-agent 9.9");
    assert_eq!(status["guest"]["stats"], serde_json::Value::Null);
    assert!(
        home.log()
            .contains(r#"answered Stats with unsupported (request "stats")"#),
        "{}",
        home.log()
    );
    proxy.signal(rustix::process::Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn the_status_answers_fast_when_the_guest_does_not() {
    let home = Home::new();
    let mut proxy = home.spawn("hang-stats", &[]);
    home.wait_state("running");
    let asked = std::time::Instant::now();
    let status = get(&home.control(), "/v1/status").json();
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the status took {:?}",
        asked.elapsed()
    );
    assert_eq!(status["state"], "running");
    assert_eq!(status["guest"]["agent_version"], "fake-agent 9.9");
    assert_eq!(status["guest"]["stats"], serde_json::Value::Null);
    proxy.signal(rustix::process::Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_shell_is_spliced_to_the_guests_shell_port() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    home.wait_state("running");
    let mut s = UnixStream::connect(home.control()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /v1/shell HTTP/1.1\r\nHost: berth\r\nConnection: Upgrade\r\n\
          Upgrade: berth-shell\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: berth-shell"),
        "{head}"
    );
    let shell = ShellRequest {
        command: vec!["echo".into(), "hi".into()],
        tty: false,
        rows: 24,
        cols: 80,
        term: "xterm".into(),
    };
    write_frame(&mut s, &shell).unwrap();
    assert_eq!(
        read_shell_frame(&mut s).unwrap(),
        Some(ShellFrame::Stdout(b"ran echo hi\n".to_vec()))
    );
    assert_eq!(read_shell_frame(&mut s).unwrap(), Some(ShellFrame::Exit(0)));
    proxy.signal(rustix::process::Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}
