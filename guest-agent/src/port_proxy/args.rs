//! The port proxy's command line, as dockerd writes it and Go's `flag` package reads it:
//! `-proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80`,
//! plus `-use-listen-fd` from dockerd 27 and later (the listening socket is then fd 4) and
//! `-v`/`-version`. `-flag value`, `-flag=value` and `--flag` all work, as in Go.

use std::net::{IpAddr, Ipv4Addr};

use berth_protocol::ports::{Proto, Publish};

/// Errors of this module, in the words of Go's `flag` package where it has them.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("flag provided but not defined: -{0}")]
    Unknown(String),
    #[error("flag needs an argument: -{0}")]
    NoValue(String),
    #[error("invalid value {value:?} for flag -{flag}")]
    Invalid { flag: String, value: String },
    #[error("flag -{0} is required")]
    Missing(&'static str),
    #[error("berth publishes tcp and udp ports, not {0}")]
    Proto(String),
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    /// `-v` or `-version`: print the version and exit.
    Version,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub publish: Publish,
    /// dockerd bound the host address itself and passed the socket as fd 4.
    pub use_listen_fd: bool,
}

/// Parses the arguments after argv[0]. Like Go's `flag.Parse`, it stops at `--` or at the first
/// argument that is not a flag.
pub fn parse(args: &[String]) -> Result<Parsed, Error> {
    let mut proto = Proto::Tcp;
    let mut host_ip: IpAddr = Ipv4Addr::UNSPECIFIED.into();
    let (mut host_port, mut container_ip, mut container_port) = (None, None, None);
    let mut use_listen_fd = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            break;
        };
        if flag.is_empty() {
            break; // "--"
        }
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        match name {
            "v" | "version" if bool_value(name, inline.as_deref())? => return Ok(Parsed::Version),
            "v" | "version" => {}
            "use-listen-fd" => use_listen_fd = bool_value(name, inline.as_deref())?,
            "proto" | "host-ip" | "host-port" | "container-ip" | "container-port" => {
                let value = match inline {
                    Some(value) => value,
                    None => rest
                        .next()
                        .cloned()
                        .ok_or_else(|| Error::NoValue(name.to_string()))?,
                };
                let invalid = || Error::Invalid {
                    flag: name.to_string(),
                    value: value.clone(),
                };
                match name {
                    "proto" => {
                        proto = match value.as_str() {
                            "tcp" => Proto::Tcp,
                            "udp" => Proto::Udp,
                            _ => return Err(Error::Proto(value)),
                        }
                    }
                    "host-ip" => host_ip = value.parse().map_err(|_| invalid())?,
                    "host-port" => host_port = Some(value.parse().map_err(|_| invalid())?),
                    "container-ip" => container_ip = Some(value.parse().map_err(|_| invalid())?),
                    _ => container_port = Some(value.parse().map_err(|_| invalid())?),
                }
            }
            other => return Err(Error::Unknown(other.to_string())),
        }
    }
    Ok(Parsed::Run(Args {
        publish: Publish {
            proto,
            host_ip,
            host_port: host_port.ok_or(Error::Missing("host-port"))?,
            container_ip: container_ip.ok_or(Error::Missing("container-ip"))?,
            container_port: container_port.ok_or(Error::Missing("container-port"))?,
        },
        use_listen_fd,
    }))
}

/// A boolean flag's value: bare means true; otherwise Go's `strconv.ParseBool` spellings.
fn bool_value(name: &str, inline: Option<&str>) -> Result<bool, Error> {
    match inline {
        None | Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(value) => Err(Error::Invalid {
            flag: name.to_string(),
            value: value.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    fn run(line: &str) -> Args {
        match parse(&argv(line)).unwrap() {
            Parsed::Run(args) => args,
            Parsed::Version => panic!("{line}: version"),
        }
    }

    #[test]
    fn dockerd_20_10_and_26_command_line() {
        // libnetwork/portmapper/proxy_linux.go, argv[0] being the path, dropped by the caller.
        let args = run(
            "-proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 \
             -container-port 80",
        );
        assert_eq!(
            args.publish,
            Publish {
                proto: Proto::Tcp,
                host_ip: "0.0.0.0".parse().unwrap(),
                host_port: 8080,
                container_ip: "172.17.0.2".parse().unwrap(),
                container_port: 80,
            }
        );
        assert!(!args.use_listen_fd);
        let args =
            run("-proto udp -host-ip :: -host-port 5353 -container-ip fd00::2 -container-port 53");
        assert_eq!(args.publish.proto, Proto::Udp);
        assert_eq!(args.publish.host_ip, "::".parse::<IpAddr>().unwrap());
        assert_eq!(
            args.publish.container_ip,
            "fd00::2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn dockerd_27_and_later_add_use_listen_fd() {
        let args = run(
            "-proto tcp -host-ip 127.0.0.1 -host-port 80 -container-ip 172.17.0.3 \
             -container-port 8000 -use-listen-fd",
        );
        assert!(args.use_listen_fd);
        assert_eq!(args.publish.host_ip, IpAddr::from([127, 0, 0, 1]));
        // Go's other spellings.
        let args =
            run("--host-port=1 -container-ip=10.0.0.1 -container-port 2 -use-listen-fd=false");
        assert!(!args.use_listen_fd);
        assert_eq!(
            args.publish.host_ip,
            IpAddr::from([0, 0, 0, 0]),
            "the default"
        );
        assert_eq!(parse(&argv("-version")), Ok(Parsed::Version));
        assert_eq!(parse(&argv("-v=true")), Ok(Parsed::Version));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        let err = |line: &str| parse(&argv(line)).unwrap_err().to_string();
        assert_eq!(err("-bogus 1"), "flag provided but not defined: -bogus");
        assert_eq!(err("-host-port"), "flag needs an argument: -host-port");
        assert_eq!(
            err("-host-port 70000 -container-ip 1.2.3.4 -container-port 1"),
            "invalid value \"70000\" for flag -host-port"
        );
        assert_eq!(
            err("-host-port 1 -container-port 1"),
            "flag -container-ip is required"
        );
        assert_eq!(
            err("-proto sctp -host-port 1 -container-ip 1.2.3.4 -container-port 1"),
            "berth publishes tcp and udp ports, not sctp"
        );
        // Parsing stops at the first non-flag, as Go's does: what follows is ignored.
        let args = run("-host-port 1 -container-ip 1.2.3.4 -container-port 2 extra -bogus");
        assert_eq!(args.publish.container_port, 2);
    }
}
