//! The `berth-vmm` binary booted from a machine description (`--config vm.json`) with a tiny
//! 64-bit ELF payload (no Linux): the API socket answers `Ping` with the VMM's pid and size, and
//! `Stop` ends the VMM with `VmmExit::Stopped`'s status and removes the socket. Needs /dev/kvm
//! and fails, never skips, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_machine::{
    read_message, write_message, DeviceConfig, DiskConfig, VmConfig, VmmExit, VmmRequest,
    VmmResponse,
};

/// Where the payload is loaded and entered (the VMM loads kernels at 1 MiB and up).
const LOAD_ADDR: u64 = 0x10_0000;
/// The payload's code starts this far into the file.
const CODE_OFFSET: u64 = 0x1000;

/// An ELF64 executable with one loadable segment holding `code` at `LOAD_ADDR`.
fn elf_payload(code: &[u8]) -> Vec<u8> {
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// Prints "B" on COM1, then spins until the VMM stops it.
#[rustfmt::skip]
const SPIN: [u8; 9] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'B',             // mov al, 'B'
    0xee,                   // out dx, al
    0xeb, 0xfe,             // jmp $
];

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("berth-vmm still running {limit:?} after the stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask(stream: &UnixStream, request: &VmmRequest) -> VmmResponse {
    write_message(&mut &*stream, request).unwrap();
    read_message(&mut BufReader::new(stream))
        .unwrap()
        .unwrap()
        .unwrap()
}

struct Files {
    _dir: vmm_sys_util::tempdir::TempDir,
    config: PathBuf,
    socket: PathBuf,
    console: PathBuf,
}

fn files(dir: vmm_sys_util::tempdir::TempDir) -> Files {
    let at = |name: &str| dir.as_path().join(name);
    std::fs::write(at("payload.elf"), elf_payload(&SPIN)).unwrap();
    std::fs::write(at("data.img"), vec![0u8; 1 << 20]).unwrap();
    let mut config = VmConfig::new(at("payload.elf"));
    config.cpus = 1;
    config.memory_mib = 128;
    config.devices = vec![
        DeviceConfig::Disk(DiskConfig {
            path: at("data.img"),
            read_only: false,
            serial: Some(berth_machine::DATA_DISK_SERIAL.into()),
        }),
        DeviceConfig::Rng,
    ];
    config.serial_log = Some(at("console.log"));
    config.api_socket = Some(at("vmm.sock"));
    std::fs::write(at("vm.json"), config.to_json().unwrap()).unwrap();
    Files {
        config: at("vm.json"),
        socket: at("vmm.sock"),
        console: at("console.log"),
        _dir: dir,
    }
}

/// Held while a test spawns a process or makes its stale socket. Between fork and exec a child
/// holds a copy of every open descriptor: a stale socket's listener made at that moment would
/// live on in the other test's child, take this test's connection and reset it at the exec.
static FORKING: Mutex<()> = Mutex::new(());

/// A spawned berth-vmm, killed if the test ends (or fails) with it still running: a failed test
/// must not leave a VMM spinning its vCPU on the machine.
struct Vmm(Child);

impl std::ops::Deref for Vmm {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(config: &Path) -> Vmm {
    let _forking = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    Vmm(Command::new(env!("CARGO_BIN_EXE_berth-vmm"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap())
}

#[test]
fn stop_on_the_api_socket_ends_the_vmm_with_the_stopped_status() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/berth-vmm-stop-").unwrap();
    let f = files(dir);
    let mut vmm = spawn(&f.config);
    wait_for("the API socket", Duration::from_secs(10), || {
        f.socket.exists() || vmm.try_wait().unwrap().is_some()
    });
    assert!(vmm.try_wait().unwrap().is_none(), "berth-vmm exited early");
    wait_for(
        "the payload's console output",
        Duration::from_secs(10),
        || std::fs::read(&f.console).is_ok_and(|c| c.contains(&b'B')),
    );

    // Connections one after another; the vCPU keeps spinning meanwhile.
    for _ in 0..2 {
        let stream = UnixStream::connect(&f.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            ask(&stream, &VmmRequest::Ping),
            VmmResponse::Pong {
                pid: vmm.id(),
                cpus: 1,
                memory_mib: 128
            }
        );
    }
    let stream = UnixStream::connect(&f.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ask(&stream, &VmmRequest::Stop), VmmResponse::Ack);

    let status = wait_exit(&mut vmm, Duration::from_secs(10));
    let stderr = std::io::read_to_string(vmm.stderr.take().unwrap()).unwrap();
    assert_eq!(
        status.code(),
        Some(i32::from(VmmExit::Stopped.code())),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("stopped through the API socket"),
        "{stderr}"
    );
    assert!(!f.socket.exists(), "the API socket is removed at exit");
}

#[test]
fn a_stale_api_socket_is_replaced() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/berth-vmm-stale-").unwrap();
    let f = files(dir);
    // What a VMM killed with SIGKILL leaves behind.
    {
        let _forking = FORKING.lock().unwrap_or_else(|e| e.into_inner());
        drop(std::os::unix::net::UnixListener::bind(&f.socket).unwrap());
    }
    let mut vmm = spawn(&f.config);
    let stream = {
        let mut connected = None;
        wait_for(
            "the API socket to be served",
            Duration::from_secs(10),
            || {
                connected = UnixStream::connect(&f.socket).ok();
                connected.is_some() || vmm.try_wait().unwrap().is_some()
            },
        );
        connected.expect("berth-vmm exited instead of serving")
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(ask(&stream, &VmmRequest::Stop), VmmResponse::Ack);
    let status = wait_exit(&mut vmm, Duration::from_secs(10));
    assert_eq!(status.code(), Some(i32::from(VmmExit::Stopped.code())));
}
