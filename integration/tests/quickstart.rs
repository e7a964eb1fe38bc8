//! The README's first command: the quickstart runs to completion, exits 0
//! and prints a transcript whose figures show the whole system at work:
//! every frame sent through net0 came back and was copied and checksummed
//! by sva0, every page fault raised was answered, no device wrote into the
//! frame area after its unmap returned, and both devices lost their
//! translations for it.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use ioasis_integration::bins::workspace_example;
use ioasis_integration::process::{Output, Proc};
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
    // The frame area, poisoned right after the unmap returned while both
    // devices had writes to it in flight, is untouched (1 MiB).
    assert_eq!(get("poison intact bytes"), 1 << 20, "{out}");
    let _ = get("writes stopped by unmap");
    assert!(out.contains("IOTLB miss"), "{out}");
    assert!(out.contains("status 0x03"), "{out}");
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
