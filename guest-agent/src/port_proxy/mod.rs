//! dockerd's userland proxy (`userland-proxy-path`), played by the agent binary when it runs as
//! `port-proxy`: one process per published port. It listens on the port in the guest as
//! docker-proxy does, asks the host proxy over vsock to listen on the host too, and reports to
//! dockerd on fd 3 the way docker-proxy does (`0\n`, or `1\n` and the error). The host's
//! listener lives as long as the publish connection, that is as long as this process.
//!
//! dockerd (20.10, 26 and later) starts the proxy with argv[0] = `userland-proxy-path`; the
//! image links `PATH` to the agent, and `dispatch` recognises the name. Its output goes to
//! /dev/null (dockerd gives the proxy no stdout or stderr); what it prints is for a run by hand.

mod args;
mod forward;

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_protocol::ports::{Publish, PublishReply, PUBLISH_PORT};
use berth_protocol::{read_frame, write_frame};

use crate::vsock::{self, Duplex, VsockStream, HOST_CID};

pub use args::{parse, Args, Parsed};

/// Where the image links the agent for dockerd's `userland-proxy-path`.
pub const PATH: &str = "/usr/libexec/berth/port-proxy";
/// argv[0] file names that make the agent a port proxy.
const NAMES: [&str; 2] = ["port-proxy", "berth-port-proxy"];
/// For tests: the publish connection goes to this unix socket instead of the host's vsock.
pub const PUBLISH_SOCKET_ENV: &str = "BERTH_PORT_PROXY_PUBLISH_SOCKET";
/// The pipe to dockerd (docker-proxy's "signal-parent").
const REPORT_FD: RawFd = 3;
/// dockerd's bound socket with `-use-listen-fd`.
const LISTEN_FD: RawFd = 4;
/// How long the host has to answer a publish; dockerd gives the whole start 16 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(12);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] args::Error),
    #[error("-use-listen-fd, but no socket on fd 4")]
    NoListenFd,
    #[error(transparent)]
    Forward(#[from] forward::Error),
    #[error("reach the host's port publisher (an older berth-host-proxy has none)")]
    ConnectHost(#[source] vsock::Error),
    #[error("reach the port publisher at {0}")]
    ConnectSocket(PathBuf, #[source] std::io::Error),
    #[error("set the publish reply's timeout")]
    Timeout(#[source] std::io::Error),
    #[error("send the publish request to the host")]
    Send(#[source] berth_protocol::Error),
    #[error("read the host's publish reply")]
    Reply(#[source] berth_protocol::Error),
    #[error("the host closed the publish connection without a reply")]
    NoReply,
    /// The host's words, which are native Docker's ("listen tcp4 0.0.0.0:80: bind: ...").
    #[error("{0}")]
    Refused(String),
}

/// Runs the port proxy if argv[0] names it, returning its exit status; `None` otherwise.
pub fn dispatch() -> Option<i32> {
    let mut argv = std::env::args_os();
    let argv0 = argv.next()?;
    if !is_port_proxy(Path::new(&argv0)) {
        return None;
    }
    let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
    Some(main(&args))
}

fn is_port_proxy(argv0: &Path) -> bool {
    argv0
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| NAMES.contains(&n))
}

/// The whole port-proxy process, after argv[0].
fn main(args: &[String]) -> i32 {
    let report_pipe = take_inherited(REPORT_FD).map(File::from);
    if let Err(e) = exit_on_stop_signals() {
        say(&format!("SIGTERM and SIGINT: {e}"));
    }
    let args = match parse(args) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Version) => {
            println!("berth-port-proxy {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Err(e) => return failed(report_pipe, &e.into()),
    };
    let passed = args.use_listen_fd.then(|| take_inherited(LISTEN_FD));
    let passed = match passed {
        Some(None) => return failed(report_pipe, &Error::NoListenFd),
        Some(fd) => fd,
        None => None,
    };
    match std::env::var_os(PUBLISH_SOCKET_ENV) {
        Some(path) => {
            let path = PathBuf::from(path);
            let connect =
                || UnixStream::connect(&path).map_err(|e| Error::ConnectSocket(path.clone(), e));
            run(&args, passed, report_pipe, connect)
        }
        None => run(&args, passed, report_pipe, connect_host),
    }
}

/// The publish connection to the host proxy (vsock CID 2, `PUBLISH_PORT`).
pub fn connect_host() -> Result<VsockStream, Error> {
    VsockStream::connect(HOST_CID, PUBLISH_PORT).map_err(Error::ConnectHost)
}

fn run<D: Duplex>(
    args: &Args,
    passed: Option<OwnedFd>,
    mut report_pipe: Option<File>,
    connect: impl FnOnce() -> Result<D, Error>,
) -> i32 {
    let running = match start(args, passed, connect) {
        Ok(running) => running,
        Err(e) => return failed(report_pipe, &e),
    };
    if let Some(pipe) = report_pipe.as_mut() {
        let _ = report(pipe, Ok(()));
    }
    drop(report_pipe);
    say(&format!(
        "publishing {}; the host listens on {}",
        describe(&running.request),
        running.bound
    ));
    let why = running.wait();
    say(&why);
    1
}

/// Reports `e` to dockerd and says it; the exit status of a failed start.
fn failed(report_pipe: Option<File>, e: &Error) -> i32 {
    let text = crate::console::chain(e);
    if let Some(mut pipe) = report_pipe {
        let _ = report(&mut pipe, Err(&text));
    }
    say(&text);
    1
}

/// A started publish: listening in the guest and on the host.
#[derive(Debug)]
pub struct Running<D> {
    conn: D,
    pub request: Publish,
    /// Where the host listens (its `ports.bind_address` may narrow what was asked).
    pub bound: SocketAddr,
}

/// Listens in the guest, publishes on the host through the connection `connect` makes, and
/// starts forwarding in the guest. Nothing is left listening when it fails.
pub fn start<D: Duplex>(
    args: &Args,
    passed: Option<OwnedFd>,
    connect: impl FnOnce() -> Result<D, Error>,
) -> Result<Running<D>, Error> {
    let listener = forward::Listener::open(&args.publish, passed)?;
    let mut request = args.publish.clone();
    if request.host_port == 0 {
        // Only a hand run asks for port 0; the host gets the one the guest picked.
        request.host_port = listener.port().unwrap_or(0);
    }
    let mut conn = connect()?;
    let bound = publish(&mut conn, &request)?;
    listener.start(SocketAddr::new(
        request.container_ip,
        request.container_port,
    ))?;
    Ok(Running {
        conn,
        request,
        bound,
    })
}

/// Sends `request` and reads the host's answer (bounded by `REPLY_TIMEOUT`).
pub fn publish<D: Duplex>(conn: &mut D, request: &Publish) -> Result<SocketAddr, Error> {
    vsock::set_read_timeout(conn, Some(REPLY_TIMEOUT)).map_err(Error::Timeout)?;
    write_frame(conn, request).map_err(Error::Send)?;
    let reply = read_frame::<PublishReply>(conn)
        .map_err(Error::Reply)?
        .ok_or(Error::NoReply)?;
    vsock::set_read_timeout(conn, None).map_err(Error::Timeout)?;
    match reply {
        PublishReply::Bound { host_ip, host_port } => Ok(SocketAddr::new(host_ip, host_port)),
        PublishReply::Refused { message } => Err(Error::Refused(message)),
    }
}

impl<D: Duplex> Running<D> {
    /// Blocks while the host keeps the publish; returns why it ended.
    pub fn wait(mut self) -> String {
        let mut buf = [0u8; 256];
        let what = describe(&self.request);
        loop {
            match self.conn.read(&mut buf) {
                Ok(0) => return format!("the host ended the publish of {what}"),
                Ok(_) => {} // the host says nothing after its reply; ignored
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return format!("the publish connection of {what} broke: {e}"),
            }
        }
    }
}

/// `0.0.0.0:8080/tcp -> 172.17.0.2:80`
fn describe(p: &Publish) -> String {
    format!(
        "{}/{} -> {}",
        SocketAddr::new(p.host_ip, p.host_port),
        p.proto,
        SocketAddr::new(p.container_ip, p.container_port)
    )
}

/// Writes docker-proxy's report: `0\n` when ready, `1\n` and the error otherwise (dockerd
/// prints "Error starting userland proxy: <error>").
pub fn report(pipe: &mut impl Write, outcome: Result<(), &str>) -> std::io::Result<()> {
    match outcome {
        Ok(()) => pipe.write_all(b"0\n"),
        Err(text) => pipe.write_all(format!("1\n{text}").as_bytes()),
    }
}

/// Takes an inherited descriptor if it is open, closing it on exec.
fn take_inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only asks about the descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: F_SETFD on an open descriptor changes only its close-on-exec flag.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor was inherited for this purpose (dockerd's ExtraFiles) and nothing
    // else in this process has claimed it: this runs before anything opens files.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGTERM (dockerd's death, `Pdeathsig`) and SIGINT (dockerd's stop) end the process at once
/// with status 0, as docker-proxy's do: blocked in every thread and awaited by one of its own.
fn exit_on_stop_signals() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only edit it and this thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            let mut signo: libc::c_int = 0;
            // SAFETY: `set` and `signo` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut signo) } == 0 {
                std::process::exit(0);
            }
        })
        .map(drop)
}

/// One write per line, as the agent's console::say does.
fn say(message: &str) {
    let line = format!("berth-port-proxy: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::ports::Proto;
    use std::io::Read;
    use std::net::{Shutdown, TcpListener, TcpStream};

    fn args_for(backend: SocketAddr) -> Args {
        Args {
            publish: Publish {
                proto: Proto::Tcp,
                host_ip: "127.0.0.1".parse().unwrap(),
                host_port: 0,
                container_ip: backend.ip(),
                container_port: backend.port(),
            },
            use_listen_fd: false,
        }
    }

    type Host = std::thread::JoinHandle<(Publish, Option<UnixStream>)>;

    /// A host proxy that answers one publish with `reply` (or hangs up) and hands back what it
    /// was asked and its end of the connection.
    fn fake_host(reply: Option<PublishReply>) -> (UnixStream, Host) {
        let (host, guest) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut host = host;
            let asked: Publish = read_frame(&mut host).unwrap().unwrap();
            let Some(reply) = reply else {
                return (asked, None);
            };
            write_frame(&mut host, &reply).unwrap();
            (asked, Some(host))
        });
        (guest, t)
    }

    fn echo_container() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let mut conn = conn.unwrap();
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                conn.write_all(&got).unwrap();
            }
        });
        addr
    }

    fn port_is_free(port: u16) -> bool {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    #[test]
    fn the_report_is_docker_proxys() {
        let mut pipe = Vec::new();
        report(&mut pipe, Ok(())).unwrap();
        assert_eq!(pipe, b"0\n");
        let mut pipe = Vec::new();
        report(
            &mut pipe,
            Err("listen tcp4 0.0.0.0:80: bind: address already in use"),
        )
        .unwrap();
        assert_eq!(
            pipe,
            b"1\nlisten tcp4 0.0.0.0:80: bind: address already in use"
        );
    }

    #[test]
    fn dispatch_is_by_argv0s_file_name() {
        assert!(is_port_proxy(Path::new(PATH)));
        assert!(is_port_proxy(Path::new("berth-port-proxy")));
        assert!(!is_port_proxy(Path::new("/sbin/init")));
        assert!(!is_port_proxy(Path::new("/usr/sbin/docker-proxy")));
    }

    #[test]
    fn a_bound_publish_forwards_in_the_guest_until_the_host_ends_it() {
        let backend = echo_container();
        let bound = PublishReply::Bound {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: 8080,
        };
        let (guest, host) = fake_host(Some(bound));
        let running = start(&args_for(backend), None, || Ok(guest)).unwrap();
        let (asked, host_end) = host.join().unwrap();
        assert_eq!(asked.container_ip, backend.ip());
        assert_eq!(asked.container_port, backend.port());
        assert_ne!(asked.host_port, 0, "the host gets the guest's port");
        assert_eq!(running.bound, "127.0.0.1:8080".parse().unwrap());
        // A client in the guest reaches the container through the guest's listener.
        let mut client = TcpStream::connect(("127.0.0.1", asked.host_port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).unwrap();
        assert_eq!(back, "ping");
        // The host closing the publish ends the proxy.
        drop(host_end);
        let why = running.wait();
        assert!(
            why.starts_with("the host ended the publish of 127.0.0.1:"),
            "{why}"
        );
    }

    #[test]
    fn a_refusal_is_reported_in_the_hosts_words_and_frees_the_guest_port() {
        let message = "listen tcp4 0.0.0.0:8080: bind: address already in use".to_string();
        let (guest, host) = fake_host(Some(PublishReply::Refused {
            message: message.clone(),
        }));
        let err = start(&args_for(echo_container()), None, || Ok(guest)).unwrap_err();
        let (asked, _) = host.join().unwrap();
        assert_eq!(crate::console::chain(&err), message);
        assert!(port_is_free(asked.host_port));
    }

    #[test]
    fn no_reply_and_no_host_fail_clearly() {
        let (guest, host) = fake_host(None);
        let err = start(&args_for(echo_container()), None, || Ok(guest)).unwrap_err();
        let (asked, _) = host.join().unwrap();
        assert!(matches!(err, Error::NoReply), "{err:?}");
        assert!(port_is_free(asked.host_port));
        let gone = || -> Result<UnixStream, Error> {
            let e = std::io::Error::from_raw_os_error(libc::ECONNRESET);
            Err(Error::ConnectHost(vsock::Error::Connect(
                HOST_CID,
                PUBLISH_PORT,
                e,
            )))
        };
        let text =
            crate::console::chain(&start(&args_for(echo_container()), None, gone).unwrap_err());
        assert!(
            text.starts_with("reach the host's port publisher (an older berth-host-proxy has none): connect to vsock CID 2 port 1030: "),
            "{text}"
        );
    }
}
