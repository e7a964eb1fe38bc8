//! DPDK `dpdk-testpmd` inside a VDUSE guest ([`crate::vduse_kit`]), as
//! the same frontend of vdpa-net over both transports: a `virtio_user`
//! port on vdpa-net's vhost-user socket, and a `virtio_user` port on
//! `/dev/vhost-vdpa-0`, the same device served over VDUSE and bound to the
//! kernel's `vhost_vdpa` (whose `UPDATE_IOTLB` requests then map
//! testpmd's own memory into the daemon).
//!
//! [`GUEST_LIB`] holds the guest's shell functions; the script of a test
//! starts the daemons with them and calls `tp_run` once per run. Each run
//! prints two markers that [`parse_runs`] reads back from the console:
//! `RUN SIDE START END TX` (uptime before `start` and after `stop`, and
//! the packets testpmd sent, from its forward statistics) and then
//! `STATS SIDE JSON`, the daemon's newest statistics line at least a
//! second and a half after testpmd quit. Every run is checked: the
//! daemon's sink counted exactly the packets testpmd sent in it.

use serde_json::Value;

use crate::guest::MARKER_PREFIX;
use crate::vdpa_net::sum_field;

/// Shell functions of the guest (after the VDUSE tests' own):
///
/// - `start_sides`: vdpa-net with a `sink` port twice, both pinned to
///   vCPU 1: `vu` on the vhost-user socket `/tmp/vu.sock`, `vd` as VDUSE
///   device `vnet0`, added to the vDPA bus with automatic probing off and
///   bound to `vhost_vdpa` (`/dev/vhost-vdpa-0`); marks `VDPA_DRIVER
///   vhost_vdpa`;
/// - `tp_run SIDE PATH SECS`: testpmd (both lcores on vCPU 0, `--no-huge`,
///   txonly, 64-byte frames) on a `virtio_user` port at `PATH`, started
///   and stopped by commands on a fifo, forwarding for `SECS` seconds;
///   then the two markers of the module's docs.
pub const GUEST_LIB: &str = r#"
PMDS=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
N=0
start_sides() {
    mkdir -p /var/run
    # EAL refuses drivers below a world-writable directory (the initramfs
    # root is one).
    chmod 755 / /usr /usr/lib /usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/dpdk $PMDS
    start_daemon vu taskset -c 1 /bin/vdpa-net --socket-path /tmp/vu.sock --port sink --stats-interval 0.5
    start_daemon vd taskset -c 1 /bin/vdpa-net --vduse vnet0 --port sink --stats-interval 0.5
    wait_for /dev/vduse/vnet0 || fail_with NO_VDUSE_DEVICE
    wait_for /tmp/vu.sock || fail_with NO_SOCKET
    load_module vhost_vdpa || fail_with NO_VHOST_VDPA
    echo 0 > /sys/bus/vdpa/drivers_autoprobe
    timeout 60 vdpa dev add name vnet0 mgmtdev vduse || fail_with VDPA_ADD_FAILED
    echo vnet0 > /sys/bus/vdpa/drivers/vhost_vdpa/bind || fail_with BIND_FAILED
    wait_for /dev/vhost-vdpa-0 || fail_with NO_VHOST_VDPA_DEV
    drv=$(basename "$(readlink /sys/bus/vdpa/devices/vnet0/driver)")
    mark "VDPA_DRIVER $drv"
}
tp_run() {
    side=$1; path=$2; secs=$3
    N=$((N + 1)); out=/tmp/tp$N.out
    rm -f /tmp/tp.cmd; mkfifo /tmp/tp.cmd
    timeout 300 dpdk-testpmd --lcores 0@0,1@0 --main-lcore 0 --no-pci --no-huge -m 256 \
        --file-prefix tp$N -d $PMDS/librte_net_virtio.so.23 -d $PMDS/librte_mempool_ring.so.23 \
        --vdev virtio_user0,path=$path,queues=1 -- -i --forward-mode=txonly --nb-cores=1 \
        --total-num-mbufs=8192 --no-mlockall < /tmp/tp.cmd > $out 2>&1 &
    TP=$!
    exec 3>/tmp/tp.cmd
    i=0; while ! grep -q 'testpmd> ' $out && kill -0 $TP 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    grep -q 'testpmd> ' $out || { exec 3>&-; tail -n 40 $out; fail_with TESTPMD_NO_PROMPT; }
    s=$(cut -d' ' -f1 /proc/uptime)
    echo start >&3
    sleep $secs
    echo stop >&3
    e=$(cut -d' ' -f1 /proc/uptime)
    sleep 1
    echo quit >&3
    exec 3>&-
    wait $TP; rc=$?
    tx=$(grep 'TX-packets:' $out | head -n 1 | awk '{print $2}')
    if [ "$rc" != 0 ] || [ -z "$tx" ]; then tail -n 40 $out; fail_with TESTPMD_FAILED; fi
    mark "RUN $side $s $e $tx"
    sleep 1.5
    mark "STATS $side $(tail -n 1 /tmp/$side.out)"
}
"#;

/// The side of a run: vhost-user (`vu`) or VDUSE through `vhost_vdpa`
/// (`vd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `virtio_user` on vdpa-net's vhost-user socket.
    VhostUser,
    /// `virtio_user` on `/dev/vhost-vdpa-0`, vdpa-net over VDUSE.
    Vduse,
}

