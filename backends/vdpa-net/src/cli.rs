//! Command-line parsing of the `vdpa-net` daemon.
//!
//! ```text
//! vdpa-net --socket-path PATH --port PORT [--queues N] [--mac MAC]
//!          [--stats-interval SECS] [--poll-us N] [--tap-io auto|uring|syscall]
//!          [--socket-mode MODE] [--socket-group GROUP]
//! vdpa-net --device socket=PATH,port=PORT[,queues=N][,mac=MAC] [--device ...] [...]
//! ```

use ioasis::socket_policy::SocketPolicy;
use thiserror::Error;

use crate::net::{default_mac, parse_mac, MacAddr, MAX_QUEUE_PAIRS};
use crate::port::{PortSpec, TapIo};
use crate::vhu_net::NetConfig;

/// Usage text printed by `--help` and after an argument error.
pub const USAGE: &str = "\
usage: vdpa-net --socket-path PATH --port PORT [--queues N] [--mac MAC]
                [--stats-interval SECS] [--poll-us N] [--tap-io MODE]
                [--socket-mode MODE] [--socket-group GROUP]
       vdpa-net --device socket=PATH,port=PORT[,queues=N][,mac=MAC] [--device ...]
                [--stats-interval SECS] [--poll-us N] [--tap-io MODE]
                [--socket-mode MODE] [--socket-group GROUP]

Serves virtio-net devices over vhost-user.
  --socket-path PATH     unix socket the device listens on
  --port PORT            tap=IFNAME | switch=NAME | sink | reflect | source[=LEN]
  --queues N             queue pairs, 1 to 8 (default 1)
  --mac MAC              MAC address in the config space (default: derived from the socket path)
  --device SPEC          one more device (repeatable); the form above is shorthand for one
  --stats-interval SECS  print a JSON statistics line every SECS seconds (0: only at exit)
  --poll-us N            after work, poll queues and port for N microseconds, notifications off (default 0)
  --tap-io MODE          tap packet I/O: auto (io_uring if available), uring, syscall
  --socket-mode MODE     octal mode of the sockets (default 0600: this user and root only)
  --socket-group GROUP   group (name or number) of the sockets, for a mode such as 0660
Statistics go to stdout, one JSON object per line; logs go to stderr (RUST_LOG).";

/// Errors of the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// An option that is not known.
    #[error("unknown option {0:?}")]
    UnknownOption(String),
    /// An option given without its value.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("bad value {value:?} for {what}: {why}")]
    BadValue {
        /// The option or key.
        what: String,
        /// The value given.
        value: String,
        /// Why it was refused.
        why: String,
    },
    /// A required key or option is missing.
    #[error("{0}")]
    Missing(String),
    /// Two devices name the same socket.
    #[error("socket {0:?} is given twice")]
    DuplicateSocket(String),
    /// No device at all.
    #[error("no device: give --socket-path and --port, or --device")]
    NoDevice,
}

/// Result alias of the command line.
pub type Result<T> = std::result::Result<T, Error>;

/// What the daemon was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The devices to serve.
    pub devices: Vec<NetConfig>,
    /// Seconds between statistics lines (0: only at exit).
    pub stats_interval: f64,
    /// Mode and group of the device sockets.
    pub socket_policy: SocketPolicy,
    /// `--help` was given.
    pub help: bool,
}

fn bad(what: &str, value: &str, why: impl ToString) -> Error {
    Error::BadValue {
        what: what.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn parse_queues(what: &str, v: &str) -> Result<u16> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUE_PAIRS).contains(&n) => Ok(n),
        _ => Err(bad(what, v, format!("expected 1 to {MAX_QUEUE_PAIRS}"))),
    }
}

fn parse_mac_opt(what: &str, v: &str) -> Result<MacAddr> {
    let m = parse_mac(v).map_err(|e| bad(what, v, e))?;
    if m[0] & 1 != 0 {
        return Err(bad(what, v, "multicast address"));
    }
    if m == [0; 6] {
        return Err(bad(what, v, "all-zero address"));
    }
    Ok(m)
}

/// A MAC derived from the socket path: stable across restarts.
fn mac_for(socket: &str) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in socket.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    default_mac(h)
}

