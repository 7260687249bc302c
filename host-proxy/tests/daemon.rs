//! The `berth-host-proxy` binary's lifecycle against the fake VMM (`examples/fake_vmm.rs`): the
//! lock, the files it writes (run/vm.json, the pid, the data disk), the Docker socket, the stop
//! sequence on SIGTERM (the guest's power-off, the VMM API's stop, the kill), a crash that
//! leaves the daemon serving, and the clean-up when it quits.
#![allow(clippy::unwrap_used)] // test helpers panic on purpose

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use berth_host_proxy::lock::{self, Status};
use common::{docker_ping, get, post, Home};
use rustix::process::Signal;

#[test]
fn serves_docker_refuses_a_second_instance_and_shuts_the_guest_down_on_sigterm() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    let socket = home.path("home/run/docker.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let response = loop {
        match docker_ping(&socket) {
            Some(r) if r.starts_with("HTTP/1.1 200") => break r,
            _ if Instant::now() > deadline => panic!("no ping; log:\n{}", home.log()),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(response.ends_with("OK"), "{response}");
    for owner_only in ["run/docker.sock", "run/berth.sock"] {
        let mode = std::fs::metadata(home.path(&format!("home/{owner_only}")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{owner_only} is owner-only");
    }

    let state = get(&home.control(), "/v1/status").json();
    assert_eq!(state["pid"], proxy.id());
    assert!(state["vmm_pid"].as_u64().is_some());
    assert_eq!(state["settings"]["memory_mib"], 256);
    let pid = std::fs::read_to_string(home.path("home/run/berth.pid")).unwrap();
    assert_eq!(pid.trim(), proxy.id().to_string());
    assert_eq!(
        std::fs::metadata(home.path("home/data.img")).unwrap().len(),
        1 << 30
    );

    let second = home.host_proxy("normal").output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running (pid"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        docker_ping(&socket).is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "the first one still serves"
    );

    proxy.signal(Signal::TERM);
    let status = proxy.wait_exit(Duration::from_secs(20));
    let log = home.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(log.contains("quitting on SIGTERM"), "{log}");
    assert!(log.contains("acknowledged the shutdown request"), "{log}");
    assert!(log.contains("VMM exited: the guest powered off"), "{log}");
    assert_gone(&home);
}

/// After a quit: no sockets, no pid or state file, the lock free.
fn assert_gone(home: &Home) {
    for gone in [
        "run/docker.sock",
        "run/berth.sock",
        "run/vsock.sock",
        "run/vmm.sock",
        "run/passt/passt.sock",
        "run/state.json",
        "run/berth.pid",
    ] {
        assert!(
            !home.path(&format!("home/{gone}")).exists(),
            "{gone} is left behind"
        );
    }
    assert_eq!(lock::probe(&home.layout()).unwrap(), Status::Stopped);
}

#[test]
fn the_machine_description_is_written_for_the_vmm() {
    let home = Home::new();
    let (rw, ro) = (home.path("shared/rw"), home.path("shared/read only"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    let mut config = std::fs::read_to_string(home.path("config.toml")).unwrap();
    config.push_str(&format!(
        "shares = [{{ path = {rw:?} }}, {{ path = {ro:?}, read_only = true }}]\n"
    ));
    std::fs::write(home.path("config.toml"), config).unwrap();
    let mut proxy = home.spawn("normal", &[]);
    let status = home.wait_state("running");
    let json = std::fs::read(home.path("home/run/vm.json")).unwrap();
    let config = berth_machine::VmConfig::from_json(&json).unwrap();
    assert_eq!((config.cpus, config.memory_mib), (1, 256));
    assert_eq!(config.kernel, home.path("vmlinux"));
    let (rw, ro) = (rw.canonicalize().unwrap(), ro.canonicalize().unwrap());
    assert_eq!(
        config.cmdline,
        format!(
            "root=/dev/vda ro rootfstype=ext4 berth.data=serial:berth-data \
             berth.net=192.168.127.2/24,192.168.127.1,192.168.127.53,65506 \
             berth.share=berth-share-0,rw,{} berth.share=berth-share-1,ro,{}",
            rw.display(),
            ro.display().to_string().replace(' ', "%20")
        )
    );
    let params = |name: &str| -> Vec<String> {
        config
            .cmdline
            .split(' ')
            .filter_map(|p| Some(p.strip_prefix(name)?.strip_prefix('=')?.to_string()))
            .collect()
    };
    let net = berth_protocol::cmdline::GuestNet::parse(&params("berth.net")[0]).unwrap();
    assert_eq!(net.address.to_string(), "192.168.127.2");
    let mounts: Vec<_> = params("berth.share")
        .iter()
        .map(|p| berth_protocol::cmdline::GuestShare::parse(p).unwrap())
        .collect();
    assert_eq!(mounts[1].path, ro, "the space survives the command line");
    assert!(mounts[1].read_only);
    let nets: Vec<_> = config
        .devices
        .iter()
        .filter_map(|d| match d {
            berth_machine::DeviceConfig::Net(net) => Some(net.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0].socket, home.path("home/run/passt/passt.sock"));
    assert_eq!(nets[0].mac, "52:54:00:12:34:56");
    let fs: Vec<_> = config
        .devices
        .iter()
        .filter_map(|d| match d {
            berth_machine::DeviceConfig::Fs(fs) => {
                Some((fs.tag.clone(), fs.path.clone(), fs.read_only))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        fs,
        [
            ("berth-share-0".to_string(), rw.clone(), false),
            ("berth-share-1".to_string(), ro.clone(), true)
        ]
    );
    // The status shows them.
    let shares = status["settings"]["shares"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{status}");
    assert_eq!(shares[1]["path"], ro.to_str().unwrap());
    assert_eq!(shares[1]["read_only"], true);
    let disks: Vec<_> = config.disks().collect();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0].path, home.path("rootfs.img"));
    assert!(disks[0].read_only);
    assert_eq!(disks[0].serial.as_deref(), Some("berth-root"));
    assert_eq!(disks[1].path, home.path("home/data.img"));
    assert!(!disks[1].read_only);
    assert_eq!(disks[1].serial.as_deref(), Some("berth-data"));
    assert!(config.devices.contains(&berth_machine::DeviceConfig::Rng));
    assert_eq!(
        config.vsock_socket(),
        Some(home.path("home/run/vsock.sock").as_path())
    );
    assert_eq!(config.api_socket, Some(home.path("home/run/vmm.sock")));
    assert_eq!(config.serial_log, Some(home.path("home/logs/console.log")));
    // The VMM's own output reaches our log.
    assert!(home.log().contains("fake VMM: 1 vCPUs, 256 MiB, 2 disks"));
    proxy.signal(Signal::INT);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_guest_that_cannot_be_asked_to_shut_down_is_stopped_through_the_vmm_api() {
    let home = Home::new();
    let mut proxy = home.spawn("deaf", &[]);
    home.wait_state("starting");
    wait_file(&home.path("home/run/vmm.sock"), &home);
    proxy.signal(Signal::TERM);
    let status = proxy.wait_exit(Duration::from_secs(20));
    let log = home.log();
    assert_eq!(status.code(), Some(0), "an orderly stop; log:\n{log}");
    assert!(log.contains("cannot ask the guest to shut down"), "{log}");
    assert!(log.contains("asking the VMM to stop"), "{log}");
    assert!(
        log.contains("VMM exited: the VM was stopped by the host"),
        "{log}"
    );
    assert!(!log.contains("killing the VMM"), "{log}");
    assert_gone(&home);
}

#[test]
fn a_vmm_that_ignores_every_stop_is_killed() {
    let home = Home::new();
    let mut proxy = home.spawn("deaf,stuck-api", &[]);
    home.wait_state("starting");
    wait_file(&home.path("home/run/vmm.sock"), &home);
    // passt starts first: the VMM's pid is known once its API socket is there.
    let status = get(&home.control(), "/v1/status").json();
    let vmm_pid = status["vmm_pid"].as_u64().unwrap() as i32;
    proxy.signal(Signal::TERM);
    let status = proxy.wait_exit(Duration::from_secs(40));
    let log = home.log();
    assert_eq!(
        status.code(),
        Some(1),
        "a forced stop is not a clean one; log:\n{log}"
    );
    assert!(log.contains("the VMM did not stop within"), "{log}");
    assert!(log.contains("killed by signal 9"), "{log}");
    let vmm = rustix::process::Pid::from_raw(vmm_pid).unwrap();
    assert!(
        rustix::process::test_kill_process(vmm).is_err(),
        "the VMM must not outlive the host proxy"
    );
    assert_gone(&home);
}

#[test]
fn a_crash_is_restarted_with_backoff_until_five_then_reported_and_the_daemon_keeps_serving() {
    let home = Home::new();
    // The fake VMM panics at every boot: four restarts after 1, 2, 4 and 8 s, then it stays down.
    let mut proxy = home.spawn("panic", &[]);
    let status = home.wait_state("crashed");
    let reason = status["reason"].as_str().unwrap();
    assert_eq!(
        reason,
        "the guest kernel panicked (see console.log); stayed down after 5 crashes in 10 minutes \
         (berth start tries again)"
    );
    let log = home.log();
    for (attempt, pause) in [(2, 1), (3, 2), (4, 4), (5, 8)] {
        let line = format!(
            "restarting after a crash (the guest kernel panicked (see console.log)), attempt {attempt} in {pause} s"
        );
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    assert_eq!(
        log.matches("VMM exited: the guest kernel panicked").count(),
        5,
        "{log}"
    );
    assert_eq!(status["vmm_pid"], serde_json::Value::Null);
    assert_eq!(status["uptime_secs"], serde_json::Value::Null);
    let log = home.log();
    // tests/e2e/berth-home.sh greps this line.
    assert!(
        log.contains("VMM exited: the guest kernel panicked"),
        "{log}"
    );

    let response = docker_ping(&home.path("home/run/docker.sock")).unwrap();
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(
        response.contains("the Berth VM crashed (the guest kernel panicked")
            && response.contains("stayed down after 5 crashes"),
        "{response}"
    );
    assert!(!home.path("home/run/vsock.sock").exists());

    // crashed -> starting on a start, which begins a new series: five more crashes.
    let started = post(&home.control(), "/v1/start", "");
    assert_eq!(started.status, 202, "{started:?}");
    assert_eq!(started.json()["state"], "starting");
    home.wait_state("crashed");
    let log = home.log();
    assert_eq!(
        log.matches("VMM exited: the guest kernel panicked").count(),
        10,
        "{log}"
    );
    assert_eq!(
        get(&home.control(), "/v1/status").json()["state"],
        "crashed"
    );

    let quit = post(&home.control(), "/v1/quit", "");
    assert_eq!(quit.status, 202, "{quit:?}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert_gone(&home);
}

#[test]
fn a_start_that_cannot_happen_says_why_and_the_daemon_stays() {
    let home = Home::new();
    std::fs::write(home.path("config.toml"), "cpus = 0\n").unwrap();
    let mut proxy = home.spawn("normal", &[]);
    let status = home.wait_state("stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = status;
    while !status["reason"]
        .as_str()
        .unwrap()
        .starts_with("cannot start the VM:")
    {
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
        status = get(&home.control(), "/v1/status").json();
    }
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("cannot start the VM: cannot read the settings: ")
            && reason.ends_with("config.toml: cpus must be between 1 and 255, not 0"),
        "{reason}"
    );
    // The daemon still answers, and a start says the same again.
    assert_eq!(post(&home.control(), "/v1/start", "").status, 202);
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

fn wait_file(path: &Path, home: &Home) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no {}; log:\n{}",
            path.display(),
            home.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn passt_is_the_vms_network_restarted_when_it_dies_and_stopped_with_the_vm() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    home.wait_state("running");
    let socket = home.path("home/run/passt/passt.sock");
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket(),
        "passt listens on {}",
        socket.display()
    );
    wait_log(&home, "fake VMM: net backend connected");
    let first = common::passt_pids(&home.log());
    assert_eq!(first.len(), 1, "one passt per VM; log:\n{}", home.log());
    let first = pid(first[0]);
    rustix::process::kill_process(first, Signal::KILL).unwrap();

    wait_log(&home, "restarted passt (pid");
    let log = home.log();
    assert!(log.contains("passt exited while the VM runs"), "{log}");
    let pids = common::passt_pids(&log);
    assert_eq!(pids.len(), 2, "{log}");
    assert_ne!(pid(pids[1]), first, "a new passt");
    // The VMM's net device finds the new passt on the same socket.
    wait_log(&home, "fake VMM: net backend reconnected");
    assert_eq!(
        get(&home.control(), "/v1/status").json()["state"],
        "running"
    );

    let stopped = post(&home.control(), "/v1/stop", "");
    assert_eq!(stopped.status, 202, "{stopped:?}");
    home.wait_state("stopped");
    assert!(
        rustix::process::test_kill_process(pid(pids[1])).is_err(),
        "passt stops with the VM"
    );
    assert!(!socket.exists(), "its socket goes with it");
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert_gone(&home);
}

#[test]
fn a_host_without_passt_cannot_start_the_vm_and_is_told_how_to_get_it() {
    let home = Home::new();
    let empty = home.path("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let child = home
        .host_proxy("normal")
        .env_remove("BERTH_PASST")
        .env("PATH", &empty)
        .spawn()
        .unwrap();
    let mut proxy = common::Proxy { child };
    home.wait_control();
    let status = wait_reason(&home, "cannot start the VM:");
    assert_eq!(
        status["reason"],
        "cannot start the VM: cannot start the VM's network: passt is not installed: \
         apt-get install passt (or set BERTH_PASST)"
    );
    assert_eq!(status["vmm_pid"], serde_json::Value::Null);
    assert!(!home.log().contains("started the VMM"), "{}", home.log());
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_passt_that_keeps_dying_stops_the_vm_with_the_reason() {
    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    home.wait_state("running");
    // Five deaths within ten minutes: 1 + 2 + 4 + 8 s of backoff between them.
    for death in 1..=5 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let victim = loop {
            let pids = common::passt_pids(&home.log());
            if pids.len() == death {
                break pid(pids[death - 1]);
            }
            assert!(
                Instant::now() < deadline,
                "passt {death}; log:\n{}",
                home.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        wait_file(&home.path("home/run/passt/passt.sock"), &home);
        rustix::process::kill_process(victim, Signal::KILL).unwrap();
    }
    wait_reason(&home, "passt keeps exiting");
    let status = home.wait_state("stopped");
    assert_eq!(status["reason"], "passt keeps exiting: see logs/passt.log");
    assert!(home
        .log()
        .contains("passt exited 5 times within 10 minutes"));
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert_gone(&home);
}

fn pid(raw: u32) -> rustix::process::Pid {
    rustix::process::Pid::from_raw(raw as i32).unwrap()
}

fn wait_log(home: &Home, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !home.log().contains(wanted) {
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} in the log:\n{}",
            home.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the status until its reason starts with `prefix`.
fn wait_reason(home: &Home, prefix: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = get(&home.control(), "/v1/status").json();
        if status["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(prefix))
        {
            return status;
        }
        assert!(Instant::now() < deadline, "{status}; log:\n{}", home.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_port_the_guest_publishes_is_in_the_status_and_the_events_and_closes_with_the_vm() {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;

    let home = Home::new();
    let mut proxy = home.spawn("normal", &[]);
    home.wait_state("running");
    let mut events = common::Events::open(&home.control());
    // A free host port, found by binding and letting go.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // What the guest's port proxy sends, delivered as the VMM delivers a guest connection to
    // host port 1030: on `<vsock>_1030`.
    let vsock = home.path("home/run/vsock.sock");
    let mut publish =
        UnixStream::connect(berth_host_proxy::ports::publish_socket_path(&vsock)).unwrap();
    let request = serde_json::json!({
        "proto": "tcp", "host_ip": "127.0.0.1", "host_port": port,
        "container_ip": "172.17.0.2", "container_port": 80
    });
    let body = serde_json::to_vec(&request).unwrap();
    publish
        .write_all(&(body.len() as u32).to_be_bytes())
        .unwrap();
    publish.write_all(&body).unwrap();
    let mut len = [0u8; 4];
    publish.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    publish.read_exact(&mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["type"], "bound", "{reply}");

    let published = events.until(|e| e["type"] == "port");
    let event = &published.last().unwrap()["event"];
    assert_eq!(event["event"], "port_published", "{published:?}");
    assert_eq!(event["host_port"], port);
    let status = get(&home.control(), "/v1/status").json();
    assert_eq!(status["ports"][0]["host_port"], port, "{status}");
    assert_eq!(status["ports"][0]["container_ip"], "172.17.0.2", "{status}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // The VM stops: the listener and the publish go with it.
    let stopped = post(&home.control(), "/v1/stop", "");
    assert_eq!(stopped.status, 202, "{stopped:?}");
    let gone = events.until(|e| e["type"] == "port");
    assert_eq!(gone.last().unwrap()["event"]["event"], "port_unpublished");
    home.wait_state("stopped");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert_eq!(
        get(&home.control(), "/v1/status").json()["ports"],
        serde_json::json!([])
    );
    let mut rest = Vec::new();
    assert_eq!(
        publish.read_to_end(&mut rest).unwrap_or(0),
        0,
        "the publish closed"
    );
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
}
