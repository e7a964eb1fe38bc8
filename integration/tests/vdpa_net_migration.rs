//! Live migration of a QEMU guest on vdpa-net, under traffic: two QEMU
//! processes (TCG) on this machine, the destination started with
//! `-incoming`, each on its own device of one vdpa-net daemon. The two
//! devices' taps are ports of a (learning) bridge in a namespace, and a
//! sender there streams sequence-numbered UDP records to the guest, which
//! keeps each in a buffer and checks it on arrival. The bridge learned the
//! guest's MAC on the source's port: only the guest's announcement after
//! the move (`VIRTIO_NET_F_GUEST_ANNOUNCE`, which vdpa-net offers: QEMU
//! asks the driver, which sends gratuitous ARP) brings the stream to the
//! destination's port.
//!
//! - The guest moves while the stream flows; on the destination it checks
//!   every record it read (body, order) and every record it kept (checksum
//!   over its buffer), and that the stream went on to its end. The guest
//!   gave itself its own MAC address first: the stream is addressed to it,
//!   and the destination QEMU's receive filter (`query-rx-filter`: MAC,
//!   modes, multicast table) must equal the source's. Under vhost-user
//!   QEMU keeps the control queue itself (it hands a backend the data
//!   queues only), so that state moves with QEMU's device state and
//!   vdpa-net's own control queue handling and filter are not involved.
//! - Records only the device's dirty log can bring across: QEMU migrates
//!   with a downtime limit of 1 ms, so the migration goes on pass after
//!   pass (the receiver also keeps 8 MiB of its memory dirty until told
//!   to be QUIET).
//!   Once the first pass is over (every page copied once: QEMU's second
//!   dirty bitmap sync), the guest is told to HOLD: it stops reading, and
//!   the records the device writes next stay queued on its socket, their
//!   payloads in the receive buffers the device wrote them to (1400-byte
//!   records fill a mergeable buffer too far for virtio_net to build its
//!   socket buffer around it: the payload stays a page fragment of the
//!   buffer, and the guest boots with `init_on_alloc=0`, so no guest CPU
//!   writes these pages when they are allocated either). QEMU's own
//!   tracking of guest writes never sees these pages change after it
//!   copied them. A second later the guest goes QUIET and the downtime
//!   limit is raised to 300 ms, the migration ends, and on the destination
//!   the guest is told to RESUME and reads what it held, checking every
//!   byte (the sender sends no UDP checksum, so a record whose bytes are
//!   stale reaches the reader as it is).
//! - A migration cancelled half way: the source goes on with the stream.
//! - Ignored (a measurement, BENCHMARKS.md): QEMU's downtime and total
//!   time with vdpa-net and with DPDK's net_vhost as the backend, rounds
//!   alternated.
//!
//! The guest boots with 8 KiB more than 256 MiB of RAM: QEMU 7.2's TCG
//! loses guest stores after a dirty bitmap sync of a RAM block sized in
//! multiples of 256 KiB (`QemuConfig::mem_extra_kb`). With 256 MiB, both
//! runs of this test with the correct build that got past the hold left
//! the destination guest crashed (a poisoned timer list) or with its
//! receive queue stalled; with 8 KiB more, none of 3.
//!
//! Shown to fail with a device that logs nothing: vdpa-net built with
//! `RUSTFLAGS='--cfg ioasis_broken="nolog"' CARGO_TARGET_DIR=/work/target-broken-mig
//! cargo build -j2 -p vdpa-net` and the test run with
//! `IOASIS_VDPA_NET_BIN=/work/target-broken-mig/debug/vdpa-net` failed 3 runs
//! of 3: the records read after RESUME were older records (16 to 20 out
//! of order) or half old (16 to 55 malformed, their bytes wrong from the
//! buffer's page boundary on), while with the correct build the stream
//! came through intact in 10 runs of 10 (21-25 s each, downtime 6-16 ms).

mod common;

use std::time::{Duration, Instant};