struct Partial {
    socket: Option<String>,
    port: Option<PortSpec>,
    queues: u16,
    mac: Option<MacAddr>,
}

impl Partial {
    fn new() -> Partial {
        Partial {
            socket: None,
            port: None,
            queues: 1,
            mac: None,
        }
    }

    fn finish(self, poll_us: u64, tap_io: TapIo, ctx: &str) -> Result<NetConfig> {
        let socket = self
            .socket
            .ok_or_else(|| Error::Missing(format!("{ctx}: the socket path is missing")))?;
        let port = self
            .port
            .ok_or_else(|| Error::Missing(format!("{ctx}: the port is missing")))?;
        let mac = self.mac.unwrap_or_else(|| mac_for(&socket));
        Ok(NetConfig {
            socket,
            port,
            queues: self.queues,
            mac,
            poll_us,
            tap_io,
        })
    }
}

fn parse_device(spec: &str) -> Result<Partial> {
    let mut p = Partial::new();
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad("--device", spec, format!("{kv:?} is not key=value")))?;
        match k {
            "socket" if !v.is_empty() => p.socket = Some(v.to_string()),
            // A port value may itself contain '=' (tap=IFNAME).
            "port" => p.port = Some(v.parse().map_err(|e| bad("--device port", v, e))?),
            "queues" => p.queues = parse_queues("--device queues", v)?,
            "mac" => p.mac = Some(parse_mac_opt("--device mac", v)?),
            _ => return Err(bad("--device", spec, format!("unknown or empty key {k:?}"))),
        }
    }
    Ok(p)
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options> {
    let mut single = Partial::new();
    let mut single_used = false;
    let mut specs = Vec::new();
    let mut stats_interval = 0.0;
    let mut poll_us = 0u64;
    let mut tap_io = TapIo::Auto;
    let mut help = false;
    let mut socket_mode = SocketPolicy::DEFAULT_MODE;
    let mut socket_group = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if name == "--help" || name == "-h" {
            help = true;
            continue;
        }
        let known = [
            "--socket-path",
            "--port",
            "--queues",
            "--mac",
            "--device",
            "--stats-interval",
            "--poll-us",
            "--tap-io",
            "--socket-mode",
            "--socket-group",
        ];
        if !known.contains(&name.as_str()) {
            return Err(Error::UnknownOption(a));
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| Error::MissingValue(name.clone()))?,
        };
        match name.as_str() {
            "--socket-path" => {
                if v.is_empty() {
                    return Err(bad(&name, &v, "empty path"));
                }
                single.socket = Some(v);
                single_used = true;
            }
            "--port" => {
                single.port = Some(v.parse().map_err(|e| bad(&name, &v, e))?);
                single_used = true;
            }
            "--queues" => {
                single.queues = parse_queues(&name, &v)?;
                single_used = true;
            }
            "--mac" => {
                single.mac = Some(parse_mac_opt(&name, &v)?);
                single_used = true;
            }
            "--device" => specs.push(parse_device(&v)?),
            "--socket-mode" => {
                socket_mode = SocketPolicy::parse_mode(&v).map_err(|e| bad(&name, &v, e))?
            }
            "--socket-group" => {
                socket_group = Some(SocketPolicy::parse_group(&v).map_err(|e| bad(&name, &v, e))?)
            }
            "--stats-interval" => {
                stats_interval = match v.parse::<f64>() {
                    Ok(s) if s.is_finite() && (0.0..=86400.0).contains(&s) => s,
                    _ => return Err(bad(&name, &v, "expected seconds, 0 to 86400")),
                }
            }
            "--poll-us" => {
                poll_us = match v.parse::<u64>() {
                    Ok(n) if n <= 1_000_000 => n,
                    _ => return Err(bad(&name, &v, "expected microseconds, 0 to 1000000")),
                }
            }
            _ => {
                tap_io = match v.as_str() {
                    "auto" => TapIo::Auto,
                    "uring" => TapIo::Uring,
                    "syscall" => TapIo::Syscall,
                    _ => return Err(bad(&name, &v, "expected auto, uring or syscall")),
                }
            }
        }
    }
    let socket_policy = SocketPolicy::new(socket_mode, socket_group)
        .map_err(|e| bad("--socket-mode", &format!("{socket_mode:o}"), e))?;
    if help {
        return Ok(Options {
            devices: Vec::new(),
            stats_interval,
            socket_policy,
            help,
        });
    }
    let mut devices = Vec::new();
    if single_used {
        devices.push(single.finish(poll_us, tap_io, "--socket-path/--port")?);
    }
    for (i, p) in specs.into_iter().enumerate() {
        devices.push(p.finish(poll_us, tap_io, &format!("--device #{}", i + 1))?);
    }
    if devices.is_empty() {
        return Err(Error::NoDevice);
    }
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].iter().any(|o| o.socket == d.socket) {
            return Err(Error::DuplicateSocket(d.socket.clone()));
        }
    }
    Ok(Options {
        devices,
        stats_interval,
        socket_policy,
        help,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Options> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn test_single_device_form() {
        let o = p("--socket-path /tmp/a.sock --port sink --queues 4 --mac 02:00:00:00:00:01 --stats-interval 1 --poll-us 50")
            .unwrap();
        assert_eq!(o.devices.len(), 1);
        let d = &o.devices[0];
        assert_eq!(d.socket, "/tmp/a.sock");
        assert_eq!(d.port, PortSpec::Sink);
        assert_eq!(d.queues, 4);
        assert_eq!(d.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(d.poll_us, 50);
        assert_eq!(o.stats_interval, 1.0);
    }

    #[test]
    fn test_device_form_repeatable() {
        let o = p("--device socket=/tmp/a,port=switch=br0,queues=2 --device socket=/tmp/b,port=tap=t0,mac=02:00:00:00:00:02 --poll-us=5")
            .unwrap();
        assert_eq!(o.devices.len(), 2);
        assert_eq!(o.devices[0].port, PortSpec::Switch("br0".into()));
        assert_eq!(o.devices[0].queues, 2);
        assert_eq!(o.devices[1].port, PortSpec::Tap("t0".into()));
        assert_eq!(o.devices[1].mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(o.devices[1].poll_us, 5);
        assert_ne!(o.devices[0].mac, mac_for("/tmp/b"));
        assert_eq!(o.devices[0].mac, mac_for("/tmp/a"));
        assert_eq!(o.devices[0].mac[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn test_bad_arguments_are_refused() {
        for bad in [
            "",
            "--port sink",
            "--socket-path /tmp/a",
            "--socket-path /tmp/a --port bogus",
            "--socket-path /tmp/a --port sink --queues 0",
            "--socket-path /tmp/a --port sink --queues 9",
            "--socket-path /tmp/a --port sink --mac 01:00:00:00:00:01",
            "--socket-path /tmp/a --port sink --mac zz",
            "--socket-path /tmp/a --port sink --stats-interval -1",
            "--socket-path /tmp/a --port sink --poll-us x",
            "--socket-path /tmp/a --port sink --frobnicate",
            "--socket-path /tmp/a --port sink --queues",
            "--device socket=/tmp/a",
            "--device port=sink",
            "--device socket=/tmp/a,port=sink,color=red",
            "--device socket=/tmp/a,port=sink --device socket=/tmp/a,port=reflect",
            "--socket-path /tmp/a --port sink --tap-io fast",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_socket_policy_options() {
        let o = p("--socket-path /tmp/a --port sink").unwrap();
        assert_eq!(o.socket_policy, SocketPolicy::default());
        assert_eq!(o.socket_policy.mode(), 0o600);
        let o = p("--socket-path /tmp/a --port sink --socket-mode 0660 --socket-group 0").unwrap();
        assert_eq!(o.socket_policy.mode(), 0o660);
        assert_eq!(o.socket_policy.group(), Some(0));
        let o = p("--socket-path /tmp/a --port sink --socket-group root").unwrap();
        assert_eq!(o.socket_policy.group(), Some(0));
        for bad in [
            "--socket-path /tmp/a --port sink --socket-mode 999",
            "--socket-path /tmp/a --port sink --socket-mode 4770",
            "--socket-path /tmp/a --port sink --socket-group no-such-group-ioasis",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_help() {
        assert!(p("--help").unwrap().help);
    }
}
