//! The command line (clap). Bad arguments exit with status 2.

use clap::Parser;

use crate::backing::{parse_size, ImageSpec};
use crate::device::BlkOptions;
use ioasis::poll::PollMode;

/// Serves a raw image, a block device or a null disk as a virtio-blk
/// device over vhost-user or VDUSE.
#[derive(Debug, Parser)]
#[command(
    name = "vdpa-blk",
    version,
    about,
    after_help = "Signals: SIGINT or SIGTERM stops the daemon. SIGHUP re-reads the image's size \
(after it was grown or shrunk, e.g. with `truncate -s`) and, if the capacity changed, puts it \
in the config space and tells the driver: over VDUSE a config interrupt, over vhost-user \
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (the frontend then re-reads the config space)."
)]
pub struct Args {
    /// Unix socket the frontend (QEMU, ...) connects to.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "vduse",
        conflicts_with = "vduse"
    )]
    pub socket_path: Option<String>,
    /// Serve the disk as the kernel's VDUSE device NAME (`/dev/vduse/NAME`,
    /// then `vdpa dev add name NAME mgmtdev vduse`) instead of over a
    /// vhost-user socket.
    #[arg(long, value_name = "NAME")]
    pub vduse: Option<String>,
    /// Raw image file or block device, or `null:SIZE` (no I/O, reads return
    /// zeroes; SIZE like 4096, 64M, 1G).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "null",
        conflicts_with = "null"
    )]
    pub image: Option<ImageSpec>,
    /// A null disk of SIZE bytes (same as `--image null:SIZE`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub null: Option<u64>,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[arg(long)]
    pub read_only: bool,
    /// Request queues (one worker thread and io_uring each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Answer of GET_ID (at most 20 bytes).
    #[arg(long, default_value = "vdpa-blk")]
    pub serial: String,
    /// Largest queue size the driver may choose (a power of two, 2..=32768).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Print statistics as a JSON line every MS milliseconds (0: only at
    /// exit).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub stats_interval_ms: u64,
    /// After work, poll N µs with the driver's kicks off, then sleep (0:
    /// never poll) [default: adaptive, a window of 0 to 200 µs that follows
    /// the load]
    #[arg(long, value_name = "N")]
    pub poll_us: Option<u64>,
    /// Pin the queues' workers to these CPUs (`1`, `0,2-3`): the n-th
    /// queue's worker to the n-th CPU, round robin; the connection thread
    /// stays unpinned [default: no pinning]
    #[arg(long, value_name = "LIST", value_parser = parse_worker_cpus)]
    pub worker_cpus: Option<CpuList>,
}

/// A `--worker-cpus` list (a type of its own: clap reads an
/// `Option<Vec<_>>` field as a repeatable option).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// A CPU list this process may run on.
fn parse_worker_cpus(s: &str) -> Result<CpuList, String> {
    let cpus = ioasis::affinity::parse_cpu_list(s)?;
    ioasis::affinity::check_allowed(&cpus)?;
    Ok(CpuList(cpus))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if !(2..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two in 2..=32768"));
    }
    Ok(n as u16)
}

/// Where the disk is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A vhost-user socket.
    Socket(String),
    /// A VDUSE device name.
    Vduse(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "socket {p}"),
            Endpoint::Vduse(n) => write!(f, "VDUSE device {n}"),
        }
    }
}

impl Args {
    /// Where the disk is served (clap requires exactly one of the two).
    pub fn endpoint(&self) -> Endpoint {
        match (&self.socket_path, &self.vduse) {
            (_, Some(n)) => Endpoint::Vduse(n.clone()),
            (Some(p), None) => Endpoint::Socket(p.clone()),
            (None, None) => Endpoint::Socket(String::new()),
        }
    }

    /// The image to open.
    pub fn image(&self) -> ImageSpec {
        match (&self.image, self.null) {
            (Some(i), _) => i.clone(),
            (None, Some(n)) => ImageSpec::Null(n),
            // clap requires one of the two.
            (None, None) => ImageSpec::Null(512),
        }
    }

    /// The device options.
    pub fn options(&self) -> BlkOptions {
        BlkOptions {
            queues: self.queues,
            queue_size: self.queue_size,
            serial: self.serial.clone(),
            poll: PollMode::from_poll_us(self.poll_us),
            worker_cpus: self.worker_cpus.clone().map(|c| c.0).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--worker-cpus`: the list as given, each CPU one the process may
    /// use; the device pins worker n to the n-th CPU, round robin.
    #[test]
    fn test_worker_cpus() {
        let with = |cpus: &str| {
            Args::try_parse_from([
                "vdpa-blk",
                "--socket-path",
                "/s",
                "--null",
                "4K",
                "--worker-cpus",
                cpus,
            ])
        };
        let all = ioasis::affinity::allowed_cpus().expect("CPUs");
        let a = Args::try_parse_from(["vdpa-blk", "--socket-path", "/s", "--null", "4K"])
            .expect("parse");
        assert!(a.options().worker_cpus.is_empty());
        let a = with(&all[0].to_string()).expect("parse");
        assert_eq!(a.options().worker_cpus, vec![all[0]]);
        let beyond = (all.iter().max().expect("a CPU") + 1).to_string();
        for bad in [beyond.as_str(), "x", "2-1"] {
            assert!(with(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_parse() {
        let a = Args::try_parse_from([
            "vdpa-blk",
            "--socket-path",
            "/s",
            "--image",
            "null:1M",
            "--queues",
            "2",
            "--queue-size",
            "512",
        ])
        .expect("parse");
        assert_eq!(a.image(), ImageSpec::Null(1 << 20));
        assert_eq!(a.options().queues, 2);
        let b = Args::try_parse_from(["vdpa-blk", "--socket-path", "/s", "--null", "4K"])
            .expect("null");
        assert_eq!(b.image(), ImageSpec::Null(4096));
        assert_eq!(b.endpoint(), Endpoint::Socket("/s".into()));
        let v =
            Args::try_parse_from(["vdpa-blk", "--vduse", "blk0", "--null", "4K"]).expect("vduse");
        assert_eq!(v.endpoint(), Endpoint::Vduse("blk0".into()));
        for bad in [
            vec!["vdpa-blk", "--socket-path", "/s"],
            vec!["vdpa-blk", "--null", "4K"],
            vec![
                "vdpa-blk",
                "--socket-path",
                "/s",
                "--vduse",
                "b",
                "--null",
                "4K",
            ],
            vec![
                "vdpa-blk",
                "--socket-path",
                "/s",
                "--image",
                "x",
                "--queue-size",
                "100",
            ],
            vec![
                "vdpa-blk",
                "--socket-path",
                "/s",
                "--image",
                "x",
                "--queues",
                "0",
            ],
            vec!["vdpa-blk", "--socket-path", "/s", "--image", "null:1"],
            vec![
                "vdpa-blk",
                "--socket-path",
                "/s",
                "--image",
                "x",
                "--null",
                "4K",
            ],
        ] {
            assert!(Args::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }
}