use common::{need_qemu_and_vdpa_net, SETUP_TIMEOUT, STOP_TIMEOUT};
use ioasis_integration::guest_stream::{
    control, guest_file, negotiated, receive_script, Sender, GUEST_PATH,
};
use ioasis_integration::netns::Netns;
use ioasis_integration::process::wait_for_path;
use ioasis_integration::qemu::{IommuMode, Qemu, QemuConfig, GUEST_TIMEOUT};
use ioasis_integration::qmp::{MigrationState, Qmp};
use ioasis_integration::testpmd::{net_vhost_vdev, require_testpmd, Testpmd, TestpmdConfig};
use ioasis_integration::vdpa_net::{VdpaNet, VdpaNetConfig};
use ioasis_integration::{heavy_lock, ready, OrPanic, WorkDir};
use serde_json::json;

const GUEST_IP: &str = "10.0.0.1";
const HOST_CIDR: &str = "10.0.0.2/24";
const MAC: &str = "52:54:00:00:00:01";
/// The MAC address the guest gives itself (QEMU's virtio-net keeps it, and
/// the receive filter, from the control queue; under vhost-user the
/// backend never sees that queue).
const GUEST_MAC: &str = "52:54:00:00:00:42";
/// Records per second the sender offers.
const PPS: u32 = 3000;
/// Records the guest keeps (their first 64 bytes).
const MAX_RECORDS: usize = 400_000;
/// How long the stream flows before the migration starts and after it ends.
const FLOW: Duration = Duration::from_secs(3);
/// Feature bits the test looks at (VIRTIO_NET_F_GUEST_CSUM, _MRG_RXBUF).
const GUEST_CSUM: usize = 1;
const MRG_RXBUF: usize = 15;
/// Migration bandwidth, bytes/s: the first pass over the guest's RAM
/// (about 90 MB not zero) takes about 3 s.
const BANDWIDTH: u64 = 32 << 20;
/// Downtime limit (ms) while the guest is to hold: so small that the
/// migration never converges under traffic and goes on pass after pass.
const NO_CONVERGENCE_MS: u64 = 1;
/// Downtime limit (ms) once the guest holds.
const DOWNTIME_MS: u64 = 300;
/// How long the guest holds on the source before the migration may end:
/// its socket buffer is full after about 0.2 s at [`PPS`].
const HOLD_ON_SOURCE: Duration = Duration::from_secs(1);
/// Bound for a migration to finish.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

struct Rig {
    dir: WorkDir,
    ns: Netns,
    backend: Backend,
}

/// What serves the two QEMUs' sockets.
enum Backend {
    VdpaNet(VdpaNet),
    /// DPDK's net_vhost in testpmd (io forwarding: each vhost port with a
    /// net_tap port).
    NetVhost(Testpmd),
}

impl Rig {
    fn vdpa(&self) -> &VdpaNet {
        match &self.backend {
            Backend::VdpaNet(v) => v,
            Backend::NetVhost(_) => panic!("this rig's backend is net_vhost"),
        }
    }

    /// Stops the backend: vdpa-net's last counters, or testpmd's forward
    /// statistics (as text).
    fn stop_backend(&mut self) -> serde_json::Value {
        match &mut self.backend {
            Backend::VdpaNet(v) => v.stop(STOP_TIMEOUT).or_panic("stop vdpa-net"),
            Backend::NetVhost(t) => {
                let r = t.stop(STOP_TIMEOUT).or_panic("stop testpmd");
                json!({ "testpmd": format!("{r:?}") })
            }
        }
    }
}

/// One daemon, a device per side (taps `msrc` and `mdst`, bridged).
fn rig(test: &str) -> Rig {
    let dir = WorkDir::new(test).or_panic("workdir");
    let ns = Netns::new().or_panic("netns");
    let cfg = VdpaNetConfig::new()
        .device(&dir.join("src.sock"), "tap=msrc")
        .device(&dir.join("dst.sock"), "tap=mdst")
        .stats_interval(1);
    let vdpa = VdpaNet::spawn(&cfg, dir.path(), Some(&ns)).or_panic("start vdpa-net");
    bridge(&ns);
    Rig {
        dir,
        ns,
        backend: Backend::VdpaNet(vdpa),
    }
}

