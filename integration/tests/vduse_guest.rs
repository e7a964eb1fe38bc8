//! The workspace's daemons serving VDUSE devices inside a guest whose
//! kernel has VDUSE (Debian's 6.12, unpacked by `scripts/setup.sh`; see
//! [`ioasis_integration::vduse_kit`]): the daemon runs in the guest,
//! creates the kernel's device, `vdpa dev add` puts it on the vDPA bus
//! where `virtio_vdpa` binds it, and the guest's own driver uses it.
//!
//! Each test boots one TCG guest (12-25 s) and checks several things in
//! it. The daemon and its shared libraries go into the guest's initramfs.

use ioasis_integration::bins::workspace_bin;
use ioasis_integration::blk_server::{BlkExport, BlkServer, BlkServerKind, Image};
use ioasis_integration::env::require_tool;
use ioasis_integration::guest::marker;
use ioasis_integration::guest_disk::{pattern, write_pattern_script, PATTERN_PATH};
use ioasis_integration::qemu::{Qemu, QemuConfig, GUEST_TIMEOUT};
use ioasis_integration::vduse_kit::{binary_files, kit, testpmd_files};
use ioasis_integration::vduse_testpmd::{parse_runs, Run, Side, GUEST_LIB};
use ioasis_integration::{heavy_lock, ready, OrPanic, Result, WorkDir};

/// Guest RAM: the kernel's bounce buffer of a VDUSE device is 64 MiB.
const GUEST_MB: u32 = 512;

