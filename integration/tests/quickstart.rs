//! The README's first command: the quickstart runs to completion, exits 0
//! and prints a transcript whose figures show the whole system at work:
//! every frame sent through net0 came back and was copied and checksummed
//! by sva0, every page fault raised was answered, both devices had writes
//! into the frame area in flight when it was unmapped, none of them wrote
//! there after the unmap returned, and both lost their translations for it.
//! And the check behind "none wrote after the unmap returned" catches a
//! device that does.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use ioasis_integration::bins::{workspace_example, workspace_example_with};
use ioasis_integration::process::{read_lossy, Output, Proc};
use ioasis_integration::{ready, OrPanic, WorkDir};

/// The `summary` block of the transcript: `name    value` lines.
fn summary(out: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let Some((_, block)) = out.split_once("\nsummary\n") else {
        return m;
    };
    for line in block.lines().take(64) {
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.rsplit_once(char::is_whitespace) {
            if let Ok(v) = v.parse::<u64>() {
                m.insert(k.trim().to_string(), v);
            }
        }
    }
    m
}

/// The quickstart's transcript and summary. Its check that no device wrote
/// after the unmap returned is shown to fail on such a write by
/// `test_quickstart_catches_a_late_device_write`; the in-flight assertions
/// rejected a run of an earlier layout of the step, in which the thread
/// issuing the unmap waited until sva0 had done all its fills (release
/// build on a loaded machine: "issued with 256 net0 and 0 sva0 writes in
/// flight").
#[test]
fn test_quickstart_transcript() {
    let test = "test_quickstart_transcript";
    let Some(exe) = ready(test, workspace_example("ioasis-examples", "quickstart")) else {
        return;
    };
    let dir = WorkDir::new("quickstart").or_panic("workdir");
    let mut p = Proc::spawn(
        "quickstart",
        &mut Command::new(&exe),
        dir.path(),
        Output::Split,
    )
    .or_panic("start the quickstart");
    let status = p
        .wait_timeout(Duration::from_secs(300))
        .or_panic("quickstart to finish");
    let out = p.stdout_text();
    assert!(
        status.success(),
        "quickstart failed ({status}):\n{out}\n{}",
        p.log_tail()
    );
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert_eq!(last.trim(), "quickstart: OK", "{out}");

    let s = summary(&out);
    let get = |k: &str| -> u64 {
        *s.get(k)
            .unwrap_or_else(|| panic!("summary has no {k:?}:\n{out}"))
    };
    let sent = get("packets sent");
    assert!(sent > 0, "{out}");
    for k in [
        "packets received",
        "net0 rx_packets",
        "net0 tx_packets",
        "frames copied",
        "crc32c verified",
    ] {
        assert_eq!(get(k), sent, "{k} differs from packets sent:\n{out}");
    }
    assert!(get("bytes sent") >= 60 * sent, "{out}");
    assert_eq!(get("bytes received"), get("bytes sent"), "{out}");
    let raised = get("faults raised");
    assert!(raised > 0, "no page fault was raised:\n{out}");
    assert_eq!(get("faults answered"), raised, "{out}");
    assert!(get("lazy copies") > 0, "{out}");
    // One per device: net0's IOTLB miss and sva0's page fault after unmap.
    assert_eq!(get("invalidations observed"), 2, "{out}");
    // The unmap raced both devices: each had writes into the frame area
    // submitted and not completed when it was issued, and the unmap stopped
    // some (sva0's 256 MiB of work outlasts it).
    assert!(get("net0 writes in flight at unmap") > 0, "{out}");
    assert!(get("sva0 writes in flight at unmap") > 0, "{out}");
    assert!(get("writes stopped by unmap") > 0, "{out}");
    // And none wrote after it returned: the whole area (1 MiB) holds
    // exactly the stamped writes completed by then.
    assert_eq!(get("late device writes"), 0, "{out}");
    assert_eq!(get("frame area bytes checked"), 1 << 20, "{out}");
    assert!(out.contains("IOTLB miss"), "{out}");
    assert!(out.contains("status 0x03"), "{out}");
}