/// The same with DPDK's net_vhost: one testpmd in the namespace, ports
/// net_vhost0 (source) and net_tap0 (`msrc`), net_vhost1 (destination) and
/// net_tap1 (`mdst`), forwarded in pairs; its forwarding lcore polls CPU 1.
fn net_vhost_rig(test: &str) -> Rig {
    let dir = WorkDir::new(test).or_panic("workdir");
    let ns = Netns::new().or_panic("netns");
    let (src, dst) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut t = Testpmd::spawn(
        &TestpmdConfig::reference_backend("backend", &src, "io")
            .vdevs(vec![
                net_vhost_vdev(0, &src, 1, false),
                "net_tap0,iface=msrc".to_string(),
                net_vhost_vdev(1, &dst, 1, false),
                "net_tap1,iface=mdst".to_string(),
            ])
            .in_netns(ns.name())
            .duration(Duration::from_secs(600)),
        dir.path(),
    )
    .or_panic("start net_vhost + net_tap");
    for sock in [&src, &dst] {
        wait_for_path(sock, SETUP_TIMEOUT, Some(t.proc_mut())).or_panic("vhost socket");
    }
    bridge(&ns);
    Rig {
        dir,
        ns,
        backend: Backend::NetVhost(t),
    }
}

/// Bridges the taps `msrc` and `mdst` (`br0`, addressed [`HOST_CIDR`]).
fn bridge(ns: &Netns) {
    for tap in ["msrc", "mdst"] {
        ns.wait_link(tap, SETUP_TIMEOUT).or_panic("tap");
    }
    ns.ip(&["link", "add", "br0", "type", "bridge"])
        .or_panic("bridge");
    for tap in ["msrc", "mdst"] {
        ns.ip(&["link", "set", tap, "master", "br0"])
            .or_panic("enslave tap");
        ns.ip(&["link", "set", tap, "up"]).or_panic("tap up");
    }
    ns.addr_up("br0", HOST_CIDR).or_panic("address the bridge");
}

fn guest(name: &str, rig: &Rig, sock: &str, iommu: IommuMode, bin: &[u8]) -> QemuConfig {
    QemuConfig::new(
        name,
        &receive_script(&format!("{GUEST_IP}/24"), GUEST_MAC, MAX_RECORDS),
    )
    .netdev(&rig.dir.join(sock), MAC)
    .iommu(iommu)
    // Pages are not zeroed on allocation (Debian's kernel zeroes them by
    // default): a receive buffer's page is then written by the device
    // alone, never by a guest CPU whose writes QEMU tracks itself.
    .append("init_on_alloc=0")
    // QEMU 7.2's TCG loses guest stores after a dirty bitmap sync of a RAM
    // block sized in multiples of 256 KiB (see `QemuConfig::mem_extra_kb`):
    // 8 KiB more take the path that does not.
    .mem_extra_kb(8)
    .file(GUEST_PATH, bin.to_vec())
    .qmp(&rig.dir.join(&format!("{name}.qmp")))
}

/// Starts source and destination, the source's guest receiving.
fn start_pair(rig: &Rig, iommu: IommuMode) -> (Qemu, Qemu, Qmp, Qmp) {
    let bin = guest_file().or_panic("guest-stream");
    let mig = rig.dir.join("mig.sock");
    let dst_cfg =
        guest("dst", rig, "dst.sock", iommu, &bin).incoming(&format!("unix:{}", mig.display()));
    let dst = Qemu::launch(&dst_cfg, rig.dir.path()).or_panic("start destination QEMU");
    let dst_qmp = Qmp::connect(&rig.dir.join("dst.qmp"), SETUP_TIMEOUT).or_panic("dst QMP");
    let mut src = Qemu::launch(&guest("src", rig, "src.sock", iommu, &bin), rig.dir.path())
        .or_panic("start source QEMU");
    let src_qmp = Qmp::connect(&rig.dir.join("src.qmp"), SETUP_TIMEOUT).or_panic("src QMP");
    src.wait_marker("RECEIVING", GUEST_TIMEOUT)
        .or_panic("the guest receives");
    // The guest's address resolved first: records the sender's kernel
    // held back for ARP would otherwise arrive after later ones.
    rig.ns
        .sh(
            &format!("busybox ping -c 1 -W 10 {GUEST_IP}"),
            SETUP_TIMEOUT,
        )
        .or_panic("ping the guest");
    (src, dst, src_qmp, dst_qmp)
}

