//! The README's first command: the quickstart runs to completion, exits 0
//! and prints a transcript that shows the steps that matter.

use std::process::Command;
use std::time::Duration;

use ioasis_integration::bins::workspace_example;
use ioasis_integration::process::{Output, Proc};
use ioasis_integration::{ready, OrPanic, WorkDir};

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
        "quickstart failed ({status}):\n{}",
        p.log_tail()
    );
    let lower = out.to_lowercase();
    assert!(!lower.contains("check failed"), "{out}");
    for word in ["fault", "unmap"] {
        assert!(
            lower.contains(word),
            "transcript does not mention {word}:\n{out}"
        );
    }
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(last.contains("OK"), "last line is not a success: {last:?}");
}
