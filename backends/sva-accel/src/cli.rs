//! Command line of the `sva-accel` daemon (clap).
//!
//! ```text
//! sva-accel --socket-path PATH [--workers N] [--wq-size N] [--wq-mode shared|dedicated]
//!           [--max-batch N] [--max-xfer BYTES] [--priority N] [--uid-priority UID:N]...
//!           [--faults-per-client N] [--iommu-socket PATH] [--label NAME]
//!           [--socket-mode MODE] [--socket-group GROUP]
//!           [--grant DEVICE=WHO]... [--limit NAME=VALUE]...
//! ```
//!
//! Every value is checked by the parser of its flag, so an error names the
//! flag. Errors exit with status 2 and `--help` and `--version` with 0
//! ([`Options::parse`]). A flag given twice takes its last value, except
//! the repeatable `--uid-priority`, `--grant` and `--limit`, which apply in
//! order.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, RangedU64ValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use ioasis::ownership::{Grantee, Grants};
use ioasis::service::{Limits, ServiceOptions};
use ioasis::socket_policy::SocketPolicy;

use crate::device::{DeviceConfig, DEFAULT_LABEL, MAX_FAULTS_PER_CLIENT};
use crate::wq::{WqMode, MAX_WQ_SIZE, MIN_WQ_SIZE};

/// The daemon's arguments, as given.
#[derive(Debug, Parser)]
#[command(
    name = "sva-accel",
    bin_name = "sva-accel",
    version,
    about = "A software accelerator with the programming model of Intel DSA.",
    after_help = after_help(),
    args_override_self = true
)]
pub struct Cli {
    /// Device socket: clients bind their portal here
    #[arg(long, value_name = "PATH")]
    socket_path: PathBuf,
    /// Worker threads, 1 to 256 [default: CPUs - 1, at least 1]
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
    workers: Option<usize>,
    /// Work queue size, a power of two, 2 to 4096
    #[arg(long, value_name = "N", default_value_t = DeviceConfig::default().wq_size,
          value_parser = parse_wq_size)]
    wq_size: u32,
    /// Work queue mode: shared or dedicated (credits)
    #[arg(long, value_name = "MODE", default_value = "shared", value_parser = wq_mode_parser(),
          hide_possible_values = true)]
    wq_mode: WqMode,
    /// Largest batch, 2 to 1024
    #[arg(long, value_name = "N", default_value_t = DeviceConfig::default().max_batch,
          value_parser = RangedU64ValueParser::<u32>::new().range(2..=1024))]
    max_batch: u32,
    /// Largest transfer in bytes
    #[arg(long, value_name = "BYTES", default_value_t = DeviceConfig::default().max_xfer,
          value_parser = RangedU64ValueParser::<u32>::new().range(1..))]
    max_xfer: u32,
    /// Work queue priority of every user, 1 to 15
    #[arg(long, value_name = "N", default_value_t = DeviceConfig::default().priority,
          value_parser = parse_priority)]
    priority: u8,
    /// Priority of one uid's clients; repeatable, the last for a uid wins
    #[arg(long, value_name = "UID:N", value_parser = parse_uid_priority)]
    uid_priority: Vec<(u32, u8)>,
    /// Outstanding I/O page faults per client, 1 to 1024
    #[arg(long, value_name = "N", default_value_t = DeviceConfig::default().faults_per_client,
          value_parser = RangedU64ValueParser::<u32>::new().range(1..=MAX_FAULTS_PER_CLIENT as u64))]
    faults_per_client: u32,
    /// The daemon's /dev/iommu service [default: PATH.iommu]
    #[arg(long, value_name = "PATH")]
    iommu_socket: Option<PathBuf>,
    /// The device's label in that service
    #[arg(long, value_name = "NAME", default_value = DEFAULT_LABEL)]
    label: String,
    /// Octal mode of the sockets (0600: this user and root)
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = SocketPolicy::parse_mode)]
    socket_mode: u32,
    /// Group (name or number) of the sockets, for modes such as 0660
    #[arg(long, value_name = "GROUP", value_parser = SocketPolicy::parse_group)]
    socket_group: Option<u32>,
    /// Grant a device (or *: every other) to WHO (see below); repeatable
    #[arg(long, value_name = "DEVICE=WHO", value_parser = parse_grant)]
    grant: Vec<(String, Grantee)>,
    /// A limit of the /dev/iommu service (see below); repeatable
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_limit)]
    limit: Vec<String>,
}