/// Starts migrating at `bandwidth` bytes/s with a downtime limit of
/// `downtime_ms`: RAM is copied while the guest runs (and its device
/// writes), then what was dirtied meanwhile while it is stopped. (A limit
/// that the whole RAM fits in would stop the guest at once and copy
/// everything then, and no page the device wrote would need its log.)
fn migrate(rig: &Rig, qmp: &mut Qmp, bandwidth: u64, downtime_ms: u64) {
    set_downtime(qmp, bandwidth, downtime_ms);
    let uri = format!("unix:{}", rig.dir.join("mig.sock").display());
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .or_panic("migrate");
}

/// Sets the migration's bandwidth and downtime limit (also while it runs).
fn set_downtime(qmp: &mut Qmp, bandwidth: u64, downtime_ms: u64) {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": bandwidth, "downtime-limit": downtime_ms })),
    )
    .or_panic("migration parameters");
}

fn finished(st: &MigrationState) -> bool {
    matches!(st.status.as_str(), "completed" | "failed" | "cancelled")
}

/// The guest's verdict on the stream, and the last record it received.
fn verdict(guest: &mut Qemu, sent: u64) {
    guest
        .expect_marker("STREAM_OK", "STREAM_FAIL", GUEST_TIMEOUT)
        .or_panic("the stream, checked in the guest");
    let text = guest.console_text();
    if let Some(summary) = text.lines().find(|l| l.starts_with("received ")) {
        eprintln!("guest: {summary}; sender: {sent} sent");
    }
    let last: i64 = text
        .split("@@IOASIS:STREAM_LAST ")
        .nth(1)
        .and_then(|t| t.split("@@").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(-1);
    // The stream went on to (about) its end: within a second of records.
    assert!(
        last + i64::from(PPS) >= i64::try_from(sent).unwrap_or(i64::MAX),
        "the guest's last record is {last}, {sent} were sent"
    );
    assert_eq!(guest.wait_end(GUEST_TIMEOUT).or_panic("guest end"), 0);
}

fn migrate_under_traffic(test: &str, iommu: IommuMode) {
    let Some(_) = ready(test, need_qemu_and_vdpa_net().and_then(|_| Netns::new())) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let mut rig = rig(test);
    let (mut src, mut dst, mut src_qmp, mut dst_qmp) = start_pair(&rig, iommu);
    // The premise of the hold: the driver receives into mergeable buffers
    // (a record's frame stays there as a page fragment of its socket
    // buffer).
    let console = src.console_text();
    assert_eq!(
        negotiated(&console, MRG_RXBUF),
        Some(true),
        "the guest negotiated VIRTIO_NET_F_MRG_RXBUF: {console}"
    );
    eprintln!(
        "[{test}] guest negotiated MRG_RXBUF; GUEST_CSUM {:?}",
        negotiated(&console, GUEST_CSUM)
    );
    let sender = Sender::start(&rig.ns, GUEST_IP, PPS, rig.dir.path()).or_panic("sender");
    std::thread::sleep(FLOW);
    let start = Instant::now();
    let src_filter = rx_filter(&mut src_qmp);
    assert!(
        src_filter.contains(GUEST_MAC),
        "the source has the guest's MAC address: {src_filter}"
    );
    eprintln!("[{test}] receive filter: {src_filter}");
    migrate(&rig, &mut src_qmp, BANDWIDTH, NO_CONVERGENCE_MS);
    // Once the first pass over RAM is over (every page copied once: QEMU
    // synchronised its dirty bitmap a second time), the guest stops
    // reading: the records the device writes next stay in their receive
    // buffers, pages no guest CPU writes, until the reader copies them out
    // on the destination. Only the device's log brings them there.
    let st = src_qmp
        .wait_migration(MIGRATION_TIMEOUT, |st| {
            finished(st) || dirty_syncs(st).is_some_and(|n| n >= 2)
        })
        .or_panic("migration under way");
    assert_eq!(
        st.status, "active",
        "the hold comes before the end: {:?}",
        st.raw
    );
    control(&rig.ns, GUEST_IP, "HOLD", rig.dir.path()).or_panic("HOLD");
    src.wait_marker("HOLDING", SETUP_TIMEOUT)
        .or_panic("the guest holds before it stops");
    std::thread::sleep(HOLD_ON_SOURCE);
    let st = src_qmp.query_migrate().or_panic("query-migrate");
    assert_eq!(
        st.status, "active",
        "the migration went on while the guest held: {:?}",
        st.raw
    );
    eprintln!(
        "[{test}] the guest holds after {:?} dirty bitmap syncs; letting the migration converge",
        dirty_syncs(&st)
    );
    control(&rig.ns, GUEST_IP, "QUIET", rig.dir.path()).or_panic("QUIET");
    src.wait_marker("QUIET", SETUP_TIMEOUT)
        .or_panic("the guest stops dirtying its memory");
    set_downtime(&mut src_qmp, BANDWIDTH, DOWNTIME_MS);
    let st = src_qmp
        .wait_migration(MIGRATION_TIMEOUT, finished)
        .or_panic("migration");
    assert_eq!(st.status, "completed", "{:?}", st.raw);
    eprintln!(
        "[{test}] migration completed: downtime {:?} ms, total {:?} ms, {:?} bytes, {:.1} s wall",
        st.downtime_ms,
        st.total_ms,
        st.transferred,
        start.elapsed().as_secs_f64()
    );
    src.kill();
    // The receive filter (the guest's MAC address, its modes and multicast
    // table, all from the control queue) came across.
    assert_eq!(
        rx_filter(&mut dst_qmp),
        src_filter,
        "the destination's receive filter is the source's"
    );
    // The announcement moves the stream to the destination's port, and
    // with it the control words.
    std::thread::sleep(FLOW);
    let mut resumed = false;
    for _ in 0..10 {
        control(&rig.ns, GUEST_IP, "RESUME", rig.dir.path()).or_panic("RESUME");
        if dst.wait_marker("RESUMED", Duration::from_secs(2)).is_ok() {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "the guest resumed: {}", dst.console_text());
    dst.wait_marker("DRAINED", GUEST_TIMEOUT)
        .or_panic("the guest read what it held");
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.finish().or_panic("sender end");
    verdict(&mut dst, sent);
    let last = rig.stop_backend();
    let c = rig.vdpa().device_counters(&last, &rig.dir.join("dst.sock"));
    assert!(
        c.tx_packets > 0,
        "the destination device carried the stream: {last}"
    );
    // QEMU's complaints about the device's IOTLB traffic, for the record
    // (see the strict IOMMU test): misses it read after the device
    // stopped, and misses for I/O addresses no longer mapped.
    let log = |name: &str| std::fs::read_to_string(rig.dir.join(name)).unwrap_or_default();
    let count = |text: &str, what: &str| text.matches(what).count();
    for side in ["src", "dst"] {
        let text = log(&format!("{side}-qemu.log"));
        eprintln!(
            "[{test}] {side} QEMU: {} IOTLB messages after the device stopped, {} translation failures",
            count(&text, "Unexpected IOTLB message"),
            count(&text, "translation failure")
        );
    }
}

/// QEMU's receive filter of the guest's NIC (`query-rx-filter`), as text.
fn rx_filter(qmp: &mut Qmp) -> String {
    qmp.execute("query-rx-filter", None)
        .or_panic("query-rx-filter")
        .to_string()
}

/// `ram.dirty-sync-count` of a `query-migrate` reply: how often QEMU
/// synchronised its dirty bitmap (once when the migration starts, then at
/// the end of each pass over the dirty pages).
fn dirty_syncs(st: &MigrationState) -> Option<u64> {
    st.raw.get("ram")?.get("dirty-sync-count")?.as_u64()
}

#[test]
fn test_guest_migrates_under_traffic() {
    migrate_under_traffic("test_guest_migrates_under_traffic", IommuMode::Off);
}

/// The same with the guest's intel-iommu in strict mode (the driver unmaps
/// every buffer once it is done with it): the device reaches the guest's
/// memory through I/O addresses it learns from IOTLB misses, and logs the
/// guest physical pages behind them.
///
/// Before the guests got 8 KiB more RAM this variant failed most runs: the
/// destination guest crashed, or its receive queue waited on misses for
/// I/O addresses the destination's I/O page tables did not map (QEMU:
/// "detected translation failure"), stale guest memory from QEMU 7.2's
/// TCG dirty tracking (see the module's doc). With it, 10 runs of 10
/// delivered the stream intact (22-26 s, downtime 9-13 ms), and the
/// `nolog` build failed it as it fails the test above (2 runs of 2: 19 and
/// 20 held records out of order, 17 and 18 malformed).
///
/// What QEMU still prints, and why it is harmless: on the source, tens of
/// "Unexpected IOTLB message when virtio device is stopped" (0 to 30 a
/// run): misses the device sent in the last moments before QEMU stopped
/// its rings (with debug logging, none was sent between the stop's first
/// message and GET_VRING_BASE's reply), which QEMU 7.2 read from the
/// backend channel only after `vhost_dev_stop` had cleared the device, and
/// dropped (no reply is asked for, so nothing waits on them).
///
/// Up to 96e0ca8 QEMU also printed a translation failure on either side
/// each run (and "New fault is not recorded due to compression of
/// faults": the guest's IOMMU recorded more DMA faults): a miss asked
/// again for a page the driver had used and unmapped meanwhile. The
/// worker counted an ask for 5 ms and forgot every ask on any unmap,
/// while QEMU took longer to answer a batch of look-ahead misses; with
/// `RUST_LOG=debug`, 27 825 of 47 890 misses were asked again while the
/// first ask was unanswered. Now an ask counts for 100 ms and only an
/// unmap that overlaps its page forgets it: 11 of 32 480, and no
/// translation failure on either side (one run each, `IOASIS_KEEP_LOGS=1
/// RUST_LOG=debug`, `scripts/iotlb-asks.py` on the daemon's log; the count:
/// misses sent, `IOTLB Update`/`Invalidate` lines, a page asked again
/// before an update or an invalidation covered it).
#[test]
fn test_guest_migrates_under_traffic_strict_iommu() {
    migrate_under_traffic(
        "test_guest_migrates_under_traffic_strict_iommu",
        IommuMode::Strict,
    );
}

/// A migration cancelled while RAM is being copied: the source's device
/// keeps serving (logging stops) and the stream goes on there intact.
#[test]
fn test_cancelled_migration_leaves_source_running() {
    let test = "test_cancelled_migration_leaves_source_running";
    let Some(_) = ready(test, need_qemu_and_vdpa_net().and_then(|_| Netns::new())) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let mut rig = rig(test);
    let (mut src, mut dst, mut src_qmp, _dst_qmp) = start_pair(&rig, IommuMode::Off);
    let sender = Sender::start(&rig.ns, GUEST_IP, PPS, rig.dir.path()).or_panic("sender");
    std::thread::sleep(FLOW);
    // 8 MiB/s: 256 MiB of RAM take half a minute, time to cancel.
    migrate(&rig, &mut src_qmp, 8 << 20, DOWNTIME_MS);
    src_qmp
        .wait_migration(MIGRATION_TIMEOUT, |st| {
            st.status == "active" && st.transferred.unwrap_or(0) > 4 << 20
        })
        .or_panic("migration under way");
    src_qmp
        .execute("migrate_cancel", None)
        .or_panic("migrate_cancel");
    let st = src_qmp
        .wait_migration(MIGRATION_TIMEOUT, finished)
        .or_panic("cancellation");
    assert_eq!(st.status, "cancelled", "{:?}", st.raw);
    dst.kill();
    std::thread::sleep(FLOW);
    let sent = sender.finish().or_panic("sender end");
    verdict(&mut src, sent);
    let last = rig.stop_backend();
    let c = rig.vdpa().device_counters(&last, &rig.dir.join("src.sock"));
    assert!(c.tx_packets > 0, "{last}");
}

/// One migration under the stream with the backend `net_vhost` picks (the
/// guest keeps no memory dirty on purpose: QUIET first), checked like the
/// tests; QEMU's downtime, total time (ms) and bytes transferred.
fn measured_migration(test: &str, net_vhost: bool) -> (u64, u64, u64) {
    let mut rig = if net_vhost {
        net_vhost_rig(test)
    } else {
        rig(test)
    };
    let (mut src, mut dst, mut src_qmp, _dst_qmp) = start_pair(&rig, IommuMode::Off);
    control(&rig.ns, GUEST_IP, "QUIET", rig.dir.path()).or_panic("QUIET");
    src.wait_marker("QUIET", SETUP_TIMEOUT)
        .or_panic("the guest stops dirtying its memory");
    let sender = Sender::start(&rig.ns, GUEST_IP, PPS, rig.dir.path()).or_panic("sender");
    std::thread::sleep(FLOW);
    migrate(&rig, &mut src_qmp, BANDWIDTH, DOWNTIME_MS);
    let st = src_qmp
        .wait_migration(MIGRATION_TIMEOUT, finished)
        .or_panic("migration");
    assert_eq!(st.status, "completed", "{:?}", st.raw);
    src.kill();
    std::thread::sleep(FLOW);
    let sent = sender.finish().or_panic("sender end");
    verdict(&mut dst, sent);
    rig.stop_backend();
    (
        st.downtime_ms.unwrap_or(0),
        st.total_ms.unwrap_or(0),
        st.transferred.unwrap_or(0),
    )
}

/// Migration downtime and total time as QEMU reports them, with vdpa-net
/// and with DPDK's net_vhost (testpmd, io forwarding to net_tap ports on
/// the same bridge) as the backend of the same guests under the same
/// stream: 3000 records/s of 1400 bytes, 32 MiB/s, downtime limit 300 ms,
/// `IOASIS_MIGRATION_ROUNDS` rounds (default 3), the two backends
/// alternated, first one then the other. A measurement, so ignored: run it
/// under `flock /work/wt/bench.lock`, with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_migration_downtime_vdpa_net_vs_net_vhost() {
    let test = "bench_migration_downtime_vdpa_net_vs_net_vhost";
    let Some(_) = ready(
        test,
        need_qemu_and_vdpa_net()
            .and_then(|_| require_testpmd())
            .and_then(|_| Netns::new()),
    ) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let rounds: usize = std::env::var("IOASIS_MIGRATION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut figures: [Vec<(u64, u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for net_vhost in order {
            let name = if net_vhost { "net_vhost" } else { "vdpa-net" };
            let f = measured_migration(&format!("{test}-{name}"), net_vhost);
            eprintln!(
                "[{test}] round {round} {name}: downtime {} ms, total {} ms, {} bytes",
                f.0, f.1, f.2
            );
            figures[usize::from(net_vhost)].push(f);
        }
    }
    for (i, name) in ["vdpa-net", "net_vhost"].iter().enumerate() {
        let median = |pick: fn(&(u64, u64, u64)) -> u64| {
            ioasis_integration::testpmd::median(figures[i].iter().map(pick).collect())
        };
        eprintln!(
            "[{test}] {name}: median downtime {} ms, total {} ms, {} bytes over {rounds} rounds",
            median(|f| f.0),
            median(|f| f.1),
            median(|f| f.2)
        );
    }
}
