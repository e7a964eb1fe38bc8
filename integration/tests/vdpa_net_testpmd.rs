//! vdpa-net driven by DPDK testpmd's virtio_user frontend: every packet is
//! counted by the sink, the reflector returns traffic in both directions,
//! several devices are served by one process, a frontend can reconnect, and
//! frames reach a tap inside a network namespace.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{need_testpmd_and_vdpa_net, OrPanicOpt, STOP_TIMEOUT};
use ioasis_integration::netns::Netns;
use ioasis_integration::testpmd::{virtio_user_vdev, Testpmd, TestpmdConfig};
use ioasis_integration::vdpa_net::{counters, find_device, VdpaNet, VdpaNetConfig};
use ioasis_integration::{heavy_lock, ready, OrPanic, WorkDir};
use serde_json::Value;

const RUN: Duration = Duration::from_secs(4);
/// virtio_user's default queue size.
const RING_SIZE: u64 = 256;

fn txonly(name: &str, sock: &Path) -> TestpmdConfig {
    TestpmdConfig::frontend(name, sock, "txonly").duration(RUN)
}

#[test]
fn test_sink_counts_every_testpmd_packet() {
    let test = "test_sink_counts_every_testpmd_packet";
    let Some(_) = ready(test, need_testpmd_and_vdpa_net()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vdpa-sink").or_panic("workdir");
    let sock = dir.join("net.sock");
    let cfg = VdpaNetConfig::new().device(&sock, "sink").stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), None).or_panic("start vdpa-net");
    let mut front = Testpmd::spawn(&txonly("frontend", &sock), dir.path()).or_panic("testpmd");
    let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
    vdpa.check_running("the end of the testpmd run")
        .or_panic("vdpa-net survives a frontend leaving");
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let sent = f.port(0).or_panic_opt("testpmd port 0").tx_packets;
    let c = vdpa.device_counters(&last, &sock);
    assert!(sent > 0, "testpmd sent nothing:\n{}", f.log);
    eprintln!("testpmd sent {sent}; sink counted {}", c.rx_packets);
    assert_eq!(
        c.rx_packets, sent,
        "sink count differs from what testpmd sent; final stats {last}"
    );
    assert_eq!(c.rx_bytes, 64 * sent, "64-byte frames; final stats {last}");
    assert_eq!(c.errors, 0, "final stats {last}");
    let lines = vdpa.stats_lines().or_panic("stats lines are JSON");
    assert!(lines.len() >= 2, "periodic lines expected: {lines:?}");
    assert!(!sock.exists(), "socket left behind after SIGTERM");
}

#[test]
fn test_sink_counts_per_queue_with_two_queue_pairs() {
    let test = "test_sink_counts_per_queue_with_two_queue_pairs";
    let Some(_) = ready(test, need_testpmd_and_vdpa_net()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vdpa-sink-mq").or_panic("workdir");
    let sock = dir.join("net.sock");
    let cfg = VdpaNetConfig::new()
        .device(&sock, "sink")
        .queues(2)
        .stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), None).or_panic("start vdpa-net");
    let mut front =
        Testpmd::spawn(&txonly("frontend", &sock).queues(2), dir.path()).or_panic("testpmd");
    let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let sent = f.port(0).or_panic_opt("testpmd port 0").tx_packets;
    let dev = find_device(&last, &sock).unwrap_or(&last);
    assert_eq!(counters(dev).rx_packets, sent, "final stats {last}");
    let queues = find_array(dev, "queues").or_panic_opt("per-queue counters");
    let busy = queues.iter().filter(|q| counters(q).rx_packets > 0).count();
    assert_eq!(busy, 2, "testpmd sends on both queues; final stats {last}");
}

fn find_array<'a>(v: &'a Value, key: &str) -> Option<&'a Vec<Value>> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_array)
            .or_else(|| m.values().find_map(|c| find_array(c, key))),
        Value::Array(a) => a.iter().find_map(|c| find_array(c, key)),
        _ => None,
    }
}

fn reflect_loop(test: &str, fwd: &str) {
    let Some(_) = ready(test, need_testpmd_and_vdpa_net()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new(test).or_panic("workdir");
    let sock = dir.join("net.sock");
    let cfg = VdpaNetConfig::new()
        .device(&sock, "reflect")
        .stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), None).or_panic("start vdpa-net");
    let mut front = Testpmd::spawn(
        &TestpmdConfig::frontend("frontend", &sock, fwd)
            .tx_first()
            .duration(RUN),
        dir.path(),
    )
    .or_panic("testpmd");
    let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let fp = f.port(0).or_panic_opt("testpmd port 0");
    let c = vdpa.device_counters(&last, &sock);
    assert!(
        fp.tx_packets > 32 && fp.rx_packets > 32,
        "the loop did not run: {fp:?}\n{}",
        f.log
    );
    eprintln!(
        "testpmd tx {} rx {}; vdpa-net rx {} tx {}",
        fp.tx_packets, fp.rx_packets, c.rx_packets, c.tx_packets
    );
    // Driver to device: every frame testpmd counted as sent was made
    // available before it stopped the ring, and the device processes what is
    // available before answering GET_VRING_BASE: exact.
    assert_eq!(
        c.rx_packets, fp.tx_packets,
        "testpmd sent {} but vdpa-net received {}; final stats {last}",
        fp.tx_packets, c.rx_packets
    );
    // Device to driver: frames the device reflected into the receive ring
    // after testpmd stopped reading it are never counted by testpmd. That
    // can only be frames in buffers the driver had posted, so at most one
    // receive ring's worth.
    assert!(
        c.tx_packets >= fp.rx_packets && c.tx_packets - fp.rx_packets <= RING_SIZE,
        "testpmd received {} but vdpa-net sent {}; final stats {last}",
        fp.rx_packets,
        c.tx_packets
    );
    assert_eq!(c.errors, 0, "final stats {last}");
}