/// What the daemon was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The device socket.
    pub socket_path: PathBuf,
    /// The `/dev/iommu` service's socket.
    pub iommu_socket: PathBuf,
    /// The device's label in the service.
    pub label: String,
    /// The device.
    pub device: DeviceConfig,
    /// Mode and group of both sockets.
    pub socket_policy: SocketPolicy,
    /// Grants and limits of the service.
    pub service: ServiceOptions,
}

impl Options {
    /// Parses `args` (the program name first).
    pub fn try_parse_from<I, T>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
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

impl Cli {
    /// Builds the options.
    pub fn into_options(self) -> Result<Options, clap::Error> {
        let iommu_socket = self.iommu_socket.unwrap_or_else(|| {
            let mut p = self.socket_path.clone().into_os_string();
            p.push(".iommu");
            PathBuf::from(p)
        });
        let defaults = DeviceConfig::default();
        let device = DeviceConfig {
            workers: self.workers.unwrap_or(defaults.workers),
            wq_size: self.wq_size,
            wq_mode: self.wq_mode,
            max_xfer: self.max_xfer,
            max_batch: self.max_batch,
            priority: self.priority,
            uid_priority: self.uid_priority,
            faults_per_client: self.faults_per_client,
        };
        let socket_policy =
            SocketPolicy::new(self.socket_mode, self.socket_group).map_err(|e| {
                Cli::command().error(ErrorKind::ValueValidation, format!("--socket-mode: {e}"))
            })?;
        let mut service = ServiceOptions::default();
        for (label, who) in &self.grant {
            service.grants.grant(label, *who);
        }
        for l in &self.limit {
            // Checked by `parse_limit`.
            service
                .limits
                .set(l)
                .map_err(|e| Cli::command().error(ErrorKind::ValueValidation, e))?;
        }
        Ok(Options {
            socket_path: self.socket_path,
            iommu_socket,
            label: self.label,
            device,
            socket_policy,
            service,
        })
    }
}

/// Text printed after the options by `--help`.
fn after_help() -> String {
    format!(
        "--socket-mode and --socket-group apply to the device and the service socket.\n\
         WHO is UID, uid:N, gid:N, pid:N or any; without --grant the device is granted\n\
         to the user the daemon runs as.\n\
         {}",
        ServiceOptions::LIMITS_HELP
    )
}

fn parse_wq_size(v: &str) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (MIN_WQ_SIZE..=MAX_WQ_SIZE).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a power of two, {MIN_WQ_SIZE} to {MAX_WQ_SIZE}"
        )),
    }
}

fn wq_mode_parser() -> impl TypedValueParser<Value = WqMode> {
    PossibleValuesParser::new(["shared", "dedicated"]).map(|s| match s.as_str() {
        "dedicated" => WqMode::Dedicated,
        _ => WqMode::Shared,
    })
}

fn parse_priority(v: &str) -> Result<u8, String> {
    match v.parse::<u8>() {
        Ok(p) if (1..=15).contains(&p) => Ok(p),
        _ => Err("expected a priority, 1 to 15".into()),
    }
}

fn parse_uid_priority(v: &str) -> Result<(u32, u8), String> {
    let (uid, prio) = v
        .split_once(':')
        .ok_or_else(|| "expected UID:PRIORITY".to_string())?;
    let uid = uid
        .parse::<u32>()
        .map_err(|_| format!("expected UID:PRIORITY, {uid:?} is not a uid"))?;
    Ok((uid, parse_priority(prio)?))
}

fn parse_grant(v: &str) -> Result<(String, Grantee), String> {
    Grants::parse(v).map_err(|e| e.to_string())
}