impl Side {
    /// The side's name in the markers.
    pub fn tag(self) -> &'static str {
        match self {
            Side::VhostUser => "vu",
            Side::Vduse => "vd",
        }
    }

    /// Where testpmd's `virtio_user` port connects.
    pub fn path(self) -> &'static str {
        match self {
            Side::VhostUser => "/tmp/vu.sock",
            Side::Vduse => "/dev/vhost-vdpa-0",
        }
    }

    /// The `tp_run` line of one run forwarding `secs` seconds.
    pub fn run_line(self, secs: u32) -> String {
        format!("tp_run {} {} {secs}\n", self.tag(), self.path())
    }
}

/// One checked run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Which transport.
    pub side: Side,
    /// Packets testpmd sent (and the sink counted).
    pub packets: u64,
    /// Seconds between `start` and `stop` (guest uptime).
    pub secs: f64,
}

impl Run {
    /// Packets per second.
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.secs.max(0.01)
    }
}

/// The runs of a console, in order, each checked: testpmd sent at least one
/// packet, and the daemon's `rx_packets` grew by exactly what it sent.
/// An error names the first run that fails.
pub fn parse_runs(console: &str) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    let mut last_rx = [0u64; 2];
    let mut pending: Option<Run> = None;
    for line in console.lines() {
        let Some(rest) = line.split(MARKER_PREFIX).nth(1) else {
            continue;
        };
        let rest = rest.trim_end().trim_end_matches("@@");
        if let Some(r) = rest.strip_prefix("RUN ") {
            let f: Vec<&str> = r.split(' ').collect();
            let [side, s, e, tx] = f[..] else {
                return Err(format!("malformed run marker: {line}"));
            };
            let side = side_of(side).ok_or_else(|| format!("unknown side: {line}"))?;
            let (Ok(s), Ok(e), Ok(tx)) = (s.parse::<f64>(), e.parse::<f64>(), tx.parse::<u64>())
            else {
                return Err(format!("malformed run marker: {line}"));
            };
            if tx == 0 {
                return Err(format!("testpmd sent nothing: {line}"));
            }
            pending = Some(Run {
                side,
                packets: tx,
                secs: e - s,
            });
        } else if let Some(r) = rest.strip_prefix("STATS ") {
            let (side, json) = r
                .split_once(' ')
                .ok_or_else(|| format!("malformed stats marker: {line}"))?;
            let side = side_of(side).ok_or_else(|| format!("unknown side: {line}"))?;
            let v: Value = serde_json::from_str(json)
                .map_err(|e| format!("the daemon's statistics line ({e}): {line}"))?;
            let rx = sum_field(&v, "rx_packets");
            let run = pending
                .take()
                .filter(|r| r.side == side)
                .ok_or_else(|| format!("statistics without a run before them: {line}"))?;
            let i = usize::from(side == Side::Vduse);
            let counted = rx.checked_sub(last_rx[i]).ok_or_else(|| {
                format!(
                    "the daemon's count went back ({} to {rx}): {line}",
                    last_rx[i]
                )
            })?;
            if counted != run.packets {
                return Err(format!(
                    "{} run {}: testpmd sent {} packets, the sink counted {counted} ({} lost)",
                    side.tag(),
                    runs.len() + 1,
                    run.packets,
                    run.packets as i128 - counted as i128
                ));
            }
            last_rx[i] = rx;
            runs.push(run);
        }
    }
    if pending.is_some() {
        return Err("the last run has no statistics after it".into());
    }
    Ok(runs)
}

fn side_of(tag: &str) -> Option<Side> {
    match tag {
        "vu" => Some(Side::VhostUser),
        "vd" => Some(Side::Vduse),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> String {
        format!("{MARKER_PREFIX}{s}@@\n")
    }

    #[test]
    fn test_parse_runs_checks_counts() {
        let good = m("RUN vu 10.00 12.00 2000")
            + &m(r#"STATS vu {"rx_packets":2000,"devices":[{"rx_packets":2000}]}"#)
            + &m("RUN vd 20.00 22.00 1000")
            + &m(r#"STATS vd {"rx_packets":1000}"#)
            + &m("RUN vd 30.00 32.00 500")
            + &m(r#"STATS vd {"rx_packets":1500}"#);
        let runs = parse_runs(&good).expect("good runs");
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].side, Side::VhostUser);
        assert!((runs[0].pps() - 1000.0).abs() < 1e-6);
        assert_eq!(runs[2].packets, 500);

        let lost = m("RUN vd 1 2 10") + &m(r#"STATS vd {"rx_packets":9}"#);
        assert!(parse_runs(&lost)
            .expect_err("a lost packet")
            .contains("1 lost"));
        let none = m("RUN vd 1 2 0") + &m(r#"STATS vd {"rx_packets":0}"#);
        assert!(parse_runs(&none).is_err());
        assert!(parse_runs(&m("RUN vd 1 2 10")).is_err());
        assert!(parse_runs(&m(r#"STATS vd {"rx_packets":0}"#)).is_err());
        let mixed = m("RUN vu 1 2 10") + &m(r#"STATS vd {"rx_packets":10}"#);
        assert!(parse_runs(&mixed).is_err());
    }
}