#[test]
fn test_reflect_loop_with_testpmd_io_forwarding() {
    reflect_loop("test_reflect_loop_with_testpmd_io_forwarding", "io");
}

#[test]
fn test_reflect_loop_with_testpmd_macswap() {
    reflect_loop("test_reflect_loop_with_testpmd_macswap", "macswap");
}

#[test]
fn test_two_devices_in_one_process_count_separately() {
    let test = "test_two_devices_in_one_process_count_separately";
    let Some(_) = ready(test, need_testpmd_and_vdpa_net()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vdpa-two").or_panic("workdir");
    let a = dir.join("a.sock");
    let b = dir.join("b.sock");
    let cfg = VdpaNetConfig::new()
        .device(&a, "sink")
        .device(&b, "sink")
        .mac("52:54:00:00:00:0b")
        .stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), None).or_panic("start vdpa-net");
    let mut front = Testpmd::spawn(
        &txonly("frontend", &a).vdevs(vec![virtio_user_vdev(0, &a, 1), virtio_user_vdev(1, &b, 1)]),
        dir.path(),
    )
    .or_panic("testpmd");
    let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let sent_a = f.port(0).or_panic_opt("testpmd port 0").tx_packets;
    let sent_b = f.port(1).or_panic_opt("testpmd port 1").tx_packets;
    assert!(sent_a > 0 && sent_b > 0);
    let ca = counters(find_device(&last, &a).or_panic_opt("device a in stats"));
    let cb = counters(find_device(&last, &b).or_panic_opt("device b in stats"));
    assert_eq!((ca.rx_packets, cb.rx_packets), (sent_a, sent_b), "{last}");
    // The MAC is not checked here: DPDK 22.11's virtio_user does not read the
    // config space of a vhost-user backend (it picks a random MAC for net_vhost
    // as well), and QEMU 7.2 sets its own.
}

#[test]
fn test_frontend_reconnects_after_testpmd_exit() {
    let test = "test_frontend_reconnects_after_testpmd_exit";
    let Some(_) = ready(test, need_testpmd_and_vdpa_net()) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vdpa-reconnect").or_panic("workdir");
    let sock = dir.join("net.sock");
    let cfg = VdpaNetConfig::new().device(&sock, "sink").stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), None).or_panic("start vdpa-net");
    let mut total = 0;
    for round in 0..2 {
        let mut front = Testpmd::spawn(
            &txonly(&format!("frontend{round}"), &sock).duration(Duration::from_secs(3)),
            dir.path(),
        )
        .or_panic("testpmd");
        if round == 0 {
            // The first frontend dies without a goodbye.
            front
                .wait_samples(0, 2, Duration::from_secs(30))
                .or_panic("traffic");
            front.proc_mut().kill();
        } else {
            let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
            total = f.port(0).or_panic_opt("testpmd port 0").tx_packets;
        }
        vdpa.check_running("a frontend to leave")
            .or_panic("vdpa-net survives");
    }
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let c = vdpa.device_counters(&last, &sock);
    assert!(total > 0);
    assert!(
        c.rx_packets >= total,
        "the second frontend's packets are not all counted: {last}"
    );
}

#[test]
fn test_testpmd_frames_reach_a_tap_in_a_netns() {
    let test = "test_testpmd_frames_reach_a_tap_in_a_netns";
    let Some(_) = ready(test, need_testpmd_and_vdpa_net().and_then(|_| Netns::new())) else {
        return;
    };
    let _lock = heavy_lock().or_panic("heavy lock");
    let dir = WorkDir::new("vdpa-tap").or_panic("workdir");
    let ns = Netns::new().or_panic("netns");
    let sock = dir.join("net.sock");
    let cfg = VdpaNetConfig::new()
        .device(&sock, "tap=vtap0")
        .stats_interval(1);
    let mut vdpa = VdpaNet::spawn(&cfg, dir.path(), Some(&ns)).or_panic("start vdpa-net");
    ns.wait_link("vtap0", common::SETUP_TIMEOUT).or_panic("tap");
    ns.addr_up("vtap0", "10.0.7.1/24")
        .or_panic("address the tap");
    let mut front = Testpmd::spawn(&txonly("frontend", &sock), dir.path()).or_panic("testpmd");
    let f = front.finish(STOP_TIMEOUT).or_panic("testpmd run");
    let tap = ns.link_stats("vtap0").or_panic("tap counters");
    let last = vdpa.stop(STOP_TIMEOUT).or_panic("stop vdpa-net");
    let sent = f.port(0).or_panic_opt("testpmd port 0").tx_packets;
    let c = vdpa.device_counters(&last, &sock);
    assert!(sent > 0);
    assert_eq!(c.rx_packets, sent, "{last}");
    assert!(tap.rx_packets > 0, "nothing reached the tap: {tap:?}");
    assert_eq!(
        tap.rx_packets + c.drops,
        c.rx_packets,
        "every frame reaches the tap or is counted as a drop: {tap:?} {last}"
    );
}