fn parse_limit(v: &str) -> Result<String, String> {
    Limits::default().set(v)?;
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("sva-accel").chain(s.split_whitespace()))
    }

    #[test]
    fn test_defaults() {
        let o = p("--socket-path /tmp/s").expect("parses");
        assert_eq!(o.socket_path, PathBuf::from("/tmp/s"));
        assert_eq!(o.iommu_socket, PathBuf::from("/tmp/s.iommu"));
        assert_eq!(o.label, DEFAULT_LABEL);
        assert_eq!(o.device, DeviceConfig::default());
        assert_eq!(o.socket_policy, SocketPolicy::default());
        assert_eq!(o.service.limits, Limits::default());
    }

    #[test]
    fn test_every_option() {
        let o = p(
            "--socket-path=/tmp/s --workers 3 --wq-size 64 --wq-mode dedicated \
                   --max-batch 16 --max-xfer 4096 --priority 9 --uid-priority 7:3 \
                   --uid-priority=8:15 --faults-per-client 5 --iommu-socket /tmp/i --label acc1 \
                   --socket-mode 0660 --socket-group 0 --grant acc1=uid:7 --grant *=any \
                   --limit mapped-per-uid=1G --limit sessions-total=4 \
             --limit faults-per-session=16",
        )
        .expect("parses");
        let d = &o.device;
        assert_eq!(
            (d.workers, d.wq_size, d.wq_mode, d.max_batch, d.max_xfer),
            (3, 64, WqMode::Dedicated, 16, 4096)
        );
        assert_eq!(d.priority, 9);
        assert_eq!(d.uid_priority, [(7, 3), (8, 15)]);
        assert_eq!(d.faults_per_client, 5);
        assert_eq!(o.iommu_socket, PathBuf::from("/tmp/i"));
        assert_eq!(o.label, "acc1");
        assert_eq!(
            (o.socket_policy.mode(), o.socket_policy.group()),
            (0o660, Some(0))
        );
        assert_eq!(o.service.limits.mapped_per_uid, 1 << 30);
        assert_eq!(o.service.limits.sessions_total, 4);
        assert_eq!(o.service.limits.faults_per_session, 16);
        let peer = |uid| ioasis::ownership::Peer {
            pid: 1,
            uid,
            gid: 1,
        };
        assert!(o.service.grants.allows("acc1", &peer(7)));
        assert!(!o.service.grants.allows("acc1", &peer(8)));
        assert!(o.service.grants.allows("other", &peer(8)));
    }

    /// A flag given twice takes its last value. (Checked to fail with
    /// `args_override_self` off: clap then refuses the second `--workers`.)
    #[test]
    fn test_last_value_wins() {
        let o =
            p("--socket-path /tmp/a --workers 2 --workers 4 --socket-path /tmp/b").expect("parses");
        assert_eq!(o.device.workers, 4);
        assert_eq!(o.socket_path, PathBuf::from("/tmp/b"));
    }

    /// Every bad value is a usage error (status 2) whose message names the
    /// flag.
    #[test]
    fn test_bad_values_name_their_flag() {
        for (args, flag) in [
            ("", "--socket-path"),
            ("--socket-path", "--socket-path"),
            ("--socket-path /tmp/s --workers 0", "--workers"),
            ("--socket-path /tmp/s --workers 257", "--workers"),
            ("--socket-path /tmp/s --workers many", "--workers"),
            ("--socket-path /tmp/s --wq-size 3", "--wq-size"),
            ("--socket-path /tmp/s --wq-size 8192", "--wq-size"),
            ("--socket-path /tmp/s --wq-mode weird", "--wq-mode"),
            ("--socket-path /tmp/s --max-batch 1", "--max-batch"),
            ("--socket-path /tmp/s --max-xfer 0", "--max-xfer"),
            ("--socket-path /tmp/s --priority 16", "--priority"),
            ("--socket-path /tmp/s --priority 0", "--priority"),
            ("--socket-path /tmp/s --uid-priority 7", "--uid-priority"),
            ("--socket-path /tmp/s --uid-priority x:3", "--uid-priority"),
            ("--socket-path /tmp/s --uid-priority 7:16", "--uid-priority"),
            (
                "--socket-path /tmp/s --faults-per-client 0",
                "--faults-per-client",
            ),
            (
                "--socket-path /tmp/s --faults-per-client 1025",
                "--faults-per-client",
            ),
            ("--socket-path /tmp/s --socket-mode 8", "--socket-mode"),
            ("--socket-path /tmp/s --socket-mode 4770", "--socket-mode"),
            (
                "--socket-path /tmp/s --socket-group no-such-group-ioasis",
                "--socket-group",
            ),
            ("--socket-path /tmp/s --grant sva0", "--grant"),
            ("--socket-path /tmp/s --grant sva0=nobody-at-all", "--grant"),
            ("--socket-path /tmp/s --limit mapped=1G", "--limit"),
            ("--socket-path /tmp/s --limit fds-total=0", "--limit"),
            ("--socket-path /tmp/s --bogus", "--bogus"),
        ] {
            let e = p(args).err();
            let code = e.as_ref().map(|e| e.exit_code());
            assert_eq!(code, Some(2), "{args:?}");
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(flag), "{args:?}: {msg}");
        }
    }

    #[test]
    fn test_help_and_version() {
        let e = p("--help").expect_err("--help is not options");
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayHelp, 0));
        assert!(e.to_string().contains("--socket-path <PATH>"));
        let e = p("--version").expect_err("--version is not options");
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayVersion, 0));
        assert_eq!(
            e.to_string(),
            format!("sva-accel {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    /// clap's own consistency checks of the derived command.
    #[test]
    fn test_command_is_consistent() {
        Cli::command().debug_assert();
    }
}
