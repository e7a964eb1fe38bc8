//! Command line of the `vdpa-net` daemon (clap).
//!
//! ```text
//! vdpa-net --socket-path PATH --port PORT [--queues N] [--mac MAC] [OPTIONS]
//! vdpa-net --vduse NAME --port PORT [--queues N] [--mac MAC] [OPTIONS]
//! vdpa-net --device socket=PATH,port=PORT[,queues=N][,mac=MAC]... [OPTIONS]
//! ```
//!
//! Every value is checked by the parser of its flag, so an error names the
//! flag; what spans flags (at least one device, no socket twice) is checked
//! by [`Cli::into_options`]. Errors exit with status 2 and `--help` and
//! `--version` with 0 ([`Options::parse`]). A flag given twice takes its
//! last value, except `--device`, which adds a device each time.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use ioasis::socket_policy::SocketPolicy;

use crate::net::{default_mac, parse_mac, MacAddr, MAX_QUEUE_PAIRS};
use crate::port::{PortSpec, TapIo};
use crate::vhu_net::NetConfig;
use ioasis::poll::PollMode;

/// Text printed after the options by `--help`.
const AFTER_HELP: &str = "\
PORT is tap=IFNAME, switch=NAME, sink, reflect, source[=LEN] (a fresh frame per packet) or
source-fixed[=LEN] (one frame offered again). --socket-path and --port are shorthand
for one --device; both forms may be given together. --vduse NAME in place of --socket-path
serves that device as the kernel's VDUSE device NAME (then `vdpa dev add name NAME mgmtdev
vduse`), without a control queue (the kernel refuses one).
Without --poll-us a worker polls after work for a window that follows the load (0 to 200 µs,
notifications off), then sleeps; --poll-us N polls a fixed N µs, --poll-us 0 never polls.
Statistics go to stdout, one JSON object per line; logs go to stderr (RUST_LOG).";

/// The daemon's arguments, as given.
#[derive(Debug, Parser)]
#[command(
    name = "vdpa-net",
    bin_name = "vdpa-net",
    version,
    about = "Serves virtio-net devices over vhost-user or VDUSE.",
    override_usage = "vdpa-net --socket-path PATH --port PORT [--queues N] [--mac MAC] [OPTIONS]\n       \
                      vdpa-net --vduse NAME --port PORT [--queues N] [--mac MAC] [OPTIONS]\n       \
                      vdpa-net --device SPEC [--device SPEC]... [OPTIONS]",
    after_help = AFTER_HELP,
    args_override_self = true,
    group = clap::ArgGroup::new("endpoint").args(["socket_path", "vduse"]).multiple(false)
)]
pub struct Cli {
    /// Unix socket the device listens on
    #[arg(long, value_name = "PATH", value_parser = parse_socket_path, requires = "port")]
    socket_path: Option<String>,
    /// Serve the device as the kernel's VDUSE device NAME (/dev/vduse/NAME)
    #[arg(long, value_name = "NAME", value_parser = parse_socket_path, requires = "port")]
    vduse: Option<String>,
    /// Where the device's frames go (see PORT below)
    #[arg(long, value_name = "PORT", value_parser = parse_port, requires = "endpoint")]
    port: Option<PortSpec>,
    /// Queue pairs, 1 to 8 [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_queues, requires = "endpoint")]
    queues: Option<u16>,
    /// MAC in the config space [default: one derived from the socket path]
    #[arg(long, value_name = "MAC", value_parser = parse_unicast_mac, requires = "endpoint")]
    mac: Option<MacAddr>,
    /// A device: socket=PATH,port=PORT[,queues=N][,mac=MAC]; repeatable
    #[arg(long = "device", value_name = "SPEC", value_parser = parse_device)]
    devices: Vec<DeviceSpec>,
    /// Print statistics every SECS seconds (0: only at exit)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_stats_interval)]
    stats_interval: f64,
    /// After work, poll N µs with notifications off (0: never) [default: adaptive]
    #[arg(long, value_name = "N", value_parser = parse_poll_us)]
    poll_us: Option<u64>,
    /// Pin the data-plane workers to these CPUs (`1`, `0,2-3`): the n-th
    /// queue pair's worker (counted across the devices in order) to the n-th
    /// CPU, round robin; the connection and server threads stay unpinned
    /// [default: no pinning]
    #[arg(long, value_name = "LIST", value_parser = parse_worker_cpus)]
    worker_cpus: Option<CpuList>,
    /// Tap I/O: auto (uring if available), uring or syscall
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = tap_io_parser(),
          hide_possible_values = true)]
    tap_io: TapIo,
    /// Octal mode of the sockets (0600: this user and root)
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_socket_mode)]
    socket_mode: u32,
    /// Group (name or number) of the sockets, for modes such as 0660
    #[arg(long, value_name = "GROUP", value_parser = parse_socket_group)]
    socket_group: Option<u32>,
}

/// What the daemon was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The devices to serve.
    pub devices: Vec<NetConfig>,
    /// Seconds between statistics lines (0: only at exit).
    pub stats_interval: f64,
    /// Mode and group of the device sockets.
    pub socket_policy: SocketPolicy,
    /// `--vduse NAME`: the first device is served as the kernel's VDUSE
    /// device NAME (its `socket` is that name, not a path).
    pub vduse: Option<String>,
}

impl Options {
    /// Parses `args` (the program name first).
    pub fn try_parse_from<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args)?.into_options()
    }

    /// Parses the process's arguments; prints help, the version or an error
    /// and exits (0 for help and version, 2 for an error) when there is
    /// nothing to run.
    pub fn parse() -> Options {
        Options::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }
}

/// A device given with `--device`.
#[derive(Debug, Clone)]
struct DeviceSpec {
    socket: String,
    port: PortSpec,
    queues: u16,
    mac: Option<MacAddr>,
}

impl Cli {
    /// Checks what spans flags and builds the options: at least one device,
    /// no socket twice.
    pub fn into_options(self) -> Result<Options, clap::Error> {
        let mut specs = Vec::with_capacity(self.devices.len() + 1);
        let vduse = self.vduse.clone();
        if let (Some(socket), Some(port)) = (self.socket_path.or(self.vduse), self.port) {
            specs.push(DeviceSpec {
                socket,
                port,
                queues: self.queues.unwrap_or(1),
                mac: self.mac,
            });
        }
        specs.extend(self.devices);
        if specs.is_empty() {
            return Err(usage_error(
                ErrorKind::MissingRequiredArgument,
                "no device: give --socket-path and --port, or --device",
            ));
        }
        let mut devices: Vec<NetConfig> = Vec::with_capacity(specs.len());
        for s in specs {
            if devices.iter().any(|d| d.socket == s.socket) {
                return Err(usage_error(
                    ErrorKind::ArgumentConflict,
                    &format!("socket {:?} is given twice", s.socket),
                ));
            }
            let mac = s.mac.unwrap_or_else(|| mac_for(&s.socket));
            devices.push(NetConfig {
                socket: s.socket,
                port: s.port,
                queues: s.queues,
                mac,
                poll: PollMode::from_poll_us(self.poll_us),
                tap_io: self.tap_io,
                worker_cpus: Vec::new(),
            });
        }
        if let Some(CpuList(cpus)) = &self.worker_cpus {
            ioasis::affinity::check_allowed(cpus).map_err(|e| {
                usage_error(ErrorKind::ValueValidation, &format!("--worker-cpus: {e}"))
            })?;
            let mut next = 0usize;
            for d in &mut devices {
                d.worker_cpus = (0..d.queues.clamp(1, MAX_QUEUE_PAIRS))
                    .map(|_| {
                        let c = cpus[next % cpus.len()];
                        next += 1;
                        c
                    })
                    .collect();
            }
        }
        let socket_policy = SocketPolicy::new(self.socket_mode, self.socket_group)
            .map_err(|e| usage_error(ErrorKind::ValueValidation, &format!("--socket-mode: {e}")))?;
        Ok(Options {
            devices,
            stats_interval: self.stats_interval,
            socket_policy,
            vduse,
        })
    }
}

/// An error of the command line, printed with the usage.
fn usage_error(kind: ErrorKind, msg: &str) -> clap::Error {
    Cli::command().error(kind, msg)
}

fn parse_socket_path(v: &str) -> Result<String, String> {
    if v.is_empty() {
        return Err("empty path".into());
    }
    Ok(v.to_string())
}

fn parse_port(v: &str) -> Result<PortSpec, String> {
    v.parse().map_err(|e: crate::port::Error| e.to_string())
}

fn parse_queues(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUE_PAIRS).contains(&n) => Ok(n),
        _ => Err(format!("expected 1 to {MAX_QUEUE_PAIRS}")),
    }
}

fn parse_unicast_mac(v: &str) -> Result<MacAddr, String> {
    let m = parse_mac(v).map_err(|e| e.to_string())?;
    if m[0] & 1 != 0 {
        return Err("multicast address".into());
    }
    if m == [0; 6] {
        return Err("all-zero address".into());
    }
    Ok(m)
}

fn parse_stats_interval(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86400.0).contains(&s) => Ok(s),
        _ => Err("expected seconds, 0 to 86400".into()),
    }
}

/// A `--worker-cpus` list (a type of its own: clap reads an
/// `Option<Vec<_>>` field as a repeatable option).
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

fn parse_worker_cpus(v: &str) -> Result<CpuList, String> {
    ioasis::affinity::parse_cpu_list(v).map(CpuList)
}

fn parse_poll_us(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if n <= 1_000_000 => Ok(n),
        _ => Err("expected microseconds, 0 to 1000000".into()),
    }
}

fn tap_io_parser() -> impl TypedValueParser<Value = TapIo> {
    PossibleValuesParser::new(["auto", "uring", "syscall"]).map(|s| match s.as_str() {
        "uring" => TapIo::Uring,
        "syscall" => TapIo::Syscall,
        _ => TapIo::Auto,
    })
}

fn parse_socket_mode(v: &str) -> Result<u32, String> {
    SocketPolicy::parse_mode(v)
}

fn parse_socket_group(v: &str) -> Result<u32, String> {
    SocketPolicy::parse_group(v)
}

/// Parses `socket=PATH,port=PORT[,queues=N][,mac=MAC]`.
fn parse_device(spec: &str) -> Result<DeviceSpec, String> {
    let (mut socket, mut port, mut queues, mut mac) = (None, None, 1, None);
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?} is not key=value"))?;
        match k {
            "socket" => socket = Some(parse_socket_path(v).map_err(|e| format!("socket: {e}"))?),
            // A port value may itself contain '=' (tap=IFNAME).
            "port" => port = Some(parse_port(v).map_err(|e| format!("port: {e}"))?),
            "queues" => queues = parse_queues(v).map_err(|e| format!("queues: {e}"))?,
            "mac" => mac = Some(parse_unicast_mac(v).map_err(|e| format!("mac: {e}"))?),
            _ => return Err(format!("unknown key {k:?}")),
        }
    }
    Ok(DeviceSpec {
        socket: socket.ok_or("the socket path is missing")?,
        port: port.ok_or("the port is missing")?,
        queues,
        mac,
    })
}

/// A MAC derived from the socket path: stable across restarts.
fn mac_for(socket: &str) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in socket.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    default_mac(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn p(s: &str) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("vdpa-net").chain(s.split_whitespace()))
    }

    /// No `--poll-us`: adaptive; 0: off; N: a fixed window.
    #[test]
    fn test_poll_modes() {
        let o = p("--socket-path /tmp/a --port sink").unwrap();
        assert_eq!(o.devices[0].poll, PollMode::Adaptive);
        let o = p("--socket-path /tmp/a --port sink --poll-us 0").unwrap();
        assert_eq!(o.devices[0].poll, PollMode::Off);
        let o = p("--socket-path /tmp/a --port sink --poll-us 1000").unwrap();
        assert_eq!(o.devices[0].poll, PollMode::Fixed(Duration::from_millis(1)));
    }

    /// `--worker-cpus`: one CPU per queue pair, counted across the devices,
    /// round robin; a CPU the process may not use is refused.
    #[test]
    fn test_worker_cpus() {
        let o = p("--socket-path /tmp/a --port sink").unwrap();
        assert!(o.devices[0].worker_cpus.is_empty());
        let allowed = ioasis::affinity::allowed_cpus().unwrap();
        let c = allowed[0];
        let o = p(&format!(
            "--device socket=/tmp/a,port=sink,queues=2 --device socket=/tmp/b,port=sink --worker-cpus {c}"
        ))
        .unwrap();
        assert_eq!(o.devices[0].worker_cpus, vec![c, c]);
        assert_eq!(o.devices[1].worker_cpus, vec![c]);
        if let Some(&d) = allowed.get(1) {
            let o = p(&format!(
                "--device socket=/tmp/a,port=sink,queues=2 --device socket=/tmp/b,port=sink --worker-cpus {c},{d}"
            ))
            .unwrap();
            assert_eq!(o.devices[0].worker_cpus, vec![c, d]);
            assert_eq!(o.devices[1].worker_cpus, vec![c]);
        }
        let beyond = allowed.last().unwrap() + 1;
        let e = p(&format!(
            "--socket-path /tmp/a --port sink --worker-cpus {beyond}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("--worker-cpus"), "{e}");
        assert!(p("--socket-path /tmp/a --port sink --worker-cpus 1-0").is_err());
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
        assert_eq!(d.poll, PollMode::Fixed(Duration::from_micros(50)));
        assert_eq!(d.tap_io, TapIo::Auto);
        assert_eq!(o.stats_interval, 1.0);
    }

    /// `--vduse NAME` in place of `--socket-path`: the device's name is
    /// NAME; it excludes `--socket-path` and needs `--port`.
    #[test]
    fn test_vduse_form() {
        let o = p("--vduse vnet0 --port tap=t0 --queues 2").unwrap();
        assert_eq!(o.vduse.as_deref(), Some("vnet0"));
        assert_eq!(o.devices.len(), 1);
        assert_eq!(o.devices[0].socket, "vnet0");
        assert_eq!(o.devices[0].queues, 2);
        assert_eq!(p("--socket-path /tmp/a --port sink").unwrap().vduse, None);
        for bad in [
            "--vduse vnet0",
            "--vduse vnet0 --socket-path /tmp/a --port sink",
        ] {
            assert_eq!(p(bad).err().map(|e| e.exit_code()), Some(2), "{bad:?}");
        }
    }

    #[test]
    fn test_device_form_repeatable() {
        let o = p("--device socket=/tmp/a,port=switch=br0,queues=2 --device socket=/tmp/b,port=tap=t0,mac=02:00:00:00:00:02 --poll-us=5 --tap-io=syscall")
            .unwrap();
        assert_eq!(o.devices.len(), 2);
        assert_eq!(o.devices[0].port, PortSpec::Switch("br0".into()));
        assert_eq!(o.devices[0].queues, 2);
        assert_eq!(o.devices[1].port, PortSpec::Tap("t0".into()));
        assert_eq!(o.devices[1].mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(o.devices[1].poll, PollMode::Fixed(Duration::from_micros(5)));
        assert_eq!(o.devices[1].tap_io, TapIo::Syscall);
        assert_ne!(o.devices[0].mac, mac_for("/tmp/b"));
        assert_eq!(o.devices[0].mac, mac_for("/tmp/a"));
        assert_eq!(o.devices[0].mac[0] & 3, 2, "locally administered unicast");
    }

    /// Both forms together: the shorthand's device comes first; `=` and
    /// space forms mix; a flag given twice takes its last value. (Checked
    /// to fail with `args_override_self` off: clap then refuses the second
    /// `--poll-us`.)
    #[test]
    fn test_forms_mix_and_last_value_wins() {
        let o = p("--device=socket=/tmp/b,port=reflect --socket-path=/tmp/a --port sink --poll-us 1 --poll-us 7 --queues=2 --queues 3")
            .unwrap();
        let d: Vec<_> = o.devices.iter().map(|d| d.socket.as_str()).collect();
        assert_eq!(d, ["/tmp/a", "/tmp/b"]);
        assert_eq!(o.devices[0].queues, 3);
        assert_eq!(o.devices[0].poll, PollMode::Fixed(Duration::from_micros(7)));
        assert_eq!(o.devices[1].queues, 1);
    }

    /// Every bad command line is a usage error (status 2). (Checked to fail
    /// with the duplicate-socket check of `into_options` off.)
    #[test]
    fn test_bad_arguments_are_refused() {
        for bad in [
            "",
            "--port sink",
            "--socket-path /tmp/a",
            "--socket-path= --port sink",
            "--socket-path /tmp/a --port bogus",
            "--socket-path /tmp/a --port sink --queues 0",
            "--socket-path /tmp/a --port sink --queues 9",
            "--socket-path /tmp/a --port sink --mac 01:00:00:00:00:01",
            "--socket-path /tmp/a --port sink --mac 00:00:00:00:00:00",
            "--socket-path /tmp/a --port sink --mac zz",
            "--socket-path /tmp/a --port sink --stats-interval -1",
            "--socket-path /tmp/a --port sink --stats-interval inf",
            "--socket-path /tmp/a --port sink --poll-us x",
            "--socket-path /tmp/a --port sink --poll-us 1000001",
            "--socket-path /tmp/a --port sink --frobnicate",
            "--socket-path /tmp/a --port sink --queues",
            "--queues 2 --device socket=/tmp/a,port=sink",
            "--device socket=/tmp/a",
            "--device port=sink",
            "--device socket=,port=sink",
            "--device socket=/tmp/a,port=sink,color=red",
            "--device socket=/tmp/a,port=sink,queues",
            "--device socket=/tmp/a,port=sink --device socket=/tmp/a,port=reflect",
            "--socket-path /tmp/a --port sink --device socket=/tmp/a,port=reflect",
            "--socket-path /tmp/a --port sink --tap-io fast",
        ] {
            let e = p(bad).err();
            assert!(e.is_some(), "{bad:?} accepted");
            assert_eq!(e.map(|e| e.exit_code()), Some(2), "{bad:?}");
        }
    }

    /// A bad value's error names its flag (and, in a `--device` spec, the key).
    #[test]
    fn test_errors_name_the_flag() {
        for (args, want) in [
            ("--socket-path /tmp/a --port sink --queues 9", "--queues"),
            ("--socket-path /tmp/a --port sink --poll-us x", "--poll-us"),
            ("--socket-path /tmp/a --port bogus", "--port"),
            ("--device socket=/tmp/a,port=sink,mac=zz", "mac: "),
            ("--device socket=/tmp/a", "the port is missing"),
            (
                "--device socket=/tmp/a,port=sink --device socket=/tmp/a,port=sink",
                "given twice",
            ),
        ] {
            let e = p(args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "{args:?}: {e}");
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
    fn test_help_and_version() {
        let e = p("--help").err().unwrap();
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayHelp, 0));
        assert!(e.to_string().contains("--socket-path <PATH>"));
        let e = p("--version").err().unwrap();
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayVersion, 0));
        assert_eq!(
            e.to_string(),
            format!("vdpa-net {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    /// clap's own consistency checks of the derived command.
    #[test]
    fn test_command_is_consistent() {
        Cli::command().debug_assert();
    }
}