/// The quickstart's unmap check fails when a device writes into the frame
/// area after IOAS_UNMAP returned, for either device: the quickstart built
/// with the test-only `fault-injection` feature (example
/// `quickstart-fault-injection`), with `IOASIS_FAULT_LATE_WRITE=<device>:500`,
/// has that device write once through a host pointer 500 ms after the
/// access section that translated it ended (net0: a later frame into an
/// earlier receive buffer; sva0: a fill's pattern over the next area fill's
/// destination), and must exit 1 naming the stamp it found. 500 ms is far
/// longer than the unmap takes (at most 100 ms in the debug runs here), so
/// the write lands after it returned.
///
/// By hand, with delays of 0, 2, 20, 200 and 500 ms: every run whose
/// write landed after the unmap returned failed. With 0 or 2 ms net0's
/// write sometimes landed before the driver even issued the unmap
/// (timestamps showed it 4 ms before), a later frame overwrote it, and the
/// run passed: rightly, that write was not a late one.
///
/// ```text
/// $ cargo build -p ioasis-examples --features fault-injection --example quickstart-fault-injection
/// $ IOASIS_FAULT_LATE_WRITE=net0:200 target/debug/examples/quickstart-fault-injection
/// quickstart FAILED: a device wrote into the frame area after IOAS_UNMAP returned: stamp
///   frame 10241 (net0, receive buffer 0) at 0x1010001a (450 bytes differ from the replay of the
///   264 writes completed when it returned, which left frame 10240 (net0, receive buffer 0) there)
/// $ IOASIS_FAULT_LATE_WRITE=sva0:200 target/debug/examples/quickstart-fault-injection
/// quickstart FAILED: a device wrote into the frame area after IOAS_UNMAP returned: stamp
///   0x53544d5000000000 (sva0 fill 0.0) at 0x10181000 (512 bytes differ from the replay of the
///   772 writes completed when it returned, which left 0x53544d5000000001 (sva0 fill 0.1) there)
/// ```
#[test]
fn test_quickstart_catches_a_late_device_write() {
    let test = "test_quickstart_catches_a_late_device_write";
    let Some(exe) = ready(
        test,
        workspace_example_with(
            "ioasis-examples",
            "quickstart-fault-injection",
            "fault-injection",
        ),
    ) else {
        return;
    };
    for (dev, stamp) in [("net0", "(net0, receive buffer"), ("sva0", "(sva0 fill")] {
        let dir = WorkDir::new(&format!("quickstart-late-{dev}")).or_panic("workdir");
        let mut p = Proc::spawn(
            &format!("quickstart-late-{dev}"),
            Command::new(&exe).env("IOASIS_FAULT_LATE_WRITE", format!("{dev}:500")),
            dir.path(),
            Output::Split,
        )
        .or_panic("start the quickstart");
        let status = p
            .wait_timeout(Duration::from_secs(300))
            .or_panic("quickstart to finish");
        let out = p.stdout_text();
        let err = read_lossy(p.stderr_path());
        assert!(
            out.contains(&format!("FAULT INJECTION: {dev} will write")),
            "{dev}: the late write was not armed:\n{out}\n{err}"
        );
        assert_eq!(
            status.code(),
            Some(1),
            "{dev}: a late write must fail the quickstart:\n{out}\n{err}"
        );
        let want = "quickstart FAILED: a device wrote into the frame area after IOAS_UNMAP \
                    returned: stamp ";
        let line = err
            .lines()
            .find(|l| l.starts_with(want))
            .unwrap_or_else(|| panic!("{dev}: no {want:?} in stderr:\n{out}\n{err}"));
        assert!(line.contains(stamp), "{dev}: {line}");
    }
}

/// The in-process tour of iommu-core that the README points to.
#[test]
fn test_iommu_walkthrough_runs() {
    let test = "test_iommu_walkthrough_runs";
    let Some(exe) = ready(
        test,
        workspace_example("ioasis-examples", "iommu-walkthrough"),
    ) else {
        return;
    };
    let dir = WorkDir::new("iommu-walkthrough").or_panic("workdir");
    let mut p = Proc::spawn(
        "iommu-walkthrough",
        &mut Command::new(&exe),
        dir.path(),
        Output::Split,
    )
    .or_panic("start the walkthrough");
    let status = p
        .wait_timeout(Duration::from_secs(120))
        .or_panic("walkthrough to finish");
    let out = p.stdout_text();
    assert!(
        status.success(),
        "walkthrough failed ({status}):\n{out}\n{}",
        p.log_tail()
    );
    assert!(out.trim_end().ends_with("iommu-walkthrough: OK"), "{out}");
}

#[test]
fn test_summary_parser() {
    let out =
        "x\n\nsummary\n    packets sent            5\n    faults raised  2\n\nquickstart: OK\n";
    let s = summary(out);
    assert_eq!(s.get("packets sent"), Some(&5));
    assert_eq!(s.get("faults raised"), Some(&2));
    assert_eq!(s.len(), 2);
}