/// Shell functions of the VDUSE scripts: start a daemon in the background
/// (`start_daemon NAME ARGS...`, log in `/tmp/NAME.log`), wait for a path
/// (`wait_for PATH`, up to 10 s), show the daemon's log and fail
/// (`fail_with MARKER`).
const VDUSE_LIB: &str = r#"
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -e "$1" ]
}
start_daemon() {
    n=$1; shift
    RUST_LOG=info "$@" >/tmp/$n.out 2>/tmp/$n.log &
    DPID=$!
}
fail_with() {
    echo "--- daemon log"; tail -n 30 /tmp/*.log
    mark "$1"; exit 1
}
"#;

/// The daemon binary, QEMU and the VDUSE kit.
fn need(package: &str) -> Result<std::path::PathBuf> {
    let bin = workspace_bin(package, package)?;
    require_tool("qemu-system-x86_64", "qemu-system-x86")?;
    kit()?;
    Ok(bin)
}

/// vdpa-blk serves a disk image of the guest's tmpfs as VDUSE device
/// `vblk0`; `vdpa dev add` binds it to `virtio_vdpa` and a `vda` appears.
/// The guest writes a pattern over the whole disk (O_DIRECT in 64 KiB and
/// 4 KiB requests, buffered with fsync), drops its caches and reads it
/// back (O_DIRECT and buffered), each compared with the pattern; then the
/// image file the daemon serves is compared with it too (`IMAGE_OK`).
/// After `vdpa dev del` the daemon exits on SIGTERM and destroys the
/// kernel's device (`/dev/vduse/vblk0` is gone: `DESTROYED`).
#[test]
fn test_vduse_blk_pattern_in_guest() {
    let test = "test_vduse_blk_pattern_in_guest";
    let Some(bin) = ready(test, need("vdpa-blk")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-blk").or_panic("workdir");
    let blocks = 1024;
    let script = format!(
        "{VDUSE_LIB}\
         dd if=/dev/zero of=/tmp/disk.img bs=4k count={blocks} 2>/dev/null\n\
         start_daemon vdpa-blk /bin/vdpa-blk --vduse vblk0 --image /tmp/disk.img\n\
         wait_for /dev/vduse/vblk0 || fail_with NO_VDUSE_DEVICE\n\
         mark VDUSE_DEVICE\n\
         timeout 60 vdpa dev add name vblk0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         mark VDPA_ADDED\n\
         wait_for /sys/block/vda || fail_with NO_DISK\n\
         drv=$(basename \"$(readlink /sys/bus/vdpa/devices/vblk0/driver)\")\n\
         mark \"VDPA_DRIVER $drv\"\n\
         {rw}\
         same \"$(sum_of < /tmp/disk.img)\" \"$want\" || fail_with IMAGE_BAD\n\
         mark IMAGE_OK\n\
         vdpa dev del vblk0 || fail_with VDPA_DEL_FAILED\n\
         kill $DPID; wait $DPID; echo \"daemon exit $?\"\n\
         [ -e /dev/vduse/vblk0 ] || mark DESTROYED\n\
         tail -n 5 /tmp/vdpa-blk.log\n",
        rw = write_pattern_script("vda", blocks, 0),
    );
    let cfg =
        daemon_guest("vduse-blk", &script, &bin, "vdpa-blk").file(PATTERN_PATH, pattern(blocks));
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .expect_marker("IMAGE_OK", "IMAGE_BAD", GUEST_TIMEOUT)
        .or_panic("the pattern through VDUSE");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    assert!(
        console.contains(&marker("VDPA_DRIVER virtio_vdpa")),
        "the vDPA device is bound to virtio_vdpa:\n{console}"
    );
    assert!(console.contains(&marker("RW_OK")), "{console}");
    assert!(
        console.contains(&marker("DESTROYED")),
        "the daemon destroyed its device on exit:\n{console}"
    );
}

/// Sectors of the resize test's disk before and after it grows (4 MiB to
/// 8 MiB).
const RESIZE_BEFORE: u64 = 8192;
const RESIZE_AFTER: u64 = 16384;

/// A disk resized under the daemon reaches the guest as a config change:
/// vdpa-blk serves a 4 MiB image as VDUSE device `vblk0`, the guest's
/// `vda` has 8192 sectors (`/sys/block/vda/size`); the image is grown to
/// 8 MiB with `truncate -s` and the daemon sent SIGHUP, which makes it
/// read the size again, update its config space, give the kernel the new
/// copy (`VDUSE_DEV_SET_CONFIG`) and inject a config interrupt
/// (`VDUSE_DEV_INJECT_CONFIG_IRQ`): within 10 s `vda` has 16384 sectors
/// (`RESIZE_SEEN`), and a block past the old end reads and writes through
/// the disk into the image (`TAIL_OK`).
///
/// Shown to fail without the interrupt: with vdpa-blk built with
/// `RUSTFLAGS='--cfg ioasis_broken="noconfigirq"'` (the kernel's copy is
/// updated, no interrupt injected) and given to the test as
/// `IOASIS_VDPA_BLK_BIN`, `vda` keeps 8192 sectors (`SIZE_NOT_SEEN`).
#[test]
fn test_vduse_blk_resize_in_guest() {
    let test = "test_vduse_blk_resize_in_guest";
    let Some(bin) = ready(test, need("vdpa-blk")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-blk-resize").or_panic("workdir");
    let script = format!(
        "{VDUSE_LIB}\
         truncate -s {before_bytes} /tmp/disk.img\n\
         start_daemon vdpa-blk /bin/vdpa-blk --vduse vblk0 --image /tmp/disk.img\n\
         wait_for /dev/vduse/vblk0 || fail_with NO_VDUSE_DEVICE\n\
         timeout 60 vdpa dev add name vblk0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         wait_for /sys/block/vda || fail_with NO_DISK\n\
         mark \"SIZE_BEFORE $(cat /sys/block/vda/size)\"\n\
         [ \"$(cat /sys/block/vda/size)\" = {before} ] || fail_with SIZE_WRONG\n\
         truncate -s {after_bytes} /tmp/disk.img\n\
         kill -HUP $DPID\n\
         i=0\n\
         while [ \"$(cat /sys/block/vda/size)\" != {after} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
         mark \"SIZE_AFTER $(cat /sys/block/vda/size)\"\n\
         grep -e SIGHUP -e driver /tmp/vdpa-blk.log\n\
         [ \"$(cat /sys/block/vda/size)\" = {after} ] || fail_with SIZE_NOT_SEEN\n\
         mark RESIZE_SEEN\n\
         kill -0 $DPID || fail_with DAEMON_GONE\n\
         echo tail-of-the-grown-disk > /tmp/tail\n\
         dd if=/tmp/tail of=/dev/vda bs=4k seek={tail_block} count=1 conv=notrunc,sync,fsync 2>/dev/null || fail_with TAIL_WRITE\n\
         sync; echo 3 > /proc/sys/vm/drop_caches\n\
         dd if=/dev/vda bs=4k skip={tail_block} count=1 iflag=direct 2>/dev/null | grep -q tail-of-the-grown-disk || fail_with TAIL_READ\n\
         dd if=/tmp/disk.img bs=4k skip={tail_block} count=1 2>/dev/null | grep -q tail-of-the-grown-disk || fail_with TAIL_IMAGE\n\
         mark TAIL_OK\n\
         vdpa dev del vblk0 || fail_with VDPA_DEL_FAILED\n\
         kill $DPID; wait $DPID; echo \"daemon exit $?\"\n",
        before = RESIZE_BEFORE,
        after = RESIZE_AFTER,
        before_bytes = RESIZE_BEFORE * 512,
        after_bytes = RESIZE_AFTER * 512,
        // A 4 KiB block in the grown half.
        tail_block = RESIZE_AFTER * 512 / 4096 - 3,
    );
    let cfg = daemon_guest("vduse-resize", &script, &bin, "vdpa-blk");
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .expect_marker("RESIZE_SEEN", "SIZE_NOT_SEEN", GUEST_TIMEOUT)
        .or_panic("the guest sees the disk grow");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    for l in console
        .lines()
        .filter(|l| l.contains("SIZE_") || l.contains("SIGHUP") || l.contains("driver"))
    {
        eprintln!("guest: {l}");
    }
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    assert!(
        console.contains(&marker(&format!("SIZE_BEFORE {RESIZE_BEFORE}"))),
        "{console}"
    );
    assert!(
        console.contains(&marker("TAIL_OK")),
        "I/O past the old end goes through:\n{console}"
    );
}

/// vdpa-net serves a VDUSE net device `vnet0` whose port is a tap of the
/// guest (`vtap0`, moved into a network namespace `peer`); `vdpa dev add`
/// binds it to `virtio_vdpa` and a virtio-net interface appears (without
/// a control queue, which the kernel refuses over VDUSE). The guest pings
/// the namespace's address through it, then fetches 4 MiB over HTTP from
/// the namespace (busybox `httpd` and `wget`: the device's receive path)
/// and serves the same 4 MiB to it (its transmit path), each compared
/// with the file by sha256 (`BULK_OK`). After `vdpa dev del` the daemon
/// exits on SIGTERM and destroys its device (`DESTROYED`).
#[test]
fn test_vduse_net_traffic_in_guest() {
    let test = "test_vduse_net_traffic_in_guest";
    let Some(bin) = ready(test, need("vdpa-net")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-net").or_panic("workdir");
    let script = format!(
        "{VDUSE_LIB}\
         start_daemon vdpa-net /bin/vdpa-net --vduse vnet0 --port tap=vtap0\n\
         wait_for /dev/vduse/vnet0 || fail_with NO_VDUSE_DEVICE\n\
         wait_for /sys/class/net/vtap0 || fail_with NO_TAP\n\
         mark VDUSE_DEVICE\n\
         timeout 60 vdpa dev add name vnet0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         i=0; while ! IF=$(virtio_if) && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
         [ -n \"$IF\" ] || fail_with NO_NETDEV\n\
         drv=$(basename \"$(readlink /sys/bus/vdpa/devices/vnet0/driver)\")\n\
         mark \"VDPA_DRIVER $drv\"\n\
         IP=/usr/bin/ip.iproute2\n\
         $IP netns add peer || fail_with NETNS\n\
         $IP link set vtap0 netns peer || fail_with NETNS\n\
         $IP -n peer addr add 10.77.0.2/24 dev vtap0 && $IP -n peer link set vtap0 up && $IP -n peer link set lo up || fail_with NETNS\n\
         net_up \"$IF\" 10.77.0.1/24 || fail_with LINK_DOWN\n\
         try_ping 5 30 10.77.0.2 || fail_with NO_PING\n\
         want=$(sha256sum < {BULK} | cut -d' ' -f1)\n\
         $IP netns exec peer httpd -f -p 10.77.0.2:8080 -h /data &\n\
         H=$!; sleep 1\n\
         timeout 60 wget -q -O /tmp/in http://10.77.0.2:8080/bulk; kill $H\n\
         got=$(sha256sum < /tmp/in | cut -d' ' -f1)\n\
         [ \"$got\" = \"$want\" ] || {{ ls -l /tmp/in; fail_with BULK_IN_BAD; }}\n\
         httpd -f -p 10.77.0.1:8080 -h /data &\n\
         H=$!; sleep 1\n\
         timeout 60 $IP netns exec peer wget -q -O /tmp/out http://10.77.0.1:8080/bulk; kill $H\n\
         got=$(sha256sum < /tmp/out | cut -d' ' -f1)\n\
         [ \"$got\" = \"$want\" ] || {{ ls -l /tmp/out; fail_with BULK_OUT_BAD; }}\n\
         mark BULK_OK\n\
         vdpa dev del vnet0 || fail_with VDPA_DEL_FAILED\n\
         kill $DPID; wait $DPID; echo \"daemon exit $?\"\n\
         [ -e /dev/vduse/vnet0 ] || mark DESTROYED\n\
         tail -n 5 /tmp/vdpa-net.log\n",
        BULK = BULK_PATH,
    );
    let cfg = daemon_guest("vduse-net", &script, &bin, "vdpa-net").file(BULK_PATH, pattern(1024));
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .wait_marker("BULK_OK", GUEST_TIMEOUT)
        .or_panic("traffic through VDUSE");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    assert!(
        console.contains(&marker("VDPA_DRIVER virtio_vdpa")),
        "the vDPA device is bound to virtio_vdpa:\n{console}"
    );
    assert!(console.contains(&marker("PING_OK 10.77.0.2")), "{console}");
    assert!(
        console.contains(&marker("DESTROYED")),
        "the daemon destroyed its device on exit:\n{console}"
    );
}

/// The data of the bulk transfers in the guest.
const BULK_PATH: &str = "/data/bulk";

/// vdpa-net, which keeps no inflight record, killed with SIGKILL and
/// started again with the same name while its VDUSE device is running
/// under the guest's virtio-net: the new daemon takes the device over and
/// resumes each queue at its used index (Linux 6.12 keeps the avail index
/// the driver started the queue at, not the old daemon's, so the device's
/// position is read from the ring). Before the kill the guest pings the
/// namespace and fetches 4 MiB from it (the rings well past their start);
/// after the restart (a new `vtap0`, the old one went with the killed
/// daemon; both given the same MAC, so that the guest's neighbour entry
/// stays right) it pings again and fetches the 4 MiB again, checked by sha256
/// (`NET_RESTART_OK`), and the guest's kernel reports no broken ring.
///
/// Shown to fail when the queues resume at the kernel's avail index: with
/// vdpa-net built with `RUSTFLAGS='--cfg ioasis_broken="vduseavail"'` and
/// given to the test as `IOASIS_VDPA_NET_BIN`, no ping gets through after
/// the restart (`NO_PING_AFTER`: the daemon pops the transmit ring again
/// from its start, stale chains, and its receive queue fails).
#[test]
fn test_vduse_net_daemon_restart_in_guest() {
    let test = "test_vduse_net_daemon_restart_in_guest";
    let Some(bin) = ready(test, need("vdpa-net")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-net-restart").or_panic("workdir");
    let script = format!(
        "{VDUSE_LIB}\
         IP=/usr/bin/ip.iproute2\n\
         peer_up() {{\n\
         \x20   wait_for /sys/class/net/vtap0 || fail_with NO_TAP\n\
         \x20   $IP link set vtap0 netns peer || fail_with NETNS\n\
         \x20   $IP -n peer link set vtap0 address 02:00:00:00:77:02 || fail_with NETNS\n\
         \x20   $IP -n peer addr add 10.77.0.2/24 dev vtap0 && $IP -n peer link set vtap0 up || fail_with NETNS\n\
         }}\n\
         fetch() {{\n\
         \x20   $IP netns exec peer httpd -f -p 10.77.0.2:8080 -h /data &\n\
         \x20   H=$!; sleep 1\n\
         \x20   rm -f /tmp/in; timeout 60 wget -q -O /tmp/in http://10.77.0.2:8080/bulk; kill $H\n\
         \x20   [ \"$(sha256sum < /tmp/in | cut -d' ' -f1)\" = \"$want\" ] || {{ ls -l /tmp/in; dmesg | tail -n 20; fail_with \"$1\"; }}\n\
         }}\n\
         want=$(sha256sum < {BULK} | cut -d' ' -f1)\n\
         $IP netns add peer && $IP -n peer link set lo up || fail_with NETNS\n\
         start_daemon vdpa-net /bin/vdpa-net --vduse vnet0 --port tap=vtap0\n\
         wait_for /dev/vduse/vnet0 || fail_with NO_VDUSE_DEVICE\n\
         peer_up\n\
         timeout 60 vdpa dev add name vnet0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         i=0; while ! IF=$(virtio_if) && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
         [ -n \"$IF\" ] || fail_with NO_NETDEV\n\
         net_up \"$IF\" 10.77.0.1/24 || fail_with LINK_DOWN\n\
         try_ping 5 30 10.77.0.2 || fail_with NO_PING\n\
         fetch BULK_BEFORE_BAD\n\
         kill -9 $DPID; wait $DPID 2>/dev/null\n\
         sleep 1\n\
         start_daemon vdpa-net2 /bin/vdpa-net --vduse vnet0 --port tap=vtap0\n\
         peer_up\n\
         grep -o 'resum.*' /tmp/vdpa-net2.log | head -n 4\n\
         try_ping 5 30 10.77.0.2 || {{ dmesg | tail -n 20; fail_with NO_PING_AFTER; }}\n\
         fetch BULK_AFTER_BAD\n\
         dmesg | grep -i 'virtio\\|vduse' | grep -i 'bad\\|broken\\|not a head\\|error' && fail_with RING_BROKEN\n\
         mark NET_RESTART_OK\n\
         vdpa dev del vnet0\n\
         kill $DPID; wait $DPID\n\
         tail -n 5 /tmp/vdpa-net2.log\n",
        BULK = BULK_PATH,
    );
    let cfg =
        daemon_guest("vduse-net-restart", &script, &bin, "vdpa-net").file(BULK_PATH, pattern(1024));
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .wait_marker("NET_RESTART_OK", GUEST_TIMEOUT * 2)
        .or_panic("traffic across a daemon restart");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    for l in console.lines().filter(|l| l.contains("resum")) {
        eprintln!("guest: {l}");
    }
}

/// Milliseconds each request of the restart test's disk takes (`null_blk`
/// in timer mode): long enough that, whenever the daemon is killed, the
/// readers' requests are almost surely inside it.
const SLOW_DISK_MS: u32 = 50;

/// vdpa-blk killed with SIGKILL while requests are in flight inside it,
/// and started again with the same name. The disk it serves is the
/// guest's `null_blk` (memory-backed, every request completing 50 ms after
/// it was submitted, readahead off), holding a pattern; four readers of
/// the guest read it back through the VDUSE disk (O_DIRECT, 4 KiB
/// requests, one outstanding each), so the daemon nearly always holds
/// requests it popped and not completed (in 6 runs 1 to 4 were
/// resubmitted, 4 in five of them). Reads, not writes: over VDUSE vdpa-blk does buffered I/O
/// (O_DIRECT on the kernel's bounce buffer fails with EFAULT, see
/// vdpa-blk's worker), and a buffered write completes at once into the
/// page cache. The restarted daemon takes the kernel's device over (the
/// driver still has it running), resubmits from its inflight record what
/// the killed one had in flight (its log says how many: the test requires
/// at least one, `IN_FLIGHT_AT_KILL`, else it showed nothing), and every
/// read completes with the pattern's data (`RESTART_OK`).
///
/// Shown to fail when what was in flight is not done again: with vdpa-blk
/// built with `RUSTFLAGS='--cfg ioasis_broken="dropinflight"'` (the ring
/// resumes after the requests in flight without resubmitting them) and
/// given to the test as `IOASIS_VDPA_BLK_BIN`, the reads in flight at the
/// kill never complete and the test fails with `READS_LOST`. The
/// `noresubmit` build resubmits nothing but rewinds the ring to the used
/// index, which pops the same requests again (they completed in order):
/// every read completes, and the test fails only because the log says 0
/// resubmitted (no `IN_FLIGHT_AT_KILL`).
#[test]
fn test_vduse_blk_daemon_restart_in_guest() {
    let test = "test_vduse_blk_daemon_restart_in_guest";
    let Some(bin) = ready(test, need("vdpa-blk")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-blk-restart").or_panic("workdir");
    let blocks = 1024;
    let script = format!(
        "{VDUSE_LIB}\
         P={PATTERN_PATH}\n\
         load_module null_blk memory_backed=1 gb=1 bs=4096 irqmode=2 completion_nsec={nsec} || fail_with NO_NULL_BLK\n\
         wait_for /dev/nullb0 || fail_with NO_NULL_BLK\n\
         dd if=$P of=/dev/nullb0 bs=64k oflag=direct 2>/dev/null || fail_with NO_NULL_BLK\n\
         blockdev --setra 0 /dev/nullb0\n\
         start_daemon vdpa-blk /bin/vdpa-blk --vduse vblk0 --image /dev/nullb0\n\
         wait_for /dev/vduse/vblk0 || fail_with NO_VDUSE_DEVICE\n\
         timeout 60 vdpa dev add name vblk0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         wait_for /sys/block/vda || fail_with NO_DISK\n\
         sync; echo 3 > /proc/sys/vm/drop_caches\n\
         for q in 0 1 2 3; do\n\
         \x20   ( dd if=/dev/vda of=/tmp/part$q bs=4k skip=$((q * {quarter})) count={quarter} iflag=direct 2>/tmp/dd$q.err; echo $? > /tmp/dd$q.rc ) &\n\
         done\n\
         sleep 1\n\
         [ ! -e /tmp/dd0.rc ] && [ ! -e /tmp/dd3.rc ] && mark KILLED_MIDWAY\n\
         echo \"nullb0 in flight (reads writes): $(cat /sys/block/nullb0/inflight)\"\n\
         kill -9 $DPID; wait $DPID 2>/dev/null\n\
         grep -o 'O_DIRECT failed with EFAULT.*' /tmp/vdpa-blk.log | head -n 1\n\
         sleep 1\n\
         start_daemon vdpa-blk2 /bin/vdpa-blk --vduse vblk0 --image /dev/nullb0\n\
         for q in 0 1 2 3; do\n\
         \x20   i=0; while [ ! -e /tmp/dd$q.rc ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\n\
         \x20   [ \"$(cat /tmp/dd$q.rc 2>/dev/null)\" = 0 ] || {{ cat /tmp/dd$q.err; fail_with READS_LOST; }}\n\
         done\n\
         mark READS_DONE\n\
         grep -o 'inflight region: [0-9]* request.*' /tmp/vdpa-blk2.log\n\
         n=$(grep -o 'inflight region: [0-9]*' /tmp/vdpa-blk2.log | awk '{{s += $3}} END {{print s + 0}}')\n\
         mark \"RESUBMITTED $n\"\n\
         [ \"$n\" -gt 0 ] && mark IN_FLIGHT_AT_KILL\n\
         want=$(sha256sum < $P | cut -d' ' -f1)\n\
         got=$(cat /tmp/part0 /tmp/part1 /tmp/part2 /tmp/part3 | sha256sum | cut -d' ' -f1)\n\
         [ \"$got\" = \"$want\" ] || fail_with READ_BACK_BAD\n\
         mark RESTART_OK\n\
         vdpa dev del vblk0\n\
         kill $DPID; wait $DPID\n\
         tail -n 5 /tmp/vdpa-blk2.log\n",
        quarter = blocks / 4,
        nsec = u64::from(SLOW_DISK_MS) * 1_000_000,
    );
    let cfg = daemon_guest("vduse-restart", &script, &bin, "vdpa-blk")
        .file(PATTERN_PATH, pattern(blocks));
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .expect_marker("READS_DONE", "READS_LOST", GUEST_TIMEOUT * 2)
        .or_panic("every read completes across a daemon restart");
    guest
        .wait_marker("RESTART_OK", GUEST_TIMEOUT)
        .or_panic("the right data across a daemon restart");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    assert!(
        console.contains(&marker("KILLED_MIDWAY")),
        "the daemon was killed while the guest read (else the test shows nothing):\n{console}"
    );
    for l in console.lines().filter(|l| {
        [
            "RESUBMITTED",
            "inflight region",
            "nullb0 in flight",
            "EFAULT",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        eprintln!("guest: {l}");
    }
    assert!(
        console.contains(&marker("IN_FLIGHT_AT_KILL")),
        "requests were in flight inside the daemon at the kill (its successor resubmitted some), else the test shows nothing:\n{console}"
    );
}

/// Bytes each timed read moves (2048 requests of 64 KiB).
const BENCH_BYTES: u64 = 128 << 20;
/// Rounds of the comparison (each reads both disks, the order alternating).
const BENCH_ROUNDS: usize = 5;

/// The same guest reads the same kind of disk through both transports:
/// `vda` is a vhost-user-blk disk of QEMU served by vdpa-blk on the host,
/// `vdb` a VDUSE disk served by vdpa-blk inside the guest; each round
/// reads 128 MiB from each with `dd bs=64k iflag=direct` (the order
/// alternating), timed with `/proc/uptime`. Every read must move all its
/// 2048 requests. Prints the medians and ranges in MB/s and the ratio
/// VDUSE / vhost-user. Under TCG the VDUSE daemon runs on the emulated
/// CPU and the vhost-user one natively on the host, so the ratio measures
/// the emulation more than the transport.
/// `cargo test -p ioasis-integration --test vduse_guest -- --ignored --nocapture bench`
#[test]
#[ignore = "a measurement: run it alone, under the bench lock"]
fn test_vduse_blk_bench_against_vhost_user() {
    let test = "test_vduse_blk_bench_against_vhost_user";
    let Some(bin) = ready(test, need("vdpa-blk")) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-bench").or_panic("workdir");
    let img = dir.join("host.img");
    if let Err(e) = std::fs::write(&img, vec![0u8; BENCH_BYTES as usize]) {
        panic!("host image: {e}");
    }
    let sock = dir.join("host.sock");
    let mut host = BlkServer::spawn(
        &BlkServerKind::VdpaBlk(bin.clone()),
        &BlkExport::new(&sock, Image::File(img)),
        dir.path(),
        "host-blk",
    )
    .or_panic("host vdpa-blk");
    let count = BENCH_BYTES / 65536;
    let script = format!(
        "{VDUSE_LIB}\
         dd if=/dev/zero of=/tmp/disk.img bs=1M count={mb} 2>/dev/null\n\
         start_daemon vdpa-blk /bin/vdpa-blk --vduse vblk0 --image /tmp/disk.img\n\
         wait_for /dev/vduse/vblk0 || fail_with NO_VDUSE_DEVICE\n\
         timeout 60 vdpa dev add name vblk0 mgmtdev vduse || fail_with VDPA_ADD_FAILED\n\
         wait_for /sys/block/vdb || fail_with NO_DISK\n\
         t() {{\n\
         \x20   s=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   n=$(dd if=/dev/$1 of=/dev/null bs=64k count={count} iflag=direct 2>&1 | grep -c '^{count}+0 records in')\n\
         \x20   e=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   mark \"BENCH $1 $s $e $n\"\n\
         }}\n\
         for r in 1 2 3 4 5; do\n\
         \x20   if [ $((r % 2)) = 1 ]; then t vda; t vdb; else t vdb; t vda; fi\n\
         done\n\
         mark BENCH_DONE\n",
        mb = BENCH_BYTES >> 20,
    );
    let cfg = daemon_guest("vduse-bench", &script, &bin, "vdpa-blk")
        .mem_mb(GUEST_MB + 256)
        .blkdev(&sock, 1);
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .wait_marker("BENCH_DONE", GUEST_TIMEOUT * 3)
        .or_panic("the comparison");
    let console = guest.console_text();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for l in console.lines() {
        let Some(rest) = l.split("@@IOASIS:BENCH ").nth(1) else {
            continue;
        };
        let f: Vec<&str> = rest.trim_end_matches("@@").split(' ').collect();
        let [disk, s, e, n] = f[..] else { continue };
        assert_eq!(n, "1", "every read moved its {count} requests: {l}");
        let (Ok(s), Ok(e)) = (s.parse::<f64>(), e.parse::<f64>()) else {
            panic!("bad timestamps: {l}");
        };
        let secs = e - s;
        let side = usize::from(disk == "vdb");
        rates[side].push(BENCH_BYTES as f64 / 1e6 / secs.max(0.01));
    }
    assert!(
        rates.iter().all(|r| r.len() == BENCH_ROUNDS),
        "{BENCH_ROUNDS} reads of each disk: {rates:?}\n{console}"
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [mut vu, mut vd] = rates;
    let (mu, md) = (median(&mut vu), median(&mut vd));
    eprintln!(
        "vhost-user (host daemon): median {mu:.1} MB/s, range {:.1}-{:.1}; VDUSE (guest daemon): median {md:.1} MB/s, range {:.1}-{:.1}; VDUSE / vhost-user = {:.2}",
        vu[0],
        vu[vu.len() - 1],
        vd[0],
        vd[vd.len() - 1],
        md / mu
    );
    drop(guest);
    host.stop(std::time::Duration::from_secs(10));
}

/// A guest of the VDUSE kit ([`GUEST_MB`] of RAM) that runs `script` with
/// `daemon` (`vdpa-blk` or `vdpa-net`, the build at `bin`) and its shared
/// libraries in its initramfs.
fn daemon_guest(name: &str, script: &str, bin: &std::path::Path, daemon: &str) -> QemuConfig {
    let mut cfg = QemuConfig::new(name, script)
        .kit(kit().or_panic("kit"))
        .mem_mb(GUEST_MB);
    for (path, data) in binary_files(bin, daemon).or_panic("daemon files") {
        cfg = cfg.file(&path, data);
    }
    cfg
}

/// A guest that runs DPDK testpmd against vdpa-net: 2 vCPUs (testpmd on
/// vCPU 0, the daemons on vCPU 1), QEMU's `max` vCPU model (Debian's DPDK
/// needs SSE4.2), RAM for testpmd's 256 MiB, the daemon, testpmd and its
/// drivers in the initramfs. `script` runs after the daemons are up.
fn testpmd_guest(name: &str, bin: &std::path::Path, runs: &str) -> QemuConfig {
    let script = format!("{VDUSE_LIB}{GUEST_LIB}start_sides\n{runs}mark TESTPMD_DONE\n");
    let mut cfg = QemuConfig::new(name, &script)
        .kit(kit().or_panic("kit"))
        .mem_mb(1024)
        .smp(2)
        .cpu("max");
    let mut seen = std::collections::HashSet::new();
    let files = binary_files(bin, "vdpa-net").or_panic("daemon files");
    for (path, data) in files
        .into_iter()
        .chain(testpmd_files().or_panic("testpmd files"))
    {
        if seen.insert(path.clone()) {
            cfg = cfg.file(&path, data);
        }
    }
    cfg
}

/// vdpa-net, testpmd and the VDUSE kit.
fn need_testpmd() -> Result<std::path::PathBuf> {
    let bin = need("vdpa-net")?;
    testpmd_files()?;
    Ok(bin)
}

/// The VDUSE device bound to the kernel's `vhost_vdpa` instead of
/// `virtio_vdpa`, driven from userspace: vdpa-net serves `vnet0` with a
/// `sink` port, the test binds it to `vhost_vdpa` and DPDK testpmd in the
/// guest sends into it for 2 s through a `virtio_user` port on
/// `/dev/vhost-vdpa-0` (txonly). testpmd's memory reaches the daemon
/// through `vhost_vdpa`'s IOTLB updates (`VDUSE_IOTLB_GET_FD` on its
/// memfd), not the kernel's bounce buffer. Every packet testpmd sent must
/// be counted by the sink (else the test fails with the number lost;
/// the check is `parse_runs`', whose unit test shows it failing).
#[test]
fn test_vduse_net_vhost_vdpa_testpmd_in_guest() {
    let test = "test_vduse_net_vhost_vdpa_testpmd_in_guest";
    let Some(bin) = ready(test, need_testpmd()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vduse-vhost-vdpa").or_panic("workdir");
    let cfg = testpmd_guest("vduse-vhost-vdpa", &bin, &Side::Vduse.run_line(2));
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .wait_marker("TESTPMD_DONE", GUEST_TIMEOUT * 2)
        .or_panic("testpmd through vhost_vdpa");
    let rc = guest.wait_end(GUEST_TIMEOUT).or_panic("guest end");
    let console = guest.console_text();
    assert_eq!(rc, 0, "guest script failed:\n{console}");
    assert!(
        console.contains(&marker("VDPA_DRIVER vhost_vdpa")),
        "the vDPA device is bound to vhost_vdpa:\n{console}"
    );
    let runs = parse_runs(&console).unwrap_or_else(|e| panic!("{e}\n{console}"));
    assert_eq!(runs.len(), 1, "{console}");
    eprintln!(
        "vhost_vdpa: {} packets in {:.2} s ({:.0} packets/s), all counted by the sink",
        runs[0].packets,
        runs[0].secs,
        runs[0].pps()
    );
}

/// Rounds of the testpmd comparison: each runs both sides once, the order
/// alternating (after one warm-up round that is checked but not counted).
const TESTPMD_ROUNDS: usize = 6;
/// Seconds testpmd sends in each run of the comparison.
const TESTPMD_SECS: u32 = 5;

/// The median of `v` (mean of the middle two for an even count) and the
/// range.
fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The fair comparison of the transports: the same guest, the same
/// frontend (DPDK testpmd's `virtio_user`, txonly, 64-byte frames, on
/// vCPU 0), the same daemon (vdpa-net with a `sink` port, on vCPU 1), once
/// over vhost-user (`/tmp/vu.sock`) and once over VDUSE bound to
/// `vhost_vdpa` (`/dev/vhost-vdpa-0`). A warm-up round, then rounds that
/// alternate the order; every run must have every packet counted by the
/// sink. Prints each run, the medians and ranges in packets per second,
/// the ratio of the medians and the median of the rounds' own ratios
/// (VDUSE / vhost-user; the two runs of a round are next to each other in
/// time, so a round's ratio suffers less from a machine whose load
/// changes), the commit and the load.
/// `cargo test -p ioasis-integration --test vduse_guest -- --ignored --nocapture testpmd_bench`
#[test]
#[ignore = "a measurement: run it alone, under the bench lock"]
fn test_vduse_net_testpmd_bench_against_vhost_user() {
    let test = "test_vduse_net_testpmd_bench_against_vhost_user";
    let Some(bin) = ready(test, need_testpmd()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let commit = ioasis_integration::bench_record::commit();
    let load = ioasis_integration::bench_record::loadavg();
    let dir = WorkDir::new("vduse-testpmd-bench").or_panic("workdir");
    let mut runs = String::new();
    for r in 0..=TESTPMD_ROUNDS {
        let (a, b) = if r % 2 == 0 {
            (Side::VhostUser, Side::Vduse)
        } else {
            (Side::Vduse, Side::VhostUser)
        };
        runs.push_str(&a.run_line(TESTPMD_SECS));
        runs.push_str(&b.run_line(TESTPMD_SECS));
    }
    let cfg = testpmd_guest("vduse-testpmd-bench", &bin, &runs);
    let mut guest = Qemu::launch(&cfg, dir.path()).or_panic("start QEMU");
    guest
        .wait_marker("TESTPMD_DONE", GUEST_TIMEOUT * 8)
        .or_panic("the comparison");
    let console = guest.console_text();
    let all = parse_runs(&console).unwrap_or_else(|e| panic!("{e}\n{console}"));
    assert_eq!(
        all.len(),
        2 * (TESTPMD_ROUNDS + 1),
        "two runs in each round:\n{console}"
    );
    for (i, r) in all.iter().enumerate() {
        eprintln!(
            "{} {}: {} packets in {:.2} s = {:.0} packets/s (all counted)",
            if i < 2 { "warm-up" } else { "run" },
            r.side.tag(),
            r.packets,
            r.secs,
            r.pps()
        );
    }
    let counted = &all[2..];
    let rate = |s: Side| -> Vec<f64> {
        counted
            .iter()
            .filter(|r| r.side == s)
            .map(Run::pps)
            .collect()
    };
    let ratios: Vec<f64> = counted
        .chunks(2)
        .map(|pair| {
            let vd = pair.iter().find(|r| r.side == Side::Vduse);
            let vu = pair.iter().find(|r| r.side == Side::VhostUser);
            match (vd, vu) {
                (Some(d), Some(u)) => d.pps() / u.pps(),
                _ => panic!("a round without both sides:\n{console}"),
            }
        })
        .collect();
    let (mu, lu, hu) = median_range(rate(Side::VhostUser));
    let (md, ld, hd) = median_range(rate(Side::Vduse));
    let (mr, lr, hr) = median_range(ratios);
    eprintln!(
        "commit {commit}, load {load} -> {}, {TESTPMD_ROUNDS} rounds of {TESTPMD_SECS} s\n\
         vhost-user (virtio_user on the socket): median {mu:.0} packets/s, range {lu:.0}-{hu:.0}\n\
         VDUSE (virtio_user on vhost_vdpa): median {md:.0} packets/s, range {ld:.0}-{hd:.0}\n\
         VDUSE / vhost-user: ratio of the medians {:.2}; rounds' ratios median {mr:.2}, range {lr:.2}-{hr:.2}",
        ioasis_integration::bench_record::loadavg(),
        md / mu
    );
}
